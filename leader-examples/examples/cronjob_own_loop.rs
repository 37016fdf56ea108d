//! The seed's cron job with a loop of your own: a schedule fires every second on every
//! replica, and only the leader does the work, asking `status.is_leader()` at each firing
//! while `Election::run` campaigns beside it. Run several at once; stop the leader with
//! Ctrl-C and watch another take over.
//!
//! `run` resigns the moment shutdown comes, whatever the loop is doing; the `cronjob`
//! example hands the job to `Election::lead` instead, which stops it before resigning.
//!
//! ```text
//! LEADER_STORE=etcd://127.0.0.1:2379 cargo run -p leader-examples --example cronjob_own_loop
//! ```

use std::str::FromStr;
use std::time::Duration;

use leader::Election;
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
        .build()?;
    let status = election.status();

    // Every second, on the second, on every replica.
    let schedule = cron::Schedule::from_str("* * * * * *")
        .map_err(|err| leader::Error::invalid_config("schedule", err.to_string()))?;
    let cron = tokio::spawn(async move {
        for next in schedule.upcoming(chrono::Utc) {
            let wait = (next - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            if status.is_leader() {
                println!("do work as leader");
            }
        }
    });

    let result = election.run(shutdown_signal()).await;
    cron.abort();
    result
}
