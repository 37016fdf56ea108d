//! Helpers the `leader` command's tests share.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout};

pub const BIN: &str = env!("CARGO_BIN_EXE_leader");

/// `leader ARGS`, with no `$LEADER_STORE` and library logs at error only.
pub fn leader(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("LEADER_STORE")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// `leader ARGS` with its default logging (no `RUST_LOG`).
pub fn leader_logging(args: &[&str]) -> Command {
    let mut command = leader(args);
    command.env_remove("RUST_LOG");
    command
}

/// Runs `leader` to completion: (exit code, stdout, stderr).
pub async fn finish(mut command: Command) -> (Option<i32>, String, String) {
    let output = timeout(Duration::from_secs(60), command.output())
        .await
        .expect("leader finished in time")
        .expect("leader ran");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Polls `what` until it holds, or fails at `limit`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
