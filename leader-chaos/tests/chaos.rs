//! The chaos suite's short mode: every fault kind about once on each backend.
//! `CHAOS_ROUNDS` sets the number of faults (`ci/soak` runs hundreds). And the proof that
//! the checker bites: candidates whose deadlines ignore their lease are caught.
//!
//! Each run's timeline is written to `target/chaos/<name>-timeline.svg` (`CHAOS_SVG_DIR`
//! to write elsewhere).

use std::path::{Path, PathBuf};
use std::time::Duration;

use leader_chaos::{Config, Fault, Report, StoreKind, rounds_from_env, run, timeline};

/// Writes the run's timeline and prints where.
fn picture(report: &Report, name: &str) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target folder")
        .join("chaos");
    let path = timeline::dir_from_env(target).join(format!("{name}-timeline.svg"));
    timeline::write_svg(report, &path).expect("the timeline is written");
    println!("timeline: {}", path.display());
    path
}

async fn chaos(backend: StoreKind) {
    let config = Config {
        backend,
        rounds: rounds_from_env(13),
        ttl: Duration::from_secs(1),
        candidate: env!("CARGO_BIN_EXE_chaos-candidate").into(),
        observer: env!("CARGO_BIN_EXE_chaos-observer").into(),
        faults: None,
        unsafe_candidates: false,
    };
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    picture(&report, backend.name());
    assert!(report.passed(), "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_etcd() {
    chaos(StoreKind::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis() {
    chaos(StoreKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres() {
    chaos(StoreKind::Postgres).await;
}

/// Candidates that claim leases ten times longer than the store's keep believing they lead
/// through a partition while another is elected: the exact checker must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_candidates_whose_deadlines_ignore_the_lease() {
    let config = Config {
        backend: StoreKind::Redis,
        rounds: 2,
        ttl: Duration::from_secs(1),
        candidate: env!("CARGO_BIN_EXE_chaos-candidate").into(),
        observer: env!("CARGO_BIN_EXE_chaos-observer").into(),
        faults: Some(vec![Fault::Partition]),
        unsafe_candidates: true,
    };
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    picture(&report, "redis-unsafe");
    assert!(
        !report.passed(),
        "the unsafe candidates passed:\n{}",
        report.table()
    );
    assert!(
        !report.check.overlaps.is_empty(),
        "the exact check found no overlap:\n{}",
        report.table()
    );
}
