//! The driver's own protocol code in the deterministic simulation (leader-testkit's
//! harness), against a model of Redis (`tests/sim/`): no server needed. `SIM_SEEDS`
//! seeds (default 2,000) spread over the cores, or the one seed `SIM_SEED` (`SIM_TRACE=1`
//! prints its schedule). See SIMULATION.md.

mod sim;

#[test]
fn simulated_schedules_keep_every_safety_property() {
    leader_testkit::sim::run_seeds("leader-redis", sim::RedisModel::new);
}
