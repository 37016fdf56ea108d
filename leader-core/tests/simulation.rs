//! The deterministic simulation of the state machine: leader-testkit's harness against its
//! toy store (`leader_testkit::sim::toy`), `SIM_SEEDS` seeds (default 2,000) spread over the
//! cores, or the one seed `SIM_SEED` (`SIM_TRACE=1` prints its schedule).
//!
//! `ci/test` runs the default; `ci/soak` runs 100,000 seeds. A failure prints the seed and
//! the command that replays it. Each driver crate runs the same harness against a model of
//! its own store (`cargo test -p leader-etcd --test simulation`, ...).

use leader_testkit::sim;

#[test]
fn simulated_schedules_keep_every_safety_property() {
    sim::run_seeds("leader-core", sim::toy::ToyModel::new);
}
