//! Test support, behind the `testing` feature: [`MemoryDriver`] and the [conformance
//! suite](conformance) that every driver passes. (The TCP fault proxy for real stores and
//! the deterministic simulation are in `leader-testkit`, a crate that is not published.)
//!
//! Users can unit-test their leader-only code on [`MemoryDriver`] with
//! `tokio::time::pause()`, no server needed. Driver authors run the whole suite with one
//! macro call:
//!
//! ```
//! use std::time::Duration;
//! use leader_core::testing::{MemoryHarness, conformance_tests};
//!
//! async fn harness() -> MemoryHarness {
//!     MemoryHarness::new(Duration::from_secs(1))
//! }
//!
//! conformance_tests!(harness; #[tokio::test(start_paused = true)]);
//! # fn main() {}
//! ```

pub mod conformance;
mod memory;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::conformance_tests;
pub use memory::{MemoryDriver, MemoryStore};

use crate::Driver;

/// Makes the jitter of leader-core's retry backoff, on this thread, come from a generator
/// seeded with `seed` (or from the OS again, with `None`): for simulations that replay a
/// schedule exactly (leader-testkit's `sim`). With a seed, also keeps the suspensions
/// [`simulate_suspension`] simulates on this thread from waking holders on other threads.
pub fn seed_jitter(seed: Option<u64>) {
    crate::backoff::seed_jitter(seed);
    if seed.is_some() {
        // A seeded simulation runs on this thread: its simulated suspensions stay on it.
        crate::clock::isolate_suspensions();
    }
}

/// Makes leader-core, on this thread, see the machine as suspended for `duration` just now
/// (the growth of `CLOCK_BOOTTIME − CLOCK_MONOTONIC` it reads), and wakes every term's
/// holder as a real resume does: for deterministic tests of suspension on Tokio's paused
/// clock, where the monotonic clock stands still meanwhile (as it does in a real
/// suspension). Affects this thread only: use a current-thread runtime.
pub fn simulate_suspension(duration: std::time::Duration) {
    crate::clock::simulate_suspension(duration);
}

/// What the conformance suite needs from a store: fresh drivers on one shared store, and a
/// way to partition one of them from it.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new driver, with a connection of its own, on the harness's store.
    async fn driver(&self) -> Arc<dyn Driver>;

    /// A new driver on the same store, with a switch that partitions it from the store.
    async fn faulty_driver(&self) -> (Arc<dyn Driver>, Box<dyn Fault>);

    /// The TTL the suite's elections use: short, but long enough for this store.
    fn ttl(&self) -> Duration;
}

/// A partition between one driver and its store.
#[async_trait]
pub trait Fault: Send + Sync {
    /// Nothing flows between the driver and the store from now on.
    async fn partition(&self);
    /// Traffic flows again.
    async fn heal(&self);
}

/// A [`Harness`] over one [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryHarness {
    store: MemoryStore,
    ttl: Duration,
}

impl MemoryHarness {
    /// A harness on a new store, whose elections use `ttl`.
    pub fn new(ttl: Duration) -> Self {
        MemoryHarness {
            store: MemoryStore::new(),
            ttl,
        }
    }

    /// The store behind the harness.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }
}

struct MemoryFault(MemoryDriver);

#[async_trait]
impl Fault for MemoryFault {
    async fn partition(&self) {
        self.0.set_connected(false);
    }

    async fn heal(&self) {
        self.0.set_connected(true);
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn driver(&self) -> Arc<dyn Driver> {
        Arc::new(self.store.driver())
    }

    async fn faulty_driver(&self) -> (Arc<dyn Driver>, Box<dyn Fault>) {
        let driver = self.store.driver();
        (Arc::new(driver.clone()), Box::new(MemoryFault(driver)))
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}
