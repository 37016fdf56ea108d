//! [`RedisDriver`]: the protocol's state (the line, the batched renewals, the pub/sub
//! routing) over an I/O layer ([`RedisIo`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use leader_core::{Candidate, LeaderInfo, Result};
use tracing::{debug, warn};

use crate::io::RedisIo;
use crate::keys::{ElectionKeys, check_name, millis};
use crate::line::Lines;
use crate::renewals::Renewals;
use crate::subscriber::Subscriber;

/// A [`Driver`](leader_core::Driver) for Redis: one server, a Redis Cluster, or the master
/// that Sentinel names.
///
/// Each election uses, for election `jobs` and prefix `p:`, the string `p:{jobs}:leader`
/// (the term: owner, value and token, with a millisecond expiry), the counter
/// `p:{jobs}:fence` (the fencing tokens), the line of waiting candidates and the channel
/// `p:{jobs}:events` (see [`ElectionKeys`]). The keys share the hash tag `{jobs}`, so
/// Redis Cluster keeps them in one slot. Taking the lead, renewing and resigning are Lua
/// scripts (EVALSHA, loading the script when the server lacks it) that compare the owner's
/// unique token first: a driver never extends or deletes another candidate's key.
///
/// Cheap to clone: clones share one command connection (which reconnects) and one pub/sub
/// connection; each election built on it is a distinct candidate.
#[derive(Clone)]
pub struct RedisDriver {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) io: Arc<dyn RedisIo>,
    pub(crate) prefix: String,
    pub(crate) subscriber: Subscriber,
    pub(crate) renewals: Renewals,
    pub(crate) lines: Lines,
    /// Per `(line key, candidate id)`, the `ACQUIRE`s sent and not answered: on their way,
    /// or never to be answered (dropped, timed out, failed) but maybe to land still. A
    /// withdrawal of such a candidate leaves the line again later (see `resign`); every
    /// other withdrawal is two requests (the look at the leader, the resignation). An
    /// entry lasts until the candidate's next withdrawal.
    pub(crate) unanswered: std::sync::Mutex<HashMap<(String, String), u32>>,
}

impl RedisDriver {
    /// A driver whose requests go through `io`, with keys and channels under `prefix`
    /// (`leader:` by default elsewhere). This is the seam the crate's simulation uses: the
    /// same protocol runs on a model of Redis there. The other constructors use the real
    /// client ([`RedisDriver::builder`] and the rest).
    pub fn with_io(io: Arc<dyn RedisIo>, prefix: impl Into<String>) -> Self {
        RedisDriver {
            inner: Arc::new(Inner {
                subscriber: crate::subscriber::subscriber(Arc::clone(&io)),
                io,
                prefix: prefix.into(),
                renewals: Renewals::default(),
                lines: Lines::default(),
                unanswered: std::sync::Mutex::default(),
            }),
        }
    }

    /// The keys and channels of `election`.
    pub fn keys(&self, election: &str) -> ElectionKeys {
        ElectionKeys::new(&self.inner.prefix, election)
    }

    /// Whether `election` can be held under this driver's prefix (see [`check_name`]).
    pub(crate) fn check(&self, election: &str) -> Result<()> {
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
            let Some(prefix) = driver.inner.io.keyspace() else {
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
            loop {
                notices.mark_seen();
                let holds = driver
                    .inner
                    .io
                    .holds(&keys.leader, &candidate.id, fencing_token)
                    .await;
                match holds {
                    Ok(true) => {}
                    Ok(false) => {
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
            .field("topology", &self.inner.io.topology())
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// An `ACQUIRE` on its way, counted in [`Inner::unanswered`] until
/// [`answered`](Self::answered); dropped unanswered (cancelled, timed out, failed), it
/// stays counted: the request may still land.
pub(crate) struct InFlight<'a> {
    inner: &'a Inner,
    key: (String, String),
}

impl InFlight<'_> {
    pub(crate) fn answered(self) {
        let key = self.key;
        let mut unanswered = self.inner.unanswered();
        if let Some(count) = unanswered.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                unanswered.remove(&key);
            }
        }
    }
}

impl Inner {
    fn unanswered(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), u32>> {
        self.unanswered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An `ACQUIRE` of `owner` in the line `line`, about to be sent.
    pub(crate) fn in_flight(&self, line: &str, owner: &str) -> InFlight<'_> {
        let key = (line.to_owned(), owner.to_owned());
        *self.unanswered().entry(key.clone()).or_insert(0) += 1;
        InFlight { inner: self, key }
    }

    /// Counts an `ACQUIRE` of `owner` in `line` as unanswered again: the repeats of a
    /// withdrawal stopped because the candidate waits again, so its next withdrawal must
    /// repeat in their place.
    pub(crate) fn unanswered_again(&self, line: &str, owner: &str) {
        *self
            .unanswered()
            .entry((line.to_owned(), owner.to_owned()))
            .or_insert(0) += 1;
    }

    /// Whether an `ACQUIRE` of `owner` in `line` is unanswered (on its way now, or never
    /// answered); forgets those.
    pub(crate) fn take_unanswered(&self, line: &str, owner: &str) -> bool {
        let mut unanswered = self.unanswered();
        // Most withdrawals find nothing: no key made for them.
        !unanswered.is_empty()
            && unanswered
                .remove(&(line.to_owned(), owner.to_owned()))
                .is_some()
    }

    /// The leader and its remaining lease in milliseconds.
    pub(crate) async fn leader_with_pttl(
        &self,
        keys: &ElectionKeys,
    ) -> Result<Option<(LeaderInfo, i64)>> {
        Ok(self.io.leader(&keys.leader).await?.map(|held| {
            (
                LeaderInfo::new(held.owner, held.value, held.token),
                held.pttl,
            )
        }))
    }

    /// A few milliseconds, so that waiters of several drivers do not all ask at once.
    pub(crate) fn expiry_jitter(&self, ttl: Duration) -> Duration {
        let spread = millis(ttl / 20).min(50);
        Duration::from_millis(self.io.jitter(spread.max(1)))
    }

    /// How long a waiter sleeps on a holder's remaining lease: the PTTL plus a little
    /// jitter, so waiters that saw the same expiry do not all ask at the same millisecond.
    pub(crate) fn expiry_wait(&self, pttl: i64, ttl: Duration) -> Duration {
        let base = match u64::try_from(pttl) {
            Ok(ms) => Duration::from_millis(ms),
            // -1: a key without expiry (set by hand); -2: gone already. Look again later.
            Err(_) if pttl == -2 => Duration::from_millis(1),
            Err(_) => ttl,
        };
        base + self.expiry_jitter(ttl)
    }
}
