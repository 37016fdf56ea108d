//! Holding a term: the renewal loop, and losing the term when it expires or the store
//! says it is gone.

use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use tokio::time::Instant;
use tracing::{Instrument, warn};

use super::Core;
use super::term_state::{Reading, TermState, Wake};
use crate::driver::{Driver, Grant};
use crate::error::ErrorChain;
use crate::event::{Event, LossReason};
use crate::{Error, Result};

impl Core {
    /// Ends `term` for `reason` if it is still current, and withdraws its key in the
    /// background. Returns whether it was current.
    pub(super) fn lose(self: &Arc<Self>, term: &Arc<TermState>, reason: LossReason) -> bool {
        let event = Event::Lost {
            fencing_token: term.fencing_token,
            reason,
        };
        if !self.shared.state().end(self.name(), term, event) {
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
    ///
    /// An async block rather than an async fn: the latter keeps its arguments twice in its
    /// state (as arguments and as locals), and this future rests for every held term (in the
    /// task of its driver's holders: see `holders.rs`).
    /// Only what lives across the whole loop is kept (see the size test below).
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub(super) fn hold(
        self: Arc<Self>,
        term: Arc<TermState>,
        mut grant: Grant,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            // The TTL is the grant's (a renewal's answer carries it on): not kept twice.
            let mut next_renewal = grant.confirmed_at + grant.ttl / 3;
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
                match term.rest_until(next_renewal, &mut gone).await {
                    Wake::Due => {}
                    Wake::Ended => return,
                    Wake::Gone => {
                        self.lose(&term, LossReason::Gone);
                        return;
                    }
                    Wake::Expired => {
                        self.lose(&term, LossReason::Expired);
                        return;
                    }
                }
                // Renew, for at most the renewal cap; the same three win over the request.
                // One timer serves the cap and the deadline: the rest's, until the cap. Boxed,
                // with the waits: a request's state exists only while it is in flight, so that
                // the thousands of resting holders of a process with many elections stay
                // small, and so that the renewals of all of them, which come due together
                // (they share their store's confirmations), stay small too (see the size
                // test below).
                let renewal = Box::pin(self.renew_held(&term, &grant, &mut gone));
                let (reading, renewed) = match renewal.await {
                    (_, Err(None)) => return,
                    (_, Err(Some(reason))) => {
                        self.lose(&term, reason);
                        return;
                    }
                    (reading, Ok(renewed)) => (reading, renewed),
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
                        next_renewal = (grant.confirmed_at + grant.ttl / 3)
                            .max(Instant::now() + retry_after(grant.ttl));
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
                        next_renewal = Instant::now() + retry_after(grant.ttl);
                    }
                }
            }
        }
    }

    /// One renewal of held `term` (see `hold`): the reading taken before it was sent, and
    /// the driver's answer (a timeout at the renewal cap), or why the term ended meanwhile
    /// (`None`: ended here).
    #[allow(clippy::manual_async_fn)] // on purpose: an async fn keeps its arguments twice
    fn renew_held<'a>(
        &'a self,
        term: &'a TermState,
        grant: &'a Grant,
        gone: &'a mut BoxFuture<'static, ()>,
    ) -> impl Future<Output = (Reading, Result<Result<Grant>, Option<LossReason>>)> + Send + 'a
    {
        async move {
            let reading = Reading::now();
            let started = Instant::now();
            let mut request = self
                .driver
                .renew(&self.candidate, grant)
                .instrument(self.renewal_span(term.fencing_token));
            let mut rest = pin!(term.rest_until(started + renewal_cap(grant.ttl), gone));
            let outcome = std::future::poll_fn(|cx| {
                let wake = match rest.as_mut().poll(cx) {
                    Poll::Ready(wake) => wake,
                    Poll::Pending => return request.poll_unpin(cx).map(Ok),
                };
                Poll::Ready(match wake {
                    Wake::Ended => Err(None),
                    Wake::Gone => Err(Some(LossReason::Gone)),
                    Wake::Expired => Err(Some(LossReason::Expired)),
                    // The cap: an answer that has come still counts, as with
                    // `tokio::time::timeout`, which polls the request first.
                    Wake::Due => Ok(match request.poll_unpin(cx) {
                        Poll::Ready(renewed) => renewed,
                        Poll::Pending => Err(Error::Timeout(renewal_cap(grant.ttl))),
                    }),
                })
            })
            .await;
            if let Ok(renewed) = &outcome {
                self.renewed(started, renewed);
            }
            (reading, outcome)
        }
    }
}

/// How long after a failed renewal the next one is tried.
fn retry_after(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// How long one renewal request may take.
fn renewal_cap(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(1))
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::super::term_state::{Reading, TermState};
    use super::Core;
    use crate::Config;
    use crate::driver::{Candidate, Grant};
    use crate::settings::Settings;
    use crate::testing::MemoryDriver;

    /// A candidate's core on a `MemoryDriver`, with the default settings.
    fn core(ttl: Duration) -> Arc<Core> {
        Arc::new(Core::new(
            Arc::new(MemoryDriver::new()),
            Candidate::new("e", "me", "v", ttl),
            Settings::from(&Config::default()),
        ))
    }

    /// Every held term is a task of this future, resting most of its life: Tokio places a
    /// task in a cell of 104 bytes plus the future (120 with `--cfg tokio_unstable`, as this
    /// workspace builds), rounded up to 128, so at most 264 bytes here keep a holder in 384
    /// (it was 512 with a cancellation token's and a `Notify`'s listeners in it and the TTL
    /// kept twice, 768 with nested selects).
    #[tokio::test]
    async fn a_resting_holder_stays_small() {
        let ttl = Duration::from_secs(10);
        let core = core(ttl);
        let now = Instant::now();
        let term = Arc::new(TermState::new(1, 1, now + ttl, Reading::now(), None));
        let hold = Arc::clone(&core).hold(Arc::clone(&term), Grant::new(1, now, ttl));
        let size = std::mem::size_of_val(&hold);
        assert!(size <= 264, "the holder's future is {size} bytes");
    }

    /// A renewal in flight, beside its driver's request: when a process holds many
    /// elections, their renewals come due together (they rest on the store's shared
    /// confirmations), and all of them are in flight at once. One timer for the cap and the
    /// deadline, and no nested select: it was 624 bytes with `timeout` and `expired()` each
    /// holding a timer and a listener.
    #[tokio::test]
    async fn a_renewal_in_flight_stays_small() {
        let ttl = Duration::from_secs(10);
        let core = core(ttl);
        let now = Instant::now();
        let term = TermState::new(1, 1, now + ttl, Reading::now(), None);
        let grant = Grant::new(1, now, ttl);
        let mut gone: futures::future::BoxFuture<'static, ()> = Box::pin(std::future::pending());
        let renewal = core.renew_held(&term, &grant, &mut gone);
        let size = std::mem::size_of_val(&renewal);
        assert!(size <= 344, "a renewal in flight is {size} bytes");
    }
}
