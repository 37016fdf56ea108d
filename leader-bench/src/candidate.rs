//! `leader-bench candidate`: one candidate process, as a service runs one. It campaigns,
//! holds each term until it ends (then campaigns again, with backoff) or until SIGTERM,
//! which resigns. Its stdout carries what the orchestrator times, each line ending in the
//! CLOCK_MONOTONIC nanoseconds it was printed at: `campaigning NS`, `elected TOKEN NS`
//! (as `campaign()` returns), `resigning NS` (as SIGTERM starts the resignation).
//! With `--stay` it stays up after resigning, connected, until a second SIGTERM: its exit
//! (its connections closing, its store sessions ending) then falls outside the handoff.
//! SIGINT stops it as SIGTERM does, without staying up (the orchestrator's clean-up).
//!
//! The bench runs this instead of leader-chaos's `chaos-candidate`, whose 1 ms sampler
//! thread at real-time priority and log writer are for the safety checker and would
//! weigh on the latencies measured here; being a subcommand of the bench's own binary, it
//! is built with it and needs no other target found by file name.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use leader_core::Election;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::BoxResult;
use crate::stats::monotonic_ns;

/// Arguments of `leader-bench candidate`.
#[derive(Args)]
pub(crate) struct CandidateArgs {
    /// The store URL (`etcd://`, `redis://`, `postgres://`).
    #[arg(long)]
    store: String,
    /// The election's name.
    #[arg(long)]
    election: String,
    /// The term's TTL.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// After resigning, stay up (driver connected) until a second SIGTERM.
    #[arg(long)]
    stay: bool,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line} {}", monotonic_ns());
    let _ = out.flush();
}

/// What stops the candidate.
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    /// Waits for SIGTERM (`true`: stay up after resigning if asked to) or SIGINT (`false`).
    async fn recv(&mut self) -> bool {
        tokio::select! {
            _ = self.term.recv() => true,
            _ = self.int.recv() => false,
        }
    }
}

/// Runs the candidate until SIGTERM or SIGINT (resigns) or a permanent error.
pub(crate) async fn main(args: CandidateArgs) -> BoxResult<()> {
    let driver = leader::connect(&args.store).await?;
    let (retry_min, retry_max) = (Duration::from_millis(50), args.ttl);
    let election = Election::builder(driver, args.election)
        .ttl(args.ttl)
        .retry(retry_min, retry_max)
        .build()?;
    let mut stop = Stop {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    };
    let mut delay = retry_min;
    loop {
        say("campaigning");
        let campaigned = tokio::select! {
            biased;
            _ = stop.recv() => return Ok(()),
            campaigned = election.campaign() => campaigned,
        };
        match campaigned {
            Ok(term) => {
                say(&format!("elected {}", term.fencing_token()));
                let shutdown = tokio::select! {
                    biased;
                    stay = stop.recv() => Some(stay && args.stay),
                    () = term.ended() => None,
                };
                if let Some(stay) = shutdown {
                    say("resigning");
                    let resigned = match term.resign().await {
                        Ok(()) | Err(leader_core::Error::NotALeader) => Ok(()),
                        Err(err) => Err(err.into()),
                    };
                    if stay {
                        stop.recv().await;
                    }
                    return resigned;
                }
                delay = retry_min;
            }
            Err(err) if !err.is_transient() => return Err(err.into()),
            Err(_) => {}
        }
        tokio::select! {
            biased;
            _ = stop.recv() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(retry_max);
    }
}
