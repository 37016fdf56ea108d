//! The seed's cron job on `Election::lead`: a schedule fires every second, on the leader
//! only. The library starts the job when this replica is elected and stops it when the term
//! ends; at Ctrl-C or SIGTERM it stops the job first and resigns after, so the next leader
//! starts only once this one's job has stopped. Run several at once; stop the leader and
//! watch another take over.
//!
//! ```text
//! LEADER_STORE=etcd://127.0.0.1:2379 cargo run -p leader-examples --example cronjob
//! ```
//!
//! `cronjob_own_loop` is the same job for services that keep their own loop and ask
//! `status.is_leader()` beside `Election::run`.

use std::str::FromStr;
use std::time::Duration;

use leader::{Election, Term};
use leader_examples::{driver_from_env, exit_with, init_logging, shutdown_signal};

#[tokio::main]
async fn main() {
    init_logging();
    if let Err(err) = run().await {
        exit_with(&err);
    }
}

async fn run() -> leader::Result<()> {
    let driver = driver_from_env().await?;
    let name = std::env::var("LEADER_ELECTION").unwrap_or_else(|_| "cronjob-example".to_owned());
    let election = Election::builder(driver, name)
        .ttl(Duration::from_secs(2))
        // The job's time to stop once its term ends: it awaits often, so little is needed.
        .safety_margin(Duration::from_millis(200))
        .build()?;
    // Every second, on the second.
    let schedule = cron::Schedule::from_str("* * * * * *")
        .map_err(|err| leader::Error::invalid_config("schedule", err.to_string()))?;
    election
        .lead(shutdown_signal(), move |term| job(schedule.clone(), term))
        .await
}

/// The leader's job, for one term: runs until the term's token is cancelled.
async fn job(schedule: cron::Schedule, term: Term) {
    let stop = term.cancellation_token();
    for next in schedule.upcoming(chrono::Utc) {
        let wait = (next - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        println!("do work as leader");
    }
}
