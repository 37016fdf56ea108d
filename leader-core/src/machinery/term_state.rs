//! One term of this candidate: its fencing token and its clock (the deadline, which only
//! moves forward while it holds, and the suspension of the machine counted against it).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFuture;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::lock;
use crate::clock::SuspendOffset;
use crate::settings::DeadlineHook;

/// One term of this candidate.
pub(crate) struct TermState {
    pub(crate) fencing_token: u64,
    /// The number of this term among the candidate's terms (from 1).
    pub(super) seq: u64,
    /// Taken just before the term became visible: the first instant of belief.
    pub(crate) elected_at: Instant,
    /// The deadline, and when the term ended: one lock for both (one per held term).
    clock: Mutex<TermClock>,
    pub(crate) ended: CancellationToken,
    on_deadline: Option<DeadlineHook>,
}

/// What ended a [`TermState::rest_until`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The time asked for came.
    Due,
    /// The term's deadline passed first.
    Expired,
    /// The term was ended.
    Ended,
    /// The driver said the term is gone.
    Gone,
}

pin_project! {
    /// A holder resting: one timer and two listeners, reused across wakes. A hand-written
    /// future rather than nested selects, because every held term rests here most of its
    /// life: this state is most of a holder task's size (see the holder's size test).
    pub(crate) struct Rest<'a> {
        term: &'a TermState,
        gone: &'a mut BoxFuture<'static, ()>,
        suspensions: &'static Notify,
        due: Instant,
        #[pin]
        ended: WaitForCancellationFuture<'a>,
        #[pin]
        suspended: Notified<'static>,
        #[pin]
        timer: Sleep,
    }
}

impl Future for Rest<'_> {
    type Output = Wake;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Wake> {
        let mut this = self.project();
        if this.ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Ended);
        }
        if this.gone.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Gone);
        }
        loop {
            // Listening before the clock is read: a suspension noticed after the read wakes
            // this rest (one noticed before it shows in the read).
            while this.suspended.as_mut().poll(cx).is_ready() {
                this.suspended.set(this.suspensions.notified());
            }
            let wake = {
                let mut clock = lock(&this.term.clock);
                let suspended = clock.confirmed.offset.suspended_since();
                let now = Instant::now();
                if !clock.holds() || now + suspended >= clock.deadline {
                    return Poll::Ready(Wake::Expired);
                }
                if now >= *this.due {
                    return Poll::Ready(Wake::Due);
                }
                // Later than now: a timer that fired is always moved (no busy loop).
                (clock.deadline - suspended).min(*this.due)
            };
            if this.timer.deadline() != wake {
                this.timer.as_mut().reset(wake);
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// A reading of the suspend offset, with the instant it was taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    pub(super) at: Instant,
    pub(super) offset: SuspendOffset,
}

impl Reading {
    pub(crate) fn now() -> Self {
        Reading {
            at: Instant::now(),
            offset: SuspendOffset::now(),
        }
    }
}

struct TermClock {
    deadline: Instant,
    /// Taken no later than the confirmation `deadline` rests on: a suspension of the
    /// machine since then shortens the deadline by as much.
    confirmed: Reading,
    /// Set the first time the deadline is seen passed: the term never becomes valid again.
    passed: bool,
    /// When the term was ended (stepped down), if it was: its deadline never moves again.
    ended_at: Option<Instant>,
}

impl TermClock {
    fn holds(&mut self) -> bool {
        if !self.passed {
            let now = Instant::now() + self.confirmed.offset.suspended_since();
            self.passed = now >= self.deadline;
        }
        !self.passed
    }
}

impl TermState {
    pub(super) fn new(
        fencing_token: u64,
        seq: u64,
        deadline: Instant,
        confirmed: Reading,
        on_deadline: Option<DeadlineHook>,
    ) -> Self {
        if let Some(hook) = &on_deadline {
            // A hook that panics at the first deadline only loses its log line: the term
            // holds as the store granted it.
            let _ = hook.call(fencing_token, deadline.into_std());
        }
        TermState {
            fencing_token,
            seq,
            elected_at: Instant::now(),
            clock: Mutex::new(TermClock {
                deadline,
                confirmed,
                passed: false,
                ended_at: None,
            }),
            ended: CancellationToken::new(),
            on_deadline,
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        lock(&self.clock).deadline
    }

    /// Resolves once the term's deadline has passed, counting a suspension of the machine,
    /// within milliseconds of the process running again (Tokio's timers alone would wait out
    /// the time the machine slept). With `fixed`, that deadline instead of the current one.
    pub(crate) async fn expired(&self, fixed: Option<Instant>) {
        let suspensions = crate::clock::suspensions();
        loop {
            // Listening before the clock is read: a suspension noticed after the read wakes
            // this wait (one noticed before it shows in the read).
            let mut suspended = pin!(suspensions.notified());
            suspended.as_mut().enable();
            let due = {
                let mut clock = lock(&self.clock);
                let deadline = fixed.unwrap_or(clock.deadline);
                let suspended = clock.confirmed.offset.suspended_since();
                if !clock.holds() || Instant::now() + suspended >= deadline {
                    return;
                }
                deadline - suspended
            };
            tokio::select! {
                () = sleep_until(due) => {}
                () = suspended => {}
            }
        }
    }

    /// Rests until `due` (then [`Wake::Due`]) unless the term's deadline passes first,
    /// counting a suspension of the machine as [`expired`](Self::expired) does (then
    /// [`Wake::Expired`]), or the term's token is cancelled (then [`Wake::Ended`]), or
    /// `gone` resolves (then [`Wake::Gone`]); when several hold at once, in that order.
    pub(crate) fn rest_until<'a>(
        &'a self,
        due: Instant,
        gone: &'a mut BoxFuture<'static, ()>,
    ) -> Rest<'a> {
        let suspensions = crate::clock::suspensions();
        Rest {
            term: self,
            gone,
            suspensions,
            due,
            ended: self.ended.cancelled(),
            suspended: suspensions.notified(),
            timer: sleep_until(due),
        }
    }

    /// Steps down: records the instant, then cancels the token. Call it with the state
    /// lock held, as the term leaves `State::term`.
    pub(super) fn end(&self) {
        lock(&self.clock).ended_at.get_or_insert_with(Instant::now);
        self.ended.cancel();
    }

    pub(crate) fn ended_at(&self) -> Option<Instant> {
        lock(&self.clock).ended_at
    }

    pub(crate) fn is_valid(&self) -> bool {
        !self.ended.is_cancelled() && lock(&self.clock).holds()
    }

    /// Moves the deadline to `deadline`, which a confirmation sent at `confirmed_at` vouches
    /// for; `reading` was taken before the renewal was asked for. Returns false, moving
    /// nothing, if the current deadline has already passed: a late renewal never revives a
    /// term.
    ///
    /// The suspension reference moves to `reading` only if it predates the confirmation (a
    /// driver may answer with an earlier confirmation it shares between elections):
    /// otherwise a suspension between the confirmation and the reading would be forgotten.
    /// The old reference predates the old confirmation, hence the new one too.
    pub(super) fn extend(
        &self,
        deadline: Instant,
        confirmed_at: Instant,
        reading: Reading,
    ) -> bool {
        let mut clock = lock(&self.clock);
        if clock.ended_at.is_some() || !clock.holds() {
            return false;
        }
        if deadline > clock.deadline {
            if let Some(hook) = &self.on_deadline
                && hook.call(self.fencing_token, deadline.into_std()).is_err()
            {
                // The deadline cannot be logged: not moving it keeps the log complete;
                // the term ends at its current deadline.
                return false;
            }
            clock.deadline = deadline;
            if reading.at <= confirmed_at {
                clock.confirmed = reading;
            }
        }
        true
    }
}

#[cfg(all(test, feature = "testing"))]
#[path = "term_tests.rs"]
mod term_tests;
