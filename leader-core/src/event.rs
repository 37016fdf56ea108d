//! [`Event`]: what a candidate is told when its leadership changes.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

/// A change of this candidate's leadership, delivered by
/// [`Election::subscribe`](crate::Election::subscribe) in the order it happened. Events are
/// never coalesced: every `Elected` is followed by exactly one `Lost` or `Resigned` for the
/// same fencing token before the next `Elected`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// This candidate leads: a new term began.
    Elected {
        /// The new term's fencing token.
        fencing_token: u64,
    },
    /// The term ended without this candidate asking: it could not be renewed before its
    /// deadline, or the store says it is gone.
    Lost {
        /// The ended term's fencing token.
        fencing_token: u64,
        /// Why it ended.
        reason: LossReason,
    },
    /// The term ended because this candidate resigned, and the store confirmed it.
    Resigned {
        /// The ended term's fencing token.
        fencing_token: u64,
    },
}

impl Event {
    /// `true` for [`Event::Elected`], `false` for the end of a term: the Go original's
    /// dispatcher payload.
    pub fn is_leader(&self) -> bool {
        matches!(self, Event::Elected { .. })
    }

    /// The fencing token of the term the event is about.
    pub fn fencing_token(&self) -> u64 {
        match self {
            Event::Elected { fencing_token }
            | Event::Lost { fencing_token, .. }
            | Event::Resigned { fencing_token } => *fencing_token,
        }
    }
}

/// Why a term was [lost](Event::Lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// The deadline passed without a successful renewal (store unreachable, too slow, or
    /// this process was paused).
    Expired,
    /// The store no longer holds the term: its key expired, was deleted, or was taken.
    Gone,
    /// A resignation was asked for, the candidate stepped down, but the store call failed:
    /// the store may keep the key until it expires. `resign()` may be called again.
    ResignFailed,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::Expired => "not renewed before its deadline",
            LossReason::Gone => "the store no longer holds it",
            LossReason::ResignFailed => "resigned, but the store call failed",
        })
    }
}

/// The stream returned by [`Election::subscribe`](crate::Election::subscribe).
///
/// It buffers without bound (events are a few per term), so a slow reader loses nothing;
/// it ends when the last clone of the election is dropped and its candidacy withdrawn.
#[derive(Debug)]
pub struct EventStream {
    pub(crate) rx: mpsc::UnboundedReceiver<Event>,
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
