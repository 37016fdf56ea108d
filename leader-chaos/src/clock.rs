//! CLOCK_MONOTONIC as nanoseconds: one clock for every process of the machine, so that
//! the candidates' logs compare exactly.

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of this machine.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// A `std::time::Instant` (CLOCK_MONOTONIC on Linux) as [`monotonic_ns`] nanoseconds.
pub fn to_monotonic_ns(instant: std::time::Instant) -> u64 {
    // Read both clocks back to back; retry if something came between them.
    let mut best = (u64::MAX, 0u64);
    for _ in 0..3 {
        let before = monotonic_ns();
        let now = std::time::Instant::now();
        let after = monotonic_ns();
        let at = if instant <= now {
            before.saturating_sub(u64::try_from((now - instant).as_nanos()).unwrap_or(u64::MAX))
        } else {
            before.saturating_add(u64::try_from((instant - now).as_nanos()).unwrap_or(u64::MAX))
        };
        let spread = after.saturating_sub(before);
        if spread < best.0 {
            best = (spread, at);
        }
    }
    best.1
}
