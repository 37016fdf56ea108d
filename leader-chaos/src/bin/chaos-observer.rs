//! The chaos suite's observer: watches the store's leader of one election (`observe`), as
//! a dashboard or `leader observe` would, and logs each change on CLOCK_MONOTONIC:
//!
//! ```text
//! o TOKEN NS     the store says term TOKEN leads
//! o - NS         the store says nobody leads
//! ```
//!
//! ```text
//! chaos-observer <store url> <election> <log file>
//! ```

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use futures::StreamExt;
use leader_chaos::monotonic_ns;

/// Watches one election's leader and logs each change.
#[derive(Debug, Parser)]
#[command(name = "chaos-observer")]
struct Args {
    /// The store's URL, for `leader::connect`.
    store_url: String,
    /// The election to watch.
    election: String,
    /// The log file (appended to).
    log_file: PathBuf,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(err) = run(&args).await {
        eprintln!("chaos-observer: {err}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Connecting may fail while the candidates' drivers set up the store (a PostgreSQL
    // schema set-up holds a lock under load) or while it restarts: wait for it, as a
    // service would; only a refusal or a bad URL ends the observer.
    let mut delay = std::time::Duration::from_millis(50);
    let driver = loop {
        match leader::connect(&args.store_url).await {
            Ok(driver) => break driver,
            Err(err) if err.is_transient() => {
                eprintln!("chaos-observer: connecting: {err}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
            Err(err) => return Err(err.into()),
        }
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log_file)?;
    let mut leaders = driver.observe(&args.election);
    let mut last: Option<Option<u64>> = None;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let item = tokio::select! {
            biased;
            _ = sigterm.recv() => return Ok(()),
            item = leaders.next() => item,
        };
        let Some(item) = item else {
            return Err("the observation ended".into());
        };
        // Store errors (a restart, a lost member) are part of the chaos: keep watching.
        let Ok(leader) = item else { continue };
        let token = leader.map(|l| l.fencing_token);
        if last == Some(token) {
            continue;
        }
        last = Some(token);
        let shown = token.map_or_else(|| "-".to_owned(), |t| t.to_string());
        log.write_all(format!("o {shown} {}\n", monotonic_ns()).as_bytes())?;
    }
}
