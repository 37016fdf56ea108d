//! Withdrawing what this candidate may still have in the store: campaigns in flight, the
//! leftover of an ended term, the background withdrawer, and the close of the last handle.

use std::sync::Arc;

use tokio::time::{sleep, timeout};
use tracing::warn;

use super::Core;
use super::state::Leftover;
use crate::backoff::Backoff;
use crate::driver::Driver;
use crate::error::ErrorChain;
use crate::event::{Event, LossReason};
use crate::telemetry;
use crate::{Error, Result};

impl Core {
    /// Starts the background withdrawer unless it runs already or nothing is left.
    pub(super) fn ensure_withdrawer(self: &Arc<Self>) {
        let mut st = self.shared.state();
        if st.withdrawer || st.leftover.is_none() {
            return;
        }
        // Without a runtime it stays a leftover: the next campaign or resign() takes it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            st.withdrawer = true;
            runtime.spawn(withdrawer(Arc::clone(self)));
        }
    }

    /// Withdraws this candidate's campaigns in flight and waits until their places in line
    /// are gone from the store. A term held already is left alone.
    pub(crate) async fn withdraw_campaigns(self: &Arc<Self>) -> Result<()> {
        let guard = loop {
            // Listening before cancelling: a campaign registered after the cancel (another
            // thread may queue it on the lock ahead of this call) is cancelled too, rather
            // than waited for through its whole wait in line.
            let registered = self.registered.notified();
            let mut registered = std::pin::pin!(registered);
            registered.as_mut().enable();
            for (_, campaign) in &self.shared.state().campaigns {
                campaign.cancel();
            }
            tokio::select! {
                biased;
                guard = self.lock_campaigns_here() => break guard,
                () = &mut registered => {}
            }
        };
        let result = self.withdraw_leftover().await;
        drop(guard);
        if result.is_err() {
            self.ensure_withdrawer();
        }
        result
    }

    /// Asks the driver to delete what this candidate left in the store, if anything. Call
    /// it holding the campaign lock.
    pub(super) async fn withdraw_leftover(&self) -> Result<()> {
        let Some(leftover) = self.shared.state().leftover else {
            return Ok(());
        };
        self.withdraw(leftover).await
    }

    pub(super) async fn withdraw(&self, leftover: Leftover) -> Result<()> {
        let limit = self.resign_limit();
        let token = leftover.fencing_token();
        let result = match timeout(limit, self.driver.resign(&self.candidate, token)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(limit)),
        };
        telemetry::store_result(self.name(), "resign", &result);
        if result.is_ok() {
            let mut st = self.shared.state();
            if st.leftover == Some(leftover) {
                st.leftover = None;
            }
        }
        result
    }

    /// The last handle is gone: withdraw the candidacy, resign any term, end the streams.
    /// If the store cannot be reached, the background withdrawer keeps trying (holding the
    /// driver) until it can, so nothing is left behind.
    pub(crate) async fn close(self: Arc<Self>) {
        if let Err(err) = self.withdraw_campaigns().await {
            warn!(
                election = %self.name(),
                error = %ErrorChain(&err),
                "could not withdraw the dropped election's campaign; retrying in the background"
            );
        }
        match self.resign(None).await {
            Ok(()) | Err(Error::NotALeader) => {}
            Err(err) => warn!(
                election = %self.name(),
                error = %ErrorChain(&err),
                "could not withdraw the dropped election's key; retrying in the background"
            ),
        }
        self.shared.state().subscribers.clear();
    }

    /// Dropped outside a runtime: nothing can reach the store; step down at least.
    pub(crate) fn step_down_locally(&self) {
        let mut st = self.shared.state();
        if let Some(term) = st.term.clone() {
            let event = Event::Lost {
                fencing_token: term.fencing_token,
                reason: LossReason::ResignFailed,
            };
            st.end(&self.candidate.election, &term, event);
        }
        st.subscribers.clear();
    }
}

/// The one background withdrawer of a candidate: deletes its leftover, retrying with
/// backoff until it is gone (or a campaign took care of it), or the store refuses for good.
async fn withdrawer(core: Arc<Core>) {
    let mut backoff = Backoff::new(core.settings.retry_min, core.settings.retry_max);
    let mut failures = 0u32;
    loop {
        let result = {
            let _guard = core.lock_campaigns_here().await;
            core.withdraw_leftover().await
        };
        let failed = match result {
            Ok(()) => false,
            Err(err) if !err.is_transient() => {
                warn!(
                    election = %core.name(),
                    error = %ErrorChain(&err),
                    "cannot withdraw this candidate's key; giving up"
                );
                core.shared.state().withdrawer = false;
                return;
            }
            Err(err) => {
                if failures.is_multiple_of(10) {
                    warn!(
                        election = %core.name(),
                        error = %ErrorChain(&err),
                        failures = failures + 1,
                        "could not withdraw this candidate's key; retrying"
                    );
                }
                failures = failures.saturating_add(1);
                true
            }
        };
        {
            let mut st = core.shared.state();
            if st.leftover.is_none() {
                st.withdrawer = false;
                return;
            }
        }
        if failed {
            sleep(backoff.next_delay()).await;
        }
    }
}
