//! The `leader` command's exit statuses, one by one, against real stores (and closed
//! loopback ports for unreachable ones), its one-line errors, and the log lines of `run`.

mod common;

use std::time::Duration;

use common::{eventually, finish, leader, leader_logging};
use leader_testkit::{RedisOptions, RedisServer, etcd, free_port, redis, unique};

/// What every error line must be: one line, prefixed, the password kept back, no Debug
/// dump of a library type, the cause said once.
fn one_clean_line(stderr: &str, context: &str) {
    assert_eq!(stderr.trim_end().lines().count(), 1, "{context}: {stderr}");
    assert!(stderr.starts_with("leader: "), "{context}: {stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "{context}: password leaked: {stderr}"
    );
    for dump in ["tonic::", "Os {", "kind:", "ConnectError("] {
        assert!(!stderr.contains(dump), "{context}: a Debug dump: {stderr}");
    }
    let refused = stderr.to_lowercase().matches("refused").count();
    assert!(refused <= 2, "{context}: said more than once: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_status_3_with_its_address_on_one_line() {
    let port = free_port().expect("a free port");
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!("redis://u:hunter2@127.0.0.1:{port}/0"),
        format!("etcd://127.0.0.1:{port}"),
        format!("postgres://postgres:hunter2@127.0.0.1:{port}/postgres"),
    ] {
        for args in [
            vec!["who", "--store", &url, "jobs"],
            vec!["observe", "--store", &url, "jobs"],
            vec!["run", "--store", &url, "--name", "jobs", "--", "true"],
        ] {
            let context = format!("{args:?}");
            let (code, stdout, stderr) = finish(leader(&args)).await;
            assert_eq!(code, Some(3), "{context}: {stderr}");
            assert!(stdout.is_empty(), "{context}: {stdout}");
            one_clean_line(&stderr, &context);
            assert!(
                stderr.contains(&format!("127.0.0.1:{port}")),
                "{context}: the address: {stderr}"
            );
            assert_eq!(
                stderr.to_lowercase().matches("connection refused").count(),
                1,
                "{context}: the cause once: {stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_status_3_and_say_what_to_check() {
    let server = RedisServer::start_with(RedisOptions {
        config: vec!["requirepass sekret-pass".to_owned()],
        ..RedisOptions::default()
    })
    .expect("redis-server");
    let wrong = format!("redis://default:hunter2@{}", server.addr());
    let none = format!("redis://{}", server.addr());
    for url in [&wrong, &none] {
        for args in [
            vec!["who", "--store", url, "jobs"],
            vec!["run", "--store", url, "--name", "jobs", "--", "true"],
        ] {
            let context = format!("{args:?}");
            let (code, _, stderr) = finish(leader(&args)).await;
            assert_eq!(code, Some(3), "{context}: {stderr}");
            one_clean_line(&stderr, &context);
            assert!(stderr.contains("credentials"), "{context}: {stderr}");
        }
    }
    // The right password: nobody leads.
    let right = format!("redis://default:sekret-pass@{}", server.addr());
    let (code, _, stderr) = finish(leader(&["who", "--store", &right, "jobs"])).await;
    assert_eq!(code, Some(1), "{stderr}");
}

#[tokio::test]
async fn an_unknown_scheme_is_named_with_the_schemes_this_build_has() {
    for url in ["foo://x", "zk://u:hunter2@127.0.0.1:2181"] {
        let (code, _, stderr) = finish(leader(&["who", "--store", url, "jobs"])).await;
        assert_eq!(code, Some(2), "{stderr}");
        one_clean_line(&stderr, url);
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
        assert!(
            stderr.contains(&format!("unknown scheme `{scheme}://`")),
            "{stderr}"
        );
        for known in ["etcd://", "redis://", "rediss://", "postgres://"] {
            assert!(stderr.contains(known), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_is_0_with_a_leader_and_1_without() {
    let server = redis().await;
    let name = unique("who");
    let (code, stdout, _) = finish(leader(&["who", "--store", &server.url(), &name])).await;
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    // run's command asks who leads: itself.
    let (code, stdout, stderr) = finish(leader(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--value",
        "me",
        "--",
        common::BIN,
        "who",
        "--store",
        &server.url(),
        &name,
    ]))
    .await;
    assert_eq!((code, stdout.trim()), (Some(0), "me"), "{stderr}");
}

/// `--once`: the term lost (its key deleted by an operator) is exit 1, after the command
/// was stopped; every step is one log line at info, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_exits_1_when_the_key_is_deleted_and_logs_each_step() {
    let server = etcd().await;
    let addr = server.client_addr(0);
    let name = unique("once");
    let dir = tempfile::tempdir().expect("tempdir");
    let started = dir.path().join("started");
    let script = format!("touch {}; exec sleep 300", started.display());
    let store = format!("etcd://{addr}");
    let run = tokio::spawn(finish(leader_logging(&[
        "run", "--store", &store, "--name", &name, "--ttl", "5s", "--grace", "300ms", "--once",
        "--", "sh", "-c", &script,
    ])));
    eventually("the command", Duration::from_secs(15), || started.exists()).await;
    let mut client = leader::etcd::etcd_client::Client::connect([addr.to_string()], None)
        .await
        .expect("etcd client");
    client
        .delete(
            format!("{name}/"),
            Some(leader::etcd::etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("delete the leader's key");
    let (code, _, stderr) = run.await.expect("joined");
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let step = |needle: &str| {
        lines
            .iter()
            .position(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stderr}"))
    };
    let order = [
        step("waiting to be elected"),
        step("INFO elected "),
        step("started the command"),
        step("the term ended"),
        step("signalled the command's process group"),
        step("the command was ended by a signal"),
        step("lost the election (--once)"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "{order:?}\n{stderr}"
    );
    let ended = lines[step("the term ended")];
    assert!(ended.contains("key deleted"), "{ended}");
    assert!(
        lines[step("started the command")].contains("pid="),
        "{stderr}"
    );
    assert!(
        lines[step("INFO elected ")].contains("fencing_token="),
        "{stderr}"
    );
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_logs_json_lines_and_nothing_with_quiet() {
    let server = redis().await;
    let name = unique("json");
    let (code, _, stderr) = finish(leader_logging(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--log-format",
        "json",
        "--",
        "true",
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let messages: Vec<String> = stderr
        .lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            value["message"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    for wanted in [
        "waiting to be elected",
        "elected",
        "the command exited",
        "resigned",
    ] {
        assert!(
            messages.iter().any(|m| m == wanted),
            "{wanted}: {messages:?}"
        );
    }
    let (code, _, stderr) = finish(leader_logging(&[
        "run",
        "--store",
        &server.url(),
        "--name",
        &name,
        "--quiet",
        "--",
        "sh",
        "-c",
        "exit 4",
    ]))
    .await;
    assert_eq!((code, stderr.as_str()), (Some(4), ""));
}

#[tokio::test]
async fn check_is_0_for_safe_settings_and_2_naming_the_rule() {
    let (code, stdout, _) = finish(leader(&["check", "--ttl", "10s", "--grace", "2s"])).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("failover after a crash: at most 10s"),
        "{stdout}"
    );
    assert!(stdout.contains("is gone by 9s 800ms"), "{stdout}");
    assert!(
        stdout.contains("margin left for clock drift: 200ms"),
        "{stdout}"
    );
    let (code, stdout, stderr) = finish(leader(&["check", "--ttl", "4s", "--grace", "2s"])).await;
    assert_eq!(code, Some(2), "{stdout}");
    assert!(stderr.contains("rule: margin < TTL/2"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, _, stderr) =
        finish(leader(&["check", "--ttl", "10s", "--safety-margin", "0s"])).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("above zero"), "{stderr}");
    // run refuses what check refuses, before touching the store.
    let (code, _, stderr) = finish(leader(&[
        "run",
        "--store",
        "redis://127.0.0.1:1",
        "--name",
        "x",
        "--ttl",
        "4s",
        "--",
        "true",
    ]))
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("margin < TTL/2"), "{stderr}");
}
