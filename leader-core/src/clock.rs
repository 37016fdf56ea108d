//! Time the machine spent suspended, which the monotonic clock does not count.
//!
//! Deadlines live on Tokio's clock, which on Linux is `CLOCK_MONOTONIC`: it stops while the
//! machine sleeps (suspend to RAM, a laptop lid), but the store's lease runs on. Linux's
//! `CLOCK_BOOTTIME` counts that time, so the growth of `CLOCK_BOOTTIME − CLOCK_MONOTONIC`
//! between a renewal's send time and now is the suspension a deadline check must subtract.
//! Elsewhere the offset is always zero (and suspend is not detected).

use std::sync::{Mutex, OnceLock};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Suspensions shorter than this are treated as none: the two clocks are read by two
/// system calls, and a preemption between them looks like a short suspension.
const NOISE: Duration = Duration::from_millis(1);

/// A reading of `CLOCK_BOOTTIME − CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SuspendOffset(Duration);

impl SuspendOffset {
    /// The offset now.
    pub(crate) fn now() -> Self {
        SuspendOffset(read_offset() + simulated())
    }

    /// How long the machine was suspended since `self` was read, or zero if too little
    /// to tell apart from scheduling noise.
    pub(crate) fn suspended_since(self) -> Duration {
        self.suspended_until(SuspendOffset::now())
    }

    fn suspended_until(self, later: SuspendOffset) -> Duration {
        let grown = later.0.saturating_sub(self.0);
        if grown < NOISE { Duration::ZERO } else { grown }
    }
}

/// An instant on Tokio's clock, with how much the machine had been suspended by then: the
/// time elapsed since it counts the time the machine slept, which Tokio's clock (on Linux
/// `CLOCK_MONOTONIC`) does not. For drivers that must know how much time really passed
/// between two events, as the store's leases count it.
#[derive(Debug, Clone, Copy)]
pub struct BootInstant {
    at: tokio::time::Instant,
    offset: SuspendOffset,
}

impl BootInstant {
    /// Now.
    pub fn now() -> Self {
        BootInstant {
            at: tokio::time::Instant::now(),
            offset: SuspendOffset::now(),
        }
    }

    /// The reading's instant on Tokio's clock.
    pub fn instant(&self) -> tokio::time::Instant {
        self.at
    }

    /// The time since this reading, counting the time the machine was suspended meanwhile.
    pub fn elapsed(&self) -> Duration {
        self.at.elapsed() + self.offset.suspended_since()
    }
}

/// Told of each suspension of the machine, within milliseconds of the process running again
/// after it, when timers on the monotonic clock (Tokio's) would still wait out the time the
/// machine slept. Two ways to listen: a [`notified`](Self::notified) future, or a waker kept
/// in a list ([`listen`](Self::listen)): 16 bytes in one list, where a `Notified` is 64 in
/// the listener's own future; every held term's holder rests listening, in a task whose
/// size counts once per election.
pub(crate) struct Suspensions {
    notify: Notify,
    wakers: Mutex<Wakers>,
}

/// Listed wakers, by slot; freed slots are used again.
#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Suspensions {
    fn new() -> Self {
        Suspensions {
            notify: Notify::new(),
            wakers: Mutex::default(),
        }
    }

    /// Resolves at the next suspension noticed after it is created (once enabled or first
    /// polled, as Tokio's `Notify::notify_waiters`).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// Lists `waker` (in `slot`, which it sets on the first call), to be woken at every
    /// suspension noticed from now on until [`forget`](Self::forget): listen before reading
    /// the clock, and a suspension noticed after the read wakes the listener.
    pub(crate) fn listen(&self, slot: &mut Option<usize>, waker: &Waker) {
        let mut wakers = self.lock();
        if let Some(Some(listed)) = slot.and_then(|at| wakers.slots.get_mut(at)) {
            listed.clone_from(waker);
            return;
        }
        let at = match wakers.free.pop() {
            Some(at) => at,
            None => {
                wakers.slots.push(None);
                wakers.slots.len() - 1
            }
        };
        wakers.slots[at] = Some(waker.clone());
        *slot = Some(at);
    }

    /// Takes the waker listed in `slot` off the list.
    pub(crate) fn forget(&self, slot: Option<usize>) {
        let Some(at) = slot else { return };
        let mut wakers = self.lock();
        if let Some(listed) = wakers.slots.get_mut(at)
            && listed.take().is_some()
        {
            wakers.free.push(at);
        }
        if wakers.free.len() == wakers.slots.len() {
            // Nobody listens: the room goes too.
            *wakers = Wakers::default();
        }
    }

    /// Tells every listener.
    fn notify(&self) {
        self.notify.notify_waiters();
        // Woken outside the lock: a waker may run code of its own.
        let listed: Vec<Waker> = self.lock().slots.iter().flatten().cloned().collect();
        for waker in listed {
            waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Wakers> {
        self.wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The suspensions this thread is told of.
///
/// On Linux one thread per process sleeps on `CLOCK_BOOTTIME` (a second at a time, so
/// nearly idle): a sleep on that clock ends as soon as the machine resumes past it, and the
/// thread then sees the offset grown. Elsewhere nothing is ever notified.
pub(crate) fn suspensions() -> &'static Suspensions {
    #[cfg(any(test, feature = "testing"))]
    if let Some(local) = LOCAL.with(std::cell::Cell::get) {
        return local;
    }
    notifier()
}

fn notifier() -> &'static Suspensions {
    static SUSPENSIONS: OnceLock<Suspensions> = OnceLock::new();
    SUSPENSIONS.get_or_init(|| {
        #[cfg(target_os = "linux")]
        {
            // Without the thread, a suspension is still seen at the next timer or check.
            let _ = std::thread::Builder::new()
                .name("leader-suspend-watch".into())
                .spawn(watch_suspensions);
        }
        Suspensions::new()
    })
}

#[cfg(any(test, feature = "testing"))]
thread_local! {
    /// The suspensions simulated on this thread (by leader-testkit's simulation), added to the offset
    /// that this thread reads.
    static SIMULATED: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

#[cfg(any(test, feature = "testing"))]
thread_local! {
    /// Suspension notices of this thread's own, once a seeded simulation ran on it: a
    /// suspension simulated in one seed then wakes only the holders of that seed's
    /// (current-thread) runtime, not those of a seed running on another thread, which
    /// would change that seed's schedule and break its exact replay.
    static LOCAL: std::cell::Cell<Option<&'static Suspensions>> =
        const { std::cell::Cell::new(None) };
}

/// Gives this thread suspension notices of its own (see `LOCAL`), from now on. Kept
/// afterwards (one small leak per test thread): holders of an earlier seed may still
/// wait on it.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn isolate_suspensions() {
    LOCAL.with(|local| {
        if local.get().is_none() {
            local.set(Some(Box::leak(Box::new(Suspensions::new()))));
        }
    });
}

/// Makes this thread read the offset `duration` larger, as if the machine had been
/// suspended that long just now, and tells every term's holder to look again (on this
/// thread only, once it is isolated).
#[cfg(any(test, feature = "testing"))]
pub(crate) fn simulate_suspension(duration: Duration) {
    SIMULATED.with(|simulated| simulated.set(simulated.get() + duration));
    suspensions().notify();
}

#[cfg(any(test, feature = "testing"))]
fn simulated() -> Duration {
    SIMULATED.with(std::cell::Cell::get)
}

#[cfg(not(any(test, feature = "testing")))]
fn simulated() -> Duration {
    Duration::ZERO
}

#[cfg(target_os = "linux")]
fn watch_suspensions() {
    use nix::sys::time::TimeSpec;
    use nix::time::{ClockId, ClockNanosleepFlags, clock_nanosleep};
    let period = TimeSpec::from_duration(Duration::from_secs(1));
    let mut last = SuspendOffset::now();
    loop {
        let _ = clock_nanosleep(
            ClockId::CLOCK_BOOTTIME,
            ClockNanosleepFlags::empty(),
            &period,
        );
        let now = SuspendOffset::now();
        if !last.suspended_until(now).is_zero() {
            notifier().notify();
        }
        last = now;
    }
}

#[cfg(target_os = "linux")]
fn read_offset() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    let read = |clock| clock_gettime(clock).map(Duration::from).ok();
    // Monotonic, boot, monotonic: the boot reading sits between the two others, so the
    // offset is known to within half their gap. Take the tightest of three tries.
    let mut best: Option<(Duration, Duration)> = None;
    for _ in 0..3 {
        let (Some(m1), Some(boot), Some(m2)) = (
            read(ClockId::CLOCK_MONOTONIC),
            read(ClockId::CLOCK_BOOTTIME),
            read(ClockId::CLOCK_MONOTONIC),
        ) else {
            return Duration::ZERO;
        };
        let gap = m2.saturating_sub(m1);
        let offset = boot.saturating_sub(m1 + gap / 2);
        if best.is_none_or(|(best_gap, _)| gap < best_gap) {
            best = Some((gap, offset));
        }
        if gap < Duration::from_micros(100) {
            break;
        }
    }
    best.map_or(Duration::ZERO, |(_, offset)| offset)
}

#[cfg(not(target_os = "linux"))]
fn read_offset() -> Duration {
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn listed_wakers_are_woken_at_each_suspension_until_forgotten() {
        let suspensions = Suspensions::new();
        let counts: Vec<std::sync::Arc<Count>> = (0..3)
            .map(|_| std::sync::Arc::new(Count(0.into())))
            .collect();
        let woken = |i: usize| counts[i].0.load(std::sync::atomic::Ordering::SeqCst);
        let mut slots = [None, None, None];
        for (slot, count) in slots.iter_mut().zip(&counts) {
            suspensions.listen(slot, &Waker::from(std::sync::Arc::clone(count)));
        }
        // Listening again keeps the slot.
        let first = slots[0];
        suspensions.listen(
            &mut slots[0],
            &Waker::from(std::sync::Arc::clone(&counts[0])),
        );
        assert_eq!(slots[0], first);
        suspensions.notify();
        assert_eq!((woken(0), woken(1), woken(2)), (1, 1, 1));
        // Woken wakers stay listed; a forgotten one is not woken again and its slot is
        // used again.
        suspensions.forget(slots[1].take());
        suspensions.notify();
        assert_eq!((woken(0), woken(1), woken(2)), (2, 1, 2));
        suspensions.listen(
            &mut slots[1],
            &Waker::from(std::sync::Arc::clone(&counts[1])),
        );
        assert_eq!(
            suspensions.lock().slots.len(),
            3,
            "the freed slot is used again"
        );
        for slot in &mut slots {
            suspensions.forget(slot.take());
        }
        assert!(
            suspensions.lock().slots.is_empty(),
            "nobody listens: no room kept"
        );
        suspensions.notify();
        assert_eq!((woken(0), woken(1), woken(2)), (2, 1, 2), "nobody is woken");
    }

    /// A `BootInstant`'s elapsed time counts the time the machine was suspended since,
    /// which Tokio's clock does not.
    #[tokio::test(start_paused = true)]
    async fn a_boot_instants_elapsed_time_counts_a_suspension() {
        let at = BootInstant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(at.elapsed() >= Duration::from_secs(1));
        assert!(at.elapsed() < Duration::from_secs(1) + NOISE * 10);
        isolate_suspensions();
        simulate_suspension(Duration::from_secs(2));
        // Within the jitter of reading the two clocks (nanoseconds) either way.
        let elapsed = at.elapsed();
        assert!(
            elapsed > Duration::from_secs(3) - NOISE
                && elapsed < Duration::from_secs(3) + NOISE * 10,
            "{elapsed:?}"
        );
        assert_eq!(
            at.instant() + Duration::from_secs(1),
            tokio::time::Instant::now()
        );
    }

    #[test]
    fn no_suspension_reads_as_zero() {
        let offset = SuspendOffset::now();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(offset.suspended_since(), Duration::ZERO);
    }

    #[test]
    fn a_grown_offset_is_the_suspension_and_noise_is_none() {
        let before = SuspendOffset(Duration::from_secs(7));
        let after = SuspendOffset(Duration::from_secs(9));
        assert_eq!(before.suspended_until(after), Duration::from_secs(2));
        let jitter = SuspendOffset(Duration::from_secs(7) + NOISE / 2);
        assert_eq!(before.suspended_until(jitter), Duration::ZERO);
        assert_eq!(after.suspended_until(before), Duration::ZERO);
    }
}
