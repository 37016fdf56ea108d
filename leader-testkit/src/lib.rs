#![doc = include_str!("../README.md")]
//! Real store processes for tests, examples and benchmarks: `etcd` (one member or a
//! 3-member cluster), `redis-server` and PostgreSQL, each on free loopback ports with a data directory
//! of its own, killed and reaped on drop.
//!
//! A missing binary is an error that says how to install it: tests that need a server fail
//! loudly rather than skip.

mod etcd;
mod lines;
mod peers;
mod postgres;
mod process;
mod proxy;
mod redis;
mod secure;
mod topologies;

pub mod sim;

pub use etcd::EtcdServer;
pub use lines::LineProcess;
pub use postgres::PostgresServer;
pub use process::{free_port, require_binary, signal};
pub use proxy::FaultProxy;
pub use redis::{RedisOptions, RedisServer};
pub use secure::{Certificates, ROOT_PASSWORD, SecureEtcd, secure_etcd};
pub use topologies::{MASTER_NAME, RedisCluster, RedisSentinel};

/// One PostgreSQL server for a test, started off the async runtime. Panics with the command
/// that installs PostgreSQL when the binaries are missing (a test never skips).
pub async fn postgres() -> PostgresServer {
    tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .expect("the start task ran")
        .expect("postgres starts (install it with: sudo apt-get install -y postgresql)")
}

/// One etcd member for a test, started off the async runtime. Panics with the command that
/// installs etcd when the binary is missing (a test never skips).
pub async fn etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("the start task ran")
        .expect("etcd starts (install it with: sudo apt-get install -y etcd-server)")
}

/// One redis-server for a test, started off the async runtime. Panics with the command that
/// installs Redis when the binary is missing (a test never skips).
pub async fn redis() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("the start task ran")
        .expect("redis-server starts (install it with: sudo apt-get install -y redis-server)")
}

/// `what` with a suffix no other test (or run) uses, for election names and key prefixes.
pub fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{what}-{:08x}-{n}", std::process::id() ^ nanos)
}
