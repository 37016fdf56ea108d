//! Fencing where the leader writes: a leader that is stopped past its deadline and then
//! resumed cannot write any more, because a fence in the same PostgreSQL transaction as the
//! write refuses its stale fencing token.
//!
//! The demo runs leader A as a child process. A is elected, checks `is_leader()` (true),
//! and is about to write when it is frozen with SIGSTOP (a long GC pause, a VM migration).
//! Its lease expires; leader B (this process) is elected and writes. A is resumed with
//! SIGCONT and goes on with the write it had decided to make: the fence refuses it
//! (`Error::Fenced`), and only B's write is in the table.
//!
//! ```text
//! LEADER_STORE=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run -p leader-examples --example fenced_writes
//! ```
//!
//! The election runs on `LEADER_STORE` (any store); the writes go to `FENCE_DATABASE`, a
//! PostgreSQL URL, which defaults to `LEADER_STORE` when that is PostgreSQL.

use std::process::Stdio;
use std::time::Duration;

use leader::Election;
use leader::postgres::Fence;
use leader::postgres::tokio_postgres::{self, Client, NoTls};
use leader_examples::{driver_from_env, exit_with, init_logging};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::timeout;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() {
    init_logging();
    let result = if std::env::args().any(|a| a == "--stale-leader") {
        stale_leader().await
    } else {
        demo().await
    };
    if let Err(err) = result {
        exit_with(err.as_ref());
    }
}

fn election_name() -> String {
    std::env::var("LEADER_ELECTION").unwrap_or_else(|_| "fenced-writes-demo".to_owned())
}

/// The PostgreSQL the writes go to.
fn database_url() -> BoxResult<String> {
    if let Ok(url) = std::env::var("FENCE_DATABASE")
        && !url.is_empty()
    {
        return Ok(url);
    }
    match std::env::var("LEADER_STORE") {
        Ok(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(url),
        _ => Err("set FENCE_DATABASE (or LEADER_STORE) to a postgres:// URL".into()),
    }
}

async fn connect() -> BoxResult<Client> {
    let (client, connection) = tokio_postgres::connect(&database_url()?, NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "database connection closed");
        }
    });
    Ok(client)
}

/// The fence and the table of writes (idempotent).
async fn prepare(client: &Client) -> BoxResult<Fence> {
    let fence = Fence::new(format!("{}-report", election_name()));
    fence.create_table(client).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS fenced_writes_demo (
                 resource      text   NOT NULL,
                 writer        text   NOT NULL,
                 fencing_token bigint NOT NULL
             )",
        )
        .await?;
    Ok(fence)
}

/// One fenced write: the fence check and the write in one transaction.
async fn write(client: &mut Client, fence: &Fence, writer: &str, token: u64) -> leader::Result<()> {
    let tx = client.transaction().await.map_err(leader::Error::store)?;
    fence.check(&tx, token).await?;
    tx.execute(
        "INSERT INTO fenced_writes_demo VALUES ($1, $2, $3)",
        &[
            &fence.resource(),
            &writer,
            &i64::try_from(token).unwrap_or(i64::MAX),
        ],
    )
    .await
    .map_err(leader::Error::store)?;
    tx.commit().await.map_err(leader::Error::store)
}

/// Leader A, the child: elected, checks that it leads, waits for `go` on stdin (it is
/// frozen meanwhile), then writes without looking again, as code that checked a moment
/// ago does.
async fn stale_leader() -> BoxResult<()> {
    let mut client = connect().await?;
    let fence = prepare(&client).await?;
    let election = Election::builder(driver_from_env().await?, election_name())
        .ttl(TTL)
        .value("leader A")
        .build()?;
    let term = election.campaign().await?;
    println!("A: elected with fencing token {}", term.fencing_token());
    println!(
        "A: is_leader() = {}; about to write",
        election.status().is_leader()
    );
    tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await??;
    println!(
        "A: resumed; is_leader() = {} now, but the write was already decided",
        election.status().is_leader()
    );
    match write(&mut client, &fence, "A", term.fencing_token()).await {
        Ok(()) => println!("A: write with token {} landed", term.fencing_token()),
        Err(err @ leader::Error::Fenced { .. }) => {
            println!(
                "A: write with token {} refused: {err}",
                term.fencing_token()
            );
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

fn signal(child: &Child, signal: &str) -> BoxResult<()> {
    let pid = child.id().ok_or("the child has exited")?;
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid} failed: {status}").into())
    }
}

async fn demo() -> BoxResult<()> {
    let mut client = connect().await?;
    let fence = prepare(&client).await?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--stale-leader")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin: ChildStdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    // Relay A's lines until it is about to write.
    loop {
        let line = timeout(TTL * 10, lines.next_line())
            .await?
            .map_err(|err| format!("reading A: {err}"))?
            .ok_or("A exited early")?;
        println!("{line}");
        if line.contains("about to write") {
            break;
        }
    }
    signal(&child, "STOP")?;
    println!("-- A is frozen (SIGSTOP) before its write; its lease runs out");
    let election = Election::builder(driver_from_env().await?, election_name())
        .ttl(TTL)
        .value("leader B")
        .build()?;
    let term = timeout(TTL * 5, election.campaign()).await??;
    println!("B: elected with fencing token {}", term.fencing_token());
    write(&mut client, &fence, "B", term.fencing_token()).await?;
    println!("B: write with token {} landed", term.fencing_token());
    signal(&child, "CONT")?;
    println!("-- A is resumed (SIGCONT)");
    stdin.write_all(b"go\n").await?;
    while let Some(line) = timeout(TTL * 10, lines.next_line()).await?? {
        println!("{line}");
    }
    let status = timeout(TTL * 5, child.wait()).await??;
    if !status.success() {
        return Err(format!("A exited with {status}").into());
    }
    let writers: Vec<String> = client
        .query(
            "SELECT writer || ' (token ' || fencing_token || ')' FROM fenced_writes_demo \
             WHERE resource = $1",
            &[&fence.resource()],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    println!("writes in the table: {}", writers.join(", "));
    election.resign().await?;
    Ok(())
}
