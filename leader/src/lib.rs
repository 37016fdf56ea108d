#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(clippy::unwrap_used)]

mod config;
mod url;

use std::sync::Arc;

pub use config::Config;
pub use leader_core::{
    BoxError, CancellationToken, Candidate, Driver, Election, ElectionBuilder, Error, ErrorChain,
    Event, EventStream, Grant, LeaderInfo, LossReason, MAX_NAME_LEN, MAX_TTL, MAX_VALUE_LEN,
    MIN_TTL, Result, Status, Term,
};
pub use url::{StoreUrl, redact_urls};

/// The etcd driver crate, with the `etcd` feature.
#[cfg(feature = "etcd")]
pub use leader_etcd as etcd;
/// The PostgreSQL driver crate, with the `postgres` feature.
#[cfg(feature = "postgres")]
pub use leader_postgres as postgres;
/// The Redis driver crate, with the `redis` feature.
#[cfg(feature = "redis")]
pub use leader_redis as redis;

/// The schemes this build can connect to, for error messages.
fn available() -> String {
    let mut schemes: Vec<&str> = Vec::new();
    if cfg!(feature = "etcd") {
        schemes.push("etcd://");
    }
    if cfg!(feature = "redis") {
        schemes.push("redis://");
    }
    if cfg!(feature = "postgres") {
        schemes.push("postgres://");
        schemes.push("postgresql://");
    }
    if schemes.is_empty() {
        "none (enable the `etcd`, `redis` or `postgres` feature of the `leader` crate)".to_owned()
    } else {
        schemes.join(", ")
    }
}

#[cfg_attr(
    all(feature = "etcd", feature = "redis", feature = "postgres"),
    allow(dead_code)
)]
fn not_built_in(url: &StoreUrl, feature: &str) -> Error {
    Error::invalid_config(
        "store",
        format!(
            "`{}://` needs the `{feature}` feature of the `leader` crate, which this build \
             does not have; available: {}",
            url.scheme(),
            available()
        ),
    )
}

/// Connects to the store `url` names, and returns its driver.
///
/// | URL | store |
/// |---|---|
/// | `etcd://[user:password@]host:port[,host:port…][/prefix/]` | etcd (feature `etcd`); the path is the key prefix: none gives the keys of `etcdctl elect NAME` |
/// | `redis://[user:password@]host:port[/db]` | Redis (feature `redis`) |
/// | `postgres://[user[:password]@][host[:port]][/dbname][?param=value…]`, `postgresql://…` | PostgreSQL (feature `postgres`): libpq's URL form as `tokio-postgres` reads it; the table is `leader_elections` |
///
/// TLS (`etcds://`, `rediss://`, and `sslmode=require` on PostgreSQL), Redis Cluster and
/// Sentinel (`redis+cluster://`, `redis+sentinel://`) are recognised and answered with an
/// error saying that this build does not support them yet.
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
/// [`Error::InvalidConfig`] (`store`) for a URL that does not parse, an unknown scheme, or
/// a scheme whose feature is not built in (the message names the available schemes);
/// [`Error::Denied`] for credentials the store refuses; [`Error::Store`] if it cannot be
/// reached. No error message contains the password.
pub async fn connect(url: &str) -> Result<Arc<dyn Driver>> {
    let url = StoreUrl::parse(url)?;
    connect_to(&url).await
}

/// [`connect`], for a URL already parsed.
///
/// # Errors
///
/// As [`connect`].
pub async fn connect_to(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    match url.scheme() {
        "etcd" => connect_etcd(url).await,
        "redis" => connect_redis(url).await,
        "etcds" | "rediss" | "rediss+cluster" => Err(Error::invalid_config(
            "store",
            format!(
                "`{}://` (TLS) is not supported by this version yet; available: {}",
                url.scheme(),
                available()
            ),
        )),
        "redis+cluster" | "redis+sentinel" => Err(Error::invalid_config(
            "store",
            format!(
                "`{}://` is not supported by this version yet; available: {}",
                url.scheme(),
                available()
            ),
        )),
        "postgres" | "postgresql" => connect_postgres(url).await,
        other => Err(Error::invalid_config(
            "store",
            format!(
                "unknown scheme `{other}://` in `{url}`; available: {}",
                available()
            ),
        )),
    }
}

#[cfg(feature = "etcd")]
async fn connect_etcd(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    use leader_etcd::EtcdDriver;
    if let Some((key, _)) = url.params().next() {
        return Err(Error::invalid_config(
            "store",
            format!("etcd:// takes no parameter `{key}` (in `{url}`)"),
        ));
    }
    let endpoints: Vec<String> = url.hosts().iter().map(|h| format!("http://{h}")).collect();
    let mut options = EtcdDriver::default_connect_options();
    match (url.user(), url.password()) {
        (Some(user), Some(password)) => options = options.with_user(user, password),
        (Some(_), None) => {
            return Err(Error::invalid_config(
                "store",
                format!("etcd:// needs a password with its user (in `{url}`)"),
            ));
        }
        (None, Some(_)) => {
            return Err(Error::invalid_config(
                "store",
                format!("etcd:// needs a user with its password (in `{url}`)"),
            ));
        }
        (None, None) => {}
    }
    // The path is the key prefix: `/svc/` gives `svc/`; no path, no prefix.
    let prefix = url.path().strip_prefix('/').unwrap_or(url.path());
    let builder = EtcdDriver::connect_builder(&endpoints, options).await?;
    Ok(Arc::new(builder.prefix(prefix).build()))
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    Err(not_built_in(url, "etcd"))
}

#[cfg(feature = "redis")]
async fn connect_redis(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    if url.hosts().len() != 1 {
        return Err(Error::invalid_config(
            "store",
            format!("redis:// takes one host:port (in `{url}`); Redis Cluster is redis+cluster://"),
        ));
    }
    let db = url.path().trim_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(Error::invalid_config(
            "store",
            format!("the path of a redis:// URL is a database number, not `{db}` (in `{url}`)"),
        ));
    }
    Ok(Arc::new(
        leader_redis::RedisDriver::connect(url.as_given()).await?,
    ))
}

#[cfg(not(feature = "redis"))]
async fn connect_redis(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    Err(not_built_in(url, "redis"))
}

#[cfg(feature = "postgres")]
async fn connect_postgres(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    if let Some(mode) = url.param("sslmode")
        && !matches!(mode, "disable" | "prefer")
    {
        return Err(Error::invalid_config(
            "store",
            format!(
                "`sslmode={mode}`: TLS to PostgreSQL is not supported by this version yet; \
                 available: {} without TLS (in `{url}`)",
                available()
            ),
        ));
    }
    Ok(Arc::new(
        leader_postgres::PostgresDriver::connect(url.as_given()).await?,
    ))
}

#[cfg(not(feature = "postgres"))]
async fn connect_postgres(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    Err(not_built_in(url, "postgres"))
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
            #[cfg(feature = "postgres")]
            "postgres://u:pw@127.0.0.1:5432/db?sslmode=require",
            "etcds://127.0.0.1:2379",
            "redis+cluster://127.0.0.1:7000",
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
