//! What the examples share: choosing the store from the environment, logging to stderr,
//! and waiting for Ctrl-C or SIGTERM.
//!
//! * `LEADER_STORE`: a store URL (see `leader::connect`), default `etcd://127.0.0.1:2379`;
//!   `redis://127.0.0.1:6379` for Redis.
//! * `RUST_LOG`: log filter for stderr, default `warn`.

use std::sync::Arc;

use leader::{Driver, Result, StoreUrl};

/// The store URL the environment gives (`LEADER_STORE`), or the default.
pub fn store_from_env() -> Result<StoreUrl> {
    let url = std::env::var("LEADER_STORE")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "etcd://127.0.0.1:2379".to_owned());
    StoreUrl::parse(&url)
}

/// The driver of the store the environment names.
pub async fn driver_from_env() -> Result<Arc<dyn Driver>> {
    leader::connect_to(&store_from_env()?).await
}

/// Logs to stderr (stdout is the examples' output), filtered by `RUST_LOG` (default `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves at Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Prints `err` with its chain of causes to stderr and exits with status 1.
pub fn exit_with(err: &(dyn std::error::Error + 'static)) -> ! {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    eprintln!("error: {message}");
    std::process::exit(1)
}
