//! The chaos suite's short mode: a couple of rounds of every fault kind on each backend.
//! `CHAOS_ROUNDS` sets the number of faults (`ci/soak` runs hundreds).

use std::time::Duration;

use leader_chaos::{Backend, Config, rounds_from_env, run};

async fn chaos(backend: Backend) {
    let config = Config {
        backend,
        rounds: rounds_from_env(12),
        ttl: Duration::from_secs(1),
        candidate: env!("CARGO_BIN_EXE_chaos-candidate").into(),
    };
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    assert!(report.passed(), "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_etcd() {
    chaos(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis() {
    chaos(Backend::Redis).await;
}
