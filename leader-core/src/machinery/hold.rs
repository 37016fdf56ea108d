//! Holding a term: the renewal loop, and losing the term when it expires or the store
//! says it is gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{Instrument, warn};

use super::Core;
use super::term_state::{Reading, TermState, Wake};
use crate::Error;
use crate::driver::{Driver, Grant};
use crate::error::ErrorChain;
use crate::event::{Event, LossReason};

impl Core {
    /// Ends `term` for `reason` if it is still current, and withdraws its key in the
    /// background. Returns whether it was current.
    pub(super) fn lose(self: &Arc<Self>, term: &Arc<TermState>, reason: LossReason) -> bool {
        let event = Event::Lost {
            fencing_token: term.fencing_token,
            reason,
        };
        if !self.shared.state().end(term, event) {
            return false;
        }
        warn!(
            election = %self.name(),
            fencing_token = term.fencing_token,
            %reason,
            "term lost; stepped down"
        );
        self.ensure_withdrawer();
        true
    }

    /// Renews `term` every third of its TTL, each attempt capped at a quarter of it, until
    /// the term ends; ends it at its deadline.
    pub(super) async fn hold(self: Arc<Self>, term: Arc<TermState>, mut grant: Grant) {
        let ttl = grant.ttl;
        let retry = (ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let cap = (ttl / 4).max(Duration::from_millis(1));
        let mut next_renewal = grant.confirmed_at + ttl / 3;
        let mut failures = 0u32;
        let mut gone = self.driver.term_gone(&self.candidate, term.fencing_token);
        loop {
            if !term.is_valid() {
                // Ended elsewhere, or the machine was suspended past the deadline (the
                // monotonic timers below do not count that time).
                self.lose(&term, LossReason::Expired);
                return;
            }
            // Rest until the renewal time; the term's end, the store saying it is gone and
            // the deadline (counting a suspension) win.
            let wake = tokio::select! {
                biased;
                () = term.ended.cancelled() => return,
                () = &mut gone => {
                    self.lose(&term, LossReason::Gone);
                    return;
                }
                wake = term.rest_until(next_renewal) => wake,
            };
            if wake == Wake::Expired {
                self.lose(&term, LossReason::Expired);
                return;
            }
            // Renew; the same three win over the request. Boxed: a request's state exists
            // only while it is in flight, so that the thousands of resting holders of a
            // process with many elections stay small.
            let renewal = Box::pin(async {
                let reading = Reading::now();
                let renewed = self
                    .renew(&grant, cap)
                    .instrument(self.renewal_span(term.fencing_token))
                    .await;
                (reading, renewed)
            });
            let (reading, renewed) = tokio::select! {
                biased;
                () = term.ended.cancelled() => return,
                () = &mut gone => {
                    self.lose(&term, LossReason::Gone);
                    return;
                }
                () = term.expired(None) => {
                    self.lose(&term, LossReason::Expired);
                    return;
                }
                renewed = renewal => renewed,
            };
            match renewed {
                Ok(renewed) if renewed.fencing_token == grant.fencing_token => {
                    if !term.extend(self.deadline_of(&renewed), renewed.confirmed_at, reading) {
                        // The answer came after the deadline passed: too late to count.
                        self.lose(&term, LossReason::Expired);
                        return;
                    }
                    failures = 0;
                    grant = renewed;
                    next_renewal = (grant.confirmed_at + ttl / 3).max(Instant::now() + retry);
                }
                Ok(_) | Err(Error::TermGone) => {
                    self.lose(&term, LossReason::Gone);
                    return;
                }
                Err(err) => {
                    if failures.is_multiple_of(5) {
                        warn!(
                            election = %self.name(),
                            fencing_token = term.fencing_token,
                            error = %ErrorChain(&err),
                            failures = failures + 1,
                            "renewal failed; retrying until the deadline"
                        );
                    }
                    failures = failures.saturating_add(1);
                    next_renewal = Instant::now() + retry;
                }
            }
        }
    }
}
