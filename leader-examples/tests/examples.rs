//! Runs the example binaries against real etcd and redis-server processes and checks what
//! they print.

use std::process::Stdio;
use std::time::Duration;

use leader_testkit::{EtcdServer, LineProcess, PostgresServer, RedisServer, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;

/// The store an example runs against, kept alive for the test.
enum Store {
    Etcd(EtcdServer),
    Redis(RedisServer),
    Postgres(PostgresServer),
}

impl Store {
    async fn start(backend: &str) -> Store {
        let backend = backend.to_owned();
        tokio::task::spawn_blocking(move || match backend.as_str() {
            "etcd" => Store::Etcd(EtcdServer::start().expect("etcd starts")),
            "postgres" => Store::Postgres(PostgresServer::start().expect("postgres starts")),
            _ => Store::Redis(RedisServer::start().expect("redis-server starts")),
        })
        .await
        .expect("start task")
    }

    fn command(&self, example: &str) -> Command {
        let exe = std::env::current_exe().expect("test binary path");
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target dir")
            .join("examples");
        let mut command = Command::new(dir.join(example));
        command
            .env(
                "LEADER_ELECTION",
                format!("{example}-{:08x}", rand_suffix()),
            )
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        match self {
            Store::Etcd(server) => {
                command.env("LEADER_STORE", format!("etcd://{}", server.client_addr(0)))
            }
            Store::Redis(server) => command.env("LEADER_STORE", server.url()),
            Store::Postgres(server) => command.env("LEADER_STORE", server.url()),
        };
        command
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id()
}

/// A running example.
struct Running(LineProcess);

impl Running {
    fn spawn(mut command: Command) -> Running {
        Running(LineProcess::spawn(&mut command).expect("example starts (built by cargo test)"))
    }

    async fn next_line(&mut self, limit: Duration) -> Option<String> {
        self.0.next_line(limit).await
    }

    fn signal(&self, signal: &str) {
        self.0.signal(signal).expect("signal delivered");
    }

    async fn exit_ok(&mut self, limit: Duration) {
        let status = self.0.wait(limit).await.expect("the example exits in time");
        assert!(status.success(), "exit status {status}");
    }
}

/// `GET /` on `port`, returning the body.
async fn get(port: u16) -> Option<String> {
    get_path(port, "/").await.map(|(_, body)| body)
}

/// `GET path` on `port`, returning the status line and the body.
async fn get_path(port: u16, path: &str) -> Option<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

async fn server_prints_true_then_false(backend: &str) {
    let store = Store::start(backend).await;
    let port = free_port().expect("free port");
    let mut command = store.command("server");
    command.env("PORT", port.to_string());
    let mut server = Running::spawn(command);
    // While it serves, `/` says it leads.
    let start = Instant::now();
    let mut answered = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(body) = get(port).await
            && body == "I am leader"
        {
            answered = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered.as_deref(), Some("I am leader"));
    // The leader probe says so too, with the term's fencing token.
    let (status_line, body) = get_path(port, "/leader").await.expect("the probe answers");
    assert!(status_line.contains(" 200 "), "{status_line}");
    assert!(
        body.starts_with(r#"{"leader":true,"fencingToken":"#),
        "{body}"
    );
    server.exit_ok(Duration::from_secs(20)).await;
    let mut output = Vec::new();
    while let Some(line) = server.next_line(Duration::from_secs(1)).await {
        output.push(line);
    }
    assert_eq!(output, ["true", "false"], "the whole stdout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_example_on_etcd() {
    server_prints_true_then_false("etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_example_on_redis() {
    server_prints_true_then_false("redis").await;
}

async fn cronjob_works_on_the_leader_only(backend: &str) {
    cron_example_works_on_the_leader_only(backend, "cronjob").await;
}

async fn cron_example_works_on_the_leader_only(backend: &str, example: &str) {
    let store = Store::start(backend).await;
    let election = format!("{example}-{:08x}", rand_suffix());
    let mut first = store.command(example);
    first.env("LEADER_ELECTION", &election);
    let mut a = Running::spawn(first);
    assert_eq!(
        a.next_line(Duration::from_secs(15)).await.as_deref(),
        Some("do work as leader")
    );
    let mut second = store.command(example);
    second.env("LEADER_ELECTION", &election);
    let mut b = Running::spawn(second);
    // Every firing while both run: the leader works, the follower never does (checked at
    // each firing, not once).
    for firing in 0..4 {
        assert_eq!(
            a.next_line(Duration::from_secs(5)).await.as_deref(),
            Some("do work as leader"),
            "firing {firing} on the leader"
        );
        assert_eq!(
            b.0.try_line(),
            None,
            "the follower worked at firing {firing}"
        );
    }
    // The leader stops on SIGTERM, resigning; it does no more work, and the follower takes
    // over and works at every firing from then on.
    a.signal("TERM");
    a.exit_ok(Duration::from_secs(10)).await;
    while let Some(line) = a.0.try_line() {
        assert_eq!(
            line, "do work as leader",
            "the leader printed only its work"
        );
    }
    for firing in 0..3 {
        assert_eq!(
            b.next_line(Duration::from_secs(10)).await.as_deref(),
            Some("do work as leader"),
            "firing {firing} on the new leader"
        );
    }
    b.signal("TERM");
    b.exit_ok(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjob_example_on_etcd() {
    cronjob_works_on_the_leader_only("etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjob_example_on_redis() {
    cronjob_works_on_the_leader_only("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjob_own_loop_example_on_redis() {
    cron_example_works_on_the_leader_only("redis", "cronjob_own_loop").await;
}

async fn failover_demo_runs(backend: &str) {
    let store = Store::start(backend).await;
    let mut command = store.command("failover");
    command.args(["--ttl", "1"]);
    let mut demo = Running::spawn(command);
    demo.exit_ok(Duration::from_secs(60)).await;
    let mut output = Vec::new();
    while let Some(line) = demo.next_line(Duration::from_secs(1)).await {
        output.push(line);
    }
    let text = output.join("\n");
    for expected in [
        "SIGKILL candidate",
        "failover took",
        "SIGTERM candidate",
        "handoff took",
        "strictly increasing",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_demo_on_etcd() {
    failover_demo_runs("etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_demo_on_redis() {
    failover_demo_runs("redis").await;
}

/// A leader frozen with SIGSTOP past its deadline, then resumed: its write is refused by
/// the PostgreSQL fence, the new leader's lands, and only that one is in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_refuses_the_stale_leaders_write_on_postgres() {
    let store = Store::start("postgres").await;
    let mut demo = Running::spawn(store.command("fenced_writes"));
    let mut output = Vec::new();
    while let Some(line) = demo.next_line(Duration::from_secs(30)).await {
        output.push(line);
    }
    demo.exit_ok(Duration::from_secs(10)).await;
    let said = output.join("\n");
    println!("{said}");
    let a_token = output
        .iter()
        .find_map(|l| l.strip_prefix("A: elected with fencing token "))
        .unwrap_or_else(|| panic!("A was never elected:\n{said}"));
    let b_token = output
        .iter()
        .find_map(|l| l.strip_prefix("B: elected with fencing token "))
        .unwrap_or_else(|| panic!("B was never elected:\n{said}"));
    assert!(
        a_token.parse::<u64>().expect("a token") < b_token.parse::<u64>().expect("a token"),
        "{said}"
    );
    assert!(
        said.contains(&format!("B: write with token {b_token} landed")),
        "{said}"
    );
    assert!(
        said.contains(&format!("A: write with token {a_token} refused: fenced")),
        "{said}"
    );
    assert!(
        output
            .last()
            .is_some_and(|l| l == &format!("writes in the table: B (token {b_token})")),
        "{said}"
    );
}
