#![doc = include_str!("../README.md")]

mod failure;
mod fence;
mod keyspace;
mod line;
mod renewals;
mod scripts;
mod subscriber;
mod topology;
mod url;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use leader_core::{Candidate, CandidateInfo, Driver, Error, Grant, LeaderInfo, Result};
use rand::Rng;
use redis::Client;
use redis::cluster::ClusterClient;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

pub use fence::Fence;
pub use redis;
pub use url::SCHEMES;

use line::{Lines, News};
use renewals::{Cached, Renewals};
use scripts::{ACQUIRE, CANDIDATES, HAND_OVER, HOLDS, LEADER, PROCLAIM, REFRESH, RENEW, RESIGN};
use subscriber::Subscriber;
use topology::{Call, Connection, Lua, Source, needs_new_connection};

/// The default for [`RedisDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Driver`] for Redis: one server, a Redis Cluster, or the master that Sentinel names.
///
/// Each election uses, for election `jobs` and prefix `p:`, the hash `p:{jobs}:leader`
/// (fields `owner`, `value`, `token`, with a millisecond expiry), the counter
/// `p:{jobs}:fence` (the fencing tokens) and the channel `p:{jobs}:events`. The keys share
/// the hash tag `{jobs}`, so Redis Cluster keeps them in one slot. Taking the lead,
/// renewing and resigning are Lua scripts (EVALSHA, loading the script when the server
/// lacks it) that compare the owner's unique token first: a driver never extends or
/// deletes another candidate's key.
///
/// Cheap to clone: clones share one command connection (which reconnects) and one pub/sub
/// connection; each election built on it is a distinct candidate.
#[derive(Clone)]
pub struct RedisDriver {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    /// The shared connection and its generation (counting the connections made).
    connection: tokio::sync::Mutex<(u64, Option<Connection>)>,
    prefix: String,
    request_timeout: Duration,
    replicas: Option<(usize, Duration)>,
    subscriber: Subscriber,
    renewals: Renewals,
    lines: Lines,
    /// The keyspace-notification channel prefix (`__keyspace@<db>__:`) when the server
    /// publishes the events a held term needs (see [`keyspace`]); `None` otherwise.
    keyspace: std::sync::Mutex<Option<String>>,
    acquire: Lua,
    renew: Lua,
    resign: Lua,
    leader: Lua,
    refresh: Lua,
    candidates: Lua,
    hand_over: Lua,
    proclaim: Lua,
    holds: Lua,
}

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
        RedisDriver {
            inner: Arc::new(Inner {
                subscriber: Subscriber::new(self.source.clone()),
                renewals: Renewals::default(),
                lines: Lines::default(),
                keyspace: std::sync::Mutex::new(None),
                source: self.source,
                connection: tokio::sync::Mutex::new((0, None)),
                prefix: self.prefix,
                request_timeout: self.request_timeout,
                replicas,
                acquire: Lua::new(ACQUIRE),
                renew: Lua::new(RENEW),
                resign: Lua::new(RESIGN),
                leader: Lua::new(LEADER),
                refresh: Lua::new(REFRESH),
                candidates: Lua::new(CANDIDATES),
                hand_over: Lua::new(HAND_OVER),
                proclaim: Lua::new(PROCLAIM),
                holds: Lua::new(HOLDS),
            }),
        }
    }

    /// The driver, connected: fails if Redis cannot be reached or refuses this client now.
    /// Warns (a `tracing` warning) when the server's `maxmemory-policy` could evict a
    /// leader's key, if this user may read it.
    pub async fn connect(self) -> Result<RedisDriver> {
        let driver = self.build();
        let (_, mut connection) = driver.inner.connection().await?;
        match connection.eviction_policy().await {
            Some(policy) if policy != "noeviction" => warn!(
                %policy,
                "Redis may evict keys (maxmemory-policy is not noeviction): an evicted \
                 leader key elects another candidate while the leader still leads; use \
                 noeviction or an instance of its own for elections"
            ),
            Some(_) => {}
            None => debug!("cannot read maxmemory-policy (CONFIG GET not permitted?)"),
        }
        Ok(driver)
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

    /// The keys and channels of `election`.
    pub fn keys(&self, election: &str) -> ElectionKeys {
        let tag = format!("{}{{{election}}}", self.inner.prefix);
        ElectionKeys {
            leader: format!("{tag}:leader"),
            fence: format!("{tag}:fence"),
            channel: format!("{tag}:events"),
            line: format!("{tag}:line"),
            line_until: format!("{tag}:line-until"),
            line_maintained: format!("{tag}:line-maintained"),
            wake_prefix: format!("{tag}:wake:"),
        }
    }
}

impl RedisDriver {
    /// Whether `election` can be held under this driver's prefix (see [`check_name`]).
    fn check(&self, election: &str) -> Result<()> {
        check_name(&self.inner.prefix, election)
    }

    /// Resolves when Redis says that `candidate`'s term `fencing_token` is gone: its key
    /// deleted, expired, evicted or overwritten (by an operator, by another candidate).
    /// Only where the server publishes keyspace notifications (`notify-keyspace-events`
    /// with `K` and `g` and `x`, or `KA`; read at each connection, not on a Cluster): an
    /// event on the key is a reason to read it, and this resolves only if the key no longer
    /// holds the term. Elsewhere it never resolves, and the next renewal (within a third of
    /// the TTL) notices instead.
    pub fn term_gone(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
    ) -> impl Future<Output = ()> + Send + 'static {
        let driver = self.clone();
        let candidate = candidate.clone();
        async move {
            let Some(prefix) = driver.inner.keyspace() else {
                return std::future::pending().await;
            };
            let keys = driver.keys(&candidate.election);
            let channel = format!("{prefix}{}", keys.leader);
            let mut notices = match driver.inner.subscriber.subscribe_checked(&channel).await {
                Ok(notices) => notices,
                Err(_) => {
                    debug!(%channel, "keyspace channel refused (ACL): the renewals notice a lost term");
                    return std::future::pending().await;
                }
            };
            let token = fencing_token.to_string();
            loop {
                notices.mark_seen();
                let call = Call::new(&driver.inner.holds, &[&keys.leader])
                    .arg(&candidate.id)
                    .arg(&token);
                match driver.inner.run::<i64>(call, false).await {
                    Ok(1) => {}
                    Ok(_) => {
                        warn!(election = %candidate.election, fencing_token, "the leader key no longer holds this term");
                        return;
                    }
                    // The renewals deal with store errors.
                    Err(_) => {}
                }
                notices.changed().await;
            }
        }
    }
}

impl std::fmt::Debug for RedisDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDriver")
            .field("topology", &self.inner.source.kind())
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// The Redis names one election uses; see [`RedisDriver`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ElectionKeys {
    /// The leader's term, a string `L\n<token>\n<owner>\n<value>` with the lease as
    /// expiry (or `N\n<nominee>` while a handover's nomination lasts).
    pub leader: String,
    /// The counter the fencing tokens come from.
    pub fence: String,
    /// The channel that announces `elected` and `resigned` (to observers).
    pub channel: String,
    /// The line of waiting candidates: a sorted set of places (`<owner>\n<value>`) by
    /// arrival (server time in µs).
    pub line: String,
    /// When each place in line expires unless its driver refreshes it (server time in
    /// ms), a sorted set.
    pub line_until: String,
    /// A marker that one driver pruned the line this refresh period (`PX` the period).
    pub line_maintained: String,
    /// The prefix of each waiting candidate's own channel: a resignation wakes only the
    /// head of the line, on `wake_prefix` + its owner token.
    pub wake_prefix: String,
}

impl ElectionKeys {
    /// The channel that wakes the waiting candidate `owner`.
    pub fn wake(&self, owner: &str) -> String {
        format!("{}{owner}", self.wake_prefix)
    }
}

/// Whether `election` (under `prefix`) has keys of its own: the name sits between `{` and
/// `}` (the hash tag), so it must contain neither (else two names could share keys, or an
/// election's keys could land in different Cluster slots); the prefix, shared by every
/// election of the driver, neither, for the same reason. Names are case-sensitive (as
/// Redis keys are): `Jobs` and `jobs` are two elections; `:` and `/` are ordinary
/// characters inside the tag, so `a` and `a:b` never nest.
fn check_name(prefix: &str, election: &str) -> Result<()> {
    if election.contains(['{', '}']) {
        return Err(Error::invalid_config(
            "name",
            "must not contain `{` or `}` with Redis (they delimit the election's hash tag, so \
             such a name could share keys with another election or split its own across \
             Cluster slots)",
        ));
    }
    if prefix.contains(['{', '}']) {
        return Err(Error::invalid_config(
            "prefix",
            "must not contain `{` or `}` with Redis (the election name is the hash tag)",
        ));
    }
    Ok(())
}

/// The commands the driver sends (its scripts' included): the least-privilege ACL of its
/// user is `~PREFIX* &PREFIX*` and these (see the README, "Production").
pub const ACL_COMMANDS: &str = "+evalsha +eval +ping +subscribe +unsubscribe +get +set \
    +del +incr +pexpire +pttl +publish +zadd +zrem +zrange +zrangebyscore +zmscore +zscore \
    +zpopmin +time +wait +config|get +cluster|slots +role +info";

/// A Redis error as this crate's [`Error`]: a refused login or a missing ACL permission is
/// [`Error::Denied`] (retrying cannot fix it), anything else [`Error::Store`].
pub(crate) fn redis_error(err: redis::RedisError) -> Error {
    if is_denied(&err) {
        Error::denied(failure::Failure(err))
    } else {
        Error::store(failure::Failure(err))
    }
}

/// A Redis refusal, with what the driver's user needs.
#[derive(Debug)]
struct Refusal {
    source: leader_core::BoxError,
    prefix: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let said = leader_core::ErrorChain(self.source.as_ref()).to_string();
        let prefix = &self.prefix;
        if said.contains("NOPERM") || said.contains("no permissions") {
            let commands: Vec<&str> = ACL_COMMANDS.split_whitespace().collect();
            write!(
                f,
                "{said}: the Redis user needs the keys and channels under `{prefix}` and the \
                 driver's commands (ACL SETUSER USER ~{prefix}* &{prefix}* {})",
                commands.join(" ")
            )
        } else {
            write!(
                f,
                "{said}: Redis refused the credentials (check the user and password)"
            )
        }
    }
}

impl std::error::Error for Refusal {}

fn is_denied(err: &redis::RedisError) -> bool {
    err.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOPERM" | "WRONGPASS" | "NOAUTH"))
}

/// The renewal script's call for `batch`.
fn renew_call<'a>(script: &'a Lua, batch: &'a [renewals::Due]) -> Call<'a> {
    let keys: Vec<&str> = batch.iter().map(|due| due.key.as_str()).collect();
    let mut call = Call::new(script, &keys);
    for due in batch {
        call = call.arg(&due.owner).arg(due.token).arg(millis(due.ttl));
    }
    call
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Inner {
    /// The shared connection and its generation, made on first use (and again after
    /// [`discard`](Self::discard)).
    async fn connection(&self) -> Result<(u64, Connection)> {
        let mut slot = self.connection.lock().await;
        if let (generation, Some(connection)) = &*slot {
            return Ok((*generation, connection.clone()));
        }
        // Requests with a `WAIT` may take its timeout on top of the request timeout.
        let limit = self.request_timeout + self.replicas.map_or(Duration::ZERO, |(_, wait)| wait);
        let (mut connection, db) =
            match timeout(self.request_timeout * 2, self.source.connect(limit)).await {
                Ok(result) => result.map_err(|err| self.explain(redis_error(err)))?,
                Err(_) => return Err(Error::Timeout(self.request_timeout * 2)),
            };
        // Keyspace notifications are node-local on a Cluster (db is None there): not used.
        let keyspace = match db {
            Some(db) => {
                let flags = timeout(
                    self.request_timeout,
                    connection.config("notify-keyspace-events"),
                )
                .await
                .ok()
                .flatten();
                keyspace::channel_prefix(db, flags.as_deref())
            }
            None => None,
        };
        debug!(?keyspace, "keyspace notifications for held terms");
        *self
            .keyspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = keyspace;
        slot.0 += 1;
        slot.1 = Some(connection.clone());
        Ok((slot.0, connection))
    }

    /// `err`, with a refusal ([`Error::Denied`]) explained.
    fn explain(&self, err: Error) -> Error {
        match err {
            Error::Denied(source) => Error::denied(Refusal {
                source,
                prefix: self.prefix.clone(),
            }),
            other => other,
        }
    }

    /// Drops the shared connection of `generation` after a request on it failed in a way
    /// a new connection may fix: the connection manager reconnects when a socket closes,
    /// but not when it merely goes silent (half-open), and not to another server when this
    /// one became a replica (a Sentinel failover); the next request opens a new one. A
    /// newer connection (made after another request's failure) is kept.
    async fn discard(&self, generation: u64) {
        let mut slot = self.connection.lock().await;
        if slot.0 == generation && slot.1.take().is_some() {
            debug!("Redis request failed; opening a new connection for the next one");
        }
    }

    /// Runs a script; `writes` scripts wait for the replicas if the driver has that
    /// option.
    async fn run<T: redis::FromRedisValue>(&self, call: Call<'_>, writes: bool) -> Result<T> {
        let (generation, mut connection) = self.connection().await?;
        let wait = self.replicas.filter(|_| writes);
        let result = timeout(
            self.request_timeout + wait.map_or(Duration::ZERO, |(_, wait)| wait),
            call.run::<T>(&mut connection, wait),
        )
        .await;
        match result {
            Ok(Ok((value, None))) => Ok(value),
            Ok(Ok((value, Some(acked)))) => match wait {
                Some((wanted, _)) if acked < wanted => Err(Error::store(std::io::Error::other(
                    format!("WAIT: {acked} of {wanted} replicas acknowledged the write in time"),
                ))),
                _ => Ok(value),
            },
            Ok(Err(err)) => {
                if needs_new_connection(&err) {
                    self.discard(generation).await;
                }
                Err(self.explain(redis_error(err)))
            }
            Err(_) => {
                self.discard(generation).await;
                Err(Error::Timeout(self.request_timeout))
            }
        }
    }

    /// Takes the lead or stands in line. `in_line`: this candidate's place may still be
    /// in line (it was not popped by a wakeup), so an election removes it. `stand`: stand
    /// in line if the key is held (else only look). `ask`: report when the lease it waits
    /// behind ends.
    async fn try_acquire(
        &self,
        keys: &ElectionKeys,
        candidate: &Candidate,
        in_line: bool,
        stand: bool,
        ask: bool,
    ) -> Result<Acquired> {
        let flag = |on: bool| if on { "1" } else { "0" };
        let sent_at = Instant::now();
        let call = Call::new(&self.acquire, &[&keys.leader, &keys.fence, &keys.line])
            .arg(&candidate.id)
            .arg(&candidate.value)
            .arg(millis(candidate.ttl))
            .arg(&keys.channel)
            .arg(place(candidate))
            .arg(flag(in_line))
            .arg(flag(stand))
            .arg(flag(ask));
        let answer: Vec<i64> = self.run(call, true).await?;
        match answer.as_slice() {
            [1, token] => {
                let token = u64::try_from(*token).map_err(|_| {
                    Error::store(std::io::Error::other(format!("fence counter at {token}")))
                })?;
                self.renewals
                    .hold(&keys.leader, &candidate.id, token, candidate.ttl, sent_at);
                Ok(Acquired::Won(Grant::new(token, sent_at, candidate.ttl)))
            }
            [0, pttl] => Ok(Acquired::Waiting(u64::try_from(*pttl).ok().map(|ms| {
                sent_at + Duration::from_millis(ms) + expiry_jitter(candidate.ttl)
            }))),
            _ => Ok(Acquired::Waiting(None)),
        }
    }

    /// The resignation script for `candidate` with `token` (`-`: leave the line only).
    async fn resign_call(
        &self,
        keys: &ElectionKeys,
        candidate: &Candidate,
        token: &str,
    ) -> Result<()> {
        let call = Call::new(&self.resign, &[&keys.leader, &keys.line, &keys.line_until])
            .arg(&candidate.id)
            .arg(place(candidate))
            .arg(token)
            .arg(&keys.channel)
            .arg(&keys.wake_prefix)
            .arg(millis(keep(candidate.ttl)));
        let _removed: i64 = self.run(call, true).await?;
        Ok(())
    }

    /// The connection's keyspace channel prefix if the server publishes the events a held
    /// term needs; `None` otherwise (or for a Cluster, where they are node-local).
    fn keyspace(&self) -> Option<String> {
        self.keyspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The leader and its remaining lease in milliseconds.
    async fn leader_with_pttl(&self, keys: &ElectionKeys) -> Result<Option<(LeaderInfo, i64)>> {
        let call = Call::new(&self.leader, &[&keys.leader]);
        let held: Option<(String, Vec<u8>, u64, i64)> = {
            let raw: Vec<redis::Value> = self.run(call, false).await?;
            if raw.is_empty() {
                None
            } else {
                Some(
                    redis::FromRedisValue::from_redis_value(redis::Value::Array(raw))
                        .map_err(Error::store)?,
                )
            }
        };
        Ok(held.map(|(id, value, fencing_token, pttl)| {
            (LeaderInfo::new(id, value, fencing_token), pttl)
        }))
    }
}

/// What an acquisition attempt did.
enum Acquired {
    /// Elected.
    Won(Grant),
    /// In line (or looked only); when the lease it waits behind ends, if asked.
    Waiting(Option<Instant>),
}

/// A candidate's place in line: `<owner>\n<value>` (the line lists values too, for
/// [`Driver::candidates`]).
fn place(candidate: &Candidate) -> Vec<u8> {
    let mut place = Vec::with_capacity(candidate.id.len() + 1 + candidate.value.len());
    place.extend_from_slice(candidate.id.as_bytes());
    place.push(b'\n');
    place.extend_from_slice(&candidate.value);
    place
}

/// How long a place in line lives without a refresh: 1.25 of the shortest TTL among its
/// driver's waiters, refreshed every [`period`]. A place left behind (a campaign that
/// landed after its withdrawal) is pruned at the first maintenance after that (one per
/// period and election): within 1.25 + 2/3 < 2 TTLs.
fn keep(ttl: Duration) -> Duration {
    ttl * 5 / 4
}

/// How often a driver refreshes its waiters' places: two thirds of their shortest TTL.
fn period(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// Refreshes the places of this driver's candidates waiting in one election, every half
/// of their shortest TTL, until none waits; tells each its news.
async fn refresher(driver: RedisDriver, keys: ElectionKeys, line: Arc<line::Line>) {
    loop {
        let Some((places, owners, ttl)) = line.snapshot() else {
            if driver.inner.lines.leave_if_empty(&keys.line, &line) {
                return;
            }
            continue;
        };
        let keep = keep(ttl);
        let sent_at = Instant::now();
        let mut head = None;
        let mut failed = false;
        for (chunk, chunk_owners) in places.chunks(500).zip(owners.chunks(500)) {
            let mut call = Call::new(
                &driver.inner.refresh,
                &[
                    &keys.leader,
                    &keys.line,
                    &keys.line_until,
                    &keys.line_maintained,
                ],
            )
            .arg(millis(keep))
            .arg(millis(period(ttl)))
            .arg(&keys.wake_prefix);
            for place in chunk {
                call = call.arg(place.as_slice());
            }
            match driver
                .inner
                .run::<(Vec<usize>, Vec<u8>, i64)>(call, true)
                .await
            {
                Ok((missing, first, pttl)) => {
                    for i in missing {
                        if let Some(owner) = chunk_owners.get(i) {
                            line.tell(owner, News::Missing);
                        }
                    }
                    let first = first
                        .split(|b| *b == b'\n')
                        .next()
                        .map(|owner| String::from_utf8_lossy(owner).into_owned());
                    let expiry = u64::try_from(pttl)
                        .ok()
                        .map(|ms| sent_at + Duration::from_millis(ms) + expiry_jitter(ttl));
                    head = first.filter(|f| !f.is_empty()).map(|f| (f, expiry));
                }
                Err(err) => {
                    debug!(error = %leader_core::ErrorChain(&err), "refreshing places in line failed");
                    failed = true;
                }
            }
        }
        if !failed {
            line.behind_except(head.as_ref().map(|(owner, _)| owner.as_str()));
            if let Some((owner, expiry)) = &head {
                line.tell(owner, News::Head(*expiry));
            }
        }
        let pause = if failed {
            (ttl / 10).max(Duration::from_millis(50))
        } else {
            period(ttl)
        };
        sleep(pause).await;
    }
}

/// A few milliseconds, so that waiters of several drivers do not all ask at once.
fn expiry_jitter(ttl: Duration) -> Duration {
    let spread = millis(ttl / 20).min(50);
    Duration::from_millis(rand::rng().random_range(1..=spread.max(1)))
}

/// How long a waiter sleeps on a holder's remaining lease: the PTTL plus a little jitter,
/// so waiters that saw the same expiry do not all ask at the same millisecond.
fn expiry_wait(pttl: i64, ttl: Duration) -> Duration {
    let base = match u64::try_from(pttl) {
        Ok(ms) => Duration::from_millis(ms),
        // -1: a key without expiry (set by hand); -2: gone already. Look again later.
        Err(_) if pttl == -2 => Duration::from_millis(1),
        Err(_) => ttl,
    };
    let spread = millis(ttl / 20).min(50);
    base + Duration::from_millis(rand::rng().random_range(1..=spread.max(1)))
}

#[async_trait]
impl Driver for RedisDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        self.check(&candidate.election)?;
        let keys = self.keys(&candidate.election);
        // This candidate's own channel: a resignation wakes the head of the line only, not
        // every waiter. A candidate stands in line only once subscribed, so that no wakeup
        // meant for it is missed: at once if the channel still is (a candidate that waited
        // and campaigns again costs no SUBSCRIBE), else after a first try that only
        // peeks, so a candidate elected at once subscribes to nothing.
        let wake = keys.wake(&candidate.id);
        let mut notices = self.inner.subscriber.existing(&wake);
        // Whether this candidate's place may still be in line (not popped by a wakeup).
        let mut in_line = false;
        let mut waiting: Option<line::Waiting> = None;
        // The head's timer fired: the next try asks when the lease ends now.
        let mut timer_fired = false;
        loop {
            if let Some(notices) = &mut notices {
                notices.mark_seen();
            }
            let stand = notices.is_some();
            let lease_end = match self
                .inner
                .try_acquire(&keys, candidate, in_line, stand, timer_fired)
                .await?
            {
                Acquired::Won(grant) => return Ok(grant),
                Acquired::Waiting(lease_end) => lease_end,
            };
            let Some(notices) = &mut notices else {
                notices = Some(self.inner.subscriber.subscribe(&wake).await);
                continue;
            };
            in_line = true;
            let waiting = match &mut waiting {
                Some(waiting) => waiting,
                None => {
                    let (joined, new_line) = self.inner.lines.join(
                        &keys.line,
                        &candidate.id,
                        place(candidate),
                        candidate.ttl,
                    );
                    if let Some(line) = new_line {
                        tokio::spawn(refresher(self.clone(), keys.clone(), line));
                    }
                    waiting.insert(joined)
                }
            };
            // Only the head of the line keeps a timer (at the lease it waits behind);
            // the others wait for a wakeup or for their driver's refresh.
            // A lease end already passed is not waited for again (the lease was renewed
            // since that refresh): the next refresh says when it ends now.
            let upcoming = |at: Option<Instant>| at.filter(|at| *at > Instant::now());
            let mut expiry = match *waiting.news.borrow_and_update() {
                News::Head(at) => upcoming(at),
                _ => None,
            };
            if timer_fired {
                // Still the head (as far as this driver knows): wait for the lease as it is
                // now, not for the next refresh.
                expiry = upcoming(lease_end).or(expiry);
                timer_fired = false;
            }
            debug!(election = %candidate.election, "waiting in line");
            loop {
                let timer = async {
                    match expiry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = notices.changed() => {
                        // Popped from the line by the wakeup (or pub/sub reconnected).
                        in_line = false;
                        break;
                    }
                    changed = waiting.news.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        match *waiting.news.borrow_and_update() {
                            News::Missing => {
                                in_line = false;
                                break;
                            }
                            News::Head(at) => expiry = upcoming(at),
                            News::Behind | News::None => expiry = None,
                        }
                    }
                    () = timer => {
                        timer_fired = true;
                        break;
                    }
                }
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        let keys = self.keys(&candidate.election);
        let inner = &self.inner;
        let token = grant.fencing_token;
        let renewed = |at: Instant| Grant::new(token, at, candidate.ttl);
        let cluster = matches!(inner.source, Source::Cluster { .. });
        // A Cluster keeps elections in different slots, which one script cannot touch
        // together: one call per renewal there.
        let mut _batch = None;
        if !cluster {
            let ask = || {
                inner.renewals.ask(
                    &keys.leader,
                    &candidate.id,
                    token,
                    candidate.ttl,
                    grant.confirmed_at,
                )
            };
            match ask() {
                Cached::Renewed(at) => return Ok(renewed(at)),
                Cached::Gone => return Err(Error::TermGone),
                Cached::Miss => {}
            }
            // Held until this renewal's batch is recorded: renewals asking meanwhile then
            // find theirs in it.
            _batch = Some(inner.renewals.batch.lock().await);
            match ask() {
                Cached::Renewed(at) => return Ok(renewed(at)),
                Cached::Gone => return Err(Error::TermGone),
                Cached::Miss => {}
            }
        }
        // This renewal's own term first, from its own arguments; then (one server or
        // Sentinel) the other held terms due, up to one call's worth: the rest renew in
        // their own terms' calls.
        let own = renewals::Due {
            key: keys.leader.clone(),
            owner: candidate.id.clone(),
            token,
            ttl: candidate.ttl,
        };
        let mut batch = vec![own];
        if !cluster {
            batch.extend(inner.renewals.due(&keys.leader, renewals::BATCH - 1));
        }
        let sent_at = Instant::now();
        let values: Vec<i64> = inner.run(renew_call(&inner.renew, &batch), true).await?;
        let flags: Vec<bool> = values.iter().map(|v| *v == 1).collect();
        inner.renewals.record(&batch, &flags, sent_at);
        if flags.first().copied().unwrap_or(false) {
            Ok(renewed(sent_at))
        } else {
            Err(Error::TermGone)
        }
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        let keys = self.keys(&candidate.election);
        // Deletes by exact token only: this request may land late, after this candidate's
        // next term began, and must not delete that one. Without a token (a campaign whose
        // answer never came), read it first; if another leads, only leave the line.
        let token = match fencing_token {
            Some(token) => token.to_string(),
            None => match self.inner.leader_with_pttl(&keys).await? {
                Some((leader, _)) if leader.id == candidate.id => leader.fencing_token.to_string(),
                _ => "-".to_owned(),
            },
        };
        self.inner.resign_call(&keys, candidate, &token).await?;
        self.inner
            .renewals
            .release(&keys.leader, &candidate.id, fencing_token);
        if fencing_token.is_none() {
            // A withdrawal: the campaign it ends may have sent a request that lands after
            // this one (a stalled server, a connection replaced after a timeout). Leave
            // the line again three times over the next 1.5 TTL, unless the candidate
            // waits again meanwhile: whatever such a request left is gone within 2 TTLs.
            let driver = self.clone();
            let candidate = candidate.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    sleep(candidate.ttl / 2).await;
                    if driver.inner.lines.waits(&keys.line, &candidate.id) {
                        return;
                    }
                    if let Err(err) = driver.inner.resign_call(&keys, &candidate, "-").await {
                        debug!(error = %leader_core::ErrorChain(&err), "leaving the line again failed");
                    }
                }
            });
        }
        Ok(())
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        self.check(election)?;
        let keys = self.keys(election);
        Ok(self
            .inner
            .leader_with_pttl(&keys)
            .await?
            .map(|(info, _)| info))
    }

    fn check_name(&self, election: &str) -> Result<()> {
        self.check(election)
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        self.check(election)?;
        let keys = self.keys(election);
        // Places not yet refreshed count as live here: the refresh prunes them if stale.
        let call = Call::new(
            &self.inner.candidates,
            &[&keys.leader, &keys.line, &keys.line_until],
        )
        .arg(1_000_000_000_000_000_u64);
        let flat: Vec<Vec<u8>> = self.inner.run(call, false).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for (i, pair) in flat.chunks_exact(2).enumerate() {
            if i == 0 && pair[0] == b"-" {
                continue;
            }
            let id = String::from_utf8_lossy(&pair[0]).into_owned();
            out.push(CandidateInfo::new(id, pair[1].clone(), i == 0));
        }
        Ok(out)
    }

    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        let keys = self.keys(&candidate.election);
        let call = Call::new(
            &self.inner.hand_over,
            &[&keys.leader, &keys.line, &keys.line_until],
        )
        .arg(&candidate.id)
        .arg(fencing_token.to_string())
        .arg(nominee)
        .arg(millis(candidate.ttl))
        .arg(&keys.wake_prefix)
        .arg(&keys.channel);
        let answer: String = self.inner.run(call, true).await?;
        match answer.as_str() {
            "ok" => {
                self.inner
                    .renewals
                    .release(&keys.leader, &candidate.id, Some(fencing_token));
                Ok(())
            }
            "gone" => Err(Error::TermGone),
            "absent" => Err(Error::NotWaiting {
                id: nominee.to_owned(),
            }),
            other => Err(Error::store(std::io::Error::other(format!(
                "unexpected answer from the handover script: {other}"
            )))),
        }
    }

    async fn proclaim(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        value: &[u8],
    ) -> Result<()> {
        let keys = self.keys(&candidate.election);
        let call = Call::new(&self.inner.proclaim, &[&keys.leader])
            .arg(&candidate.id)
            .arg(fencing_token.to_string())
            .arg(value)
            .arg(&keys.channel);
        match self.inner.run::<i64>(call, true).await? {
            1 => Ok(()),
            _ => Err(Error::TermGone),
        }
    }

    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        if self.inner.keyspace().is_none() {
            // Nothing to hold per term: the renewals notice.
            return Box::pin(std::future::pending());
        }
        Box::pin(RedisDriver::term_gone(self, candidate, fencing_token))
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let driver = self.clone();
        let election = election.to_owned();
        futures::stream::unfold(
            (driver, election, None, None),
            |(driver, election, mut notices, next_check)| async move {
                if notices.is_none() {
                    let keys = driver.keys(&election);
                    notices = Some(driver.inner.subscriber.subscribe(&keys.channel).await);
                }
                let notices_ref = notices.as_mut()?;
                if let Some(wait) = next_check {
                    tokio::select! {
                        () = notices_ref.changed() => {}
                        () = sleep(wait) => {}
                    }
                }
                notices_ref.mark_seen();
                let keys = driver.keys(&election);
                let (item, next) = match driver.check(&election) {
                    Err(err) => (Err(err), Some(Duration::from_secs(3600))),
                    Ok(()) => match driver.inner.leader_with_pttl(&keys).await {
                        Ok(Some((info, pttl))) => (
                            Ok(Some(info)),
                            Some(expiry_wait(pttl, Duration::from_millis(100))),
                        ),
                        // No leader: wait for an announcement (or a pub/sub reconnection).
                        Ok(None) => (Ok(None), Some(Duration::from_secs(3600))),
                        Err(err) => (Err(err), Some(Duration::from_millis(500))),
                    },
                };
                Some((item, (driver, election, notices, next)))
            },
        )
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_logins_and_acl_denials_are_not_retried() {
        let noperm = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "this user has no permissions to run the 'evalsha' command",
        ));
        assert!(matches!(redis_error(noperm), Error::Denied(_)));
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(!redis_error(auth).is_transient());
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(redis_error(io).is_transient());
    }
}
