//! Fencing where the leader writes, on Redis: one command run by a script after the fence
//! check, atomically.

use std::sync::LazyLock;

use leader_core::{Error, Result};
use redis::{Cmd, FromRedisValue, Script};

use crate::scripts::FENCE;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FENCE));

/// A fence for one resource in Redis: [`run`](Self::run) runs one Redis command only if
/// the fencing token it carries is at least the highest token this resource has seen, and
/// records it; a stale leader's command fails with [`Error::Fenced`] and is not run.
///
/// The check and the command are one Lua script, so nothing can come between them: a
/// newer leader's command and a stale one's are ordered by Redis, and once the newer
/// token has been seen the stale one is refused.
///
/// The fence key is `<prefix>fence:{<resource>}` (prefix `leader:` by default): the
/// resource is its hash tag. **On a Redis Cluster the command's keys must carry the same
/// hash tag** (`{reports}:rows`, `jobs:{reports}`…), so that they live in the fence key's
/// slot: the script runs on that slot's node, and Redis does not check the command's keys
/// for you (the script declares the fence key only). One server or Sentinel has no such
/// rule.
/// Resource names must not contain `{` or `}`.
///
/// ```rust,no_run
/// # async fn example(term: leader_core::Term) -> leader_core::Result<()> {
/// use leader_redis::Fence;
/// let client = redis::Client::open("redis://127.0.0.1:6379").map_err(leader_core::Error::store)?;
/// let mut conn = client.get_multiplexed_async_connection().await.map_err(leader_core::Error::store)?;
/// let fence = Fence::new("reports");
/// let mut cmd = redis::cmd("HSET");
/// cmd.arg("{reports}:latest").arg("day").arg("2026-12-03");
/// let _: i64 = fence.run(&mut conn, term.fencing_token(), &cmd).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    resource: String,
    prefix: String,
}

impl Fence {
    /// The fence of `resource`, with the key prefix `leader:`.
    pub fn new(resource: impl Into<String>) -> Self {
        Fence {
            resource: resource.into(),
            prefix: "leader:".to_owned(),
        }
    }

    /// A prefix for the fence key instead of `leader:` (an ACL's key pattern, say).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The resource's name.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The key holding the highest token seen: `<prefix>fence:{<resource>}`.
    pub fn key(&self) -> String {
        format!("{}fence:{{{}}}", self.prefix, self.resource)
    }

    /// The hash tag the command's keys share with the fence key on a Cluster:
    /// `{<resource>}`.
    pub fn hash_tag(&self) -> String {
        format!("{{{}}}", self.resource)
    }

    /// Runs `cmd` on `conn` if `token` is at least the highest token seen for this
    /// resource (recording `token` as the highest), in one script; returns the command's
    /// reply.
    ///
    /// # Errors
    ///
    /// [`Error::Fenced`] (with the higher token seen) if a higher token was seen: `cmd` was
    /// not run. [`Error::InvalidConfig`] if the resource name holds `{` or `}`, or `cmd`
    /// uses a cursor argument. [`Error::Store`] for Redis errors (the command's own
    /// included).
    pub async fn run<T, C>(&self, conn: &mut C, token: u64, cmd: &Cmd) -> Result<T>
    where
        T: FromRedisValue,
        C: redis::aio::ConnectionLike + Send,
    {
        if self.resource.contains(['{', '}']) || self.prefix.contains(['{', '}']) {
            return Err(Error::invalid_config(
                "resource",
                "a Redis fence's resource and prefix must not contain `{` or `}` (the \
                 resource is the fence key's hash tag)",
            ));
        }
        let key = self.key();
        let mut invocation = SCRIPT.key(&key);
        invocation.arg(token);
        for arg in cmd.args_iter() {
            match arg {
                redis::Arg::Simple(bytes) => {
                    invocation.arg(bytes);
                }
                _ => {
                    return Err(Error::invalid_config(
                        "command",
                        "a fenced command cannot use a cursor argument",
                    ));
                }
            }
        }
        match invocation.invoke_async::<T>(conn).await {
            Ok(value) => Ok(value),
            Err(err) if err.code() == Some("FENCED") => Err(Error::Fenced {
                resource: self.resource.clone(),
                token,
                newer: err.detail().and_then(|d| d.trim().parse().ok()),
            }),
            Err(err) => Err(crate::client::redis_error(err)),
        }
    }
}
