//! The conformance suite on `MemoryDriver`, on Tokio's paused clock.

use std::time::Duration;

use leader_core::testing::{MemoryHarness, conformance_tests};

async fn harness() -> MemoryHarness {
    MemoryHarness::new(Duration::from_secs(2))
}

conformance_tests!(harness; #[tokio::test(start_paused = true)]);

mod multi_thread {
    //! The same suite on real time and a multi-threaded runtime.
    use super::*;

    async fn harness() -> MemoryHarness {
        MemoryHarness::new(Duration::from_secs(1))
    }

    conformance_tests!(harness; #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
}
