//! The driver's leases: one per distinct TTL (in whole seconds), granted when a candidate
//! first needs it, kept alive by a task of its own, with keep-alives coalesced so that
//! renewals of any number of terms on a lease cost one request per round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use leader_core::{Error, Result};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

use crate::error::{ErrorChain, from_etcd, is_lease_not_found, unexpected};
use crate::{Inner, lock};

/// The leases of one driver, by TTL in whole seconds.
pub(crate) struct Leases {
    slots: Mutex<HashMap<u64, Arc<LeaseSlot>>>,
}

/// The lease of one TTL: the live one, or none yet (or none any more).
pub(crate) struct LeaseSlot {
    seconds: u64,
    state: tokio::sync::Mutex<Option<Lease>>,
    /// The id of the live lease, or 0; waiters watch it to notice the lease's loss.
    id: watch::Sender<i64>,
}

struct Lease {
    id: i64,
    ttl: Duration,
    alive: bool,
    /// Send time of the last request that the server answered with the lease still alive.
    confirmed_at: Instant,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Set while a keep-alive waits for its answer; if it is still set at the next call, the
    /// previous call was cancelled and the stream may deliver its stale answer: start anew.
    in_flight: bool,
}

impl Leases {
    pub(crate) fn new() -> Self {
        Leases {
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slot of the lease with a TTL of `seconds`.
    pub(crate) fn slot(&self, seconds: u64) -> Arc<LeaseSlot> {
        let mut slots = lock(&self.slots);
        Arc::clone(slots.entry(seconds).or_insert_with(|| {
            Arc::new(LeaseSlot {
                seconds,
                state: tokio::sync::Mutex::new(None),
                id: watch::Sender::new(0),
            })
        }))
    }

    /// The live leases, as (TTL in seconds, id), for `Debug`.
    pub(crate) fn live(&self) -> Vec<(u64, i64)> {
        let slots = lock(&self.slots);
        let mut live: Vec<(u64, i64)> = slots
            .values()
            .map(|slot| (slot.seconds, *slot.id.borrow()))
            .filter(|&(_, id)| id != 0)
            .collect();
        live.sort_unstable();
        live
    }
}

impl LeaseSlot {
    /// Follows the id of the live lease (0 when there is none).
    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.id.subscribe()
    }
}

/// A lease TTL as etcd takes it: whole seconds, rounded up, at least one.
pub(crate) fn whole_seconds(ttl: Duration) -> u64 {
    (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1)
}

impl Inner {
    /// The TTL in whole seconds of the lease that a candidate asking for `ttl` uses.
    pub(crate) fn lease_seconds(&self, ttl: Duration) -> u64 {
        whole_seconds(self.lease_ttl.unwrap_or(ttl))
    }

    /// The live lease of `slot` (granting one if there is none), as (id, ttl).
    pub(crate) async fn ensure_lease(
        self: &Arc<Self>,
        slot: &Arc<LeaseSlot>,
    ) -> Result<(i64, Duration)> {
        let mut lease = slot.state.lock().await;
        if let Some(current) = lease.as_ref()
            && current.alive
        {
            return Ok((current.id, current.ttl));
        }
        let sent_at = Instant::now();
        let granted = self
            .request(
                self.client
                    .clone()
                    .lease_grant(i64::try_from(slot.seconds).unwrap_or(i64::MAX), None),
            )
            .await?;
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        if granted_ttl.is_zero() {
            return Err(unexpected(format!(
                "etcd granted lease {:x} with TTL {}: {}",
                granted.id(),
                granted.ttl(),
                granted.error()
            )));
        }
        debug!(lease = %format!("{:x}", granted.id()), ttl = ?granted_ttl, "granted etcd lease");
        *lease = Some(Lease {
            id: granted.id(),
            ttl: granted_ttl,
            alive: true,
            confirmed_at: sent_at,
            keeper: None,
            in_flight: false,
        });
        slot.id.send_replace(granted.id());
        tokio::spawn(keep_lease_alive(
            Arc::downgrade(self),
            Arc::clone(slot),
            granted.id(),
            granted_ttl,
        ));
        Ok((granted.id(), granted_ttl))
    }

    /// Confirms lease `id` of `slot` is alive: returns the send time of the last keep-alive
    /// if it was sent at or after `not_before`, else sends one. Coalesces all callers into
    /// one stream. [`Error::TermGone`] if etcd says the lease is gone; then every held term
    /// on it is gone too.
    ///
    /// One attempt (the request and its answer together) takes at most the request timeout
    /// or a sixth of the lease's TTL, whichever is shorter, so that a stalled keep-alive
    /// (the background one, say) does not keep the lease's lock from renewals for long: a
    /// renewal that waits behind it still has time for its own attempt within the quarter
    /// of a TTL that the core gives each renewal.
    pub(crate) async fn keep_alive(
        &self,
        slot: &LeaseSlot,
        id: i64,
        not_before: Instant,
    ) -> Result<Instant> {
        let mut guard = slot.state.lock().await;
        let lease = match guard.as_mut() {
            Some(lease) if lease.id == id && lease.alive => lease,
            _ => return Err(Error::TermGone),
        };
        if lease.confirmed_at >= not_before {
            return Ok(lease.confirmed_at);
        }
        if lease.in_flight {
            // The previous attempt was cancelled (or timed out) before its answer came:
            // the stream may still deliver that stale answer, so start a new one.
            lease.keeper = None;
        }
        let limit = attempt_limit(self.request_timeout, lease.ttl);
        let sent_at = Instant::now();
        let answer = match lease.keeper.as_mut() {
            None => {
                // The first keep-alive is sent and answered inside `lease_keep_alive`.
                match timeout(limit, self.client.clone().lease_keep_alive(id)).await {
                    Ok(Ok(keeper)) => {
                        lease.keeper = Some(keeper);
                        Ok(1)
                    }
                    Ok(Err(err)) if is_lease_not_found(&err) => Ok(0),
                    Ok(Err(err)) => Err(from_etcd(err)),
                    Err(_) => Err(Error::Timeout(limit)),
                }
            }
            Some((keeper, stream)) => {
                // Stays set if this future is dropped before the answer: see above.
                lease.in_flight = true;
                let answered = timeout(limit, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
                lease.in_flight = false;
                match answered {
                    Ok(Ok(Some(response))) => Ok(response.ttl()),
                    Ok(Ok(None)) => Err(unexpected("etcd closed the keep-alive stream")),
                    Ok(Err(err)) => Err(from_etcd(err)),
                    Err(_) => Err(Error::Timeout(limit)),
                }
            }
        };
        match answer {
            Ok(ttl) if ttl > 0 => {
                lease.confirmed_at = sent_at;
                Ok(sent_at)
            }
            Ok(_) => {
                warn!(lease = %format!("{id:x}"), "etcd lease expired or was revoked");
                lease.alive = false;
                lease.keeper = None;
                slot.id.send_replace(0);
                drop(guard);
                self.lease_gone(id);
                Err(Error::TermGone)
            }
            Err(err) => {
                lease.keeper = None;
                Err(err)
            }
        }
    }

    /// Marks lease `id` of `slot` dead (etcd said so), so the next campaign grants a new one.
    pub(crate) async fn lease_lost(&self, slot: &LeaseSlot, id: i64) {
        let mut guard = slot.state.lock().await;
        if let Some(lease) = guard.as_mut()
            && lease.id == id
        {
            lease.alive = false;
            lease.keeper = None;
            slot.id.send_replace(0);
        }
        drop(guard);
        self.lease_gone(id);
    }
}

/// The longest one keep-alive attempt on a lease of `ttl` may take: `request_timeout`, but
/// no more than a sixth of the TTL (and at least a millisecond).
fn attempt_limit(request_timeout: Duration, ttl: Duration) -> Duration {
    request_timeout.min(ttl / 6).max(Duration::from_millis(1))
}

/// Keeps lease `id` of `slot` alive every third of its TTL while the driver exists and the
/// lease is current, so that waiting candidates keep their place in line.
async fn keep_lease_alive(inner: Weak<Inner>, slot: Arc<LeaseSlot>, id: i64, ttl: Duration) {
    let period = ttl / 3;
    let first_retry = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut retry = first_retry;
    let mut failures = 0u32;
    let mut delay = period;
    loop {
        sleep(delay).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let not_before = Instant::now()
            .checked_sub(period)
            .unwrap_or_else(Instant::now);
        match inner.keep_alive(&slot, id, not_before).await {
            Ok(confirmed_at) => {
                if failures > 0 {
                    debug!(lease = %format!("{id:x}"), failures, "etcd keep-alive works again");
                }
                failures = 0;
                retry = first_retry;
                delay = (confirmed_at + period).saturating_duration_since(Instant::now());
                delay = delay.max(first_retry);
            }
            Err(Error::TermGone) => return,
            Err(err) => {
                // Log the first failure and then every tenth, not every retry.
                if failures.is_multiple_of(10) {
                    warn!(
                        lease = %format!("{id:x}"),
                        error = %ErrorChain(&err),
                        failures = failures + 1,
                        "etcd keep-alive failed; retrying with backoff"
                    );
                }
                failures = failures.saturating_add(1);
                delay = retry;
                // Back off up to the keep-alive period: a waiting candidate needs no more.
                retry = (retry * 2).min(period.max(first_retry));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttls_are_whole_seconds_rounded_up() {
        assert_eq!(whole_seconds(Duration::from_millis(10)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(10)), 10);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn a_keep_alive_attempt_takes_at_most_a_sixth_of_the_lease() {
        let five = Duration::from_secs(5);
        assert_eq!(
            attempt_limit(five, Duration::from_secs(60)),
            five,
            "the request timeout when it is shorter"
        );
        assert_eq!(
            attempt_limit(five, Duration::from_secs(6)),
            Duration::from_secs(1)
        );
        assert_eq!(
            attempt_limit(five, Duration::from_secs(1)),
            Duration::from_secs(1) / 6
        );
    }
}
