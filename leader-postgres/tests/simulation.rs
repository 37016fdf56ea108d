//! The deterministic simulation of leader-postgres's protocol against a model of
//! PostgreSQL (no server needed). `SIM_SEED=N` replays one seed, `SIM_TRACE=1` prints its
//! schedule, `SIM_SEEDS` sets how many seeds run (default 2,000). See SIMULATION.md.

mod sim;

#[test]
fn simulated_schedules_keep_every_safety_property() {
    leader_testkit::sim::run_seeds("leader-postgres", sim::PostgresModel::new);
}
