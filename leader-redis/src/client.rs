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
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::failure::Failure;
use crate::io::{
    Acquire, AcquireReply, Candidates, HandOver, HandOverReply, LeaderReply, Message, Proclaim,
    PubSub, PubSubConnection, RedisIo, Refresh, RefreshReply, Renewal, Resign,
};
use crate::keyspace;
use crate::topology::{Call, Connection, Lua, Source, needs_new_connection};
use crate::wire::{self, Script, ScriptCall};

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
    /// The scripts, in the order of [`Script::ALL`] (indexed by [`Script`]).
    scripts: [Lua; Script::ALL.len()],
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
            scripts: Script::ALL.map(|script| Lua::new(script.source())),
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

    /// Runs a script call; one that writes waits for the replicas if the driver has that
    /// option.
    async fn run(&self, call: &ScriptCall) -> Result<redis::Value> {
        // `Script::ALL` lists the scripts in their order of declaration.
        let lua = &self.scripts[call.script as usize];
        let (generation, mut connection) = self.connection().await?;
        let wait = self.replicas.filter(|_| call.writes);
        let result = timeout(
            self.request_timeout + wait.map_or(Duration::ZERO, |(_, wait)| wait),
            Call::new(lua, call).run::<redis::Value>(&mut connection, wait),
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

#[async_trait]
impl RedisIo for ClientIo {
    async fn acquire(&self, r: &Acquire) -> Result<AcquireReply> {
        wire::acquire_reply(self.run(&wire::acquire(r)).await?)
    }

    async fn renew(&self, terms: &[Renewal]) -> Result<Vec<bool>> {
        wire::renew_reply(self.run(&wire::renew(terms)).await?)
    }

    async fn resign(&self, r: &Resign) -> Result<bool> {
        wire::resign_reply(self.run(&wire::resign(r)).await?)
    }

    async fn refresh(&self, r: &Refresh) -> Result<RefreshReply> {
        wire::refresh_reply(self.run(&wire::refresh(r)).await?)
    }

    async fn leader(&self, leader: &str) -> Result<Option<LeaderReply>> {
        wire::leader_reply(self.run(&wire::leader(leader)).await?)
    }

    async fn candidates(&self, r: &Candidates) -> Result<Vec<(String, Vec<u8>)>> {
        wire::candidates_reply(self.run(&wire::candidates(r)).await?)
    }

    async fn hand_over(&self, r: &HandOver) -> Result<HandOverReply> {
        wire::hand_over_reply(self.run(&wire::hand_over(r)).await?)
    }

    async fn proclaim(&self, r: &Proclaim) -> Result<bool> {
        wire::proclaim_reply(self.run(&wire::proclaim(r)).await?)
    }

    async fn holds(&self, leader: &str, owner: &str, token: u64) -> Result<bool> {
        wire::holds_reply(self.run(&wire::holds(leader, owner, token)).await?)
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
