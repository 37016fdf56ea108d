//! Campaigning: one campaign at a time under the campaign lock, in a task of its own,
//! withdrawn if it does not finish; a grant becomes a term only if its deadline holds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, debug_span, field, info, info_span};

use super::state::Leftover;
use super::term_state::{Reading, TermState};
use super::{CampaignGuard, Core, holders};
use crate::driver::{Driver, Grant};
use crate::event::{Event, LossReason};
use crate::telemetry;
use crate::{Error, Result};

impl Core {
    /// Campaigns until elected, or returns the term this candidate holds.
    ///
    /// The campaign runs in a task of its own: a resign() that withdraws it must not wait
    /// for its caller to poll it again. Dropping this future withdraws it.
    pub(crate) async fn campaign(self: Arc<Self>) -> Result<(Arc<TermState>, Arc<Self>)> {
        // Registered before waiting for the lock, so that a resign() that comes later
        // always finds it and withdraws it rather than waiting for it to be elected.
        let withdrawn = CancellationToken::new();
        let id = {
            let mut st = self.shared.state();
            st.next_campaign += 1;
            let id = st.next_campaign;
            st.campaigns.push((id, withdrawn.clone()));
            id
        };
        self.registered.notify_waiters();
        // Unlisted when the campaign ends, or when its task is dropped without running.
        let registered = Registered {
            core: Arc::clone(&self),
            id,
        };
        let (tx, rx) = oneshot::channel();
        let core = Arc::clone(&self);
        let token = withdrawn.clone();
        let campaign = async move {
            let _registered = registered;
            let result = tokio::select! {
                biased;
                () = token.cancelled() => Err(Error::Withdrawn),
                term = Arc::clone(&core).campaign_locked(&token) => term,
            };
            if let Err(Ok(term)) = tx.send(result) {
                // The caller gave up just as the term began: it asked to withdraw.
                let _ = core.resign(Some(&term)).await;
            }
        };
        let span = info_span!(
            "campaign",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            fencing_token = field::Empty,
        );
        let campaign = campaign.instrument(span);
        let _withdraw_if_dropped = withdrawn.clone().drop_guard();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(campaign);
            }
            // Polled outside Tokio: run it here (a resign() then waits for it).
            Err(_) => campaign.await,
        }
        let result = rx.await.unwrap_or(Err(Error::Withdrawn));
        _withdraw_if_dropped.disarm();
        result.map(|term| (term, self))
    }

    async fn campaign_locked(
        self: Arc<Self>,
        withdrawn: &CancellationToken,
    ) -> Result<Arc<TermState>> {
        let guard = Arc::clone(&self).lock_campaigns().await;
        {
            let mut st = self.shared.state();
            if let Some(term) = st.term.clone() {
                if term.is_valid() {
                    return Ok(term);
                }
                // Expired, and its holder task has not ended it yet: end it here, before the
                // driver is asked for a new term, so that nothing can renew it meanwhile.
                let event = Event::Lost {
                    fencing_token: term.fencing_token,
                    reason: LossReason::Expired,
                };
                st.end(&self.candidate.election, &term, event);
            }
        }
        // From here on, giving up (an error, a dropped future, a resign()) withdraws
        // whatever the campaign may have left in the store.
        let mut withdrawal = Withdrawal {
            core: Some(Arc::clone(&self)),
            guard: Some(guard),
        };
        let (grant, reading) = self.elect().await?;
        let term = self.start_term(grant, reading, withdrawn)?;
        withdrawal.disarm();
        Ok(term)
    }

    /// Clears what earlier terms left, then waits in the driver until elected; returns a
    /// grant whose deadline has not passed.
    async fn elect(&self) -> Result<(Grant, Reading)> {
        self.withdraw_leftover().await?;
        debug!(election = %self.name(), id = %self.candidate.id, "campaigning");
        let confirmed = Reading::now();
        let granted = self.driver.campaign(&self.candidate).await;
        telemetry::store_result(self.name(), "campaign", &granted);
        let grant = granted?;
        if self.holds(&grant, confirmed) {
            return Ok((grant, confirmed));
        }
        // Elected after a long wait on a stale confirmation: confirm once more, unless the
        // machine slept since the campaign began. A driver checks a renewal against the
        // grant's deadline on Tokio's clock, which does not count that sleep: it could renew
        // a grant whose deadline has really passed, which the next in line may have seen
        // (etcd: it then ends the term, and the renewal's read can come before that delete
        // lands). Giving the grant up costs a place in line, after a suspension only.
        if !confirmed.offset.suspended_since().is_zero() {
            return Err(Error::TermGone);
        }
        let limit = self.candidate.ttl;
        let renewed = self
            .renew(&grant, limit)
            .instrument(self.renewal_span(grant.fencing_token))
            .await;
        let renewed = renewed?;
        // The same if it slept during the renewal: its confirmation may have been sent
        // after the old deadline had really passed.
        if !confirmed.offset.suspended_since().is_zero() {
            return Err(Error::TermGone);
        }
        // The reading taken before the campaign is the reference, as in
        // `TermState::extend`: it predates the renewal's confirmation even when that is an
        // earlier one shared with other terms, and no suspension since it is left to count.
        if self.holds(&renewed, confirmed) {
            Ok((renewed, confirmed))
        } else {
            Err(Error::Timeout(limit))
        }
    }

    /// One renewal request, given up after `limit`: timed and counted for the metrics.
    pub(super) async fn renew(&self, grant: &Grant, limit: Duration) -> Result<Grant> {
        let started = Instant::now();
        let renewed = timeout(limit, self.driver.renew(&self.candidate, grant))
            .await
            .unwrap_or(Err(Error::Timeout(limit)));
        self.renewed(started, &renewed);
        renewed
    }

    /// Counts a renewal request sent at `started` that came back (or timed out) with
    /// `renewed`, for the metrics.
    pub(super) fn renewed(&self, started: Instant, renewed: &Result<Grant>) {
        telemetry::renewal(self.name(), started.elapsed());
        telemetry::store_result(self.name(), "renew", renewed);
    }

    pub(super) fn renewal_span(&self, fencing_token: u64) -> Span {
        debug_span!(
            "renew",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            fencing_token,
        )
    }

    fn holds(&self, grant: &Grant, confirmed: Reading) -> bool {
        Instant::now() + confirmed.offset.suspended_since() < self.deadline_of(grant)
    }

    /// Starts the term `grant` describes, unless a resign() withdrew the campaign meanwhile
    /// (then the caller's withdrawal deletes it from the store).
    fn start_term(
        self: &Arc<Self>,
        grant: Grant,
        confirmed: Reading,
        withdrawn: &CancellationToken,
    ) -> Result<Arc<TermState>> {
        let term = {
            let mut st = self.shared.state();
            if withdrawn.is_cancelled() {
                return Err(Error::Withdrawn);
            }
            st.started += 1;
            let term = Arc::new(TermState::new(
                grant.fencing_token,
                st.started,
                self.deadline_of(&grant),
                confirmed,
                self.settings.on_deadline.clone(),
            ));
            // The driver's campaign replaced whatever this candidate had in the store.
            st.leftover = None;
            st.term = Some(Arc::clone(&term));
            st.emit(
                &self.candidate.election,
                Event::Elected {
                    fencing_token: grant.fencing_token,
                },
            );
            term
        };
        Span::current().record("fencing_token", grant.fencing_token);
        info!(election = %self.name(), fencing_token = grant.fencing_token, "elected");
        holders::hold(
            &self.driver,
            Arc::clone(self).hold(Arc::clone(&term), grant),
        );
        Ok(term)
    }
}

/// A campaign in flight, listed in the state until it returns or is dropped.
struct Registered {
    core: Arc<Core>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut st = self.core.shared.state();
        st.campaigns.retain(|(id, _)| *id != self.id);
        if st.campaigns.is_empty() {
            // A candidate that holds its term has no campaign in flight for most of its
            // life: the list's room goes with its last entry (64 bytes per election).
            st.campaigns = Vec::new();
        }
    }
}

/// Withdraws a campaign that did not finish (its future was dropped, it failed, or a
/// resign() withdrew it): marks what it may have left, releases the lock, and lets the
/// background withdrawer (or the next holder of the lock) delete it.
struct Withdrawal {
    core: Option<Arc<Core>>,
    guard: Option<CampaignGuard>,
}

impl Withdrawal {
    fn disarm(&mut self) {
        self.core = None;
        self.guard = None;
    }
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        let (Some(core), Some(guard)) = (self.core.take(), self.guard.take()) else {
            return;
        };
        {
            // Set before the lock is released: whoever takes it next withdraws first, and
            // resign() waits for it rather than answering "not a leader" while the store
            // may still hold this candidate's key.
            let mut st = core.shared.state();
            st.leftover = Some(Leftover::and(st.leftover, Leftover::Unknown));
        }
        drop(guard);
        core.ensure_withdrawer();
    }
}
