//! The term machinery behind the handles: campaigning under one lock, holding a term
//! (renewals, the deadline), ending it (exactly one end event), and withdrawing whatever an
//! ended term or an abandoned campaign left in the store.
//!
//! Invariants kept here, which the simulation (leader-testkit's `sim`, run by `cargo test -p leader-core --test simulation`) checks:
//! * Every call that creates or deletes this candidate's key runs under `campaign_lock`,
//!   so a withdrawal can never race a newer term's creation.
//! * A term's deadline only moves forward while it has not passed; once `is_valid()` was
//!   false it stays false ([`TermState::extend`]).
//! * A term is ended in one synchronous step (`State::term` cleared, its end time set, its
//!   token cancelled if one was made and its holder woken, one event emitted), and every end that the store did not confirm leaves a
//!   [`Leftover`](state::Leftover) that is withdrawn before the next campaign and by one background task.
//! * A campaign runs in a task of its own, so a resign() that withdraws it never waits on a
//!   future nobody polls; a resign() never ends a term started after it was called.
//!
//! `state.rs` holds what the handles share (the term, the leftover, the campaigns, the
//! subscribers); `term_state.rs` one term and its clock; `campaign.rs` campaigning;
//! `hold.rs` the renewal loop; `resign.rs` ending a term; `withdraw.rs` withdrawing.

mod campaign;
mod hold;
mod holders;
mod resign;
mod state;
mod term_state;
mod withdraw;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::driver::{Candidate, Driver, Grant};
use crate::settings::Settings;
pub(crate) use state::{Shared, Work};
pub(crate) use term_state::TermState;

/// Takes a std mutex whether or not a panic poisoned it: the data under these locks is
/// always left consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) struct Core {
    pub(crate) driver: Arc<dyn Driver>,
    pub(crate) candidate: Candidate,
    pub(crate) settings: Settings,
    pub(crate) shared: Arc<Shared>,
    /// Serialises every call that creates or deletes this candidate's key in the store
    /// (campaign, resign, withdrawal), so a late withdrawal can never delete a newer term.
    /// A semaphore of one permit, kept inline (one allocation less per election): borrowed
    /// as a [`SemaphorePermit`](tokio::sync::SemaphorePermit), or held by an owner of the
    /// core as a [`CampaignGuard`].
    campaign_lock: tokio::sync::Semaphore,
    /// Woken each time a campaign registers, for `withdraw_campaigns`.
    registered: tokio::sync::Notify,
}

/// The campaign lock, held: given back when dropped.
pub(super) struct CampaignGuard(Arc<Core>);

impl Drop for CampaignGuard {
    fn drop(&mut self) {
        self.0.campaign_lock.add_permits(1);
    }
}

impl Core {
    pub(crate) fn new(driver: Arc<dyn Driver>, candidate: Candidate, settings: Settings) -> Self {
        let shared = Arc::new(Shared::new());
        Core {
            driver,
            candidate,
            settings,
            shared,
            campaign_lock: tokio::sync::Semaphore::new(1),
            registered: tokio::sync::Notify::new(),
        }
    }

    /// Takes the campaign lock for as long as the guard lives, which may outlive this borrow.
    async fn lock_campaigns(self: Arc<Self>) -> CampaignGuard {
        // The semaphore is never closed, so the acquisition only waits; the permit is
        // forgotten in the same step as the guard that gives it back is made.
        if let Ok(permit) = self.campaign_lock.acquire().await {
            permit.forget();
        }
        CampaignGuard(self)
    }

    /// Takes the campaign lock for the length of this borrow.
    async fn lock_campaigns_here(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // Never closed: always `Some`.
        self.campaign_lock.acquire().await.ok()
    }

    fn name(&self) -> &str {
        &self.candidate.election
    }

    fn deadline_of(&self, grant: &Grant) -> Instant {
        grant.confirmed_at
            + grant
                .ttl
                .saturating_sub(self.settings.margin_for(grant.ttl))
    }

    /// The longest wait for a resignation or withdrawal request.
    fn resign_limit(&self) -> Duration {
        self.candidate.ttl.max(Duration::from_secs(1))
    }
}
