//! What the handles of one candidate share, under one lock: the current term, what the
//! store may still hold, the campaigns in flight, the work of `lead()`, the subscribers.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lock;
use super::term_state::TermState;
use crate::event::Event;
use crate::telemetry;

pub(crate) struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) term: Option<Arc<TermState>>,
    /// What this candidate may still have in the store although it holds no term.
    pub(super) leftover: Option<Leftover>,
    /// The campaigns in flight, by id: resign() withdraws them.
    pub(super) campaigns: Vec<(u64, CancellationToken)>,
    pub(super) next_campaign: u64,
    /// How many terms were started: resign() never ends one started after it was called.
    pub(super) started: u64,
    /// Whether the background withdrawer runs.
    pub(super) withdrawer: bool,
    /// The work `lead()` runs for the current term, if any.
    pub(super) work: Option<Work>,
    pub(super) subscribers: Vec<mpsc::UnboundedSender<Event>>,
}

/// The work [`Election::lead`](crate::Election::lead) runs for a term: a resign() or
/// hand_over() of that term asks it to stop, and waits until it is gone, before the store
/// is asked.
pub(crate) struct Work {
    pub(crate) term: Arc<TermState>,
    /// The work's token: cancelled to ask it to stop.
    pub(crate) stop: CancellationToken,
    /// Cancelled once the work's task is gone (returned, panicked or aborted).
    pub(crate) gone: CancellationToken,
}

/// Something of this candidate's that the store may still hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leftover {
    /// The key of this term, which ended without the store confirming its deletion.
    Term(u64),
    /// Whatever a campaign that did not finish left, or several leftovers at once.
    Unknown,
}

impl Leftover {
    pub(super) fn fencing_token(self) -> Option<u64> {
        match self {
            Leftover::Term(token) => Some(token),
            Leftover::Unknown => None,
        }
    }

    pub(super) fn and(this: Option<Leftover>, other: Leftover) -> Leftover {
        match this {
            None => other,
            Some(this) if this == other => this,
            Some(_) => Leftover::Unknown,
        }
    }
}

impl State {
    /// Tells the subscribers of election `name` (for metrics) of `event`.
    pub(super) fn emit(&mut self, name: &str, event: Event) {
        telemetry::transition(name, &event);
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Ends the current term, if it is `term`: one synchronous step, one event.
    pub(super) fn end(&mut self, name: &str, term: &Arc<TermState>, event: Event) -> bool {
        match &self.term {
            Some(current) if Arc::ptr_eq(current, term) => {
                self.term = None;
                term.end();
                if !matches!(event, Event::Resigned { .. }) {
                    // Not just this term: a campaign answer lost earlier may have landed
                    // late and left a newer key of this candidate. Read, then delete.
                    self.leftover = Some(Leftover::Unknown);
                }
                self.emit(name, event);
                true
            }
            _ => false,
        }
    }
}

impl Shared {
    pub(crate) fn new() -> Self {
        Shared {
            state: Mutex::new(State::default()),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn valid_term(&self) -> Option<Arc<TermState>> {
        self.state()
            .term
            .as_ref()
            .filter(|term| term.is_valid())
            .cloned()
    }

    #[cfg(test)]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.state().subscribers.len()
    }

    /// Records the work `lead()` runs for a term (or none).
    pub(crate) fn set_work(&self, work: Option<Work>) {
        self.state().work = work;
    }

    /// Forgets the work of `term`, if it is the one recorded.
    pub(crate) fn clear_work(&self, term: &Arc<TermState>) {
        let mut st = self.state();
        if st.work.as_ref().is_some_and(|w| Arc::ptr_eq(&w.term, term)) {
            st.work = None;
        }
    }

    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.state();
        st.subscribers.retain(|tx| !tx.is_closed());
        st.subscribers.push(tx);
        rx
    }
}
