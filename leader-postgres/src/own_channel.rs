//! The driver's own channel (`leader_d_<random>`): PostgreSQL wakes one waiter of this
//! driver by its candidate id (`w<id>`: its turn may have come), tells one that a
//! resignation granted it the term (`G<token>:<stamp>:<id>`), or tells a leader of this
//! driver that someone else ended its term (`g<token>:<id>`, sent by the table's trigger).
//! The LISTEN connection ([`crate::listener`]) hands this channel's notifications here.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How many recent "term gone" notices are kept for leaders that register after them.
const RECENT_GONE: usize = 256;

/// How many of its latest statements a waiter remembers the send time of. The place a
/// grant quotes was set, most often, by one of the last statements sent for it (they run
/// in order on one connection; one sent before a reconnection may still land later, and
/// failed keeper rounds count too). A grant quoting an older one is not trusted: the
/// waiter attempts instead, as if it were only woken, and its attempt takes the row that
/// holds its own live term anew (see `Table::acquire`).
const STAMPS: usize = 4;

/// The driver's channel and who waits on it.
pub(crate) struct Shared {
    /// The driver's own channel.
    pub(crate) channel: String,
    routes: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    /// This driver's waiting candidates, by candidate id.
    /// (Each registration has a sequence number: everyone is woken in the order they
    /// registered, whatever their ids, so that a seeded simulation replays exactly.)
    waiters: BTreeMap<String, (u64, Arc<Waiter>)>,
    /// This driver's leaders, by candidate id: the term they hold and its watch.
    terms: BTreeMap<Arc<str>, (u64, u64, Arc<TermWatch>)>,
    /// The next registration's sequence number.
    next: u64,
    /// The last "term gone" notices, for a leader that registers after its notice came.
    recent_gone: VecDeque<(String, u64)>,
    /// The keeper task (refreshing waiters' places) runs.
    keeper: bool,
}

/// A waiting candidate of this driver.
pub(crate) struct Waiter {
    pub(crate) election: String,
    pub(crate) ttl: Duration,
    /// Woken when its turn may have come (a permit is kept if it is not waiting yet).
    pub(crate) wake: Notify,
    /// It knows it is first in line (or nominated) and keeps a timer at the expiry of
    /// whatever holds the election: the keeper need not wake it to say so.
    pub(crate) armed: AtomicBool,
    /// The statements sent for its place since it registered, newest last: their stamps
    /// and send times. Only this registration's: a grant quoting a stamp from before it
    /// (an earlier campaign with the same id, another process) is not recognised.
    stamps: Mutex<VecDeque<(u64, Instant)>>,
    /// A grant heard for it and not yet taken: (token, stamp).
    granted: Mutex<Option<(u64, u64)>>,
}

impl Waiter {
    /// Records that a statement stamped `stamp`, sent at `sent_at`, sets this place.
    pub(crate) fn stamped(&self, stamp: u64, sent_at: Instant) {
        let mut stamps = lock(&self.stamps);
        if stamps.len() >= STAMPS {
            stamps.pop_front();
        }
        stamps.push_back((stamp, sent_at));
    }

    /// Takes the grant heard for this waiter, if any: its token, and when the statement
    /// that started its lease was sent, if that statement is one this registration
    /// remembers (`None` then: the grant cannot be bounded here).
    pub(crate) fn take_grant(&self) -> Option<(u64, Option<Instant>)> {
        let (token, stamp) = lock(&self.granted).take()?;
        let sent_at = lock(&self.stamps)
            .iter()
            .find(|(s, _)| *s == stamp)
            .map(|(_, at)| *at);
        Some((token, sent_at))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A leader of this driver, told when its term is ended by someone else.
#[derive(Default)]
pub(crate) struct TermWatch {
    pub(crate) wake: Wakeup,
    /// The trigger said the term is gone; otherwise a wake means "look at the row".
    pub(crate) gone: AtomicBool,
}

/// A waiter's registration; removed when dropped.
pub(crate) struct WaiterGuard {
    pub(crate) waiter: Arc<Waiter>,
    id: String,
    shared: Arc<Shared>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut routes = self.shared.lock();
        if routes
            .waiters
            .get(&self.id)
            .is_some_and(|(_, held)| Arc::ptr_eq(held, &self.waiter))
        {
            routes.waiters.remove(&self.id);
        }
    }
}

/// A leader's registration; removed when dropped.
pub(crate) struct TermGuard {
    pub(crate) watch: Arc<TermWatch>,
    /// The key of its route: one copy.
    id: Arc<str>,
    shared: Arc<Shared>,
}

impl TermGuard {
    /// The leader's candidate id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for TermGuard {
    fn drop(&mut self) {
        let mut routes = self.shared.lock();
        if routes
            .terms
            .get(&*self.id)
            .is_some_and(|(_, _, held)| Arc::ptr_eq(held, &self.watch))
        {
            routes.terms.remove(&*self.id);
        }
    }
}

impl Shared {
    pub(crate) fn new(channel: String) -> Self {
        Shared {
            channel,
            routes: Mutex::new(Routes::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Routes> {
        lock(&self.routes)
    }

    /// A notification on the driver's channel.
    pub(crate) fn notify(&self, payload: &str) {
        let mut routes = self.lock();
        if let Some(id) = payload.strip_prefix('w') {
            if let Some((_, waiter)) = routes.waiters.get(id) {
                waiter.wake.notify_one();
            }
        } else if let Some((token, stamp, id)) = payload.strip_prefix('G').and_then(|rest| {
            let (token, rest) = rest.split_once(':')?;
            let (stamp, id) = rest.split_once(':')?;
            Some((token.parse::<u64>().ok()?, stamp.parse::<u64>().ok()?, id))
        }) {
            if let Some((_, waiter)) = routes.waiters.get(id) {
                *lock(&waiter.granted) = Some((token, stamp));
                waiter.wake.notify_one();
            }
        } else if let Some((token, id)) = payload
            .strip_prefix('g')
            .and_then(|rest| rest.split_once(':'))
            && let Ok(token) = token.parse::<u64>()
        {
            if let Some((_, held, watch)) = routes.terms.get(id)
                && *held == token
            {
                watch.gone.store(true, Ordering::SeqCst);
                watch.wake.notify_one();
            }
            if routes.recent_gone.len() >= RECENT_GONE {
                routes.recent_gone.pop_front();
            }
            routes.recent_gone.push_back((id.to_owned(), token));
        }
    }

    /// Wakes every waiter and leader, in the order they registered: notifications may
    /// have been missed.
    pub(crate) fn notify_all(&self) {
        let routes = self.lock();
        let mut wakes: Vec<(u64, Result<&Notify, &Wakeup>)> = routes
            .waiters
            .values()
            .map(|(seq, waiter)| (*seq, Ok(&waiter.wake)))
            .chain(
                routes
                    .terms
                    .values()
                    .map(|(seq, _, watch)| (*seq, Err(&watch.wake))),
            )
            .collect();
        wakes.sort_by_key(|(seq, _)| *seq);
        for (_, wake) in wakes {
            match wake {
                Ok(waiter) => waiter.notify_one(),
                Err(leader) => leader.notify_one(),
            }
        }
    }

    /// The waiters of this driver, for the keeper; marks the keeper as running, or as
    /// stopped when there are none.
    pub(crate) fn waiters_for_keeper(&self) -> Vec<(String, Arc<Waiter>)> {
        let mut routes = self.lock();
        routes.keeper = !routes.waiters.is_empty();
        let mut waiters: Vec<_> = routes
            .waiters
            .iter()
            .map(|(id, (seq, waiter))| (*seq, id.clone(), Arc::clone(waiter)))
            .collect();
        waiters.sort_by_key(|(seq, _, _)| *seq);
        waiters
            .into_iter()
            .map(|(_, id, waiter)| (id, waiter))
            .collect()
    }

    /// The waiter `id`, if it still waits.
    pub(crate) fn waiter(&self, id: &str) -> Option<Arc<Waiter>> {
        self.lock()
            .waiters
            .get(id)
            .map(|(_, waiter)| Arc::clone(waiter))
    }

    /// Registers a waiting candidate `id` of this driver. Returns whether the keeper task
    /// must be started (it was not running).
    pub(crate) fn wait(
        self: &Arc<Self>,
        id: &str,
        election: &str,
        ttl: Duration,
    ) -> (WaiterGuard, bool) {
        let waiter = Arc::new(Waiter {
            election: election.to_owned(),
            ttl,
            wake: Notify::new(),
            armed: AtomicBool::new(false),
            stamps: Mutex::new(VecDeque::with_capacity(STAMPS)),
            granted: Mutex::new(None),
        });
        let mut routes = self.lock();
        let seq = routes.next;
        routes.next += 1;
        routes
            .waiters
            .insert(id.to_owned(), (seq, Arc::clone(&waiter)));
        let start_keeper = !routes.keeper;
        routes.keeper = true;
        drop(routes);
        (
            WaiterGuard {
                waiter,
                id: id.to_owned(),
                shared: Arc::clone(self),
            },
            start_keeper,
        )
    }

    /// Registers the term `token` of leader `id` of this driver; its watch is already
    /// marked gone if the trigger's notice came before.
    pub(crate) fn hold(self: &Arc<Self>, id: &str, token: u64) -> TermGuard {
        let watch = Arc::new(TermWatch::default());
        let mut routes = self.lock();
        if routes
            .recent_gone
            .iter()
            .any(|(gone, held)| gone == id && *held == token)
        {
            watch.gone.store(true, Ordering::SeqCst);
            watch.wake.notify_one();
        }
        let seq = routes.next;
        routes.next += 1;
        let id: Arc<str> = id.into();
        routes
            .terms
            .insert(Arc::clone(&id), (seq, token, Arc::clone(&watch)));
        drop(routes);
        TermGuard {
            watch,
            id,
            shared: Arc::clone(self),
        }
    }
}

/// A wake-up for one waiting task, kept if it comes before the wait (as a `Notify`'s
/// permit): 16 bytes of waker and a flag, and a wait of one reference, where a `Notify`'s
/// waiter is 64 bytes. Every held term waits on one for as long as it lasts.
#[derive(Default)]
pub(crate) struct Wakeup {
    waker: AtomicWaker,
    pending: AtomicBool,
}

impl Wakeup {
    /// Wakes the waiting task, or the next wait if none waits now.
    pub(crate) fn notify_one(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Resolves at the first wake-up not yet taken (one that came before counts). For one
    /// task at a time: a second waiter takes the first one's place.
    pub(crate) fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before the flag is read again: a wake-up after the read wakes
            // this task.
            if self.pending.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.pending.swap(false, Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wakeup_before_the_wait_is_kept_once_and_one_during_it_wakes_it() {
        let wakeup = Arc::new(Wakeup::default());
        wakeup.notify_one();
        wakeup.notify_one();
        tokio::time::timeout(Duration::ZERO, wakeup.notified())
            .await
            .expect("the wake-up that came first");
        // Two wake-ups before the wait are one.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), wakeup.notified())
                .await
                .is_err()
        );
        let waiting = tokio::spawn({
            let wakeup = Arc::clone(&wakeup);
            async move { wakeup.notified().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        wakeup.notify_one();
        // Paused clock: the millisecond passes only once the woken task could not run.
        tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("woken")
            .expect("the waiting task");
    }

    #[test]
    fn a_held_term_shares_its_id_with_its_route_and_leaves_it_when_dropped() {
        let shared = Arc::new(Shared::new("leader_d_test".into()));
        let guard = shared.hold("me", 7);
        assert_eq!(guard.id(), "me");
        shared.notify("g7:me");
        assert!(guard.watch.gone.load(Ordering::SeqCst));
        drop(guard);
        assert!(shared.lock().terms.is_empty());
        // The notice is kept for a registration that comes after it.
        let late = shared.hold("me", 7);
        assert!(late.watch.gone.load(Ordering::SeqCst));
    }
}
