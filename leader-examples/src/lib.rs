//! What the examples share: choosing the backend from the environment, logging to stderr,
//! and waiting for Ctrl-C or SIGTERM.
//!
//! * `LEADER_BACKEND`: `etcd` (default) or `redis`.
//! * `ETCD_ENDPOINTS`: comma-separated, default `127.0.0.1:2379`.
//! * `REDIS_URL`: default `redis://127.0.0.1:6379`.
//! * `RUST_LOG`: log filter for stderr, default `warn`.

use std::fmt;
use std::sync::Arc;

use leader_core::{Driver, Error, Result};

/// The store behind the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// etcd, through `leader-etcd`.
    Etcd,
    /// Redis, through `leader-redis`.
    Redis,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Etcd => "etcd",
            Backend::Redis => "redis",
        })
    }
}

impl Backend {
    /// `LEADER_BACKEND`, or etcd when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("LEADER_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("etcd") => Ok(Backend::Etcd),
            Ok("redis") => Ok(Backend::Redis),
            Ok(other) => Err(Error::invalid_config(
                "LEADER_BACKEND",
                format!("is {other:?}; use `etcd` or `redis`"),
            )),
        }
    }

    /// Connects to this backend at the address the environment gives.
    pub async fn connect(self) -> Result<Arc<dyn Driver>> {
        match self {
            Backend::Etcd => {
                let endpoints =
                    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".to_owned());
                let endpoints: Vec<&str> = endpoints
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .collect();
                Ok(Arc::new(leader_etcd::EtcdDriver::connect(endpoints).await?))
            }
            Backend::Redis => {
                let url = std::env::var("REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
                Ok(Arc::new(leader_redis::RedisDriver::connect(&url).await?))
            }
        }
    }
}

/// The driver the environment asks for.
pub async fn driver_from_env() -> Result<Arc<dyn Driver>> {
    Backend::from_env()?.connect().await
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
