//! Jittered exponential backoff, for `Election::run` and for drivers' retries.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `min` to `max`, each drawn uniformly from its upper half, so
/// that candidates that failed together do not retry together.
///
/// Inside a seeded simulation (`leader_testkit::sim`) the jitter comes from the seed, so
/// that a schedule replays exactly.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starting at `min`, doubling up to `max`.
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        let floor = ceiling / 2;
        let spread = ceiling.saturating_sub(floor);
        floor.saturating_add(spread.mul_f64(jitter()))
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// A uniform draw from `[0, 1)`: from the thread's seeded generator while a simulation
/// runs on this thread (so that its schedule replays exactly), else from `rand`.
fn jitter() -> f64 {
    #[cfg(feature = "testing")]
    if let Some(draw) = SEEDED.with(|rng| rng.borrow_mut().as_mut().map(|rng| rng.random())) {
        return draw;
    }
    rand::rng().random()
}

/// A random `u64` (the random part of a candidate id), seeded like [`jitter`].
pub(crate) fn random_u64() -> u64 {
    #[cfg(feature = "testing")]
    if let Some(draw) = SEEDED.with(|rng| rng.borrow_mut().as_mut().map(|rng| rng.random())) {
        return draw;
    }
    rand::random()
}

#[cfg(feature = "testing")]
thread_local! {
    static SEEDED: std::cell::RefCell<Option<rand::rngs::StdRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread's backoff jitter come from a generator seeded with `seed` (or from
/// `rand` again, with `None`).
#[cfg(feature = "testing")]
pub(crate) fn seed_jitter(seed: Option<u64>) {
    use rand::SeedableRng;
    SEEDED.with(|rng| *rng.borrow_mut() = seed.map(rand::rngs::StdRng::seed_from_u64));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_max_with_jitter_in_the_upper_half() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut backoff = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(max);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= min);
    }

    #[test]
    fn a_huge_maximum_does_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..200 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() >= Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_candidates_apart() {
        let mut delays = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
            delays.insert(backoff.next_delay());
        }
        assert!(
            delays.len() > 10,
            "20 candidates drew only {} delays",
            delays.len()
        );
    }
}
