//! Store clock steps: PostgreSQL runs under libfaketime, redis-server under this crate's
//! `clockshift.c` preload library (its jemalloc hangs under Debian's libfaketime 0.9.10:
//! "unexpected recursive calls to clock_gettime()"), both started by `chaos-store`; the
//! orchestrator steps the store's wall clock forward by TTL/2 (then partitions the leader)
//! and back by TTL/2 (then kills the leader). Both expire leases by wall clock
//! (PostgreSQL's `now()`, Redis's key expiry), so a forward step can let the next leader in
//! while the old one still believes it leads: the documented limit ("the safety margin
//! covers clock-rate drift, not a store whose clock jumps"). The run measures what happens;
//! it fails only if something other than a forward clock step breaks a property. etcd's
//! leases run on its monotonic clock and are not stepped.
//!
//! The runs' reports go to `target/chaos/clock-<store>.json` (`CHAOS_RESULTS_DIR`).

use std::path::{Path, PathBuf};

use leader_chaos::{Config, Fault, StoreKind, rounds_from_env, run, timeline};

fn target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target folder")
        .join("chaos")
}

async fn clock_steps(backend: StoreKind) {
    let name = format!("clock-{}", backend.name());
    let mut config = Config::new(
        backend,
        rounds_from_env(2).max(2) / 2 * 2,
        env!("CARGO_BIN_EXE_chaos-candidate"),
        env!("CARGO_BIN_EXE_chaos-observer"),
    );
    config.faults = Some(Fault::clock_steps());
    config.clock_store = Some(env!("CARGO_BIN_EXE_chaos-store").into());
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    let svg = timeline::dir_from_env(target()).join(format!("{name}-timeline.svg"));
    timeline::write_svg(&report, &svg).expect("the timeline is written");
    let dir = std::env::var_os("CHAOS_RESULTS_DIR").map_or_else(target, PathBuf::from);
    std::fs::create_dir_all(&dir).expect("the results folder");
    let json = serde_json::to_string_pretty(&report.json()).expect("JSON");
    std::fs::write(dir.join(format!("{name}.json")), json).expect("the report is written");

    // Every overlap must have begun in a round whose store clock stepped forward.
    if let Err(problem) = report.passed_but_overlaps_in(&[Fault::ClockForwardPartition]) {
        panic!("{problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_on_postgres() {
    clock_steps(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_on_redis() {
    clock_steps(StoreKind::Redis).await;
}
