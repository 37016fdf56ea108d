//! [`ClientIo`]: the real [`RedisIo`], on the `redis` crate's clients. It only sends the
//! scripts and reads their answers; every decision is the protocol's. What it does on its
//! own: one shared command connection (replaced after a failure a new one may fix), an
//! optional `WAIT` after each write, the keyspace-notification setting read at each
//! connection, and pub/sub connections to the right node.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use leader_core::{Error, Result};
use rand::Rng;
use redis::FromRedisValue;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::failure::Failure;
use crate::io::{
    Acquire, AcquireReply, Candidates, HandOver, HandOverReply, LeaderReply, Message, Proclaim,
    PubSub, PubSubConnection, RedisIo, Refresh, RefreshReply, Renewal, Resign,
};
use crate::keyspace;
use crate::scripts::{
    ACQUIRE, CANDIDATES, HAND_OVER, HOLDS, LEADER, PROCLAIM, REFRESH, RENEW, RESIGN,
};
use crate::topology::{Call, Connection, Lua, Source, needs_new_connection};

/// The commands the driver sends (its scripts' included): the least-privilege ACL of its
/// user is `~PREFIX* &PREFIX*` and these (see the README, "Production").
pub const ACL_COMMANDS: &str = "+evalsha +eval +ping +subscribe +unsubscribe +get +set \
    +del +incr +pexpire +pttl +publish +zadd +zrem +zrange +zrangebyscore +zmscore +zscore \
    +zpopmin +time +wait +config|get +cluster|slots +role +info";

/// The real I/O layer: one server, a Cluster, or the master that Sentinel names.
pub(crate) struct ClientIo {
    source: Source,
    /// The shared connection and its generation (counting the connections made).
    connection: tokio::sync::Mutex<(u64, Option<Connection>)>,
    /// For the explanation of a refusal (the ACL the user needs).
    prefix: String,
    request_timeout: Duration,
    replicas: Option<(usize, Duration)>,
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

impl ClientIo {
    pub(crate) fn new(
        source: Source,
        prefix: String,
        request_timeout: Duration,
        replicas: Option<(usize, Duration)>,
    ) -> Self {
        ClientIo {
            source,
            connection: tokio::sync::Mutex::new((0, None)),
            prefix,
            request_timeout,
            replicas,
            keyspace: std::sync::Mutex::new(None),
            acquire: Lua::new(ACQUIRE),
            renew: Lua::new(RENEW),
            resign: Lua::new(RESIGN),
            leader: Lua::new(LEADER),
            refresh: Lua::new(REFRESH),
            candidates: Lua::new(CANDIDATES),
            hand_over: Lua::new(HAND_OVER),
            proclaim: Lua::new(PROCLAIM),
            holds: Lua::new(HOLDS),
        }
    }

    /// Connects now; warns (a `tracing` warning) when the server's `maxmemory-policy`
    /// could evict a leader's key, if this user may read it.
    pub(crate) async fn connect(&self) -> Result<()> {
        let (_, mut connection) = self.connection().await?;
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
        Ok(())
    }

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
    async fn run<T: FromRedisValue>(&self, call: Call<'_>, writes: bool) -> Result<T> {
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
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

fn unexpected(what: &str, answer: impl std::fmt::Debug) -> Error {
    Error::store(std::io::Error::other(format!(
        "unexpected answer from the {what} script: {answer:?}"
    )))
}

#[async_trait]
impl RedisIo for ClientIo {
    async fn acquire(&self, r: &Acquire) -> Result<AcquireReply> {
        let call = Call::new(&self.acquire, &[&r.leader, &r.fence, &r.line])
            .arg(&r.owner)
            .arg(r.value.as_slice())
            .arg(r.ttl_ms)
            .arg(&r.channel)
            .arg(r.place.as_slice())
            .arg(flag(r.in_line))
            .arg(flag(r.stand))
            .arg(flag(r.ask_pttl));
        let answer: Vec<i64> = self.run(call, true).await?;
        match answer.as_slice() {
            [1, token] => Ok(AcquireReply::Elected(*token)),
            [0, pttl] => Ok(AcquireReply::Held(Some(*pttl))),
            [0] => Ok(AcquireReply::Held(None)),
            other => Err(unexpected("acquire", other)),
        }
    }

    async fn renew(&self, terms: &[Renewal]) -> Result<Vec<bool>> {
        let keys: Vec<&str> = terms.iter().map(|term| term.leader.as_str()).collect();
        let mut call = Call::new(&self.renew, &keys);
        for term in terms {
            call = call.arg(&term.owner).arg(term.token).arg(term.ttl_ms);
        }
        let values: Vec<i64> = self.run(call, true).await?;
        Ok(values.iter().map(|v| *v == 1).collect())
    }

    async fn resign(&self, r: &Resign) -> Result<bool> {
        let token = r.token.map_or_else(|| "-".to_owned(), |t| t.to_string());
        let call = Call::new(&self.resign, &[&r.leader, &r.line, &r.line_until])
            .arg(&r.owner)
            .arg(r.place.as_slice())
            .arg(token)
            .arg(&r.channel)
            .arg(&r.wake_prefix)
            .arg(r.keep_ms);
        let removed: i64 = self.run(call, true).await?;
        Ok(removed == 1)
    }

    async fn refresh(&self, r: &Refresh) -> Result<RefreshReply> {
        let mut call = Call::new(
            &self.refresh,
            &[&r.leader, &r.line, &r.line_until, &r.line_maintained],
        )
        .arg(r.keep_ms)
        .arg(r.period_ms)
        .arg(&r.wake_prefix);
        for place in &r.places {
            call = call.arg(place.as_slice());
        }
        let (missing, head, pttl): (Vec<usize>, Vec<u8>, i64) = self.run(call, true).await?;
        Ok(RefreshReply {
            missing,
            head,
            pttl,
        })
    }

    async fn leader(&self, leader: &str) -> Result<Option<LeaderReply>> {
        let call = Call::new(&self.leader, &[leader]);
        let raw: Vec<redis::Value> = self.run(call, false).await?;
        if raw.is_empty() {
            return Ok(None);
        }
        let (owner, value, token, pttl): (String, Vec<u8>, u64, i64) =
            FromRedisValue::from_redis_value(redis::Value::Array(raw)).map_err(Error::store)?;
        Ok(Some(LeaderReply {
            owner,
            value,
            token,
            pttl,
        }))
    }

    async fn candidates(&self, r: &Candidates) -> Result<Vec<(String, Vec<u8>)>> {
        let call = Call::new(&self.candidates, &[&r.leader, &r.line, &r.line_until]).arg(r.keep_ms);
        let flat: Vec<Vec<u8>> = self.run(call, false).await?;
        Ok(flat
            .chunks_exact(2)
            .map(|pair| {
                (
                    String::from_utf8_lossy(&pair[0]).into_owned(),
                    pair[1].clone(),
                )
            })
            .collect())
    }

    async fn hand_over(&self, r: &HandOver) -> Result<HandOverReply> {
        let call = Call::new(&self.hand_over, &[&r.leader, &r.line, &r.line_until])
            .arg(&r.owner)
            .arg(r.token.to_string())
            .arg(&r.nominee)
            .arg(r.ttl_ms)
            .arg(&r.wake_prefix)
            .arg(&r.channel);
        let answer: String = self.run(call, true).await?;
        match answer.as_str() {
            "ok" => Ok(HandOverReply::Done),
            "gone" => Ok(HandOverReply::Gone),
            "absent" => Ok(HandOverReply::Absent),
            other => Err(unexpected("handover", other)),
        }
    }

    async fn proclaim(&self, r: &Proclaim) -> Result<bool> {
        let call = Call::new(&self.proclaim, &[&r.leader])
            .arg(&r.owner)
            .arg(r.token.to_string())
            .arg(r.value.as_slice())
            .arg(&r.channel);
        Ok(self.run::<i64>(call, true).await? == 1)
    }

    async fn holds(&self, leader: &str, owner: &str, token: u64) -> Result<bool> {
        let call = Call::new(&self.holds, &[leader])
            .arg(owner)
            .arg(token.to_string());
        Ok(self.run::<i64>(call, false).await? == 1)
    }

    async fn pubsub(&self, attempt: usize) -> Result<PubSubConnection> {
        let client = self.source.node(attempt).await.map_err(redis_error)?;
        let pubsub = client.get_async_pubsub().await.map_err(redis_error)?;
        let (sink, stream) = pubsub.split();
        let messages = stream
            .map(|message| Message {
                channel: message.get_channel_name().to_owned(),
                payload: message.get_payload_bytes().to_vec(),
            })
            .boxed();
        Ok(PubSubConnection {
            commands: Box::new(Sink(sink)),
            messages,
        })
    }

    fn keyspace(&self) -> Option<String> {
        self.keyspace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn per_slot(&self) -> bool {
        matches!(self.source, Source::Cluster { .. })
    }

    fn topology(&self) -> &'static str {
        self.source.kind()
    }

    fn jitter(&self, spread: u64) -> u64 {
        rand::rng().random_range(1..=spread.max(1))
    }
}

/// The commands half of a real pub/sub connection.
struct Sink(redis::aio::PubSubSink);

#[async_trait]
impl PubSub for Sink {
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool> {
        match self.0.subscribe(channels).await {
            Ok(()) => Ok(true),
            // Refused (an ACL without this channel): the connection is fine.
            Err(err) if err.code().is_some() => {
                debug!(?channels, error = %err, "Redis refused a subscription");
                Ok(false)
            }
            Err(err) => Err(redis_error(err)),
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        self.0.unsubscribe(channel).await.map_err(redis_error)
    }

    async fn ping(&mut self) -> Result<()> {
        self.0
            .ping::<redis::Value>()
            .await
            .map(drop)
            .map_err(redis_error)
    }
}

/// A Redis error as this crate's [`Error`]: a refused login or a missing ACL permission is
/// [`Error::Denied`] (retrying cannot fix it), anything else [`Error::Store`].
pub(crate) fn redis_error(err: redis::RedisError) -> Error {
    if is_denied(&err) {
        Error::denied(Failure(err))
    } else {
        Error::store(Failure(err))
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
