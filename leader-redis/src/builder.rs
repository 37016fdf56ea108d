//! The real driver's constructors and options: [`RedisDriverBuilder`].

use std::sync::Arc;
use std::time::Duration;

use leader_core::{Error, Result};
use redis::Client;
use redis::cluster::ClusterClient;
use tracing::warn;

use crate::client::{ClientIo, redis_error};
use crate::driver::RedisDriver;
use crate::io::RedisIo;
use crate::topology::Source;

/// The default for [`RedisDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds a [`RedisDriver`] with options.
#[derive(Clone)]
#[must_use = "a RedisDriverBuilder does nothing until build() is called"]
pub struct RedisDriverBuilder {
    source: Source,
    prefix: String,
    request_timeout: Duration,
    replicas: Option<(usize, Duration)>,
}

impl std::fmt::Debug for RedisDriverBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDriverBuilder")
            .field("topology", &self.source.kind())
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl RedisDriverBuilder {
    /// A prefix put before every key and channel. Defaults to `leader:`; the ACL of the
    /// driver's user names it (`~leader:* &leader:*`, see the README).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest wait for one Redis request. Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// After each write (taking the lead, renewing, resigning), `WAIT replicas timeout` on
    /// the same connection: a term is granted or renewed only once `replicas` replicas have
    /// its write, and otherwise the attempt fails (the term then ends at its deadline, and a
    /// campaign is withdrawn and tried again). This narrows the window in which a failover
    /// to an asynchronous replica forgets a leader; it does not close it (see the README,
    /// "Sentinel"). For one server or Sentinel; a Cluster ignores it (with a warning).
    pub fn replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// The driver. It connects on first use.
    pub fn build(self) -> RedisDriver {
        let prefix = self.prefix.clone();
        RedisDriver::with_io(Arc::new(self.io()), prefix)
    }

    /// The real I/O layer alone, with these options: what [`build`](Self::build) puts
    /// under the driver's protocol. For tests that hold a model of Redis to the real
    /// server (the crate's differential test), and for
    /// [`RedisDriver::with_io`](crate::RedisDriver::with_io) with a layer of your own
    /// around it.
    pub fn build_io(self) -> Arc<dyn RedisIo> {
        Arc::new(self.io())
    }

    /// The real I/O layer with these options.
    fn io(self) -> ClientIo {
        let replicas = match (&self.source, self.replicas) {
            (Source::Cluster { .. }, Some(_)) => {
                warn!("Redis Cluster: the replicas option is not supported there and is ignored");
                None
            }
            (Source::Sentinel(_), None) => {
                warn!(
                    "Redis Sentinel without the replicas option: a master partitioned from \
                     the sentinels goes on accepting its leader's renewals while the new \
                     master elects another; set replicas (WAIT) to 1 or more, or \
                     min-replicas-to-write on the servers (see leader-redis's README)"
                );
                None
            }
            (_, replicas) => replicas,
        };
        ClientIo::new(self.source, self.prefix, self.request_timeout, replicas)
    }

    /// The driver, connected: fails if Redis cannot be reached or refuses this client now.
    /// Warns (a `tracing` warning) when the server's `maxmemory-policy` could evict a
    /// leader's key, if this user may read it.
    pub async fn connect(self) -> Result<RedisDriver> {
        let prefix = self.prefix.clone();
        let io = Arc::new(self.io());
        io.connect().await?;
        Ok(RedisDriver::with_io(io, prefix))
    }
}

impl RedisDriver {
    /// A driver on `client` (one server), with the default options. It connects on first
    /// use.
    pub fn new(client: Client) -> Self {
        Self::builder(client).build()
    }

    /// A builder for a driver on `client` (one server).
    pub fn builder(client: Client) -> RedisDriverBuilder {
        Self::on(Source::Single(client))
    }

    /// A builder for a driver on a Redis Cluster with the seed `nodes`; pub/sub connects to
    /// one of them (the first that answers), since a `PUBLISH` reaches every node of a
    /// Cluster.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) if `nodes` is empty or one does not parse.
    pub fn cluster_builder<T: redis::IntoConnectionInfo + Clone>(
        nodes: Vec<T>,
    ) -> Result<RedisDriverBuilder> {
        let client = ClusterClient::builder(nodes.clone())
            .build()
            .map_err(|err| Error::invalid_config("store", err.to_string()))?;
        Self::cluster_on(client, nodes.into_iter().map(Client::open))
    }

    /// [`cluster_builder`](Self::cluster_builder) over TLS with `certificates` (a CA of
    /// your own, a client certificate); the nodes' URLs are `rediss://`.
    ///
    /// # Errors
    ///
    /// As [`cluster_builder`](Self::cluster_builder).
    #[cfg(feature = "tls")]
    pub fn cluster_builder_with_tls<T: redis::IntoConnectionInfo + Clone>(
        nodes: Vec<T>,
        certificates: redis::TlsCertificates,
    ) -> Result<RedisDriverBuilder> {
        let client = ClusterClient::builder(nodes.clone())
            .certs(certificates.clone())
            .build()
            .map_err(|err| Error::invalid_config("store", err.to_string()))?;
        Self::cluster_on(
            client,
            nodes
                .into_iter()
                .map(|node| Client::build_with_tls(node, certificates.clone())),
        )
    }

    fn cluster_on(
        client: ClusterClient,
        nodes: impl Iterator<Item = redis::RedisResult<Client>>,
    ) -> Result<RedisDriverBuilder> {
        let nodes = nodes
            .collect::<redis::RedisResult<Vec<Client>>>()
            .map_err(|err| Error::invalid_config("store", err.to_string()))?;
        Self::cluster_builder_from(client, nodes)
    }

    /// A builder for a driver on a Redis Cluster through a cluster client of your own
    /// (for its options: timeouts, a node address map, credentials providers), with
    /// `pubsub_nodes`: the nodes that pub/sub may connect to, tried in turn.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) if `pubsub_nodes` is empty.
    pub fn cluster_builder_from(
        client: ClusterClient,
        nodes: Vec<Client>,
    ) -> Result<RedisDriverBuilder> {
        if nodes.is_empty() {
            return Err(Error::invalid_config(
                "store",
                "a Redis Cluster needs at least one node",
            ));
        }
        Ok(Self::on(Source::Cluster { client, nodes }))
    }

    /// A builder for a driver on the master that `sentinel` names (a
    /// [`SentinelClient`](redis::sentinel::SentinelClient) for the master's service name,
    /// with [`SentinelServerType::Master`](redis::sentinel::SentinelServerType::Master)).
    /// Every (re)connection asks the sentinels again, and a connection to a server that
    /// has become a replica (`READONLY`) is replaced, so the driver follows a failover.
    pub fn sentinel_builder(sentinel: redis::sentinel::SentinelClient) -> RedisDriverBuilder {
        Self::on(Source::Sentinel(Arc::new(tokio::sync::Mutex::new(
            sentinel,
        ))))
    }

    fn on(source: Source) -> RedisDriverBuilder {
        RedisDriverBuilder {
            source,
            prefix: "leader:".to_owned(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            replicas: None,
        }
    }

    /// Connects to `url` (`redis://127.0.0.1:6379`, `rediss://` with the `tls` feature),
    /// as the `redis` crate reads URLs, and returns a driver with the default options;
    /// fails if Redis cannot be reached or refuses this client now. For this workspace's
    /// store URLs (Cluster, Sentinel, `prefix=`, `replicas=`, TLS files) use
    /// [`connect_url`](Self::connect_url).
    pub async fn connect(url: &str) -> Result<Self> {
        let client = Client::open(url).map_err(redis_error)?;
        Self::builder(client).connect().await
    }
}
