//! The chaos suite's short mode: every fault kind once on each backend (`CHAOS_ROUNDS` sets
//! the number of faults; `ci/soak` runs hundreds), each candidate process holding 20
//! elections. And the proof that the checker bites: candidates whose deadlines ignore their
//! lease, and candidates that count their lease from the answer's arrival, are caught.
//!
//! Each run's timeline is written to `target/chaos/<name>-timeline.svg` (`CHAOS_SVG_DIR`
//! to write elsewhere), and its report as JSON to `target/chaos/<name>.json`
//! (`CHAOS_RESULTS_DIR` to write elsewhere: `ci/soak` gathers them).

use std::path::{Path, PathBuf};

use leader_chaos::{
    Config, Fault, RedisTopology, Report, StoreKind, UnsafeMode, rounds_from_env, run, timeline,
};

fn target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target folder")
        .join("chaos")
}

/// Writes the run's timeline and JSON and prints where.
fn keep(report: &Report, name: &str) {
    let path = timeline::dir_from_env(target()).join(format!("{name}-timeline.svg"));
    timeline::write_svg(report, &path).expect("the timeline is written");
    println!("timeline: {}", path.display());
    let dir = std::env::var_os("CHAOS_RESULTS_DIR").map_or_else(target, PathBuf::from);
    std::fs::create_dir_all(&dir).expect("the results folder");
    let path = dir.join(format!("{name}.json"));
    let json = serde_json::to_string_pretty(&report.json()).expect("JSON");
    std::fs::write(&path, json).expect("the report is written");
    println!("report: {}", path.display());
}

fn config(backend: StoreKind, rounds: usize) -> Config {
    Config::new(
        backend,
        rounds,
        env!("CARGO_BIN_EXE_chaos-candidate"),
        env!("CARGO_BIN_EXE_chaos-observer"),
    )
}

async fn chaos(backend: StoreKind) {
    let config = config(backend, rounds_from_env(Fault::all(backend).len()));
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    keep(&report, backend.name());
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

/// Redis under Sentinel: the master is killed, the sentinels promote its replica, the old
/// master comes back as a replica; the candidates connect by the Sentinel URL with
/// `replicas=1`, so every grant and renewal is on the replica before it counts, and no term
/// overlaps another across the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_sentinel_failover() {
    let mut config = config(StoreKind::Redis, rounds_from_env(2).min(4));
    config.faults = Some(vec![Fault::MasterFailover]);
    config.redis_topology = Some(RedisTopology::Sentinel);
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    keep(&report, "redis-sentinel");
    assert!(report.passed(), "{}", report.table());
}

/// A Redis Cluster (three masters, a replica each): the master serving the driven election
/// is killed, its replica promoted, the old master back as a replica. The driver cannot
/// WAIT on a Cluster, so a failover may lose the last renewal and let the next leader in
/// while the old one still believes (the documented limit, as for a store clock stepped
/// forward): the run measures what happens and fails only if something else breaks a
/// property (an overlap outside a failover, a token going back, a liveness failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_cluster_failover() {
    let mut config = config(StoreKind::Redis, rounds_from_env(2).min(4));
    config.faults = Some(vec![Fault::MasterFailover]);
    config.redis_topology = Some(RedisTopology::Cluster);
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    keep(&report, "redis-cluster");
    if let Err(problem) = report.passed_but_overlaps_in(&[Fault::MasterFailover]) {
        panic!("{problem}");
    }
    assert!(report.liveness_failures.is_empty(), "{}", report.table());
}

/// The sharpest form of the slow-answer fault: one election per process (on Redis, a
/// process with several elections also renews the slowed one in the other elections'
/// batches, whose requests land after the slow answer, so the store's lease outlives even a
/// belief counted from the answer). A correct library passes; one that counts a lease from
/// the answer's arrival overlaps by about the delay here, in every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_then_a_partition_with_one_election_per_process() {
    let mut config = config(StoreKind::Redis, 2);
    config.faults = Some(vec![Fault::SlowAnswersThenPartition]);
    config.elections = 1;
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    keep(&report, "redis-slow-answers");
    assert!(report.passed(), "{}", report.table());
}

/// Runs broken candidates through `faults` and asserts that the exact check found an
/// overlap.
async fn caught(mode: UnsafeMode, faults: Vec<Fault>, rounds: usize, name: &str) {
    let mut config = config(StoreKind::Redis, rounds);
    config.faults = Some(faults);
    config.unsafe_mode = Some(mode);
    config.elections = 1;
    let report = run(config).await.expect("the chaos run completes");
    println!("{}", report.table());
    keep(&report, name);
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

/// Candidates that claim leases ten times longer than the store's keep believing they lead
/// through a partition while another is elected: the exact checker must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_candidates_whose_deadlines_ignore_the_lease() {
    caught(UnsafeMode::Lease, vec![Fault::Partition], 2, "redis-unsafe").await;
}

/// Candidates that count each lease from the instant its answer arrived: answers slowed by
/// a fifth of the TTL (ten times the safety margin), then a partition, and the old leader
/// believes a fifth of a TTL past the store's expiry, while the next one leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_candidates_that_count_the_lease_from_the_answer() {
    caught(
        UnsafeMode::AnswerTime,
        vec![Fault::SlowAnswersThenPartition],
        2,
        "redis-unsafe-answer-time",
    )
    .await;
}
