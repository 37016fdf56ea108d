//! The places in line of a driver's waiting candidates, refreshed per election in one call
//! every two thirds of a TTL (however many of its candidates wait there), and the news that call
//! brings each of them: its place is gone (campaign again), or it heads the line and the
//! lease it waits behind expires at a given instant (only the head keeps that timer, so
//! waiters do not poll).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What a waiting candidate learns from its driver's refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum News {
    /// Nothing yet.
    None,
    /// Its place is no longer in line: it should campaign again.
    Missing,
    /// It heads the line; the lease it waits behind ends at this instant (if it has one).
    Head(Option<Instant>),
    /// It does not head the line.
    Behind,
}

struct Waiter {
    /// Order of arrival on this driver: the refresh and the news go in this order, not in
    /// the owners' (random) order, so that a seeded simulation replays exactly.
    seq: u64,
    place: Vec<u8>,
    ttl: Duration,
    news: watch::Sender<News>,
}

/// One election's waiting candidates on this driver.
pub(crate) struct Line {
    waiters: Mutex<BTreeMap<String, Waiter>>,
    /// The next waiter's `seq`.
    next: std::sync::atomic::AtomicU64,
}

impl Line {
    fn waiters(&self) -> MutexGuard<'_, BTreeMap<String, Waiter>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The places to refresh, their owners, and the shortest TTL among them; `None` when
    /// nobody waits.
    pub(crate) fn snapshot(&self) -> Option<(Vec<Vec<u8>>, Vec<String>, Duration)> {
        let waiters = self.waiters();
        let ttl = waiters.values().map(|w| w.ttl).min()?;
        let mut ordered: Vec<(&String, &Waiter)> = waiters.iter().collect();
        ordered.sort_by_key(|(_, w)| w.seq);
        let (owners, places) = ordered
            .into_iter()
            .map(|(owner, w)| (owner.clone(), w.place.clone()))
            .unzip();
        Some((places, owners, ttl))
    }

    /// Tells `owner` its news.
    pub(crate) fn tell(&self, owner: &str, news: News) {
        if let Some(waiter) = self.waiters().get(owner) {
            waiter.news.send_if_modified(|old| {
                let changed = *old != news || news == News::Missing;
                *old = news;
                changed
            });
        }
    }

    /// Tells every waiter but `head` that it is behind.
    pub(crate) fn behind_except(&self, head: Option<&str>) {
        let waiters = self.waiters();
        let mut ordered: Vec<(&String, &Waiter)> = waiters.iter().collect();
        ordered.sort_by_key(|(_, w)| w.seq);
        for (owner, waiter) in ordered {
            if Some(owner.as_str()) != head {
                waiter.news.send_if_modified(|old| {
                    // A place reported missing stays so until its waiter stands in line
                    // again: overwritten by the same refresh's "behind", it was never
                    // read, and the waiter waited for a wakeup no one would send.
                    if *old == News::Missing {
                        return false;
                    }
                    let changed = *old != News::Behind;
                    *old = News::Behind;
                    changed
                });
            }
        }
    }
}

/// Every election this driver has candidates waiting in, by its line key.
#[derive(Default)]
pub(crate) struct Lines {
    lines: Mutex<BTreeMap<String, Arc<Line>>>,
}

/// A waiting candidate's registration; dropping it leaves the driver's refresh.
pub(crate) struct Waiting {
    line: Arc<Line>,
    owner: String,
    pub(crate) news: watch::Receiver<News>,
}

impl Waiting {
    /// This waiter stood in line again: a `Missing` it read is over (without a change
    /// notification: the waiter reads the news afresh).
    pub(crate) fn rejoined(&self) {
        if let Some(waiter) = self.line.waiters().get(&self.owner) {
            waiter.news.send_if_modified(|old| {
                if *old == News::Missing {
                    *old = News::None;
                }
                false
            });
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.line.waiters().remove(&self.owner);
    }
}

impl Lines {
    fn lines(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Line>>> {
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `owner` (its place `place`, TTL `ttl`) as waiting in the line `key`.
    /// Returns the registration and, if this line had no refresher on this driver, the
    /// line for a new refresher to serve.
    pub(crate) fn join(
        &self,
        key: &str,
        owner: &str,
        place: Vec<u8>,
        ttl: Duration,
    ) -> (Waiting, Option<Arc<Line>>) {
        let mut lines = self.lines();
        let (line, new) = match lines.get(key) {
            Some(line) => (Arc::clone(line), None),
            None => {
                let line = Arc::new(Line {
                    waiters: Mutex::new(BTreeMap::new()),
                    next: std::sync::atomic::AtomicU64::new(0),
                });
                lines.insert(key.to_owned(), Arc::clone(&line));
                (Arc::clone(&line), Some(line))
            }
        };
        let (news, rx) = watch::channel(News::None);
        let seq = line.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        line.waiters().insert(
            owner.to_owned(),
            Waiter {
                seq,
                place,
                ttl,
                news,
            },
        );
        (
            Waiting {
                line,
                owner: owner.to_owned(),
                news: rx,
            },
            new,
        )
    }

    /// Whether `owner` waits in the line `key` on this driver now.
    pub(crate) fn waits(&self, key: &str, owner: &str) -> bool {
        self.lines()
            .get(key)
            .is_some_and(|line| line.waiters().contains_key(owner))
    }

    /// The refresher of `key` ends if nobody waits there any more: true if it must end.
    pub(crate) fn leave_if_empty(&self, key: &str, line: &Arc<Line>) -> bool {
        let mut lines = self.lines();
        if line.waiters().is_empty() {
            if lines.get(key).is_some_and(|l| Arc::ptr_eq(l, line)) {
                lines.remove(key);
            }
            true
        } else {
            false
        }
    }
}
