//! etcd-specific behaviour against real etcd processes: interop with `etcdctl elect`, lease
//! loss, server restarts, and member failures in a 3-member cluster.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TTL, harness};
use leader_core::testing::conformance::{
    next_event, spawn_campaign, spawn_run, wait_until, within,
};
use leader_core::{CancellationToken, Election, Event, LossReason};
use leader_etcd::EtcdDriver;
use leader_testkit::{EtcdServer, LineProcess};
use tokio::process::Command;
use tokio::time::Instant;

fn unique(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

fn election(driver: EtcdDriver, name: &str, value: &str) -> Election {
    Election::builder(driver, name)
        .ttl(TTL)
        .value(value)
        .retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("valid settings")
}

/// Every key under `prefix`.
async fn keys_under(kv: &mut etcd_client::Client, prefix: String) -> etcd_client::GetResponse {
    kv.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get")
}

/// An `etcdctl` process.
struct Etcdctl(LineProcess);

impl Etcdctl {
    fn spawn(endpoint: &str, args: &[&str]) -> Self {
        leader_testkit::require_binary("etcdctl", "etcd-client").expect("etcdctl installed");
        let process = LineProcess::spawn(
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(args)
                .stderr(Stdio::null()),
        )
        .expect("etcdctl starts");
        Etcdctl(process)
    }

    /// Waits for a stdout line equal to `expected`.
    async fn wait_line(&mut self, expected: &str, limit: Duration) {
        self.0
            .wait_for_line(limit, |line| line == expected)
            .await
            .unwrap_or_else(|err| panic!("etcdctl did not print {expected:?}: {err}"));
    }

    fn interrupt(&self) {
        self.0.signal("INT").expect("SIGINT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_etcdctl_share_one_election_both_ways() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("interop");
    let rust = election(h.driver_at(endpoint.clone()).await, &name, "rust-leader");

    // 1. Rust leads; etcdctl elect -l sees its value; etcdctl elect waits behind it.
    let rust_term = rust.campaign().await.expect("rust elected");
    let mut listener = Etcdctl::spawn(&endpoint, &["elect", "-l", &name]);
    listener
        .wait_line("rust-leader", Duration::from_secs(10))
        .await;
    let mut contender = Etcdctl::spawn(&endpoint, &["elect", &name, "etcdctl-leader"]);
    let waited = tokio::time::timeout(
        Duration::from_millis(1500),
        contender.wait_line("etcdctl-leader", Duration::from_secs(10)),
    )
    .await;
    assert!(
        waited.is_err(),
        "etcdctl must wait while the Rust candidate leads"
    );

    // 2. Rust resigns: etcdctl leads, and everyone sees its value.
    rust.resign().await.expect("resign");
    contender
        .wait_line("etcdctl-leader", Duration::from_secs(5))
        .await;
    listener
        .wait_line("etcdctl-leader", Duration::from_secs(5))
        .await;
    let info = rust.leader().await.expect("leader()").expect("a leader");
    assert_eq!(info.value, b"etcdctl-leader");
    assert!(info.fencing_token > rust_term.fencing_token());

    // 3. Rust campaigns and waits behind etcdctl; etcdctl resigns on SIGINT; Rust leads.
    let waiter = spawn_campaign(&rust);
    let mut kv = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    within(
        "the Rust candidate's key behind etcdctl's",
        Duration::from_secs(5),
        async {
            while keys_under(&mut kv, format!("{name}/")).await.kvs().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
    assert!(!waiter.is_finished(), "Rust waits while etcdctl leads");
    contender.interrupt();
    let term = within(
        "the Rust candidate's takeover",
        Duration::from_secs(5),
        waiter,
    )
    .await
    .expect("campaign task")
    .expect("elected");
    assert!(term.fencing_token() > info.fencing_token);
    listener
        .wait_line("rust-leader", Duration::from_secs(5))
        .await;
    rust.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_without_prefix_uses_etcdctls_keys_and_prefix_is_applied() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("keys");
    let plain = h.driver_at(endpoint.clone()).await;
    let client = plain.client().clone();
    let e = election(plain, &name, "v");
    e.campaign().await.expect("elected");
    let mut kv = client.clone();
    let keys = keys_under(&mut kv, format!("{name}/")).await;
    let kv0 = keys.kvs().first().expect("the candidate key exists");
    assert_eq!(
        kv0.key_str().expect("utf-8"),
        format!("{name}/{:x}", kv0.lease()),
        "the key is <name>/<lease hex>, as etcdctl elect makes it"
    );
    e.resign().await.expect("resign");

    let prefixed = EtcdDriver::builder(client.clone()).prefix("svc/").build();
    let p = election(prefixed, &name, "v");
    p.campaign().await.expect("elected");
    let keys = keys_under(&mut kv, format!("svc/{name}/")).await;
    assert_eq!(keys.kvs().len(), 1, "the prefix is applied");
    p.resign().await.expect("resign");
    let left = keys_under(&mut kv, format!("svc/{name}/")).await;
    assert!(left.kvs().is_empty(), "resign leaves nothing behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_behind_the_drivers_back_ends_the_term_and_run_recovers() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("revoked");
    let driver = h.driver_at(endpoint.clone()).await;
    let mut admin = driver.client().clone();
    let e = election(driver, &name, "v");
    let mut events = e.subscribe();
    let stop = CancellationToken::new();
    let run = spawn_run(&e, &stop);
    let first = next_event("elected", Duration::from_secs(5), &mut events).await;
    assert!(first.is_leader());
    let info = e.leader().await.expect("leader()").expect("a leader");
    let lease = i64::from_str_radix(&info.id, 16).expect("the id is the lease in hex");
    admin.lease_revoke(lease).await.expect("revoke");

    let lost = next_event("the loss", TTL * 2, &mut events).await;
    assert!(
        matches!(
            lost,
            Event::Lost {
                reason: LossReason::Gone | LossReason::Expired,
                ..
            }
        ),
        "{lost:?}"
    );
    assert!(!e.status().is_leader());
    let again = next_event(
        "elected again on a new lease",
        Duration::from_secs(10),
        &mut events,
    )
    .await;
    assert!(again.is_leader());
    assert!(again.fencing_token() > first.fencing_token());
    let info = e.leader().await.expect("leader()").expect("a leader");
    assert_ne!(
        i64::from_str_radix(&info.id, 16).ok(),
        Some(lease),
        "a new lease"
    );
    stop.cancel();
    run.await.expect("no panic").expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_ends_the_term_by_its_deadline_and_leadership_returns_with_etcd() {
    let mut h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("restart");
    let e = election(h.driver_at(endpoint).await, &name, "v");
    let mut events = e.subscribe();
    let stop = CancellationToken::new();
    let run = spawn_run(&e, &stop);
    let first = next_event("elected", Duration::from_secs(5), &mut events).await;
    assert!(first.is_leader());

    h.server.kill(0);
    let killed_at = Instant::now();
    // The deadline comes from a keep-alive sent before the kill: by a TTL later, the
    // candidate must not believe it leads, whether or not its tasks have run.
    tokio::time::sleep_until(killed_at + TTL).await;
    assert!(
        !e.status().is_leader(),
        "still leading a TTL after etcd died"
    );
    let lost = next_event("the loss", TTL, &mut events).await;
    assert!(matches!(lost, Event::Lost { .. }), "{lost:?}");

    tokio::task::block_in_place(|| h.server.restart(0).expect("etcd restarts"));
    let again = next_event("elected again", Duration::from_secs(20), &mut events).await;
    assert!(again.is_leader());
    assert!(again.fencing_token() > first.fencing_token());
    stop.cancel();
    within("run to return", Duration::from_secs(10), run)
        .await
        .expect("no panic")
        .expect("clean shutdown: etcd is back, the resignation succeeds");
    drop(h);
}
/// Samples two statuses every millisecond; records whether both ever claimed to lead.
fn watch_overlap(a: &Election, b: &Election, stop: CancellationToken) -> Arc<AtomicBool> {
    let overlap = Arc::new(AtomicBool::new(false));
    let (a, b, seen) = (a.status(), b.status(), Arc::clone(&overlap));
    std::thread::spawn(move || {
        while !stop.is_cancelled() {
            if a.is_leader() && b.is_leader() {
                seen.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    overlap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_member_failures_never_make_two_leaders() {
    let mut server = tokio::task::spawn_blocking(|| EtcdServer::start_cluster(3))
        .await
        .expect("start task")
        .expect("a 3-member etcd cluster starts");
    let endpoints = server.endpoints();
    let name = unique("cluster");
    // a talks to member 0 only; b to members 1 and 2.
    let a_driver = EtcdDriver::connect([endpoints[0].clone()])
        .await
        .expect("connect");
    let b_driver = EtcdDriver::connect([endpoints[1].clone(), endpoints[2].clone()])
        .await
        .expect("connect");
    let a = election(a_driver, &name, "a");
    let b = election(b_driver.clone(), &name, "b");
    let stop = CancellationToken::new();
    let overlap = watch_overlap(&a, &b, stop.clone());
    let a_run = spawn_run(&a, &stop);
    wait_until("a leads", Duration::from_secs(10), || {
        a.status().is_leader()
    })
    .await;
    let b_run = spawn_run(&b, &stop);

    // Kill the member a is connected to: a steps down, b takes over within TTL + a few s.
    server.kill(0);
    let killed_at = Instant::now();
    wait_until("b takes over", TTL + Duration::from_secs(5), || {
        b.status().is_leader()
    })
    .await;
    assert!(!a.status().is_leader());
    let takeover = killed_at.elapsed();

    // Kill the raft leader among the survivors while b holds the term.
    let mut client = b_driver.client().clone();
    let status = client.status().await.expect("status");
    let members = client.member_list().await.expect("member list");
    let raft_leader = members
        .members()
        .iter()
        .find(|m| m.id() == status.leader())
        .and_then(|m| m.name().strip_prefix('m'))
        .and_then(|i| i.parse::<usize>().ok())
        .expect("the raft leader is a member");
    tokio::task::block_in_place(|| {
        server.restart(0).expect("member 0 rejoins");
        server.kill(raft_leader);
    });
    wait_until(
        "a leader again after the raft leader died",
        TTL + Duration::from_secs(10),
        || a.status().is_leader() || b.status().is_leader(),
    )
    .await;

    stop.cancel();
    assert!(
        !overlap.load(Ordering::SeqCst),
        "two candidates believed they led at the same instant"
    );
    let _ = within("a's run to return", Duration::from_secs(10), a_run).await;
    let _ = within("b's run to return", Duration::from_secs(10), b_run).await;
    drop(server);
    eprintln!("takeover after killing the leader's member: {takeover:?}");
}
