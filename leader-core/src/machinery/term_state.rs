//! One term of this candidate: its fencing token and its clock (the deadline, which only
//! moves forward while it holds, and the suspension of the machine counted against it).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::lock;
use crate::clock::{SuspendOffset, Suspensions};
use crate::settings::DeadlineHook;

/// One term of this candidate.
pub(crate) struct TermState {
    pub(crate) fencing_token: u64,
    /// The number of this term among the candidate's terms (from 1).
    pub(super) seq: u64,
    /// Taken just before the term became visible: the first instant of belief.
    pub(crate) elected_at: Instant,
    /// The deadline, when the term ended, and who hears of the end: one lock (one per held
    /// term).
    clock: Mutex<TermClock>,
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
    /// A holder resting: one timer, reused across wakes, and its task's waker kept by the
    /// term (for its end) and by the list of suspension listeners. A hand-written future
    /// rather than nested selects, because every held term rests here most of its life:
    /// this state is most of a holder task's size (see the holder's size test).
    pub(crate) struct Rest<'a> {
        term: &'a TermState,
        gone: &'a mut BoxFuture<'static, ()>,
        due: Instant,
        suspensions: &'static Suspensions,
        // The slot of this rest's waker among the suspension listeners, once listed.
        listening: Option<usize>,
        #[pin]
        timer: Sleep,
    }

    impl PinnedDrop for Rest<'_> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.suspensions.forget(this.listening.take());
        }
    }
}

impl Future for Rest<'_> {
    type Output = Wake;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Wake> {
        let mut this = self.project();
        if this.term.poll_holder_ended(cx).is_ready() {
            return Poll::Ready(Wake::Ended);
        }
        if this.gone.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Gone);
        }
        loop {
            // Listening before the clock is read: a suspension noticed after the read wakes
            // this rest (one noticed before it shows in the read).
            this.suspensions.listen(this.listening, cx.waker());
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
    /// The term's cancellation token, made the first time it is asked for (most held terms
    /// never are: a token is an allocation of its own): cancelled when the term ends.
    token: Option<CancellationToken>,
    /// The holder task's waker, woken when the term ends (see
    /// [`TermState::poll_holder_ended`]).
    holder: Option<Waker>,
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
                token: None,
                holder: None,
            }),
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

    /// Rests until `due` (then [`Wake::Due`]) unless the term ends first (then
    /// [`Wake::Ended`]), or `gone` resolves (then [`Wake::Gone`]), or the term's deadline
    /// passes, counting a suspension of the machine as [`expired`](Self::expired) does (then
    /// [`Wake::Expired`]); when several hold at once, in that order. For the term's holder
    /// task only (see [`poll_holder_ended`](Self::poll_holder_ended)).
    pub(crate) fn rest_until<'a>(
        &'a self,
        due: Instant,
        gone: &'a mut BoxFuture<'static, ()>,
    ) -> Rest<'a> {
        Rest {
            term: self,
            gone,
            due,
            suspensions: crate::clock::suspensions(),
            listening: None,
            timer: sleep_until(due),
        }
    }

    /// Steps down: records the instant, then cancels the token and wakes the holder. Call
    /// it with the state lock held, as the term leaves `State::term`.
    pub(super) fn end(&self) {
        let (token, holder) = {
            let mut clock = lock(&self.clock);
            clock.ended_at.get_or_insert_with(Instant::now);
            (clock.token.clone(), clock.holder.take())
        };
        if let Some(token) = token {
            token.cancel();
        }
        if let Some(holder) = holder {
            holder.wake();
        }
    }

    /// The term's token, cancelled when it ends (at once if it has): made on first use,
    /// under the lock [`end`](Self::end) takes, so that it is cancelled whichever comes
    /// first.
    pub(crate) fn token(&self) -> CancellationToken {
        let (token, ended) = {
            let mut clock = lock(&self.clock);
            let token = clock
                .token
                .get_or_insert_with(CancellationToken::new)
                .clone();
            (token, clock.ended_at.is_some())
        };
        if ended {
            token.cancel();
        }
        token
    }

    /// Resolves when the term ends.
    pub(crate) async fn ended(&self) {
        self.token().cancelled_owned().await;
    }

    /// Ready once the term has ended; else keeps `cx`'s waker, which [`end`](Self::end)
    /// wakes. One waker only: for the term's holder task alone (a resting holder keeps no
    /// token nor listener of its own, see [`Rest`]).
    pub(super) fn poll_holder_ended(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut clock = lock(&self.clock);
        if clock.ended_at.is_some() {
            return Poll::Ready(());
        }
        match &mut clock.holder {
            Some(waker) => waker.clone_from(cx.waker()),
            None => clock.holder = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub(crate) fn ended_at(&self) -> Option<Instant> {
        lock(&self.clock).ended_at
    }

    pub(crate) fn is_valid(&self) -> bool {
        let mut clock = lock(&self.clock);
        clock.ended_at.is_none() && clock.holds()
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
