//! The leader-core conformance suite against a real PostgreSQL that each test starts.

mod common;

use common::harness;
use leader_core::testing::conformance_tests;

conformance_tests!(harness; #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
