//! [`RedisDriver::connect_url`]: Redis's store URLs (one server, Cluster, Sentinel), their
//! parameters and TLS files.

use std::time::Duration;

use leader_core::{Result, StoreUrl};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use crate::builder::RedisDriverBuilder;
use crate::driver::RedisDriver;

/// The schemes [`RedisDriver::connect_url`] takes in this build.
pub const SCHEMES: &[&str] = if cfg!(feature = "tls") {
    &[
        "redis",
        "redis+cluster",
        "redis+sentinel",
        "rediss",
        "rediss+cluster",
        "rediss+sentinel",
    ]
} else {
    &["redis", "redis+cluster", "redis+sentinel"]
};

/// The default of `replicasTimeout=`.
const REPLICAS_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    Single,
    Cluster,
    Sentinel,
}

impl RedisDriver {
    /// Connects to the Redis that `url` names and returns a driver on it; fails if Redis
    /// cannot be reached or refuses this client now.
    ///
    /// | URL | Redis |
    /// |---|---|
    /// | `redis://[user:password@]host:port[/db]` | one server; a password alone is `requirepass`'s |
    /// | `redis+cluster://[user:password@]host:port[,host:port…]` | a Redis Cluster, from its seed nodes |
    /// | `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER` | the master the sentinels name; the user and password are the master's |
    /// | `rediss…://…[?ca=PATH&cert=PATH&key=PATH]` | each over TLS (feature `tls`), with a CA of your own and a client certificate, both optional |
    ///
    /// Every form takes `prefix=` ([`RedisDriverBuilder::prefix`]); one server and
    /// Sentinel also `replicas=N` and `replicasTimeout=` (default `500ms`):
    /// [`RedisDriverBuilder::replicas`].
    ///
    /// ```no_run
    /// # async fn demo() -> leader_core::Result<()> {
    /// let driver = leader_redis::RedisDriver::connect_url("redis://127.0.0.1:6379/2?prefix=svc:").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](leader_core::Error::InvalidConfig) (`store`) for a URL of
    /// another scheme (the message names the schemes this build takes), a host without a
    /// port, a path or parameter its form does not take, an unreadable certificate, or
    /// `rediss…://` without the `tls` feature; [`Error::Denied`](leader_core::Error::Denied)
    /// for credentials Redis refuses; [`Error::Store`](leader_core::Error::Store) if it
    /// cannot be reached. No message contains the password.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::parse_url(url)?.connect().await
    }

    /// Parses a store URL (as [`connect_url`](Self::connect_url) takes) into a builder
    /// with the URL's options, for more options before connecting
    /// ([`RedisDriverBuilder::connect`]). Nothing is sent to Redis; TLS files are read now.
    ///
    /// # Errors
    ///
    /// As [`connect_url`](Self::connect_url), for the URL.
    pub fn parse_url(url: &str) -> Result<RedisDriverBuilder> {
        builder_for(&StoreUrl::parse(url)?)
    }
}

/// The builder `url` describes, with its options set.
fn builder_for(url: &StoreUrl) -> Result<RedisDriverBuilder> {
    let topology = match url.scheme() {
        "redis" | "rediss" => Topology::Single,
        "redis+cluster" | "rediss+cluster" => Topology::Cluster,
        "redis+sentinel" | "rediss+sentinel" => Topology::Sentinel,
        other => {
            return Err(url.invalid(format!(
                "`{other}://` is not a Redis URL; leader-redis takes {}",
                schemes()
            )));
        }
    };
    let tls = url.scheme().starts_with("rediss");
    let mut allowed = vec!["prefix"];
    if topology != Topology::Cluster {
        allowed.extend(["replicas", "replicasTimeout"]);
    }
    if tls {
        allowed.extend(["ca", "cert", "key"]);
    }
    url.only_params(&allowed)?;
    if tls && !cfg!(feature = "tls") {
        return Err(url.invalid(format!(
            "`{}://` needs the `tls` feature of leader-redis (the `tls` feature of `leader`), \
             which this build does not have; available: {}",
            url.scheme(),
            schemes()
        )));
    }
    url.require_host_ports()?;

    let path = url.path().trim_matches('/');
    let (db, master) = match topology {
        Topology::Single if path.is_empty() => (0, None),
        Topology::Single => match path.parse::<i64>() {
            Ok(db) if db >= 0 => (db, None),
            _ => {
                return Err(url.invalid(format!(
                    "the path of a Redis URL is a database number, not `{path}`"
                )));
            }
        },
        Topology::Cluster if path.is_empty() => (0, None),
        Topology::Cluster => {
            return Err(
                url.invalid("a Redis Cluster URL has no path (a Cluster has database 0 only)")
            );
        }
        Topology::Sentinel if path.is_empty() || path.contains('/') => {
            return Err(url.invalid(
                "a Sentinel URL's path is the master's name: redis+sentinel://host:port/MASTER",
            ));
        }
        Topology::Sentinel => (0, Some(path)),
    };
    if topology == Topology::Single && url.hosts().len() != 1 {
        return Err(url.invalid(
            "a Redis URL takes one host:port; a Cluster is redis+cluster://, Sentinel redis+sentinel://",
        ));
    }
    // A password alone is Redis's `requirepass` (`AUTH password`, the default user).
    let credentials = match (url.user(), url.password()) {
        (None, Some(password)) => Some(("default", password)),
        _ => url.credentials()?,
    };
    let node = |host: &str| -> Result<ConnectionInfo> {
        let (name, port) = host
            .rsplit_once(':')
            .and_then(|(name, port)| Some((name, port.parse::<u16>().ok()?)))
            .ok_or_else(|| url.invalid(format!("needs host:port, not `{host}`")))?;
        let name = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addr = if tls && topology != Topology::Sentinel {
            ConnectionAddr::TcpTls {
                host: name,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(name, port)
        };
        let mut info = addr
            .into_connection_info()
            .map_err(|err| url.invalid(err))?;
        if topology != Topology::Sentinel {
            let mut settings = info.redis_settings().clone().set_db(db);
            if let Some((user, password)) = credentials {
                settings = settings.set_username(user).set_password(password);
            }
            info = info.set_redis_settings(settings);
        }
        Ok(info)
    };
    let nodes = url
        .hosts()
        .iter()
        .map(|host| node(host))
        .collect::<Result<Vec<_>>>()?;
    let certificates = certificates(url, tls)?;

    let mut builder = match topology {
        Topology::Single => {
            let node = nodes
                .into_iter()
                .next()
                .ok_or_else(|| url.invalid("no host"))?;
            RedisDriver::builder(single(node, certificates).map_err(|err| url.invalid(err))?)
        }
        Topology::Cluster => cluster(nodes, certificates)?,
        Topology::Sentinel => {
            use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
            let master = master.unwrap_or_default();
            let addrs = nodes.iter().map(|info| info.addr().clone());
            let mut sentinel =
                SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(|err| url.invalid(err))?;
            if let Some((user, password)) = credentials {
                sentinel = sentinel
                    .set_client_to_redis_username(user)
                    .set_client_to_redis_password(password);
            }
            sentinel = sentinel_tls(sentinel, certificates);
            RedisDriver::sentinel_builder(sentinel.build().map_err(|err| url.invalid(err))?)
        }
    };
    if let Some(prefix) = url.param("prefix") {
        builder = builder.prefix(prefix);
    }
    if let Some(replicas) = url.param("replicas") {
        let replicas: usize = replicas
            .parse()
            .map_err(|_| url.invalid(format!("replicas={replicas} is not a number")))?;
        let timeout = match url.param("replicasTimeout") {
            Some(text) => humantime::parse_duration(text)
                .map_err(|err| url.invalid(format!("replicasTimeout={text}: {err}")))?,
            None => REPLICAS_TIMEOUT,
        };
        builder = builder.replicas(replicas, timeout);
    } else if url.param("replicasTimeout").is_some() {
        return Err(url.invalid("replicasTimeout= needs replicas="));
    }
    Ok(builder)
}

/// The schemes, as `redis://, redis+cluster://, …`.
fn schemes() -> String {
    SCHEMES
        .iter()
        .map(|scheme| format!("{scheme}://"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(feature = "tls")]
type Certificates = Option<redis::TlsCertificates>;
#[cfg(not(feature = "tls"))]
type Certificates = Option<std::convert::Infallible>;

/// The TLS files of a `rediss…://` URL, read.
#[cfg(feature = "tls")]
fn certificates(url: &StoreUrl, tls: bool) -> Result<Certificates> {
    if !tls {
        return Ok(None);
    }
    let files = url.tls_files()?;
    Ok(Some(redis::TlsCertificates {
        client_tls: files
            .identity
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: files.ca,
    }))
}

#[cfg(not(feature = "tls"))]
fn certificates(_url: &StoreUrl, _tls: bool) -> Result<Certificates> {
    Ok(None)
}

#[cfg(feature = "tls")]
fn single(node: ConnectionInfo, certificates: Certificates) -> redis::RedisResult<redis::Client> {
    match certificates {
        Some(certificates) => redis::Client::build_with_tls(node, certificates),
        None => redis::Client::open(node),
    }
}

#[cfg(not(feature = "tls"))]
fn single(node: ConnectionInfo, _certificates: Certificates) -> redis::RedisResult<redis::Client> {
    redis::Client::open(node)
}

#[cfg(feature = "tls")]
fn cluster(nodes: Vec<ConnectionInfo>, certificates: Certificates) -> Result<RedisDriverBuilder> {
    match certificates {
        Some(certificates) => RedisDriver::cluster_builder_with_tls(nodes, certificates),
        None => RedisDriver::cluster_builder(nodes),
    }
}

#[cfg(not(feature = "tls"))]
fn cluster(nodes: Vec<ConnectionInfo>, _certificates: Certificates) -> Result<RedisDriverBuilder> {
    RedisDriver::cluster_builder(nodes)
}

#[cfg(feature = "tls")]
fn sentinel_tls(
    sentinel: redis::sentinel::SentinelClientBuilder,
    certificates: Certificates,
) -> redis::sentinel::SentinelClientBuilder {
    match certificates {
        Some(certificates) => sentinel
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certificates),
        None => sentinel,
    }
}

#[cfg(not(feature = "tls"))]
fn sentinel_tls(
    sentinel: redis::sentinel::SentinelClientBuilder,
    _certificates: Certificates,
) -> redis::sentinel::SentinelClientBuilder {
    sentinel
}

#[cfg(test)]
mod tests {
    use leader_core::Error;

    use super::*;

    fn refused(url: &str) -> Error {
        let parsed = match StoreUrl::parse(url) {
            Ok(parsed) => parsed,
            Err(err) => return err,
        };
        match builder_for(&parsed) {
            Err(err) => err,
            Ok(builder) => panic!("{url} was accepted: {builder:?}"),
        }
    }

    #[test]
    fn bad_urls_are_invalid_config_and_never_show_the_password() {
        for url in [
            "etcd://u:pw@127.0.0.1:2379",
            "redis://u:pw@",
            "redis://u:pw@127.0.0.1",
            "redis://u:pw@127.0.0.1:6379/jobs",
            "redis://u:pw@127.0.0.1:6379,127.0.0.1:6380",
            "redis://u:pw@127.0.0.1:6379?ca=/ca.pem",
            "redis://u:pw@127.0.0.1:6379?replicas=x",
            "redis://u:pw@127.0.0.1:6379?replicasTimeout=1s",
            "redis://u:pw@127.0.0.1:6379?replicas=1&replicasTimeout=soon",
            "redis+cluster://u:pw@127.0.0.1:6379/3",
            "redis+cluster://u:pw@127.0.0.1:6379?replicas=1",
            "redis+sentinel://u:pw@127.0.0.1:26379",
            "redis+sentinel://u:pw@127.0.0.1:26379/a/b",
            #[cfg(not(feature = "tls"))]
            "rediss://u:pw@127.0.0.1:6379",
            #[cfg(feature = "tls")]
            "rediss://u:pw@127.0.0.1:6379?ca=/no/such/ca.pem",
            #[cfg(feature = "tls")]
            "rediss://u:pw@127.0.0.1:6379?key=/k.pem",
        ] {
            let err = refused(url);
            assert!(
                matches!(err, Error::InvalidConfig { name: "store", .. }),
                "{url}: {err:?}"
            );
            let text = format!("{err} {err:?}");
            assert!(!text.contains(":pw@"), "{text}");
        }
        let other = refused("etcd://127.0.0.1:2379").to_string();
        assert!(
            other.contains("redis+sentinel://"),
            "names the schemes: {other}"
        );
    }

    #[test]
    fn good_urls_give_builders_with_their_options() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://:requirepass@127.0.0.1:6379/3?prefix=svc:",
            "redis://app:pw@[::1]:6379?replicas=1&replicasTimeout=1s",
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001?prefix=svc:",
            "redis+sentinel://app:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster?replicas=1",
        ] {
            let parsed = StoreUrl::parse(url).expect(url);
            let builder = builder_for(&parsed).expect(url);
            let shown = format!("{builder:?}");
            assert!(!shown.contains("pw"), "{shown}");
            if url.contains("prefix=svc:") {
                assert!(shown.contains("\"svc:\""), "{url}: {shown}");
            }
        }
    }
}
