//! A deterministic simulation of leader election: several candidates, on several drivers,
//! in one to three elections (named `sim`, `sim-1`, `sim-10`: each a prefix of the next),
//! against a *model* of a store, on Tokio's paused clock, with a schedule drawn from one
//! seed.
//!
//! The harness is store-neutral. A [`Model`] gives it drivers (the real driver crate's
//! protocol code on a simulated I/O layer, or [`toy`]'s single-key driver for
//! leader-core's own state machine) and sends every request through the run's [`Net`]:
//! each request may be delayed, fail, lose its answer (the effect lands, the caller times
//! out), land late (after the caller gave up), or be answered later than the safety
//! margin; clients are partitioned (refused or hanging), the store goes away, restarts
//! (keeping its data, or losing it where the store may), is tampered with by an operator,
//! and runs on a clock up to 1.5% faster or slower than the candidates'; the candidates'
//! machine is suspended. Candidates, some sharing a driver, campaign, resign, withdraw,
//! run, drop futures and whole elections, cancel calls midway and call the API
//! concurrently. At every instant the runtime parks, and at every `Elected`, a checker
//! asserts:
//!
//! * at most one candidate of an election has `is_leader()` true (by its own deadline);
//! * fencing tokens of successive terms of an election strictly increase;
//! * within one term `is_leader()` never turns from false back to true;
//! * every `Elected` is followed by exactly one `Lost` or `Resigned` of the same term,
//!   before the next `Elected`, whatever was cancelled;
//! * a `resign()` never resigns a term that was elected while it ran;
//! * once faults stop, each election has a leader within a bound (late effects, plus the
//!   store's longest orphan, plus 3 s); then, three times, its leader resigns and another
//!   candidate waiting in line is elected within the model's handoff bound (in the second
//!   round one waiter leaves at the same instant: a wakeup lost with it fails); then
//!   `leader()` and `candidates()` name the leader, and it hands its term over to a
//!   waiter drawn at random which must be the next one elected, within the handoff bound,
//!   though the old leader campaigns again at once (a nominee's lost wakeup fails); then
//!   its leader's driver is cut off and a waiter on another driver is elected within the
//!   model's takeover bound after that leader's deadline (a head that misses the lease's
//!   end fails); then an operator ends the leader's term and it steps down within the
//!   model's notice bound (a lost notice fails); and once every election is dropped
//!   nothing is left in the store;
//! * a term an operator ended in the store leads no more 2 x TTL later (its renewals
//!   fail);
//! * where the model reports every grant, nobody is elected to a term the store never
//!   granted to it.
//!
//! A restart that loses the store's data (Redis without persistence) is outside what any
//! driver can promise (DESIGN.md): the terms that lived before it are excused from the
//! overlap and token checks. An operator's change excuses only the granted terms it ended
//! or edited (a model reports them with [`Net::tampered`]), for 2 x TTL: an overlap of two
//! other terms is a violation, and so is (where the model reports every grant,
//! [`Model::exact_grants`]) a candidate elected to a term the store never granted to it.
//!
//! The same seed replays the same schedule: [`run`] runs one; [`run_seeds`] is what a
//! `tests/simulation.rs` target calls (`SIM_SEEDS`, `SIM_SEED`, `SIM_TRACE`).

mod checker;
mod net;
pub mod scripted;
pub mod toy;
mod world;

use std::fmt;
use std::time::Duration;

pub use net::{ClientId, Fault, Held, Net};

/// The candidates' TTL.
pub const TTL: Duration = Duration::from_secs(1);
/// How long a simulated client waits for an answer (a model's drivers use this, or their
/// own timeouts for a 1 s TTL).
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
/// A late effect lands after its caller's limit (at most this much of it) ...
const LATE_CAP: Duration = Duration::from_millis(2500);
/// ... plus up to this much.
const LATE_SPREAD: Duration = Duration::from_millis(700);
/// The latest a late effect lands after its request was sent.
pub const MAX_LATE: Duration = Duration::from_millis(2500 + 700);
/// How long candidates act and faults happen.
const CHAOS: Duration = Duration::from_secs(20);
/// Once faults stop, late effects have landed and orphans expired: a leader within this.
const LIVENESS: Duration = Duration::from_secs(3);
/// How long after an operator ended a term (or the store lost its data) an overlap with it
/// is excused: every term confirmed before has passed its deadline (a TTL at most after
/// it), and a driver whose renewals confirm a whole lease (etcd's keep-alive) has had a
/// TTL more to notice the loss.
const EXCUSED: Duration = Duration::from_millis(2 * TTL.as_millis() as u64);

/// A model of one store, with the drivers that talk to it.
pub trait Model: Send + Sync + 'static {
    /// The driver under test: the driver crate's own type, on a simulated I/O layer.
    type Driver: leader_core::Driver + Clone;

    /// For messages: "etcd", "redis", "postgres".
    fn name(&self) -> &'static str;

    /// A new driver (one process's connections) that sends its requests through `net` as
    /// `client`. Its request timeouts are those the driver uses with a 1 s TTL.
    fn driver(&self, net: &Net, client: ClientId) -> Self::Driver;

    /// Operator tampering in the chaos phase (a key deleted, a lease revoked, a row
    /// edited): what was done, for the trace; `None` when there was nothing to do.
    fn tamper(&self, net: &Net) -> Option<String> {
        let _ = net;
        None
    }

    /// The store restarts; `kept` says whether its data survives. The harness cuts every
    /// client off meanwhile (their links drop).
    fn restart(&self, net: &Net, kept: bool) {
        let _ = (net, kept);
    }

    /// With faults stopped, how long a graceful handover may take: from the leader's
    /// `resign()` (its `run()` ending) until a candidate waiting in line is elected, on a
    /// network that answers at once. A few of the driver's own delays (a jitter, a
    /// refresh it waits for by design) at most: a wakeup lost or left to the next refresh
    /// must exceed it. `None`: not checked.
    fn handoff_bound(&self, ttl: Duration) -> Option<Duration> {
        let _ = ttl;
        None
    }

    /// With faults stopped, how long after a leader's own deadline a candidate waiting on
    /// another driver may be elected, when the leader's driver was cut off (its lease ends
    /// in the store, nobody resigns): the safety margin, the clocks' rate difference, the
    /// store's expiry granularity and the driver's delays by design (a jitter). A head
    /// that waits past the lease's end for its next refresh must exceed it. `None`: not
    /// checked.
    fn takeover_bound(&self, ttl: Duration) -> Option<Duration> {
        let _ = ttl;
        None
    }

    /// With faults stopped: an operator ends the term the store holds in `election` now
    /// (deletes its key or row, as [`Model::tamper`] may), reporting it with
    /// [`Net::tampered`] before the grants it makes; what was done, or `None` (nothing
    /// held, or not modelled).
    fn end_term(&self, net: &Net, election: &str) -> Option<String> {
        let _ = (net, election);
        None
    }

    /// With faults stopped, how long after [`Model::end_term`] the leader may still lead:
    /// the store's notice (a watch event, a NOTIFY) on a network that answers at once. A
    /// notice lost, left to the next renewal, must exceed it. `None`: not checked.
    fn notice_bound(&self, ttl: Duration) -> Option<Duration> {
        let _ = ttl;
        None
    }

    /// Whether the model reports, through [`Net::granted`], every term its store grants
    /// (and, through [`Net::tampered`], every granted term its operator ends): then a
    /// candidate elected to a term the store never granted to it is a violation (a waiter
    /// that leads on a record already gone).
    fn exact_grants(&self) -> bool {
        false
    }

    /// Whether some restarts of this store lose its data (Redis without persistence): only
    /// then does the harness pass `kept = false`.
    fn volatile(&self) -> bool {
        false
    }

    /// Everything the store keeps for the simulated elections (keys, rows, leases with
    /// keys), described for the message: empty once every candidate is gone.
    fn leftovers(&self, net: &Net) -> Vec<String>;

    /// The terms the store holds now whose lease has not ended (keys, rows), described for
    /// the message: checked right after every candidate closed with faults stopped, when
    /// each one's withdrawal has deleted its own term (a withdrawal that leaves its term
    /// to expire fails there, where [`leftovers`](Self::leftovers) would let it pass).
    /// `None`: not checked.
    fn terms_left(&self, net: &Net) -> Option<Vec<String>> {
        let _ = net;
        None
    }

    /// The longest a term may stay in the store after its candidate lost track of it (the
    /// orphan of a late campaign effect): its lease plus the store's expiry granularity.
    fn orphan_bound(&self, ttl: Duration) -> Duration;
}

/// What a simulated run found wrong, and how to replay it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The seed of the run.
    pub seed: u64,
    /// Virtual time since the run began.
    pub at: Duration,
    /// What went wrong.
    pub what: String,
    /// The package whose `simulation` test target replays it.
    pub package: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: at {:?}: {}\n  replay: SIM_SEED={} SIM_TRACE=1 cargo test -p {} \
             --all-features --test simulation -- --nocapture",
            self.seed, self.at, self.what, self.seed, self.package
        )
    }
}

impl std::error::Error for Violation {}

/// Figures of one simulated run (or the sum of several).
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// Terms elected.
    pub terms: u64,
    /// Store requests sent.
    pub requests: u64,
    /// Requests whose effect landed but whose answer never came.
    pub lost_answers: u64,
    /// Requests whose effect landed after the caller gave up.
    pub late_effects: u64,
    /// Requests that failed without effect.
    pub failures: u64,
    /// Partitions and store outages.
    pub outages: u64,
    /// Store restarts (and how many lost the data).
    pub restarts: u64,
    /// Restarts that lost the store's data.
    pub data_lost: u64,
    /// Operator tampering done.
    pub tampering: u64,
    /// Suspensions of the candidates' machine.
    pub suspensions: u64,
    /// Model-specific events a model counts (for example renewals answered from a shared
    /// confirmation).
    pub model_events: u64,
    /// API calls made by the candidates.
    pub calls: u64,
    /// Handovers after a resignation once faults stopped, and the slowest of them.
    pub handoffs: u64,
    /// The longest a handover took (see [`Model::handoff_bound`]), a handoff after a
    /// resignation or a planned handover.
    pub slowest_handoff: Duration,
    /// Planned handovers (`hand_over`) once faults stopped whose nominee was elected next.
    pub handovers: u64,
    /// Planned handovers not checked: the store did not list the nominee as waiting (or the
    /// driver has no handovers).
    pub handovers_skipped: u64,
    /// Takeovers from a leader cut off once faults stopped.
    pub takeovers: u64,
    /// The longest a takeover took after the old leader's deadline (see
    /// [`Model::takeover_bound`]).
    pub slowest_takeover: Duration,
    /// Leaders that stepped down after an operator ended their term once faults stopped.
    pub notices: u64,
    /// The longest one of them took (see [`Model::notice_bound`]).
    pub slowest_notice: Duration,
}

impl std::ops::AddAssign for Report {
    fn add_assign(&mut self, other: Report) {
        self.terms += other.terms;
        self.requests += other.requests;
        self.lost_answers += other.lost_answers;
        self.late_effects += other.late_effects;
        self.failures += other.failures;
        self.outages += other.outages;
        self.restarts += other.restarts;
        self.data_lost += other.data_lost;
        self.tampering += other.tampering;
        self.suspensions += other.suspensions;
        self.model_events += other.model_events;
        self.calls += other.calls;
        self.handoffs += other.handoffs;
        self.slowest_handoff = self.slowest_handoff.max(other.slowest_handoff);
        self.handovers += other.handovers;
        self.handovers_skipped += other.handovers_skipped;
        self.takeovers += other.takeovers;
        self.slowest_takeover = self.slowest_takeover.max(other.slowest_takeover);
        self.notices += other.notices;
        self.slowest_notice = self.slowest_notice.max(other.slowest_notice);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} terms, {} requests ({} failed, {} answers lost, {} late effects), {} outages, \
             {} restarts ({} lost the data), {} tamperings, {} suspensions, {} model events, \
             {} API calls, {} handoffs (slowest {:?}), {} planned handovers ({} not checked), {} takeovers (slowest {:?} after the \
             deadline), {} notices (slowest {:?})",
            self.terms,
            self.requests,
            self.failures,
            self.lost_answers,
            self.late_effects,
            self.outages,
            self.restarts,
            self.data_lost,
            self.tampering,
            self.suspensions,
            self.model_events,
            self.calls,
            self.handoffs,
            self.slowest_handoff,
            self.handovers,
            self.handovers_skipped,
            self.takeovers,
            self.slowest_takeover,
            self.notices,
            self.slowest_notice
        )
    }
}

/// Runs the simulation of `seed` against a model made by `make`, to its end, on a runtime
/// of its own on this thread.
///
/// # Errors
///
/// The first [`Violation`] of a safety or liveness property.
pub fn run<M: Model>(seed: u64, make: impl FnOnce(&Net) -> M) -> Result<Report, Violation> {
    world::run(seed, "<the package of your simulation test>", make)
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value} is not a whole number"),
    }
}

/// What a `tests/simulation.rs` target calls: `SIM_SEED=N` runs that one seed
/// (`SIM_TRACE=1` prints its schedule); otherwise `SIM_SEEDS` seeds (default 2,000) from
/// `SIM_FIRST_SEED` (default 0), spread over the cores. `package` names the crate whose
/// target replays a seed.
///
/// # Panics
///
/// When a seed breaks a property: with the first violations and the command that replays
/// each.
pub fn run_seeds<M: Model>(package: &str, make: fn(&Net) -> M) {
    if !cfg!(tokio_unstable) {
        eprintln!(
            "warning: built without --cfg tokio_unstable (the workspace's .cargo/config.toml \
             sets it; RUSTFLAGS from the environment override it): Tokio's generator is not \
             seeded, so a seed's schedule may not replay exactly"
        );
    }
    if let Some(seed) = env_u64("SIM_SEED") {
        match world::run(seed, package, make) {
            Ok(report) => println!("seed {seed}: ok, {report}"),
            Err(violation) => panic!("{violation}"),
        }
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(2_000);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|worker| {
            let package = package.to_owned();
            std::thread::spawn(move || {
                let mut total = Report::default();
                let mut failures = Vec::new();
                let mut seed = first + worker;
                while seed < first + seeds {
                    match world::run(seed, &package, make) {
                        Ok(report) => total += report,
                        Err(violation) => failures.push(violation),
                    }
                    seed += threads;
                }
                (total, failures)
            })
        })
        .collect();
    let mut total = Report::default();
    let mut failures = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok((report, found)) => {
                total += report;
                failures.extend(found);
            }
            Err(_) => panic!("a simulation thread panicked"),
        }
    }
    failures.sort_by_key(|v| v.seed);
    println!(
        "{package}: {seeds} seeds from {first} in {:.1?}: {total}; {} violations",
        started.elapsed(),
        failures.len()
    );
    if let Some(first) = failures.first() {
        for violation in failures.iter().take(10) {
            eprintln!("{violation}");
        }
        panic!(
            "{} of {seeds} seeds broke a property; first: {first}",
            failures.len()
        );
    }
}
