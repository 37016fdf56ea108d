//! The driver's leases: one per distinct TTL (in whole seconds), granted when a candidate
//! first needs it, kept alive by a task of its own, with keep-alives coalesced so that
//! renewals of any number of terms on a lease cost one request per round.
//!
//! Beside each of them, an *attempt lease* that is never kept alive: every create of a
//! candidate's key also puts a guard key on it, in the same transaction, so that once the
//! attempt lease is revoked (or expired) a create still in flight can no longer land (etcd
//! checks the lease of every put of a transaction before it applies any). Withdrawing a
//! create whose answer never came revokes it first; after that, a read of the key is final.
//!
//! And the bound on a withdrawal that keeps failing: a key whose deletion has failed for a
//! lease TTL makes the driver stop keeping that lease alive (see
//! [`LeaseSlot::withdrawal_failed`]), so etcd deletes it within another TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use leader_core::{BootInstant, Error, Result};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

use crate::error::{ErrorChain, unexpected};
use crate::io::lease_not_found;
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
    /// Bumped at each lapse of the live lease (see [`Inner::lapses`]): waiters watch it.
    lapsed: watch::Sender<u64>,
    /// The shortest term TTL asked of this slot so far, in whole seconds (rounded up): the
    /// background keep-alive comes often enough that, while etcd answers, no term of it
    /// sees a lapse.
    term_seconds: std::sync::atomic::AtomicU64,
    /// The attempt lease that creates use now, if any.
    attempt: tokio::sync::Mutex<Option<Attempt>>,
    /// Keys on this slot's leases whose deletion failed: key → (lease, first failure).
    failing: Mutex<HashMap<String, (i64, Instant)>>,
    /// The live lease and the send time of its last keep-alive (or grant) that etcd
    /// answered with the lease alive, recorded once the answer came: what a batch of
    /// renewal reads notes before it is sent (see `crate::confirm`).
    confirmed: Mutex<Option<(i64, Instant)>>,
}

/// A lease that is never kept alive, which every create also puts a guard key on.
struct Attempt {
    id: i64,
    /// Creates use it until then (half its TTL after the grant was sent), then a new one.
    usable_until: Instant,
}

struct Lease {
    id: i64,
    ttl: Duration,
    alive: bool,
    /// Send time of the last request that the server answered with the lease still alive,
    /// with the suspensions of the machine until then: lapses count them.
    confirmed: BootInstant,
    /// `lapses[k - 1]`: how many confirmations came `k` seconds or more (less 5%) after the
    /// send time of the one before: the lease's lapses (see [`Inner::lapses`]).
    lapses: [u32; LAPSE_SECONDS],
}

/// The longest lapse counted apart: longer ones count as this many seconds (a term of a
/// longer TTL then sees lapses a proof could not use: it creates its key again for
/// nothing, never the other way round).
const LAPSE_SECONDS: usize = 64;

impl Lease {
    /// Records a confirmation answered now whose request was sent at `sent`. Returns the
    /// lapse it ends, in whole seconds (0: none).
    fn confirmed(&mut self, sent: BootInstant) -> usize {
        let gap = self.confirmed.elapsed();
        // 5% less: for the rates of etcd's clock and this process's (as in crate::expiry).
        let whole = (gap.as_secs_f64() / 0.95) as usize;
        for lapses in self.lapses.iter_mut().take(whole.min(LAPSE_SECONDS)) {
            *lapses = lapses.saturating_add(1);
        }
        if sent.instant() > self.confirmed.instant() {
            self.confirmed = sent;
        }
        whole
    }
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
                lapsed: watch::Sender::new(0),
                term_seconds: std::sync::atomic::AtomicU64::new(u64::MAX),
                attempt: tokio::sync::Mutex::new(None),
                failing: Mutex::new(HashMap::new()),
                confirmed: Mutex::new(None),
            })
        }))
    }

    /// Each live lease with the send time of its last keep-alive (or grant) answered
    /// alive: taken before a request is sent, each was confirmed before that request.
    pub(crate) fn confirmations(&self) -> Vec<(i64, Instant)> {
        let slots = lock(&self.slots);
        slots
            .values()
            .filter_map(|slot| *lock(&slot.confirmed))
            .collect()
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
    /// The TTL its leases are asked for.
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    /// Records `confirmed` as lease `id`'s last confirmation (`None`: no lease is alive).
    fn note_confirmed(&self, confirmed: Option<(i64, Instant)>) {
        *lock(&self.confirmed) = confirmed;
    }

    /// Follows the id of the live lease (0 when there is none).
    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.id.subscribe()
    }

    /// How often the background keep-alive confirms the lease (granted for `ttl`): a third
    /// of its TTL, and two thirds of the shortest term TTL asked of it (in whole seconds), so
    /// that, while etcd answers in time, no confirmation comes a term's TTL after the one
    /// before (a lapse, see [`Inner::lapses`]). With the default leases (a second more
    /// than the TTL) the third is the shorter; a fixed lease TTL, or etcd granting more
    /// than asked, can make it the longer.
    fn keep_alive_period(&self, ttl: Duration) -> Duration {
        let seconds = self.shortest_term_seconds();
        (ttl / 3).min(Duration::from_secs(seconds) * 2 / 3)
    }

    /// The shortest term TTL asked of this slot, in whole seconds, at most the longest
    /// lapse counted apart.
    fn shortest_term_seconds(&self) -> u64 {
        self.term_seconds
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(LAPSE_SECONDS as u64)
    }

    /// Records that a term of `ttl` may rest on this slot's leases (before the lease is
    /// ensured: its background keep-alive then starts at the right pace).
    pub(crate) fn serves(&self, ttl: Duration) {
        self.term_seconds
            .fetch_min(whole_seconds(ttl), std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes at each lapse of the live lease (see [`Inner::lapses`]).
    pub(crate) fn subscribe_lapses(&self) -> watch::Receiver<u64> {
        self.lapsed.subscribe()
    }

    /// The TTL of the attempt leases: twice the lease's. A create uses one during the
    /// first half of its life (so one grant serves every create of a TTL), and a guard key
    /// on it never outlives its create by more than 2 × TTL, even when the candidate's
    /// resignation fails.
    fn attempt_seconds(&self) -> u64 {
        self.seconds.saturating_mul(2)
    }

    /// Records that deleting `key` (on lease `lease`) failed. Once that has lasted a lease
    /// TTL, [`Inner::keep_alive`] stops keeping `lease` alive, so that the key cannot
    /// outlive its candidate by more than twice the TTL: the last keep-alive was sent less
    /// than a TTL after the first failure, and etcd deletes every key on the lease a TTL
    /// after the last keep-alive (plus its expiry sweep of up to 500 ms, and unless an etcd
    /// leader change renews every lease). The other terms on the lease end with it (their
    /// renewals fail, their deadlines pass before the lease expires) and campaign again on
    /// a new lease: a store that keeps refusing deletes while it accepts keep-alives for a
    /// whole TTL is sick, and a key that stays forever would keep its election headless.
    pub(crate) fn withdrawal_failed(&self, key: &str, lease: i64, since: Instant) {
        lock(&self.failing)
            .entry(key.to_owned())
            .and_modify(|entry| {
                if entry.0 != lease {
                    // The same key name on a newer lease: a new withdrawal.
                    *entry = (lease, since);
                }
            })
            .or_insert((lease, since));
    }

    /// `key` is gone (deleted, or known to be absent): forget its failures.
    pub(crate) fn withdrawn(&self, key: &str) {
        let mut failing = lock(&self.failing);
        if !failing.is_empty() {
            failing.remove(key);
        }
    }

    /// Whether a deletion of a key on `lease` has been failing for `ttl` or longer.
    fn withdrawal_stuck(&self, lease: i64, ttl: Duration) -> bool {
        let failing = lock(&self.failing);
        failing
            .values()
            .any(|&(on, since)| on == lease && since.elapsed() >= ttl)
    }

    /// Forgets the failures of keys on `lease` (it is being given up).
    fn forget_failures(&self, lease: i64) {
        lock(&self.failing).retain(|_, (on, _)| *on != lease);
    }
}

/// A lease TTL as etcd takes it: whole seconds, rounded up, at least one.
pub(crate) fn whole_seconds(ttl: Duration) -> u64 {
    (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1)
}

impl Inner {
    /// The TTL in whole seconds of the lease that a candidate asking for `ttl` uses: a
    /// second more than the TTL (rounded up), so that the next in line can tell from the
    /// lease's remaining time, which etcd gives in whole seconds, that the term's deadline
    /// has passed while the lease still has up to a second to run (see [`crate::expiry`]);
    /// or the lease TTL the builder fixed.
    pub(crate) fn lease_seconds(&self, ttl: Duration) -> u64 {
        match self.lease_ttl {
            Some(fixed) => whole_seconds(fixed),
            None => whole_seconds(ttl).saturating_add(1),
        }
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
        let sent = BootInstant::now();
        let granted = self
            .request(
                self.io
                    .lease_grant(i64::try_from(slot.seconds).unwrap_or(i64::MAX)),
            )
            .await?;
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl).unwrap_or(0));
        if granted_ttl.is_zero() {
            return Err(unexpected(format!(
                "etcd granted lease {:x} with TTL {}",
                granted.id, granted.ttl,
            )));
        }
        debug!(lease = %format!("{:x}", granted.id), ttl = ?granted_ttl, "granted etcd lease");
        *lease = Some(Lease {
            id: granted.id,
            ttl: granted_ttl,
            alive: true,
            confirmed: sent,
            lapses: [0; LAPSE_SECONDS],
        });
        slot.id.send_replace(granted.id);
        slot.note_confirmed(Some((granted.id, sent.instant())));
        tokio::spawn(keep_lease_alive(
            Arc::downgrade(self),
            Arc::clone(slot),
            granted.id,
            granted_ttl,
        ));
        Ok((granted.id, granted_ttl))
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
    #[allow(clippy::manual_async_fn)] // on purpose: an async fn keeps its arguments twice
    pub(crate) fn keep_alive<'a>(
        &'a self,
        slot: &'a LeaseSlot,
        id: i64,
        not_before: Instant,
    ) -> impl Future<Output = Result<Instant>> + Send + 'a {
        async move {
            let guard = slot.state.lock().await;
            // Boxed: what sends a keep-alive takes room only in the caller that holds the
            // lock, not in every renewal waiting for it (all of a round's come due together).
            Box::pin(self.keep_alive_locked(slot, guard, id, not_before)).await
        }
    }

    /// [`keep_alive`](Self::keep_alive), the lease's lock held.
    async fn keep_alive_locked(
        &self,
        slot: &LeaseSlot,
        mut guard: tokio::sync::MutexGuard<'_, Option<Lease>>,
        id: i64,
        not_before: Instant,
    ) -> Result<Instant> {
        let lease = match guard.as_mut() {
            Some(lease) if lease.id == id && lease.alive => lease,
            _ => return Err(Error::TermGone),
        };
        if slot.withdrawal_stuck(id, lease.ttl) {
            // See `LeaseSlot::withdrawal_failed`. Not revoked: the terms on it step down by
            // their deadlines, which pass before etcd lets the lease expire.
            warn!(
                lease = %format!("{id:x}"),
                "deleting a key on this etcd lease has failed for a whole TTL; no longer \
                 keeping the lease alive, so that etcd deletes the key (the other terms on \
                 it end and campaign again on a new lease)"
            );
            lease.alive = false;
            slot.note_confirmed(None);
            slot.id.send_replace(0);
            drop(guard);
            slot.forget_failures(id);
            self.lease_gone(id);
            return Err(Error::TermGone);
        }
        if lease.confirmed.instant() >= not_before {
            return Ok(lease.confirmed.instant());
        }
        let limit = attempt_limit(self.request_timeout, lease.ttl);
        let sent = BootInstant::now();
        let sent_at = sent.instant();
        // Boxed: the request's futures take room only while one is sent. The many renewals
        // that wait for the lock above stay small (10,000 elections renew on one lease).
        let answer = match timeout(limit, Box::pin(self.io.lease_keep_alive(id))).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::Timeout(limit)),
        };
        match answer {
            Ok(ttl) if ttl > 0 => {
                // Waiters hear only of a lapse of a term's TTL (the shortest served): the
                // ordinary gaps between keep-alives, a third of a long lease, wake nobody.
                if lease.confirmed(sent) as u64 >= slot.shortest_term_seconds() {
                    slot.lapsed.send_modify(|n| *n = n.wrapping_add(1));
                }
                slot.note_confirmed(Some((id, lease.confirmed.instant())));
                Ok(sent_at)
            }
            Ok(_) => {
                warn!(lease = %format!("{id:x}"), "etcd lease expired or was revoked");
                lease.alive = false;
                slot.note_confirmed(None);
                slot.id.send_replace(0);
                drop(guard);
                self.lease_gone(id);
                Err(Error::TermGone)
            }
            Err(err) => Err(err),
        }
    }

    /// How many times lease `id` of `slot` lapsed for a term of `ttl`: a confirmation came
    /// `ttl` (in whole seconds, rounded up) or more after the send time of the one before.
    /// None if the lease is not `id` or not alive.
    ///
    /// Why a campaign compares this before its create and after its grant: the waiter
    /// behind a key ends its term once etcd shows the lease was not kept alive for longer
    /// than the term's TTL (see [`crate::expiry`]; that proof only ever shows whole seconds,
    /// at least the TTL rounded up). Such a waiter may read the lease during a lapse that
    /// begins after this candidate created its key and before the keep-alive its grant
    /// rests on, then delete the key, even after this candidate saw it at the head of the
    /// line: a held term is safe from this (its deadline had passed by then, and a late
    /// renewal never revives it), but a grant counts its first deadline from a keep-alive
    /// sent after the lapse, with no earlier deadline to check it against. A lapse since
    /// the create (seen when its confirmation came) spoils the grant; without one, no such
    /// proof can be made from the create until the grant's keep-alive.
    ///
    /// Lapses shorter than the shortest TTL the slot serves wake no waiter: call
    /// [`LeaseSlot::serves`] with `ttl` first (`campaign_term` does, before it takes the
    /// lease).
    pub(crate) async fn lapses(&self, slot: &LeaseSlot, id: i64, ttl: Duration) -> Option<u32> {
        let seconds = usize::try_from(whole_seconds(ttl))
            .unwrap_or(LAPSE_SECONDS)
            .clamp(1, LAPSE_SECONDS);
        let guard = slot.state.lock().await;
        guard
            .as_ref()
            .filter(|lease| lease.id == id && lease.alive)
            .map(|lease| lease.lapses[seconds - 1])
    }

    /// Marks lease `id` of `slot` dead (etcd said so), so the next campaign grants a new one.
    pub(crate) async fn lease_lost(&self, slot: &LeaseSlot, id: i64) {
        let mut guard = slot.state.lock().await;
        if let Some(lease) = guard.as_mut()
            && lease.id == id
        {
            lease.alive = false;
            slot.note_confirmed(None);
            slot.id.send_replace(0);
        }
        drop(guard);
        self.lease_gone(id);
    }
}

impl Inner {
    /// The attempt lease for a create sent now on `slot`: the current one if it is in the
    /// first half of its life, else a new one.
    pub(crate) async fn attempt_lease(&self, slot: &LeaseSlot) -> Result<i64> {
        let mut attempt = slot.attempt.lock().await;
        if let Some(current) = attempt.as_ref()
            && Instant::now() < current.usable_until
        {
            return Ok(current.id);
        }
        let seconds = slot.attempt_seconds();
        let sent_at = Instant::now();
        let granted = self
            .request(
                self.io
                    .lease_grant(i64::try_from(seconds).unwrap_or(i64::MAX)),
            )
            .await?;
        let ttl = Duration::from_secs(u64::try_from(granted.ttl).unwrap_or(0));
        if ttl.is_zero() {
            return Err(unexpected(format!(
                "etcd granted attempt lease {:x} with TTL {}",
                granted.id, granted.ttl,
            )));
        }
        debug!(lease = %format!("{:x}", granted.id), ?ttl, "granted an etcd attempt lease");
        *attempt = Some(Attempt {
            id: granted.id,
            usable_until: sent_at + ttl / 2,
        });
        Ok(granted.id)
    }

    /// Makes sure that no create on attempt lease `id` of `slot` can land any more: revokes
    /// it (done too if etcd says it is gone already: expired, or revoked before). etcd
    /// orders the revocation with the transactions, so a create on it either landed before
    /// (and a read after this shows it) or fails as a whole.
    pub(crate) async fn revoke_attempt(&self, slot: &LeaseSlot, id: i64) -> Result<()> {
        {
            let mut attempt = slot.attempt.lock().await;
            if attempt.as_ref().is_some_and(|a| a.id == id) {
                *attempt = None;
            }
        }
        match self.request(self.io.lease_revoke(id)).await {
            Ok(_) => Ok(()),
            Err(err) if lease_not_found(&err) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Drops attempt lease `id` from `slot` (etcd said it is gone): the next create gets a
    /// new one.
    pub(crate) async fn attempt_gone(&self, slot: &LeaseSlot, id: i64) {
        let mut attempt = slot.attempt.lock().await;
        if attempt.as_ref().is_some_and(|a| a.id == id) {
            *attempt = None;
        }
    }

    /// Whether etcd still has lease `id`. etcd answers -1 for a lease it does not have, and
    /// otherwise the remaining time truncated to whole seconds, so a live lease with less
    /// than a second left (always, for a one-second lease) reads 0: that is a lease.
    pub(crate) async fn lease_lives(&self, id: i64) -> Result<bool> {
        match self.request(self.io.lease_time_to_live(id)).await {
            Ok(answer) => Ok(answer.ttl >= 0),
            Err(err) if lease_not_found(&err) => Ok(false),
            Err(err) => Err(err),
        }
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
    let mut period = slot.keep_alive_period(ttl);
    let first_retry = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut retry = first_retry;
    let mut failures = 0u32;
    let mut delay = period;
    loop {
        sleep(delay).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        period = slot.keep_alive_period(ttl);
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

    /// An etcd that grants leases (id 7) and answers every keep-alive with this TTL (0:
    /// the lease is gone, expired or revoked by an operator). Nothing else is asked in
    /// these tests.
    struct Keeps(i64);

    #[async_trait::async_trait]
    impl crate::io::EtcdIo for Keeps {
        async fn lease_grant(&self, ttl: i64) -> Result<crate::io::LeaseGrant> {
            Ok(crate::io::LeaseGrant { id: 7, ttl })
        }
        async fn lease_revoke(&self, _: i64) -> Result<bool> {
            Err(unexpected("not asked here"))
        }
        async fn lease_keep_alive(&self, _: i64) -> Result<i64> {
            Ok(self.0)
        }
        async fn lease_time_to_live(&self, _: i64) -> Result<crate::io::LeaseTtl> {
            Err(unexpected("not asked here"))
        }
        async fn raft_term(&self, _: &[u8]) -> Result<u64> {
            Err(unexpected("not asked here"))
        }
        async fn range(&self, _: crate::io::Range) -> Result<(crate::io::RangeResult, i64)> {
            Err(unexpected("not asked here"))
        }
        async fn txn(&self, _: crate::io::Txn) -> Result<crate::io::TxnResult> {
            Err(unexpected("not asked here"))
        }
        async fn watch(&self, _: crate::io::WatchRequest) -> Result<crate::io::WatchStream> {
            Err(unexpected("not asked here"))
        }
        async fn client_txn(
            &self,
            _: &str,
            _: i64,
            _: Vec<etcd_client::TxnOp>,
        ) -> Result<Option<etcd_client::TxnResponse>> {
            Err(unexpected("not asked here"))
        }
    }

    /// A keep-alive that etcd answers with TTL 0 confirms nothing: the campaign's grant
    /// would otherwise count its first deadline from a lease that is gone (its key with
    /// it), and another candidate may already lead. The lease is marked dead, so that the
    /// next campaign takes a new one.
    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_answered_with_ttl_0_confirms_nothing() {
        let driver = crate::EtcdDriver::with_io(Arc::new(Keeps(0)), Default::default());
        let inner = &driver.inner;
        let slot = inner.leases.slot(10);
        let (id, _) = inner.ensure_lease(&slot).await.expect("granted");
        let asked = Instant::now() + Duration::from_secs(1);
        let answer = inner.keep_alive(&slot, id, asked).await;
        assert!(matches!(answer, Err(Error::TermGone)), "{answer:?}");
        assert_eq!(
            *slot.subscribe().borrow(),
            0,
            "the lease is known to be gone"
        );
        assert!(matches!(
            inner.keep_alive(&slot, id, Instant::now()).await,
            Err(Error::TermGone)
        ));
    }

    /// `Inner::lapses` reads the count of the term's TTL in whole seconds, of the lease
    /// asked for only while it lives.
    #[tokio::test(start_paused = true)]
    async fn a_terms_lapses_are_those_of_its_ttl_on_its_live_lease() {
        let driver = crate::EtcdDriver::with_io(Arc::new(Keeps(10)), Default::default());
        let inner = &driver.inner;
        let slot = inner.leases.slot(10);
        slot.serves(Duration::from_secs(1));
        let (id, _) = inner.ensure_lease(&slot).await.expect("granted");
        let secs = Duration::from_secs;
        for ttl in [secs(1), secs(2), secs(3)] {
            assert_eq!(inner.lapses(&slot, id, ttl).await, Some(0));
        }
        // 2.5 s without a keep-alive (the background one comes a third of the lease
        // later): a lapse for TTLs of 1 and 2 whole seconds, none for 3.
        tokio::time::advance(Duration::from_millis(2500)).await;
        let now = Instant::now();
        inner.keep_alive(&slot, id, now).await.expect("kept alive");
        assert_eq!(
            inner.lapses(&slot, id, Duration::from_millis(900)).await,
            Some(1)
        );
        assert_eq!(inner.lapses(&slot, id, secs(1)).await, Some(1));
        assert_eq!(
            inner.lapses(&slot, id, Duration::from_millis(1500)).await,
            Some(1)
        );
        assert_eq!(inner.lapses(&slot, id, secs(2)).await, Some(1));
        assert_eq!(inner.lapses(&slot, id, secs(3)).await, Some(0));
        // Another lease's count is none of this one's.
        assert_eq!(inner.lapses(&slot, id + 1, secs(1)).await, None);
        inner.lease_lost(&slot, id).await;
        assert_eq!(inner.lapses(&slot, id, secs(1)).await, None, "a dead lease");
    }

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

    fn lease() -> Lease {
        Lease {
            id: 1,
            ttl: Duration::from_secs(2),
            alive: true,
            confirmed: BootInstant::now(),
            lapses: [0; LAPSE_SECONDS],
        }
    }

    /// A confirmation sent `sent` and answered `answered` after the sending of the one
    /// before.
    async fn confirm_after(lease: &mut Lease, sent: Duration, answered: Duration) -> bool {
        let before = lease.confirmed.instant();
        tokio::time::advance((before + sent).saturating_duration_since(Instant::now())).await;
        let at = BootInstant::now();
        tokio::time::advance((before + answered).saturating_duration_since(Instant::now())).await;
        lease.confirmed(at) > 0
    }

    /// The waiter behind a key can prove its term's deadline passed only after the lease
    /// went more than the TTL, in whole seconds, without a keep-alive: such a gap between
    /// a confirmation's answer and the sending of the one before is a lapse for every TTL
    /// of that many whole seconds or fewer (5% less, for clock rates), and a shorter gap
    /// is none.
    #[tokio::test(start_paused = true)]
    async fn a_lapse_counts_for_the_ttls_it_spans_in_whole_seconds() {
        let mut lease = lease();
        let ms = Duration::from_millis;
        assert!(!confirm_after(&mut lease, ms(600), ms(700)).await);
        assert_eq!(lease.lapses, [0; LAPSE_SECONDS], "0.7 s: no lapse");
        assert!(confirm_after(&mut lease, ms(600), ms(1_500)).await);
        assert_eq!(lease.lapses[..2], [1, 0], "1.5 s: of one second, not two");
        // 2.9 s: of one and of two, and (5% less than three) of three.
        assert!(confirm_after(&mut lease, ms(1_000), ms(2_900)).await);
        assert_eq!(lease.lapses[..4], [2, 1, 1, 0]);
        // From the sending of the one before, not its answer: sent at once after that
        // answer (1.9 s after its sending), answered 30 ms later.
        assert!(confirm_after(&mut lease, ms(1_900), ms(1_930)).await);
        assert_eq!(lease.lapses[..4], [3, 2, 1, 0]);
        assert!(!confirm_after(&mut lease, ms(30), ms(330)).await);
        assert_eq!(lease.lapses[..4], [3, 2, 1, 0], "0.33 s: no lapse");
        // Longer than the longest counted apart: counted as it.
        assert!(confirm_after(&mut lease, ms(300), Duration::from_secs(100)).await);
        assert_eq!(lease.lapses[LAPSE_SECONDS - 1], 1);
    }

    /// The background keep-alive comes at a third of the lease's TTL, but at most two
    /// thirds of the shortest term TTL served (in whole seconds), so that no term sees a
    /// lapse while etcd answers: a lease of 2 s (TTL 1 s) every 0.67 s as before; a lease
    /// fixed at 6 s (or granted longer than asked) for a TTL of 1 s every 0.67 s, not 2 s.
    #[test]
    fn the_keep_alive_comes_often_enough_for_the_shortest_ttl_served() {
        let slot = Leases::new().slot(2);
        assert_eq!(
            slot.keep_alive_period(Duration::from_secs(6)),
            Duration::from_secs(2)
        );
        slot.serves(Duration::from_secs(1));
        assert_eq!(
            slot.keep_alive_period(Duration::from_secs(2)),
            Duration::from_secs(2) / 3
        );
        assert_eq!(
            slot.keep_alive_period(Duration::from_secs(6)),
            Duration::from_secs(2) / 3
        );
        slot.serves(Duration::from_secs(5));
        assert_eq!(
            slot.keep_alive_period(Duration::from_secs(6)),
            Duration::from_secs(2) / 3,
            "the shortest served"
        );
    }
}
