//! Ending a term on request: resign, hand over, proclaim; the work of `lead()` stops
//! first, and the term steps down before the store is asked.

use std::sync::Arc;

use tokio::time::timeout;
use tracing::{Instrument, Span, field, info, info_span};

use super::Core;
use super::state::Leftover;
use super::term_state::TermState;
use crate::driver::Driver;
use crate::event::{Event, LossReason};
use crate::telemetry;
use crate::{Error, Result};

/// How [`Core::end_term`] ends a term in the store.
enum Ending {
    /// Deletes it.
    Resign,
    /// Deletes it and nominates this candidate as the next leader.
    HandOver(String),
}

impl Core {
    /// Steps down (from `only`, or from whatever term is current) and deletes the key.
    pub(crate) async fn resign(self: &Arc<Self>, only: Option<&Arc<TermState>>) -> Result<()> {
        let span = info_span!(
            "resign",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            fencing_token = field::Empty,
        );
        if let Some(term) = only {
            span.record("fencing_token", term.fencing_token);
        }
        self.resign_in_span(only).instrument(span).await
    }

    async fn resign_in_span(self: &Arc<Self>, only: Option<&Arc<TermState>>) -> Result<()> {
        self.end_term(only, Ending::Resign).await
    }

    /// Hands the term over to `nominee` (from `only`, or from whatever term is current).
    pub(crate) async fn hand_over(
        self: &Arc<Self>,
        only: Option<&Arc<TermState>>,
        nominee: &str,
    ) -> Result<()> {
        let span = info_span!(
            "hand_over",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            nominee,
            fencing_token = field::Empty,
        );
        async {
            // Nothing changes when the nominee does not wait: ask before stepping down. (If
            // it leaves between this look and the store call, the driver refuses the
            // handover and the term is resigned instead.)
            if self.current_term(only).is_none() {
                return Err(Error::NotALeader);
            }
            // A driver that cannot list the line cannot promise "no change" either:
            // refuse before anything changes (Error::Unsupported).
            let limit = self.resign_limit();
            let line = timeout(limit, self.driver.candidates(self.name()))
                .await
                .unwrap_or(Err(Error::Timeout(limit)))?;
            if !line.iter().any(|c| c.id == nominee && !c.is_leader) {
                return Err(Error::NotWaiting {
                    id: nominee.to_owned(),
                });
            }
            self.end_term(only, Ending::HandOver(nominee.to_owned()))
                .await
        }
        .instrument(span)
        .await
    }

    /// The current term (`only`, if it is current), if any.
    fn current_term(&self, only: Option<&Arc<TermState>>) -> Option<Arc<TermState>> {
        let st = self.shared.state();
        let current = st.term.clone()?;
        match only {
            Some(only) if !Arc::ptr_eq(&current, only) => None,
            _ => Some(current),
        }
    }

    /// Steps down from the current term (`only`, if it is current) and ends it in the
    /// store as `ending` says. Without a term: deletes what an ended term left, and
    /// answers [`Error::NotALeader`]; a campaign waiting in line is left alone (the seed's
    /// contract: `NotALeader` means nothing was done).
    async fn end_term(
        self: &Arc<Self>,
        only: Option<&Arc<TermState>>,
        ending: Ending,
    ) -> Result<()> {
        let started = {
            let st = self.shared.state();
            // A campaign whose future was dropped is being withdrawn: wait for that below
            // (under the lock) and delete what it left. A campaign still in line is left
            // alone, and so is a leftover then (that campaign clears it before it waits).
            let live = st.campaigns.iter().any(|(_, token)| !token.is_cancelled());
            let dropped = st.campaigns.iter().any(|(_, token)| token.is_cancelled());
            let nothing_to_do = match only {
                Some(term) => !st.term.as_ref().is_some_and(|t| Arc::ptr_eq(t, term)),
                None => st.term.is_none() && (live || (st.leftover.is_none() && !dropped)),
            };
            if nothing_to_do || (st.term.is_none() && matches!(ending, Ending::HandOver(_))) {
                return Err(Error::NotALeader);
            }
            (st.started, st.term.clone())
        };
        let (started, seen) = started;
        // The lock may be held by a campaign that ends the term seen here itself (it had
        // expired) and then waits in line: then there is nothing left for this call.
        let guard = match &seen {
            Some(term) => tokio::select! {
                biased;
                guard = Arc::clone(self).lock_campaigns() => guard,
                () = term.ended() => return Err(Error::NotALeader),
            },
            None => Arc::clone(self).lock_campaigns().await,
        };
        // From here on the call runs to its end in a task of its own, so that cancelling
        // this future cannot lose an end event (every Elected gets exactly one end) or
        // leave lead()'s work asked to stop with nobody ending its term.
        let core = Arc::clone(self);
        let only = only.cloned();
        let body = async move {
            let current = core
                .shared
                .state()
                .term
                .clone()
                .filter(|term| term.seq <= started);
            if let Some(term) = &current {
                // lead()'s work stops before the store can elect anyone else.
                core.stop_work(term).await;
            }
            let (term, leftover) = {
                let mut st = core.shared.state();
                // A term started after this call (a campaign that took the lock first) is
                // not this call's to end.
                let current = st.term.clone().filter(|term| term.seq <= started);
                let term = match (current, &only) {
                    (Some(current), Some(only)) if !Arc::ptr_eq(&current, only) => {
                        return (Err(Error::NotALeader), false);
                    }
                    (None, Some(_)) => return (Err(Error::NotALeader), false),
                    (None, None) if matches!(ending, Ending::HandOver(_)) => {
                        return (Err(Error::NotALeader), false);
                    }
                    (current, _) => current,
                };
                // Step down before the store is asked, so that this candidate never
                // believes it leads once someone else could be elected.
                if let Some(term) = &term {
                    Span::current().record("fencing_token", term.fencing_token);
                    st.term = None;
                    term.end();
                    st.leftover = Some(Leftover::and(
                        st.leftover,
                        Leftover::Term(term.fencing_token),
                    ));
                }
                let Some(leftover) = st.leftover else {
                    return (Err(Error::NotALeader), false);
                };
                (term, leftover)
            };
            // Without a term, only a withdrawn campaign's place is deleted: this candidate
            // did not lead. (A leftover term is the retry of a failed resignation.)
            let follower = term.is_none() && leftover == Leftover::Unknown;
            let result = match (&term, ending) {
                (Some(term), Ending::HandOver(nominee)) => {
                    core.hand_over_in_store(term.fencing_token, leftover, &nominee)
                        .await
                }
                _ => core.withdraw(leftover).await,
            };
            if let Some(term) = &term {
                let event = match &result {
                    Ok(()) | Err(Error::NotWaiting { .. } | Error::Unsupported { .. }) => {
                        info!(election = %core.name(), fencing_token = term.fencing_token, "resigned");
                        Event::Resigned {
                            fencing_token: term.fencing_token,
                        }
                    }
                    Err(Error::TermGone) => Event::Lost {
                        fencing_token: term.fencing_token,
                        reason: LossReason::Gone,
                    },
                    Err(_) => Event::Lost {
                        fencing_token: term.fencing_token,
                        reason: LossReason::ResignFailed,
                    },
                };
                // Emitted before the lock is released: no newer term's Elected can come
                // first.
                core.shared.state().emit(&core.candidate.election, event);
            }
            drop(guard);
            if result.is_err() {
                core.ensure_withdrawer();
            }
            (result, follower)
        };
        let body = body.instrument(Span::current());
        let (result, follower) = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn(body)
                .await
                .unwrap_or_else(|err| (Err(Error::store(err)), false)),
            Err(_) => body.await,
        };
        match result {
            Err(Error::TermGone) => Err(Error::NotALeader),
            Ok(()) if follower => Err(Error::NotALeader),
            result => result,
        }
    }

    /// Asks lead()'s work on `term`, if one runs, to stop, and waits until it is gone, but
    /// never past the term's deadline (as it is now); lead() aborts it by then.
    async fn stop_work(&self, term: &Arc<TermState>) {
        let work = self
            .shared
            .state()
            .work
            .as_ref()
            .filter(|work| Arc::ptr_eq(&work.term, term))
            .map(|work| (work.stop.clone(), work.gone.clone()));
        let Some((stop, gone)) = work else {
            return;
        };
        stop.cancel();
        let deadline = term.deadline();
        tokio::select! {
            biased;
            () = gone.cancelled() => {}
            () = term.expired(Some(deadline)) => {}
        }
    }

    /// Ends the term `fencing_token` in the store with a nomination of `nominee`. If the
    /// driver refuses (the nominee left meanwhile), the term is resigned instead and
    /// [`Error::NotWaiting`] returned; if the term was gone already, [`Error::TermGone`].
    async fn hand_over_in_store(
        &self,
        fencing_token: u64,
        leftover: Leftover,
        nominee: &str,
    ) -> Result<()> {
        let limit = self.resign_limit();
        let result = timeout(
            limit,
            self.driver
                .hand_over(&self.candidate, fencing_token, nominee),
        )
        .await
        .unwrap_or(Err(Error::Timeout(limit)));
        telemetry::store_result(self.name(), "hand_over", &result);
        match result {
            Ok(()) => {
                let mut st = self.shared.state();
                if st.leftover == Some(Leftover::Term(fencing_token)) {
                    st.leftover = None;
                }
                Ok(())
            }
            Err(Error::TermGone) => {
                // As for every other lost term: a campaign answer lost earlier may have
                // landed late and left a newer key of this candidate. Read, then delete.
                self.shared.state().leftover = Some(Leftover::Unknown);
                Err(Error::TermGone)
            }
            // The nominee left meanwhile, or the driver lists candidates but cannot hand
            // over: the term ended already, so resign it.
            Err(err @ (Error::NotWaiting { .. } | Error::Unsupported { .. })) => {
                self.withdraw(leftover).await?;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    /// Sets the value observers see while `term` lasts.
    pub(crate) async fn proclaim(
        self: &Arc<Self>,
        term: &Arc<TermState>,
        value: &[u8],
    ) -> Result<()> {
        if !term.is_valid() {
            return Err(Error::NotALeader);
        }
        let limit = self.resign_limit();
        let result = timeout(
            limit,
            self.driver
                .proclaim(&self.candidate, term.fencing_token, value),
        )
        .await
        .unwrap_or(Err(Error::Timeout(limit)));
        telemetry::store_result(self.name(), "proclaim", &result);
        match result {
            Err(Error::TermGone) => {
                self.lose(term, LossReason::Gone);
                Err(Error::NotALeader)
            }
            result => result,
        }
    }
}
