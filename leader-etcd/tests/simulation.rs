//! The driver's own protocol in the deterministic simulation, against a model of etcd:
//! `cargo test -p leader-etcd --test simulation` (no server needed). `SIM_SEEDS`,
//! `SIM_SEED=N` and `SIM_TRACE=1` as in `leader_testkit::sim::run_seeds`.

mod sim;

#[test]
fn simulated_schedules_keep_every_safety_property() {
    leader_testkit::sim::run_seeds("leader-etcd", sim::EtcdModel::new);
}
