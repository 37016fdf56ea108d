//! From a [`StoreUrl`] to a driver: the one place that knows the stores.

use std::sync::Arc;
#[cfg(feature = "redis")]
use std::time::Duration;

use leader_core::{Driver, Error, Result};

use crate::StoreUrl;

/// The schemes this build can connect to, for error messages.
fn available() -> String {
    let mut schemes: Vec<&str> = Vec::new();
    if cfg!(feature = "etcd") {
        schemes.push("etcd://");
        if cfg!(feature = "tls") {
            schemes.push("etcds://");
        }
    }
    if cfg!(feature = "redis") {
        schemes.extend(["redis://", "redis+cluster://", "redis+sentinel://"]);
        if cfg!(feature = "tls") {
            schemes.extend(["rediss://", "rediss+cluster://", "rediss+sentinel://"]);
        }
    }
    if cfg!(feature = "postgres") {
        schemes.extend(["postgres://", "postgresql://"]);
    }
    if schemes.is_empty() {
        "none (enable the `etcd`, `redis` or `postgres` feature of the `leader` crate)".to_owned()
    } else {
        schemes.join(", ")
    }
}

#[cfg_attr(
    all(
        feature = "etcd",
        feature = "redis",
        feature = "postgres",
        feature = "tls"
    ),
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

#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
fn bad(url: &StoreUrl, why: impl std::fmt::Display) -> Error {
    Error::invalid_config("store", format!("{why} (in `{url}`)"))
}

/// Fails on a query parameter not in `allowed`.
#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
fn only_params(url: &StoreUrl, allowed: &[&str]) -> Result<()> {
    match url.params().find(|(key, _)| !allowed.contains(key)) {
        None => Ok(()),
        Some((key, _)) if allowed.is_empty() => Err(bad(
            url,
            format!("`{}://` takes no parameter `{key}`", url.scheme()),
        )),
        Some((key, _)) => Err(bad(
            url,
            format!(
                "`{}://` takes no parameter `{key}`; it takes {}",
                url.scheme(),
                allowed.join(", ")
            ),
        )),
    }
}

/// The TLS files of a URL: `ca`, and `cert` with `key`, each read now.
#[cfg(all(feature = "tls", any(feature = "etcd", feature = "redis")))]
struct TlsFiles {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(all(feature = "tls", any(feature = "etcd", feature = "redis")))]
impl TlsFiles {
    fn read(url: &StoreUrl) -> Result<Self> {
        let read = |what: &str, key: &str| -> Result<Option<Vec<u8>>> {
            url.param(key)
                .map(|path| {
                    std::fs::read(path)
                        .map_err(|err| bad(url, format!("cannot read the {what} `{path}`: {err}")))
                })
                .transpose()
        };
        let ca = read("CA certificate (ca=)", "ca")?;
        let identity = match (
            read("client certificate (cert=)", "cert")?,
            read("client key (key=)", "key")?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(bad(url, "`cert=` and `key=` go together")),
        };
        Ok(TlsFiles { ca, identity })
    }
}

/// `user` and `password`, both or neither.
#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
fn credentials(url: &StoreUrl) -> Result<Option<(&str, &str)>> {
    match (url.user(), url.password()) {
        (Some(user), Some(password)) => Ok(Some((user, password))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(bad(url, "a user needs a password")),
        (None, Some(_)) => Err(bad(url, "a password needs a user")),
    }
}

pub(crate) async fn connect(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    // Boxed: the store clients' connect futures are deep types, and a caller's future that
    // holds them unboxed can exceed rustc's query depth limit.
    type Connecting<'a> =
        std::pin::Pin<Box<dyn Future<Output = Result<Arc<dyn Driver>>> + Send + 'a>>;
    let connecting: Connecting<'_> = match url.scheme() {
        "etcd" => Box::pin(etcd(url, false)),
        "etcds" => Box::pin(etcd(url, true)),
        "redis" | "rediss" => Box::pin(redis(url, Topology::Single)),
        "redis+cluster" | "rediss+cluster" => Box::pin(redis(url, Topology::Cluster)),
        "redis+sentinel" | "rediss+sentinel" => Box::pin(redis(url, Topology::Sentinel)),
        "postgres" | "postgresql" => Box::pin(postgres(url)),
        _ => return unsupported(url),
    };
    connecting.await
}

fn unsupported(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    Err(Error::invalid_config(
        "store",
        format!(
            "unknown scheme `{}://` in `{url}`; available: {}",
            url.scheme(),
            available()
        ),
    ))
}

#[cfg(feature = "etcd")]
async fn etcd(url: &StoreUrl, tls: bool) -> Result<Arc<dyn Driver>> {
    use leader_etcd::EtcdDriver;
    let mut options = EtcdDriver::default_connect_options();
    if tls {
        #[cfg(feature = "tls")]
        {
            use leader_etcd::etcd_client::{Certificate, Identity, TlsOptions};
            only_params(url, &["ca", "cert", "key"])?;
            let files = TlsFiles::read(url)?;
            let mut tls = TlsOptions::new();
            if let Some(ca) = files.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = files.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        #[cfg(not(feature = "tls"))]
        return Err(not_built_in(url, "tls"));
    } else {
        only_params(url, &[])?;
    }
    if let Some((user, password)) = credentials(url)? {
        options = options.with_user(user, password);
    }
    let scheme = if tls { "https" } else { "http" };
    let endpoints: Vec<String> = url
        .hosts()
        .iter()
        .map(|h| format!("{scheme}://{h}"))
        .collect();
    // The path is the key prefix: `/svc/` gives `svc/`; no path, no prefix.
    let prefix = url.path().strip_prefix('/').unwrap_or(url.path());
    let builder = EtcdDriver::connect_builder(&endpoints, options).await?;
    Ok(Arc::new(builder.prefix(prefix).build()))
}

#[cfg(not(feature = "etcd"))]
async fn etcd(url: &StoreUrl, _tls: bool) -> Result<Arc<dyn Driver>> {
    Err(not_built_in(url, "etcd"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    Single,
    Cluster,
    Sentinel,
}

#[cfg(feature = "redis")]
async fn redis(url: &StoreUrl, topology: Topology) -> Result<Arc<dyn Driver>> {
    use leader_redis::RedisDriver;
    use leader_redis::redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

    let tls = url.scheme().starts_with("rediss");
    let mut allowed = vec!["prefix"];
    if topology != Topology::Cluster {
        allowed.extend(["replicas", "replicasTimeout"]);
    }
    if tls {
        allowed.extend(["ca", "cert", "key"]);
    }
    only_params(url, &allowed)?;
    #[cfg(not(feature = "tls"))]
    if tls {
        return Err(not_built_in(url, "tls"));
    }

    let path = url.path().trim_matches('/');
    let (db, master) = match topology {
        Topology::Single if path.is_empty() => (0, None),
        Topology::Single => match path.parse::<i64>() {
            Ok(db) if db >= 0 => (db, None),
            _ => {
                return Err(bad(
                    url,
                    format!("the path of a Redis URL is a database number, not `{path}`"),
                ));
            }
        },
        Topology::Cluster if path.is_empty() => (0, None),
        Topology::Cluster => {
            return Err(bad(
                url,
                "a Redis Cluster URL has no path (a Cluster has database 0 only)",
            ));
        }
        Topology::Sentinel if path.is_empty() || path.contains('/') => {
            return Err(bad(
                url,
                "a Sentinel URL's path is the master's name: redis+sentinel://host:port/MASTER",
            ));
        }
        Topology::Sentinel => (0, Some(path)),
    };
    if topology == Topology::Single && url.hosts().len() != 1 {
        return Err(bad(
            url,
            "a Redis URL takes one host:port; a Cluster is redis+cluster://, Sentinel redis+sentinel://",
        ));
    }
    // A password alone is Redis's `requirepass` (`AUTH password`, the default user).
    let credentials = match (url.user(), url.password()) {
        (None, Some(password)) => Some(("default", password)),
        _ => credentials(url)?,
    };
    let node = |host: &str| -> Result<ConnectionInfo> {
        let (name, port) = host
            .rsplit_once(':')
            .and_then(|(name, port)| Some((name, port.parse::<u16>().ok()?)))
            .ok_or_else(|| bad(url, format!("needs host:port, not `{host}`")))?;
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
        let mut info = addr.into_connection_info().map_err(|err| bad(url, err))?;
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

    #[cfg(feature = "tls")]
    let certificates = if tls {
        let files = TlsFiles::read(url)?;
        Some(leader_redis::redis::TlsCertificates {
            client_tls: files.identity.map(|(client_cert, client_key)| {
                leader_redis::redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: files.ca,
        })
    } else {
        None
    };

    let mut builder = match topology {
        Topology::Single => {
            let node = nodes
                .into_iter()
                .next()
                .ok_or_else(|| bad(url, "no host"))?;
            #[cfg(feature = "tls")]
            let client = match certificates {
                Some(certificates) => {
                    leader_redis::redis::Client::build_with_tls(node, certificates)
                }
                None => leader_redis::redis::Client::open(node),
            };
            #[cfg(not(feature = "tls"))]
            let client = leader_redis::redis::Client::open(node);
            RedisDriver::builder(client.map_err(|err| bad(url, err))?)
        }
        Topology::Cluster => {
            #[cfg(feature = "tls")]
            let builder = match certificates {
                Some(certificates) => RedisDriver::cluster_builder_with_tls(nodes, certificates),
                None => RedisDriver::cluster_builder(nodes),
            };
            #[cfg(not(feature = "tls"))]
            let builder = RedisDriver::cluster_builder(nodes);
            builder?
        }
        Topology::Sentinel => {
            use leader_redis::redis::sentinel::{SentinelClientBuilder, SentinelServerType};
            let master = master.unwrap_or_default();
            let addrs = nodes.iter().map(|info| info.addr().clone());
            let mut sentinel =
                SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(|err| bad(url, err))?;
            if let Some((user, password)) = credentials {
                sentinel = sentinel
                    .set_client_to_redis_username(user)
                    .set_client_to_redis_password(password);
            }
            #[cfg(feature = "tls")]
            if let Some(certificates) = certificates {
                sentinel = sentinel
                    .set_client_to_redis_tls_mode(leader_redis::redis::TlsMode::Secure)
                    .set_client_to_redis_certificates(certificates);
            }
            RedisDriver::sentinel_builder(sentinel.build().map_err(|err| bad(url, err))?)
        }
    };
    if let Some(prefix) = url.param("prefix") {
        builder = builder.prefix(prefix);
    }
    if let Some(replicas) = url.param("replicas") {
        let replicas: usize = replicas
            .parse()
            .map_err(|_| bad(url, format!("replicas={replicas} is not a number")))?;
        let timeout = match url.param("replicasTimeout") {
            Some(text) => humantime::parse_duration(text)
                .map_err(|err| bad(url, format!("replicasTimeout={text}: {err}")))?,
            None => Duration::from_millis(500),
        };
        builder = builder.replicas(replicas, timeout);
    } else if url.param("replicasTimeout").is_some() {
        return Err(bad(url, "replicasTimeout= needs replicas="));
    }
    Ok(Arc::new(builder.connect().await?))
}

#[cfg(not(feature = "redis"))]
async fn redis(url: &StoreUrl, _topology: Topology) -> Result<Arc<dyn Driver>> {
    Err(not_built_in(url, "redis"))
}

#[cfg(feature = "postgres")]
async fn postgres(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    // TLS (`sslmode=require`/`verify-full`, `sslrootcert=`) needs leader-postgres's `tls`
    // feature, which the `tls` feature turns on; without it the driver says so.
    Ok(Arc::new(
        leader_postgres::PostgresDriver::connect(url.as_given()).await?,
    ))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(url: &StoreUrl) -> Result<Arc<dyn Driver>> {
    Err(not_built_in(url, "postgres"))
}
