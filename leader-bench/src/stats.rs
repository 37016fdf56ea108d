//! Latency histograms (microseconds) and the small number helpers the phases share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Samples that a histogram could not record (out of its range): reported with the results.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// An empty histogram of microseconds, three significant figures.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
}

/// Records `d` in microseconds (at least 1); counts it in [`dropped`] if out of range.
pub(crate) fn record(h: &mut Histogram<u64>, d: Duration) {
    if h.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))
        .is_err()
    {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Samples dropped so far by [`record`].
pub(crate) fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The value at quantile `q` of a histogram of microseconds, in milliseconds.
pub(crate) fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// A fraction in [0, 1) spread evenly over successive `i` (the golden ratio's fractional
/// part), so that kills land at every phase of the renewal interval.
pub(crate) fn spread(i: usize) -> f64 {
    (i as f64 * 0.618_033_988_749_895).fract()
}

/// The last whitespace-separated number of a line.
pub(crate) fn last_number(line: &str) -> Option<u64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so that a
/// candidate's resignation and the next one's election can be compared.
pub(crate) fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// This process's resident set size in KiB (0 if unknown).
pub(crate) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_covers_the_interval() {
        let mut seen: Vec<f64> = (0..20).map(spread).collect();
        seen.sort_by(f64::total_cmp);
        assert!(seen.windows(2).all(|w| w[1] - w[0] < 0.15));
        assert!(seen.iter().all(|f| (0.0..1.0).contains(f)));
    }

    #[test]
    fn last_number_reads_the_line_end() {
        assert_eq!(last_number("elected 7 123456"), Some(123_456));
        assert_eq!(last_number("campaigning"), None);
    }

    #[test]
    fn quantiles_are_in_milliseconds() {
        let mut h = histogram();
        record(&mut h, Duration::from_micros(1500));
        assert!((quantile_ms(&h, 0.5) - 1.5).abs() < 0.01);
    }
}
