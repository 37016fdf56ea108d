#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
#[cfg(feature = "axum")]
pub mod http;
mod stores;

use std::sync::Arc;

pub use config::Config;
pub use leader_core::{
    BoxError, CancellationToken, Candidate, CandidateInfo, Driver, Election, ElectionBuilder,
    Error, ErrorChain, Event, EventStream, Grant, LeaderInfo, LossReason, MAX_NAME_LEN, MAX_TTL,
    MAX_VALUE_LEN, MIN_TTL, Result, Status, StoreUrl, Term, TlsFiles, redact_url, redact_urls,
};

/// The etcd driver crate, with the `etcd` feature.
#[cfg(feature = "etcd")]
pub use leader_etcd as etcd;
/// The PostgreSQL driver crate, with the `postgres` feature.
#[cfg(feature = "postgres")]
pub use leader_postgres as postgres;
/// The Redis driver crate, with the `redis` feature.
#[cfg(feature = "redis")]
pub use leader_redis as redis;

/// Connects to the store `url` names, and returns its driver: the scheme picks the driver
/// crate, whose `connect_url` parses the rest.
///
/// | URL | store |
/// |---|---|
/// | `etcd://[user:password@]host:port[,host:port…][/prefix/]` | etcd (feature `etcd`); the path is the key prefix: none gives the keys of `etcdctl elect NAME` |
/// | `etcds://…?ca=PATH[&cert=PATH&key=PATH]` | etcd over TLS (features `etcd`, `tls`), a client certificate optional |
/// | `redis://[user:password@]host:port[/db]`, `rediss://…[?ca=PATH&cert=PATH&key=PATH]` | Redis (feature `redis`; `rediss` also `tls`) |
/// | `redis+cluster://[user:password@]host:port[,host:port…]`, `rediss+cluster://…` | Redis Cluster |
/// | `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER` | Redis via Sentinel: the sentinels' addresses and the master's name; the user and password are the master's |
/// | `postgres://[user[:password]@][host[:port]][/dbname][?param=value…]`, `postgresql://…` | PostgreSQL (feature `postgres`): libpq's URL form as `tokio-postgres` reads it; the table is `leader_elections`; TLS (feature `tls`) with `sslmode=require` or `verify-full` and `sslrootcert=PATH` (`sslcert=`, `sslkey=` for a client certificate) |
///
/// Every Redis form also takes `prefix=` (the key prefix, default `leader:`); the Redis and
/// Sentinel forms `replicas=N` (and `replicasTimeout=`, default `500ms`): see
/// `RedisDriver::connect_url` in `leader-redis`. Each driver crate documents its own URLs
/// (`EtcdDriver::connect_url`, `RedisDriver::connect_url`, `PostgresDriver::connect_url`).
///
/// ```no_run
/// # async fn demo() -> leader::Result<()> {
/// let driver = leader::connect("etcd://127.0.0.1:2379").await?;
/// let election = leader::Election::builder(driver, "reports-cron").build()?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::InvalidConfig`] (`store`) for a URL that does not parse, an unknown scheme, a
/// scheme whose feature is not built in (the message names the available schemes), an
/// unknown parameter or an unreadable certificate; [`Error::Denied`] for credentials the
/// store refuses; [`Error::Store`] if it cannot be reached. No error message contains the
/// password.
pub async fn connect(url: &str) -> Result<Arc<dyn Driver>> {
    stores::connect(url).await
}

/// [`connect`], for a URL already parsed (the driver parses it again from its text).
///
/// # Errors
///
/// As [`connect`].
pub async fn connect_to(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    stores::connect(url.as_given()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_and_unsupported_schemes_name_the_available_ones() {
        for url in [
            "zookeeper://127.0.0.1:2181",
            #[cfg(not(feature = "postgres"))]
            "postgres://u:pw@127.0.0.1:5432/db",
            #[cfg(all(feature = "postgres", not(feature = "tls")))]
            "postgres://u:pw@127.0.0.1:5432/db?sslmode=require",
        ] {
            let err = match connect(url).await {
                Err(err) => err,
                Ok(_) => panic!("{url} connected"),
            };
            let text = err.to_string();
            assert!(
                matches!(err, Error::InvalidConfig { name: "store", .. }),
                "{url}: {err:?}"
            );
            assert!(text.contains("available"), "{text}");
            assert!(!text.contains(":pw@"), "{text}");
        }
    }
}
