#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]

mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use leader_core::{Candidate, Driver, Error, Grant, LeaderInfo, Result};
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::time::{Instant, sleep, timeout};
use tracing::debug;

pub use redis;

use subscriber::Subscriber;

/// The default for [`RedisDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes the lead if the key is free (or already this candidate's, from an ended term),
/// with a fresh fencing token; otherwise returns the holder's remaining PTTL.
/// KEYS: leader, fence. ARGV: owner token, value, ttl in ms, channel.
const ACQUIRE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  return {0, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'value', ARGV[2], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'elected')
return {1, token}
";

/// Extends the lease only if this candidate still owns this term.
/// KEYS: leader. ARGV: owner token, fencing token, ttl in ms.
const RENEW: &str = r"
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] == ARGV[1] and held[2] == ARGV[2] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
";

/// Deletes the key only if this candidate owns it in the given term, and tells the
/// waiters. KEYS: leader. ARGV: owner token, channel, fencing token.
const RESIGN: &str = r"
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] == ARGV[1] and held[2] == ARGV[3] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'resigned')
  return 1
end
return 0
";

/// The leader and the remaining lease, read at one instant. KEYS: leader.
const LEADER: &str = r"
local held = redis.call('HMGET', KEYS[1], 'owner', 'value', 'token')
if not held[1] then
  return {}
end
return {held[1], held[2], held[3], redis.call('PTTL', KEYS[1])}
";

/// A [`Driver`] for Redis.
///
/// Each election uses, for election `jobs` and prefix `p:`, the hash `p:{jobs}:leader`
/// (fields `owner`, `value`, `token`, with a millisecond expiry), the counter
/// `p:{jobs}:fence` (the fencing tokens) and the channel `p:{jobs}:events`. The keys share
/// the hash tag `{jobs}`, so Redis Cluster keeps them on one node. Taking the lead,
/// renewing and resigning are Lua scripts (EVALSHA, falling back to EVAL) that compare the
/// owner's unique token first: a driver never extends or deletes another candidate's key.
///
/// Cheap to clone: clones share one connection (a [`ConnectionManager`], which reconnects)
/// and one pub/sub connection; each election built on it is a distinct candidate.
#[derive(Clone)]
pub struct RedisDriver {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    request_timeout: Duration,
    subscriber: Subscriber,
    acquire: Script,
    renew: Script,
    resign: Script,
    leader: Script,
}

/// Builds a [`RedisDriver`] with options.
#[derive(Debug, Clone)]
#[must_use = "a RedisDriverBuilder does nothing until build() is called"]
pub struct RedisDriverBuilder {
    client: Client,
    prefix: String,
    request_timeout: Duration,
}

impl RedisDriverBuilder {
    /// A prefix put before every key and channel. Defaults to `leader:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest wait for one Redis request. Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The driver. It connects on first use.
    pub fn build(self) -> RedisDriver {
        RedisDriver {
            inner: Arc::new(Inner {
                subscriber: Subscriber::new(self.client.clone()),
                client: self.client,
                connection: tokio::sync::Mutex::new(None),
                prefix: self.prefix,
                request_timeout: self.request_timeout,
                acquire: Script::new(ACQUIRE),
                renew: Script::new(RENEW),
                resign: Script::new(RESIGN),
                leader: Script::new(LEADER),
            }),
        }
    }
}

impl RedisDriver {
    /// A driver on `client`, with the default options. It connects on first use.
    pub fn new(client: Client) -> Self {
        Self::builder(client).build()
    }

    /// A builder for a driver on `client`.
    pub fn builder(client: Client) -> RedisDriverBuilder {
        RedisDriverBuilder {
            client,
            prefix: "leader:".to_owned(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Connects to `url` (`redis://127.0.0.1:6379`) and returns a driver with the default
    /// options; fails if Redis cannot be reached now.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = Client::open(url).map_err(Error::store)?;
        let driver = Self::new(client);
        driver.inner.connection().await?;
        Ok(driver)
    }

    /// The Redis client, to share with the rest of the service.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The keys and channel of `election`.
    pub fn keys(&self, election: &str) -> ElectionKeys {
        let tag = format!("{}{{{election}}}", self.inner.prefix);
        ElectionKeys {
            leader: format!("{tag}:leader"),
            fence: format!("{tag}:fence"),
            channel: format!("{tag}:events"),
        }
    }
}

impl std::fmt::Debug for RedisDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDriver")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// The Redis names one election uses; see [`RedisDriver`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ElectionKeys {
    /// The hash holding the leader's `owner`, `value` and `token`, with the lease as expiry.
    pub leader: String,
    /// The counter the fencing tokens come from.
    pub fence: String,
    /// The channel that announces `elected` and `resigned`.
    pub channel: String,
}

fn check_name(election: &str) -> Result<()> {
    if election.contains(['{', '}']) {
        return Err(Error::invalid_config(
            "name",
            "must not contain `{` or `}` with Redis (they delimit the cluster hash tag)",
        ));
    }
    Ok(())
}

/// A Redis error as this crate's [`Error`]: a refused login or a missing ACL permission is
/// [`Error::Denied`] (retrying cannot fix it), anything else [`Error::Store`].
fn redis_error(err: redis::RedisError) -> Error {
    if is_denied(&err) {
        Error::denied(err)
    } else {
        Error::store(err)
    }
}

fn is_denied(err: &redis::RedisError) -> bool {
    err.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOPERM" | "WRONGPASS" | "NOAUTH"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Inner {
    /// The shared connection, made on first use (and again after [`discard`](Self::discard)).
    async fn connection(&self) -> Result<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.request_timeout))
            .set_connection_timeout(Some(self.request_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = match timeout(
            self.request_timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(result) => result.map_err(redis_error)?,
            Err(_) => return Err(Error::Timeout(self.request_timeout * 2)),
        };
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Drops the shared connection after a request got no answer: the connection manager
    /// reconnects when a socket closes, but not when it merely goes silent (half-open), so
    /// the next request opens a new one.
    async fn discard(&self) {
        if self.connection.lock().await.take().is_some() {
            debug!("Redis request timed out; opening a new connection for the next one");
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut connection = self.connection().await?;
        let result = timeout(
            self.request_timeout,
            invocation.invoke_async(&mut connection),
        )
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if err.is_timeout() {
                    self.discard().await;
                }
                Err(redis_error(err))
            }
            Err(_) => {
                self.discard().await;
                Err(Error::Timeout(self.request_timeout))
            }
        }
    }

    /// `Ok(Ok(grant))` when elected, `Ok(Err(pttl))` with the holder's remaining lease.
    async fn try_acquire(
        &self,
        keys: &ElectionKeys,
        candidate: &Candidate,
    ) -> Result<std::result::Result<Grant, i64>> {
        let sent_at = Instant::now();
        let mut invocation = self.acquire.key(&keys.leader);
        invocation
            .key(&keys.fence)
            .arg(&candidate.id)
            .arg(&candidate.value)
            .arg(millis(candidate.ttl))
            .arg(&keys.channel);
        let (won, value): (i64, i64) = self.run(invocation).await?;
        if won == 1 {
            let token = u64::try_from(value).map_err(|_| {
                Error::store(std::io::Error::other(format!("fence counter at {value}")))
            })?;
            Ok(Ok(Grant::new(token, sent_at, candidate.ttl)))
        } else {
            Ok(Err(value))
        }
    }

    /// The leader and its remaining lease in milliseconds.
    async fn leader_with_pttl(&self, keys: &ElectionKeys) -> Result<Option<(LeaderInfo, i64)>> {
        let invocation = self.leader.key(&keys.leader);
        let held: Option<(String, Vec<u8>, u64, i64)> = {
            let raw: Vec<redis::Value> = self.run(invocation).await?;
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
        check_name(&candidate.election)?;
        let keys = self.keys(&candidate.election);
        // Subscribe first, so that a resignation between our attempt and our wait is
        // not missed.
        let mut notices = self.inner.subscriber.subscribe(&keys.channel).await;
        loop {
            notices.mark_seen();
            match self.inner.try_acquire(&keys, candidate).await? {
                Ok(grant) => return Ok(grant),
                Err(pttl) => {
                    let wait = expiry_wait(pttl, candidate.ttl);
                    debug!(election = %candidate.election, ?wait, "waiting for the leader's key");
                    tokio::select! {
                        () = notices.changed() => {}
                        () = sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        let keys = self.keys(&candidate.election);
        let sent_at = Instant::now();
        let mut invocation = self.inner.renew.key(&keys.leader);
        invocation
            .arg(&candidate.id)
            .arg(grant.fencing_token)
            .arg(millis(candidate.ttl));
        let renewed: i64 = self.inner.run(invocation).await?;
        if renewed == 1 {
            Ok(Grant::new(grant.fencing_token, sent_at, candidate.ttl))
        } else {
            Err(Error::TermGone)
        }
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        let keys = self.keys(&candidate.election);
        // Deletes by exact token only: this request may land late, after this candidate's
        // next term began, and must not delete that one. Without a token (a campaign whose
        // answer never came), read it first.
        let token = match fencing_token {
            Some(token) => token,
            None => match self.inner.leader_with_pttl(&keys).await? {
                Some((leader, _)) if leader.id == candidate.id => leader.fencing_token,
                _ => return Ok(()),
            },
        };
        let mut invocation = self.inner.resign.key(&keys.leader);
        invocation.arg(&candidate.id).arg(&keys.channel).arg(token);
        let _deleted: i64 = self.inner.run(invocation).await?;
        Ok(())
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        check_name(election)?;
        let keys = self.keys(election);
        Ok(self
            .inner
            .leader_with_pttl(&keys)
            .await?
            .map(|(info, _)| info))
    }

    fn check_name(&self, election: &str) -> Result<()> {
        check_name(election)
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
                let (item, next) = match check_name(&election) {
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
