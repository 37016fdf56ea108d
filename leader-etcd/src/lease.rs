//! The driver's leases: one per distinct TTL (in whole seconds), granted when a candidate
//! first needs it, kept alive by a task of its own, with keep-alives coalesced so that
//! renewals of any number of terms on a lease cost one request per round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use leader_core::{Error, Result};
use tokio::sync::watch;
use tokio::time::{Instant, sleep};
use tracing::{debug, warn};

use crate::error::{ErrorChain, is_lease_not_found, unexpected};
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
    /// The store revision in that answer's header, or 0 if unknown.
    confirmed_revision: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Set while a keep-alive waits for its answer; if it is still set at the next call, the
    /// previous call was cancelled and the stream may deliver its stale answer: start anew.
    in_flight: bool,
}

/// A keep-alive answered with the lease alive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Confirmation {
    /// The send time of the request.
    pub(crate) sent_at: Instant,
    /// The store revision when it was answered, or 0 if etcd's answer did not say.
    pub(crate) revision: i64,
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
            confirmed_revision: granted.header().map_or(0, |h| h.revision()),
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

    /// Confirms lease `id` of `slot` is alive: returns the last keep-alive if it was sent at
    /// or after `not_before`, else sends one. Coalesces all callers into one stream.
    /// [`Error::TermGone`] if etcd says the lease is gone; then every held term on it is
    /// gone too.
    pub(crate) async fn keep_alive(
        &self,
        slot: &LeaseSlot,
        id: i64,
        not_before: Instant,
    ) -> Result<Confirmation> {
        let mut guard = slot.state.lock().await;
        let lease = match guard.as_mut() {
            Some(lease) if lease.id == id && lease.alive => lease,
            _ => return Err(Error::TermGone),
        };
        if lease.confirmed_at >= not_before {
            return Ok(Confirmation {
                sent_at: lease.confirmed_at,
                revision: lease.confirmed_revision,
            });
        }
        if lease.in_flight {
            lease.keeper = None;
        }
        let sent_at = Instant::now();
        let answer = match lease.keeper.as_mut() {
            None => {
                match self.request(self.client.clone().lease_keep_alive(id)).await {
                    // The first keep-alive is sent and answered inside `lease_keep_alive`,
                    // which does not return its header: the revision is unknown.
                    Ok(keeper) => {
                        lease.keeper = Some(keeper);
                        Ok((1, 0))
                    }
                    Err(Error::Store(err))
                        if err
                            .downcast_ref::<etcd_client::Error>()
                            .is_some_and(is_lease_not_found) =>
                    {
                        Ok((0, 0))
                    }
                    Err(err) => Err(err),
                }
            }
            Some((keeper, stream)) => {
                lease.in_flight = true;
                let sent = self.request(keeper.keep_alive()).await;
                let answered = match sent {
                    Ok(()) => self.request(stream.message()).await,
                    Err(err) => Err(err),
                };
                lease.in_flight = false;
                match answered {
                    Ok(Some(response)) => Ok((
                        response.ttl(),
                        response.header().map_or(0, |h| h.revision()),
                    )),
                    Ok(None) => Err(unexpected("etcd closed the keep-alive stream")),
                    Err(err) => Err(err),
                }
            }
        };
        match answer {
            Ok((ttl, revision)) if ttl > 0 => {
                lease.confirmed_at = sent_at;
                lease.confirmed_revision = revision;
                Ok(Confirmation { sent_at, revision })
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
            Ok(confirmed) => {
                if failures > 0 {
                    debug!(lease = %format!("{id:x}"), failures, "etcd keep-alive works again");
                }
                failures = 0;
                retry = first_retry;
                delay = (confirmed.sent_at + period).saturating_duration_since(Instant::now());
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
}
