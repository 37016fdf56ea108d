//! The signal that a held term is gone: set once by whatever learns it (the watch of held
//! keys, a renewal's read, a campaign's wait), awaited by leader-core's holder through
//! [`EtcdDriver::term_gone`](crate::EtcdDriver::term_gone), and checked by every
//! operation on the term. A cancellation token does this too, but keeps a tree of parents
//! and children this driver never uses, and its wait holds a whole `Notify` waiter:
//! together about 200 bytes for every term, where this takes about 80 (a process may hold
//! thousands of terms on one driver).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::lock;

/// Set once, never reset; clones share it. See the module's documentation.
#[derive(Clone, Default)]
pub(crate) struct Gone(Arc<Signal>);

#[derive(Default)]
struct Signal {
    gone: AtomicBool,
    /// The wakers of the waits in progress (a slot per wait; `None` once it ended).
    waiting: Mutex<Vec<Option<Waker>>>,
}

impl Gone {
    pub(crate) fn new() -> Self {
        Gone::default()
    }

    /// Sets the signal and wakes every wait; later calls do nothing.
    pub(crate) fn cancel(&self) {
        if self.0.gone.swap(true, Ordering::SeqCst) {
            return;
        }
        // Taken under the lock a wait lists itself under, after the flag is set: a wait
        // either listed itself before (and is woken here) or sees the flag.
        let waiting = std::mem::take(&mut *lock(&self.0.waiting));
        for waker in waiting.into_iter().flatten() {
            waker.wake();
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.gone.load(Ordering::SeqCst)
    }

    /// Resolves once the signal is set (at once if it is).
    pub(crate) fn cancelled_owned(self) -> Wait {
        Wait {
            gone: self,
            slot: None,
        }
    }
}

/// A wait for a [`Gone`] to be set.
pub(crate) struct Wait {
    gone: Gone,
    /// Where this wait's waker is listed, once it is.
    slot: Option<usize>,
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.gone.is_cancelled() {
            return Poll::Ready(());
        }
        let mut waiting = lock(&this.gone.0.waiting);
        // Looked at again under the lock: `cancel` sets the flag before taking the list.
        if this.gone.is_cancelled() {
            return Poll::Ready(());
        }
        match this.slot.and_then(|at| waiting.get_mut(at)) {
            Some(Some(listed)) => listed.clone_from(cx.waker()),
            _ => {
                waiting.push(Some(cx.waker().clone()));
                this.slot = Some(waiting.len() - 1);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let Some(at) = self.slot else { return };
        let mut waiting = lock(&self.gone.0.waiting);
        if let Some(listed) = waiting.get_mut(at) {
            *listed = None;
        }
        if waiting.iter().all(Option::is_none) {
            *waiting = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_wait_ends_at_the_cancel_before_or_during_it_and_clones_share_it() {
        let gone = Gone::new();
        assert!(!gone.is_cancelled());
        let first = tokio::spawn(gone.clone().cancelled_owned());
        let second = tokio::spawn(gone.clone().cancelled_owned());
        // A wait dropped before the cancel leaves nothing behind.
        assert!(gone.clone().cancelled_owned().now_or_never().is_none());
        tokio::task::yield_now().await;
        assert!(!first.is_finished() && !second.is_finished());
        gone.cancel();
        for wait in [first, second] {
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .expect("woken by the cancel")
                .expect("no panic");
        }
        assert!(gone.is_cancelled());
        // Once set, later waits end at once, and a second cancel changes nothing.
        gone.cancel();
        tokio::time::timeout(Duration::from_secs(5), gone.clone().cancelled_owned())
            .await
            .expect("already set");
        assert!(!Gone::new().is_cancelled(), "a new signal is its own");
    }

    #[test]
    fn a_wait_and_its_signal_stay_small() {
        assert!(size_of::<Wait>() <= 24, "{}", size_of::<Wait>());
        assert!(size_of::<Signal>() <= 40, "{}", size_of::<Signal>());
    }
}
