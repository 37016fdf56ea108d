//! A failover demo: three candidates, as separate processes, on the chosen backend. It
//! shows who leads, kills the leader with SIGKILL and times the takeover, then stops the
//! new leader gracefully (SIGTERM) and times the handoff, printing a timeline with the
//! fencing tokens.
//!
//! ```text
//! LEADER_STORE=etcd://127.0.0.1:2379  cargo run -p leader-examples --example failover
//! LEADER_STORE=redis://127.0.0.1:6379 cargo run -p leader-examples --example failover -- --ttl 2
//! ```

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use leader::{Election, Event};
use leader_examples::{driver_from_env, exit_with, init_logging, shutdown_signal, store_from_env};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const CANDIDATES: usize = 3;

#[tokio::main]
async fn main() {
    init_logging();
    let args: Vec<String> = std::env::args().collect();
    let ttl_secs = args
        .iter()
        .position(|a| a == "--ttl")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse::<u64>())
        .unwrap_or(Ok(2));
    let ttl = match ttl_secs {
        Ok(secs) if secs > 0 => Duration::from_secs(secs),
        _ => {
            eprintln!("usage: failover [--ttl SECONDS]   (a whole number above 0)");
            std::process::exit(2);
        }
    };
    let result = match args.iter().position(|a| a == "--candidate") {
        Some(i) => candidate(args.get(i + 1).cloned().unwrap_or_default(), ttl).await,
        None => orchestrate(ttl).await,
    };
    if let Err(err) = result {
        exit_with(err.as_ref());
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One candidate process: prints `ready`, then one line per event.
async fn candidate(id: String, ttl: Duration) -> BoxResult<()> {
    let driver = driver_from_env().await?;
    let name = std::env::var("LEADER_ELECTION").unwrap_or_else(|_| "failover-demo".to_owned());
    let election = Election::builder(driver, name)
        .ttl(ttl)
        .value(format!("candidate {id} (pid {})", std::process::id()))
        .retry(Duration::from_millis(100), ttl)
        .build()?;
    let mut events = election.subscribe();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Elected { fencing_token } => println!("elected {fencing_token}"),
                Event::Resigned { fencing_token } => println!("resigned {fencing_token}"),
                Event::Lost { fencing_token, .. } => println!("lost {fencing_token}"),
                _ => {}
            }
        }
    });
    println!("ready");
    election.run(shutdown_signal()).await?;
    // Let the printer flush the last event.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

struct Candidates {
    children: HashMap<usize, Child>,
    lines: mpsc::UnboundedReceiver<(usize, String, Instant)>,
    start: Instant,
}

impl Candidates {
    fn at(&self, when: Instant) -> String {
        format!("[{:>7.3}s]", when.duration_since(self.start).as_secs_f64())
    }

    fn say(&self, what: &str) {
        println!("{} {what}", self.at(Instant::now()));
    }

    /// The next line that `accept` takes, from any candidate, within `limit`.
    async fn expect(
        &mut self,
        what: &str,
        limit: Duration,
        mut accept: impl FnMut(usize, &str) -> bool,
    ) -> BoxResult<(usize, String, Instant)> {
        let deadline = Instant::now() + limit;
        loop {
            let next = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.lines.recv(),
            );
            match next.await {
                Ok(Some((i, line, at))) if accept(i, &line) => return Ok((i, line, at)),
                Ok(Some(_)) => {}
                Ok(None) => return Err("every candidate exited".into()),
                Err(_) => return Err(format!("no {what} within {limit:?}").into()),
            }
        }
    }

    fn signal(&self, i: usize, signal: &str) -> BoxResult<()> {
        let pid = self
            .children
            .get(&i)
            .and_then(Child::id)
            .ok_or("candidate gone")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{signal} {pid} failed").into())
        }
    }
}

fn token_of(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

async fn orchestrate(ttl: Duration) -> BoxResult<()> {
    let backend = store_from_env()?;
    let exe = std::env::current_exe()?;
    let election = format!("failover-demo-{}", std::process::id());
    let (tx, lines) = mpsc::unbounded_channel();
    let mut children = HashMap::new();
    let start = Instant::now();
    println!(
        "failover demo: {CANDIDATES} candidate processes on {backend}, election {election:?}, TTL {ttl:?}"
    );
    for i in 1..=CANDIDATES {
        let mut child = Command::new(&exe)
            .args([
                "--candidate",
                &i.to_string(),
                "--ttl",
                &ttl.as_secs().to_string(),
            ])
            .env("LEADER_ELECTION", &election)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send((i, line, Instant::now())).is_err() {
                    return;
                }
            }
        });
        children.insert(i, child);
    }
    drop(tx);
    let mut c = Candidates {
        children,
        lines,
        start,
    };
    c.say(&format!("started candidates 1..={CANDIDATES}"));

    // Everyone campaigns; one leads.
    let mut ready = 0;
    let mut leader = None;
    while ready < CANDIDATES || leader.is_none() {
        let (i, line, at) = c
            .expect("startup", Duration::from_secs(30), |_, l| {
                l == "ready" || l.starts_with("elected")
            })
            .await?;
        if line == "ready" {
            ready += 1;
        } else {
            println!(
                "{} candidate {i} leads, fencing token {}",
                c.at(at),
                token_of(&line)
            );
            leader = Some((i, token_of(&line)));
        }
    }
    let (first, first_token) = leader.ok_or("no leader")?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Crash: SIGKILL the leader. Its lease must expire before anyone else leads.
    c.say(&format!("SIGKILL candidate {first} (the leader)"));
    let killed_at = Instant::now();
    c.signal(first, "KILL")?;
    let (second, line, at) = c
        .expect("takeover", ttl * 4, |i, l| {
            i != first && l.starts_with("elected")
        })
        .await?;
    let second_token = token_of(&line);
    let failover = at.duration_since(killed_at);
    println!(
        "{} candidate {second} leads, fencing token {second_token}: failover took {:.3}s ({:.2} x TTL)",
        c.at(at),
        failover.as_secs_f64(),
        failover.as_secs_f64() / ttl.as_secs_f64()
    );
    if let Some(mut child) = c.children.remove(&first) {
        let _ = child.wait().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Graceful stop: SIGTERM the new leader; it resigns and the last candidate leads.
    c.say(&format!(
        "SIGTERM candidate {second} (the leader): it resigns"
    ));
    let stopped_at = Instant::now();
    c.signal(second, "TERM")?;
    let (third, line, at) = c
        .expect("handoff", ttl * 4, |i, l| {
            i != first && i != second && l.starts_with("elected")
        })
        .await?;
    let third_token = token_of(&line);
    let handoff = at.duration_since(stopped_at);
    println!(
        "{} candidate {third} leads, fencing token {third_token}: handoff took {:.1}ms",
        c.at(at),
        handoff.as_secs_f64() * 1000.0
    );
    if let Some(mut child) = c.children.remove(&second) {
        let status = child.wait().await?;
        c.say(&format!("candidate {second} exited ({status})"));
    }

    // Clean up the last one.
    c.signal(third, "TERM")?;
    if let Some(mut child) = c.children.remove(&third) {
        let status = child.wait().await?;
        c.say(&format!("candidate {third} resigned and exited ({status})"));
    }

    let increasing = first_token < second_token && second_token < third_token;
    println!();
    println!("summary ({backend}, TTL {ttl:?}):");
    println!(
        "  crash failover (SIGKILL)  {:>9.3}s  ({:.2} x TTL)",
        failover.as_secs_f64(),
        failover.as_secs_f64() / ttl.as_secs_f64()
    );
    println!(
        "  graceful handoff (SIGTERM) {:>8.1}ms",
        handoff.as_secs_f64() * 1000.0
    );
    println!(
        "  fencing tokens             {first_token} < {second_token} < {third_token}: {}",
        if increasing {
            "strictly increasing"
        } else {
            "NOT INCREASING"
        }
    );
    if !increasing {
        return Err("fencing tokens did not increase".into());
    }
    Ok(())
}
