//! [`Term`]: the handle of one term this candidate holds, information rather than a guard.

use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::machinery::{Core, TermState};

/// A term this candidate holds: information, not a guard. Dropping it does not resign.
#[derive(Clone)]
pub struct Term {
    pub(crate) state: Arc<TermState>,
    pub(crate) core: Arc<Core>,
    /// What [`cancellation_token`](Self::cancellation_token) returns: the term's own token
    /// (`None`: made when first asked for), or (for the work of
    /// [`Election::lead`](crate::Election::lead)) a child of it that `lead` also cancels at
    /// shutdown.
    pub(crate) stop: Option<CancellationToken>,
}

impl Term {
    pub(crate) fn new(state: Arc<TermState>, core: Arc<Core>) -> Self {
        Term {
            state,
            core,
            stop: None,
        }
    }

    /// Strictly greater than the token of every earlier term of this election. Pass it to
    /// the storage your leader writes to, so that it can reject a deposed leader's writes.
    pub fn fencing_token(&self) -> u64 {
        self.state.fencing_token
    }

    /// The instant (monotonic clock) after which this candidate must not act as leader:
    /// the send time of the last successful grant or renewal, plus the TTL, minus the
    /// safety margin. It moves forward at each renewal, never once it has passed.
    pub fn deadline(&self) -> std::time::Instant {
        self.state.deadline().into_std()
    }

    /// When this candidate began to believe it leads this term (taken just before the term
    /// became visible to [`Status::is_leader`](crate::Status::is_leader)).
    pub fn elected_at(&self) -> std::time::Instant {
        self.state.elected_at.into_std()
    }

    /// When the term was ended (stepped down: lost or resigned), if it was. The candidate
    /// stopped believing it leads at the earlier of this and the [`deadline`](Self::deadline).
    pub fn ended_at(&self) -> Option<std::time::Instant> {
        self.state.ended_at().map(tokio::time::Instant::into_std)
    }

    /// Whether the term still holds: not ended, deadline not passed.
    pub fn is_valid(&self) -> bool {
        self.state.is_valid()
    }

    /// Cancelled when the term ends, for any reason; at the latest at the deadline (unless
    /// the process is paused then: [`Status::is_leader`](crate::Status::is_leader) is the check that never lags).
    /// Hand it to leader-only work so that it stops with the term.
    ///
    /// The term that [`Election::lead`](crate::Election::lead) hands to its work has a token that is also cancelled
    /// when `lead` shuts down, before it resigns: the work's signal to stop.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.stop.clone().unwrap_or_else(|| self.state.token())
    }

    /// Resolves when the term ends: lost or resigned.
    ///
    /// In the work of [`Election::lead`](crate::Election::lead), wait for
    /// [`cancellation_token`](Self::cancellation_token) instead: at shutdown `lead` asks the
    /// work to stop *before* the term ends (it resigns once the work has returned).
    pub async fn ended(&self) {
        self.state.ended().await;
    }

    /// Resolves when the term ends, lost *or resigned*: use [`ended`](Self::ended).
    #[deprecated(
        since = "0.1.1",
        note = "it also resolves on resignation: use `ended()`"
    )]
    pub async fn lost(&self) {
        self.ended().await;
    }

    /// Resigns this term, as [`Election::resign`](crate::Election::resign), or returns [`Error::NotALeader`](crate::Error::NotALeader) if it
    /// already ended.
    ///
    /// # Cancel safety
    ///
    /// As [`Election::resign`](crate::Election::resign): the end event is never lost.
    pub async fn resign(&self) -> Result<()> {
        self.core.resign(Some(&self.state)).await
    }

    /// Hands this term over to the candidate `id`, as [`Election::hand_over`](crate::Election::hand_over), or returns
    /// [`Error::NotALeader`](crate::Error::NotALeader) if the term already ended.
    pub async fn hand_over(&self, id: &str) -> Result<()> {
        self.core.hand_over(Some(&self.state), id).await
    }

    /// A new value for observers ([`Election::leader`](crate::Election::leader), [`Election::observe`](crate::Election::observe),
    /// [`Election::candidates`](crate::Election::candidates)) while this term lasts: same term, same fencing token, no
    /// re-election. The next term campaigns with the builder's value again.
    ///
    /// # Errors
    ///
    /// [`Error::NotALeader`](crate::Error::NotALeader), with nothing written, once the term has ended (if the store
    /// says the term is gone, it ends now, reported [lost](crate::LossReason::Gone)); store
    /// errors otherwise.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        self.core.proclaim(&self.state, &value.into()).await
    }
}

impl fmt::Debug for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Term")
            .field("fencing_token", &self.state.fencing_token)
            .field("deadline", &self.state.deadline())
            .field("is_valid", &self.state.is_valid())
            .finish()
    }
}
