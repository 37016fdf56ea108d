//! A fault-injection suite for the election: real candidate processes (the
//! `chaos-candidate` binary, each holding several elections on one driver), real stores
//! (`leader-testkit`), a TCP [`FaultProxy`](leader_testkit::FaultProxy) between each
//! candidate and its store, and an exact [checker] of the safety properties over what the
//! candidates logged.
//!
//! Each candidate logs, on CLOCK_MONOTONIC, every term's first instant of belief, every
//! deadline the library gives it (through `ElectionBuilder::on_deadline`, written before
//! `is_leader()` relies on it), and its end with its final deadline; it also samples the
//! first election's `is_leader()` every millisecond as a cross-check. CLOCK_MONOTONIC is one
//! clock for all processes on a machine, so the processes' terms compare exactly.
//!
//! The [`Report`] gives, per fault kind, the time to a leader again (median and worst)
//! against its bound, the time without a leader (the availability the fault cost) and the
//! phases of the renewal interval the faults hit; and across the whole run: overlapping
//! terms, sampled overlaps, flips, sampling gaps, fencing tokens that go backwards or are
//! reused, candidates that exited badly, rounds after which no leader came back within the
//! bound, and every tampering with the store with what came of it. [`Report::json`] holds
//! all of it; [`results`] turns runs into `docs/results/soak.json` and the README's tables.
//!
//! The module layout: [`store`] (the stores and what is done to them), [`fault`] (the
//! faults), `orchestra` and `run` (the run), [`checker`] (the logs and the properties),
//! [`report`] (figures), [`timeline`] and [`svg`] (pictures; the palette and SVG writer
//! leader-bench uses too), [`results`] (results files and README tables).

pub mod checker;
mod clock;
pub mod fault;
mod orchestra;
pub mod report;
pub mod results;
mod run;
pub mod store;
pub mod svg;
pub mod timeline;

use std::path::PathBuf;
use std::time::Duration;

pub use clock::{monotonic_ns, to_monotonic_ns};
pub use fault::Fault;
pub use report::{Report, Round};
pub use run::{run, tamper_bound};
pub use store::StoreKind;

pub(crate) type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A candidate broken on purpose, to show that the checker catches it
/// (`chaos-candidate --unsafe=...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafeMode {
    /// Leases ten times longer than the store grants: deadlines that ignore the lease.
    Lease,
    /// Each lease counted from the instant its answer arrived, not the instant its request
    /// was sent: the textbook lease bug, shown by slow answers.
    AnswerTime,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store.
    pub backend: StoreKind,
    /// Faults to inject (one per round, cycling through the kinds).
    pub rounds: usize,
    /// The election TTL.
    pub ttl: Duration,
    /// The `chaos-candidate` binary.
    pub candidate: PathBuf,
    /// The `chaos-observer` binary.
    pub observer: PathBuf,
    /// The faults to cycle through; `None`: every kind the store supports.
    pub faults: Option<Vec<Fault>>,
    /// Elections each candidate process holds on its one driver (the first is the one the
    /// orchestrator drives; all are checked).
    pub elections: usize,
    /// Runs broken candidates, to show that the checker catches them.
    pub unsafe_mode: Option<UnsafeMode>,
    /// Starts Redis or PostgreSQL through this `chaos-store` binary with a steppable wall
    /// clock (PostgreSQL under libfaketime, Redis under `clockshift.c`), so that
    /// [`Fault::ClockForwardPartition`] and [`Fault::ClockBackKill`] can step it; `None`:
    /// the store runs on the true clock.
    pub clock_store: Option<PathBuf>,
    /// Redis only: runs Redis under Sentinel or as a Cluster with replicas, for
    /// [`Fault::MasterFailover`]; `None`: one redis-server.
    pub redis_topology: Option<RedisTopology>,
}

/// A Redis topology a chaos run can fail over (see [`Config::redis_topology`]); the
/// candidates connect by its URL, with no proxy in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTopology {
    /// A master and a replica (`appendfsync always`) and three sentinels; the candidates
    /// use the Sentinel URL with `replicas=1`: each grant and renewal is acknowledged by
    /// the replica (WAIT) before it counts.
    Sentinel,
    /// Three masters, each with a replica (`appendfsync always`). The driver cannot WAIT
    /// on a Cluster: a failover may lose the last writes to the master (the documented
    /// limit), so overlaps across a failover are measured, not failed.
    Cluster,
}

impl Config {
    /// A run of `rounds` faults on `backend` with the given binaries: TTL 1 s, every fault
    /// kind, 20 elections per candidate process, safe candidates.
    pub fn new(
        backend: StoreKind,
        rounds: usize,
        candidate: impl Into<PathBuf>,
        observer: impl Into<PathBuf>,
    ) -> Config {
        Config {
            backend,
            rounds,
            ttl: Duration::from_secs(1),
            candidate: candidate.into(),
            observer: observer.into(),
            faults: None,
            elections: 20,
            unsafe_mode: None,
            clock_store: None,
            redis_topology: None,
        }
    }
}

/// Reads `CHAOS_ROUNDS` (default `default`).
pub fn rounds_from_env(default: usize) -> usize {
    std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}
