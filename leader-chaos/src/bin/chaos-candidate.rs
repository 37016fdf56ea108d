//! One chaos candidate: campaigns with `Election::run` until SIGTERM, and from a plain
//! thread samples `status.is_leader()` every millisecond, appending one line per sample in
//! which it believed it led: `<fencing token> <CLOCK_MONOTONIC ns before> <ns after>`.
//! Its stdout carries the events, each with the CLOCK_MONOTONIC time it was seen:
//! `elected T ns`, `lost T ns`, `resigned T ns`, and `resigning ns` when SIGTERM starts the
//! resignation.
//!
//! ```text
//! chaos-candidate etcd|redis <endpoint or url> <election> <ttl ms> <samples file>
//! ```

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use leader_chaos::{Backend, monotonic_ns};
use leader_core::{CancellationToken, Election, Event};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: chaos-candidate etcd|redis ENDPOINT ELECTION TTL_MS SAMPLES_FILE");
        std::process::exit(2);
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .try_init();
    if let Err(err) = run(&args).await {
        eprintln!("chaos-candidate: {err}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let ttl = Duration::from_millis(args[4].parse()?);
    let backend = Backend::parse(&args[1]).ok_or_else(|| format!("unknown backend {}", args[1]))?;
    let driver = backend.connect(&args[2]).await?;
    let election = Election::builder(driver, args[3].clone())
        .ttl(ttl)
        .retry(Duration::from_millis(50), ttl)
        .build()?;

    let mut samples = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[5])?;
    let status = election.status();
    let done = CancellationToken::new();
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.is_cancelled() {
                let before = monotonic_ns();
                let token = status.fencing_token();
                let after = monotonic_ns();
                if let Some(token) = token {
                    // One write per sample: nothing is lost when the process is killed.
                    let _ = samples.write_all(format!("{token} {before} {after}\n").as_bytes());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let mut events = election.subscribe();
    let printer = tokio::spawn(async move {
        let mut out = std::io::stdout();
        while let Some(event) = events.next().await {
            let line = match event {
                Event::Elected { fencing_token } => format!("elected {fencing_token}"),
                Event::Lost { fencing_token, .. } => format!("lost {fencing_token}"),
                Event::Resigned { fencing_token } => format!("resigned {fencing_token}"),
                _ => continue,
            };
            let _ = writeln!(out, "{line} {}", monotonic_ns());
            let _ = out.flush();
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = election
        .run(async move {
            term.recv().await;
            // The moment the resignation starts, for handoff measurements.
            let mut out = std::io::stdout();
            let _ = writeln!(out, "resigning {}", monotonic_ns());
            let _ = out.flush();
        })
        .await;
    done.cancel();
    let _ = sampler.join();
    drop(election);
    let _ = tokio::time::timeout(Duration::from_millis(200), printer).await;
    result?;
    Ok(())
}
