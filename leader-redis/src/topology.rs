//! Where the driver's connections go: one server, a Cluster, or the master that Sentinel
//! names; and the scripts run there, with an optional `WAIT` for replicas after a write.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{Client, Cmd, FromRedisValue, RedisResult, Script};

use crate::wire::ScriptCall;

/// What the driver connects to.
// One per driver, made once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Source {
    /// One server (or a proxy in front of one).
    Single(Client),
    /// A Redis Cluster: commands through the cluster client (slots, `MOVED`, `ASK`, node
    /// failure); pub/sub through any one node, since a `PUBLISH` reaches every node.
    Cluster {
        client: ClusterClient,
        nodes: Vec<Client>,
    },
    /// The master that the sentinels name, asked again at every (re)connection.
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl Source {
    /// A client for one connection: the server, the current master, or for a Cluster the
    /// seed node `attempt` (modulo their number), so that pub/sub moves on when a node is
    /// down.
    pub(crate) async fn node(&self, attempt: usize) -> RedisResult<Client> {
        match self {
            Source::Single(client) => Ok(client.clone()),
            Source::Cluster { nodes, .. } => nodes
                .get(attempt % nodes.len().max(1))
                .cloned()
                .ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "a Redis Cluster needs at least one node",
                    ))
                }),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }

    /// The topology's name, for logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Source::Single(_) => "single",
            Source::Cluster { .. } => "cluster",
            Source::Sentinel(_) => "sentinel",
        }
    }

    /// A new command connection, whose requests may take `request_timeout` (a `WAIT`
    /// included), and the database it uses (`None` for a Cluster).
    pub(crate) async fn connect(
        &self,
        request_timeout: Duration,
    ) -> RedisResult<(Connection, Option<i64>)> {
        match self {
            Source::Cluster { client, .. } => Ok((
                Connection::Cluster(client.get_async_connection().await?),
                None,
            )),
            Source::Single(_) | Source::Sentinel(_) => {
                let client = self.node(0).await?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(request_timeout))
                    .set_connection_timeout(Some(request_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let db = client.get_connection_info().redis_settings().db();
                Ok((
                    Connection::Single(ConnectionManager::new_with_config(client, config).await?),
                    Some(db),
                ))
            }
        }
    }
}

/// A command connection: both kinds reconnect by themselves when a socket closes.
#[derive(Clone)]
pub(crate) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Connection::Single(connection) => cmd.query_async(connection).await,
            Connection::Cluster(connection) => cmd.query_async(connection).await,
        }
    }

    async fn pipe<T: FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> RedisResult<T> {
        match self {
            Connection::Single(connection) => pipe.query_async(connection).await,
            Connection::Cluster(connection) => pipe.query_async(connection).await,
        }
    }

    /// The connection's `maxmemory-policy`, if this user may read it.
    pub(crate) async fn eviction_policy(&mut self) -> Option<String> {
        self.config("maxmemory-policy").await
    }

    /// A server setting, if this user may read it (`CONFIG GET`).
    pub(crate) async fn config(&mut self, name: &str) -> Option<String> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let pair: Vec<String> = self.query(&cmd).await.ok()?;
        pair.into_iter().nth(1)
    }
}

/// A Lua script: its source, and its SHA1 for `EVALSHA`.
pub(crate) struct Lua {
    source: &'static str,
    hash: String,
}

impl Lua {
    pub(crate) fn new(source: &'static str) -> Self {
        Lua {
            source,
            hash: Script::new(source).get_hash().to_owned(),
        }
    }
}

/// One call of a script: its keys and arguments, sent as `EVALSHA`, or as `EVAL` (which
/// also caches it) when the server does not have the script, optionally followed on the
/// same connection by a `WAIT`. `EVAL` rather than `SCRIPT LOAD`: it is routed by its key
/// on a Cluster (`SCRIPT LOAD` goes to every node and fails if one is down), and the user
/// needs no `SCRIPT` permission.
pub(crate) struct Call<'a> {
    script: &'a Lua,
    call: &'a ScriptCall,
}

impl<'a> Call<'a> {
    pub(crate) fn new(script: &'a Lua, call: &'a ScriptCall) -> Self {
        Call { script, call }
    }

    fn command(&self, cached: bool) -> Cmd {
        let mut cmd = if cached {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&self.script.hash);
            cmd
        } else {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(self.script.source);
            cmd
        };
        cmd.arg(self.call.keys.len())
            .arg(&self.call.keys)
            .arg(&self.call.args);
        cmd
    }

    /// Runs the script. With `wait` = `Some((replicas, timeout))`, a `WAIT` follows in one
    /// pipeline (so it counts this script's writes, on this very connection) and returns
    /// how many replicas acknowledged them.
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        connection: &mut Connection,
        wait: Option<(usize, Duration)>,
    ) -> RedisResult<(T, Option<usize>)> {
        match self.once(connection, wait, true).await {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.once(connection, wait, false).await
            }
            other => other,
        }
    }

    async fn once<T: FromRedisValue>(
        &self,
        connection: &mut Connection,
        wait: Option<(usize, Duration)>,
        cached: bool,
    ) -> RedisResult<(T, Option<usize>)> {
        match wait {
            None => connection
                .query::<T>(&self.command(cached))
                .await
                .map(|value| (value, None)),
            Some((replicas, timeout)) => {
                let mut pipe = redis::pipe();
                pipe.add_command(self.command(cached))
                    .cmd("WAIT")
                    .arg(replicas)
                    .arg(
                        u64::try_from(timeout.as_millis())
                            .unwrap_or(u64::MAX)
                            .max(1),
                    );
                connection
                    .pipe::<(T, usize)>(&pipe)
                    .await
                    .map(|(value, acked)| (value, Some(acked)))
            }
        }
    }
}

/// Whether `err` says the connection is to a server that cannot take writes (a replica,
/// such as a demoted master after a failover), or is broken: reconnecting (and, with
/// Sentinel, asking for the master again) is the way out.
pub(crate) fn needs_new_connection(err: &redis::RedisError) -> bool {
    err.is_timeout()
        || err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}
