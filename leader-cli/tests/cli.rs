//! The `leader` command against real etcd and redis-server processes: usage errors, the
//! child's environment and exit status, handover on SIGTERM, the child stopped before
//! anyone else is elected when `leader run` is partitioned from the store, the child
//! killed with `leader run`, `who` and `observe`, and `etcdctl elect` interop.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, finish, leader, read};
use leader_testkit::FaultProxy;
use leader_testkit::{LineProcess, etcd, redis, unique};
use tokio::process::Command;
use tokio::time::{Instant, sleep};

/// The keys of election `name` (no prefix) on the etcd at `addr`: one per candidate in line.
async fn keys_in_line(addr: std::net::SocketAddr, name: &str) -> usize {
    use leader::etcd::etcd_client::{Client, GetOptions};
    let mut client = Client::connect([addr.to_string()], None)
        .await
        .expect("etcd client");
    client
        .get(
            format!("{name}/"),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("get")
        .kvs()
        .len()
}

/// Waits until `n` candidates of election `name` are in line, or fails at `limit`.
async fn in_line(addr: std::net::SocketAddr, name: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while keys_in_line(addr, name).await < n {
        assert!(
            Instant::now() < deadline,
            "{n} candidates never stood in line"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bad_flags_and_urls_are_one_line_and_status_2() {
    for args in [
        vec!["run", "--name", "x", "--", "true"],
        vec![
            "run",
            "--store",
            "zk://127.0.0.1:2181",
            "--name",
            "x",
            "--",
            "true",
        ],
        vec!["run", "--store", "etcd://127.0.0.1:1", "--name", "x"],
        vec![
            "run",
            "--store",
            "etcd://127.0.0.1:1",
            "--name",
            "x",
            "--ttl",
            "2s",
            "--grace",
            "1s",
            "--",
            "true",
        ],
        vec![
            "run",
            "--store",
            "etcd://127.0.0.1:1",
            "--name",
            "x",
            "--ttl",
            "soon",
            "--",
            "true",
        ],
        vec!["who", "--store", "redis://u:hunter2@", "x"],
        vec!["who", "x", "redis://u:hunter2@127.0.0.1:6379"],
        vec!["frobnicate"],
        vec![],
    ] {
        let (code, _, stderr) = finish(leader(&args)).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
        assert!(stderr.starts_with("leader: "), "{stderr}");
        assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    }
    let (code, stdout, _) = finish(leader(&["--help"])).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("Examples:"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_child_gets_the_term_in_its_environment_and_its_status_is_passed_through() {
    let server = redis().await;
    let name = unique("env");
    let (code, stdout, stderr) = finish(leader(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--value",
        "10.0.0.7:8080",
        "--",
        "sh",
        "-c",
        "echo \"$LEADER_ELECTION $LEADER_FENCING_TOKEN $LEADER_VALUE\"; exit 3",
    ]))
    .await;
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(stdout.trim(), format!("{name} 1 10.0.0.7:8080"));
    // The command exited, so `leader run` resigned: nobody leads.
    let (code, _, _) = finish(leader(&["who", "--store", &server.url(), &name])).await;
    assert_eq!(code, Some(1), "nobody leads after the command exited");
    // A signal that ends the command is reported as 128 + its number.
    let (code, _, _) = finish(leader(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--",
        "sh",
        "-c",
        "kill -9 $$",
    ]))
    .await;
    assert_eq!(code, Some(128 + 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_command_resigns_and_hands_over_at_once() {
    let server = etcd().await;
    let store = format!("etcd://{}", server.client_addr(0));
    let name = unique("handover");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let child = |who: &str| {
        format!(
            "echo start {who} >> {log}; trap 'echo stop {who} >> {log}; exit 0' TERM; \
             while true; do sleep 0.02; done",
            log = log.display()
        )
    };
    let a_script = child("a");
    let mut a = LineProcess::spawn(&mut leader(&[
        "run", "--store", &store, "--name", &name, "--ttl", "5s", "--", "sh", "-c", &a_script,
    ]))
    .expect("a starts");
    eventually("a's command", Duration::from_secs(10), || {
        read(&log).contains("start a")
    })
    .await;
    let b_script = child("b");
    let mut b = LineProcess::spawn(&mut leader(&[
        "run", "--store", &store, "--name", &name, "--ttl", "5s", "--", "sh", "-c", &b_script,
    ]))
    .expect("b starts");
    // b stands in line behind a: its command has not started.
    in_line(server.client_addr(0), &name, 2, Duration::from_secs(10)).await;
    assert!(
        !read(&log).contains("start b"),
        "b's command started while a led"
    );
    let (code, value, _) = finish(leader(&["who", "--store", &store, &name])).await;
    assert_eq!(code, Some(0));
    assert!(!value.trim().is_empty(), "who names the leader");
    let signalled = Instant::now();
    a.signal("TERM").expect("SIGTERM");
    let status = a.wait(Duration::from_secs(10)).await.expect("a exits");
    assert_eq!(status.code(), Some(0), "a exits with its command's status");
    eventually("b's command", Duration::from_secs(5), || {
        read(&log).contains("start b")
    })
    .await;
    // A resignation, not an expiry: well under the 5 s TTL even on a busy machine.
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "handover took {:?} with a 5 s TTL",
        signalled.elapsed()
    );
    assert_eq!(read(&log), "start a\nstop a\nstart b\n");
    b.signal("TERM").expect("SIGTERM");
    b.wait(Duration::from_secs(10)).await.expect("b exits");
}

/// `leader run` partitioned from the store: its command, and what the command started, are
/// gone before the other machine's command starts, even when they ignore SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_stops_its_command_before_anyone_else_starts() {
    let server = redis().await;
    let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
    let name = unique("partition");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let pids = dir.path().join("pids");
    // a's command ignores SIGTERM and starts a worker that does too.
    let a_script = format!(
        "trap '' TERM; sh -c \"trap '' TERM; sleep 300\" & echo $$ $! > {pids}; \
         echo start a >> {log}; while true; do sleep 0.02; done",
        pids = pids.display(),
        log = log.display()
    );
    // b's command, as it starts, records whether anything of a's is still alive.
    let b_script = format!(
        "for p in $(cat {pids}); do \
           if [ -e /proc/$p ] && ! grep -q ') Z ' /proc/$p/stat; then echo alive $p >> {log}; fi; \
         done; echo start b >> {log}; while true; do sleep 0.02; done",
        pids = pids.display(),
        log = log.display()
    );
    let behind = format!("redis://{}", proxy.addr());
    let _a = LineProcess::spawn(&mut leader(&[
        "run", "--store", &behind, "--name", &name, "--ttl", "3s", "--grace", "500ms", "--", "sh",
        "-c", &a_script,
    ]))
    .expect("a starts");
    eventually("a's command", Duration::from_secs(10), || {
        read(&log).contains("start a")
    })
    .await;
    eventually("a's worker", Duration::from_secs(5), || {
        read(&pids).split_whitespace().count() == 2
    })
    .await;
    let _b = LineProcess::spawn(&mut leader(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--ttl",
        "3s",
        "--grace",
        "500ms",
        "--",
        "sh",
        "-c",
        &b_script,
    ]))
    .expect("b starts");
    proxy.hold();
    eventually("b's command", Duration::from_secs(15), || {
        read(&log).contains("start b")
    })
    .await;
    assert_eq!(
        read(&log),
        "start a\nstart b\n",
        "a's command or its worker was alive when b's started"
    );
}

/// SIGTERM while waiting in line: exit 0, and nothing of this candidate left in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_waiting_withdraws_and_exits_0() {
    let server = etcd().await;
    let addr = server.client_addr(0);
    let store = format!("etcd://{addr}");
    let name = unique("waiting");
    let mut a = LineProcess::spawn(&mut leader(&[
        "run", "--store", &store, "--name", &name, "--", "sleep", "300",
    ]))
    .expect("a starts");
    in_line(addr, &name, 1, Duration::from_secs(10)).await;
    let mut b = LineProcess::spawn(&mut leader(&[
        "run", "--store", &store, "--name", &name, "--", "sleep", "300",
    ]))
    .expect("b starts");
    in_line(addr, &name, 2, Duration::from_secs(10)).await;
    b.signal("TERM").expect("SIGTERM");
    let status = b.wait(Duration::from_secs(10)).await.expect("b exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        keys_in_line(addr, &name).await,
        1,
        "b's place in line was deleted"
    );
    a.signal("TERM").expect("SIGTERM");
    a.wait(Duration::from_secs(10)).await.expect("a exits");
}

/// The command never outlives `leader run`, even when it is SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_dies_with_leader_run() {
    let server = redis().await;
    let name = unique("orphan");
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
    let mut run = LineProcess::spawn(&mut leader(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--",
        "sh",
        "-c",
        &script,
    ]))
    .expect("starts");
    eventually("the command's pid", Duration::from_secs(10), || {
        read(&pid_file).trim().parse::<u32>().is_ok()
    })
    .await;
    let pid: u32 = read(&pid_file).trim().parse().expect("pid");
    let alive = |pid: u32| {
        Path::new(&format!("/proc/{pid}")).exists()
            && !read(Path::new(&format!("/proc/{pid}/stat"))).contains(") Z ")
    };
    assert!(alive(pid));
    run.signal("KILL").expect("SIGKILL");
    let _ = run.wait(Duration::from_secs(5)).await;
    eventually("the command to die", Duration::from_secs(5), || !alive(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_prints_each_change_and_who_the_leader() {
    let server = etcd().await;
    let store = format!("etcd://{}", server.client_addr(0));
    let name = unique("observed");
    let mut observer = LineProcess::spawn(&mut leader(&[
        "observe", "--store", &store, &name, "--json",
    ]))
    .expect("observer starts");
    assert_eq!(
        observer.next_line(Duration::from_secs(10)).await.as_deref(),
        Some(r#"{"leader":null}"#)
    );
    let (code, stdout, _) = finish(leader(&["who", "--store", &store, &name, "--json"])).await;
    assert_eq!((code, stdout.trim()), (Some(1), r#"{"leader":null}"#));
    let mut run = LineProcess::spawn(&mut leader(&[
        "run", "--store", &store, "--name", &name, "--value", "worker-7", "--", "sleep", "300",
    ]))
    .expect("run starts");
    let seen = observer
        .next_line(Duration::from_secs(10))
        .await
        .expect("a change");
    assert!(seen.contains(r#""value":"worker-7""#), "{seen}");
    assert!(seen.contains(r#""fencingToken":"#), "{seen}");
    let (code, stdout, _) = finish(leader(&["who", "--store", &store, &name])).await;
    assert_eq!((code, stdout.trim()), (Some(0), "worker-7"));
    run.signal("TERM").expect("SIGTERM");
    run.wait(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(
        observer.next_line(Duration::from_secs(10)).await.as_deref(),
        Some(r#"{"leader":null}"#)
    );
    observer.signal("TERM").expect("SIGTERM");
    let status = observer.wait(Duration::from_secs(5)).await.expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// With no prefix, `leader run --name jobs` and `etcdctl elect jobs` are one election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_run_and_etcdctl_elect_share_an_election() {
    leader_testkit::require_binary("etcdctl", "etcd-client").expect("etcdctl");
    let server = etcd().await;
    let addr = server.client_addr(0);
    let store = format!("etcd://{addr}");
    let name = unique("jobs");
    let dir = tempfile::tempdir().expect("tempdir");
    let started = dir.path().join("started");
    let script = format!("touch {}; exec sleep 300", started.display());
    let etcdctl = |proposal: &str| {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={addr}"))
            .args(["elect", &name, proposal])
            .kill_on_drop(true);
        c
    };
    // etcdctl leads first: leader run waits and starts nothing.
    let mut first = LineProcess::spawn(&mut etcdctl("first")).expect("etcdctl elect");
    assert!(
        first
            .wait_for_line(Duration::from_secs(10), |l| l == "first")
            .await
            .is_ok()
    );
    let run = LineProcess::spawn(&mut leader(&[
        "run", "--store", &store, "--name", &name, "--", "sh", "-c", &script,
    ]))
    .expect("run starts");
    // leader run stands in line behind etcdctl: its command has not started.
    in_line(addr, &name, 2, Duration::from_secs(10)).await;
    assert!(
        !started.exists(),
        "leader run started its command while etcdctl led"
    );
    first.signal("INT").expect("SIGINT");
    eventually("leader run's command", Duration::from_secs(10), || {
        started.exists()
    })
    .await;
    // Now leader run leads: etcdctl waits until it stops.
    let mut second = LineProcess::spawn(&mut etcdctl("second")).expect("etcdctl elect");
    in_line(addr, &name, 2, Duration::from_secs(10)).await;
    assert_eq!(second.next_line(Duration::from_millis(700)).await, None);
    run.signal("TERM").expect("SIGTERM");
    assert!(
        second
            .wait_for_line(Duration::from_secs(10), |l| l == "second")
            .await
            .is_ok()
    );
    second.signal("INT").expect("SIGINT");
}
