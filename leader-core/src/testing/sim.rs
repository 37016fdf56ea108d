//! A deterministic simulation of the election state machine: several candidates on a
//! simulated store, on Tokio's paused clock, with a schedule drawn from one seed.
//!
//! Each store request may be delayed, fail, lose its answer (the effect lands, the caller
//! times out), land late (after the caller gave up), or be answered later than the safety
//! margin (campaigns: up to several TTLs); leases expire in the store, on a clock of its
//! own that runs up to 1.5% faster or slower than the candidates'; the candidates' machine
//! is suspended (their monotonic clock stands still, the store's runs on, the boot clock
//! they read counts it); renewals may answer with an earlier, shared confirmation; the
//! store pushes the end of a term (`term_gone`) after a delay; drivers are partitioned and
//! the store goes away. Candidates, some sharing a driver,
//! campaign, resign, run, drop futures and whole elections, cancel calls midway and call
//! the API concurrently. At every instant the runtime reaches, and at every `Elected`, a
//! checker asserts:
//!
//! * at most one candidate has `is_leader()` true;
//! * fencing tokens of successive terms strictly increase;
//! * within one term `is_leader()` never turns from false back to true;
//! * every `Elected` is followed by exactly one `Lost` or `Resigned` of the same term,
//!   before the next `Elected`, whatever was cancelled;
//! * a `resign()` never resigns a term that was elected while it ran;
//! * once faults stop, a leader is elected within a bound, no term that its candidate
//!   reported ended is left in the store, and closing every election leaves no term behind.
//!
//! The same seed replays the same schedule: run one with [`run`]; a [`Violation`] prints
//! the command that replays it.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::machinery::lock;
use crate::{Candidate, Driver, Election, Error, Event, Grant, LeaderInfo, LossReason, Result};
use crate::{Status, Term};

/// The names of the simulated elections start with this.
const ELECTION: &str = "sim";

/// The election of candidate slot `slot` when a run has `elections` of them.
fn election_of(slot: usize, elections: usize) -> String {
    format!("{ELECTION}-{}", slot % elections)
}
/// The candidates' TTL.
const TTL: Duration = Duration::from_secs(1);
/// How long a simulated client waits for an answer.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a simulated client waits for the answer to a campaign request: several TTLs.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_millis(2500);
/// The latest a late effect lands after its request was sent.
const MAX_LATE: Duration = Duration::from_millis(1000);
/// How long candidates act and faults happen.
const CHAOS: Duration = Duration::from_secs(20);
/// Once faults stop and late effects have landed, a leader within this long.
const LIVENESS: Duration = Duration::from_secs(3);

/// What a simulated run found wrong, and how to replay it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The seed of the run.
    pub seed: u64,
    /// Virtual time since the run began.
    pub at: Duration,
    /// What went wrong.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: at {:?}: {}\n  replay: SIM_SEED={} cargo test -p leader-core \
             --all-features --test simulation -- --nocapture",
            self.seed, self.at, self.what, self.seed
        )
    }
}

impl std::error::Error for Violation {}

/// Figures of one simulated run.
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
    /// Suspensions of the candidates' machine.
    pub suspensions: u64,
    /// Renewals answered with an earlier, shared confirmation.
    pub shared_confirmations: u64,
    /// API calls made by the candidates.
    pub calls: u64,
}

impl std::ops::AddAssign for Report {
    fn add_assign(&mut self, other: Report) {
        self.terms += other.terms;
        self.requests += other.requests;
        self.lost_answers += other.lost_answers;
        self.late_effects += other.late_effects;
        self.failures += other.failures;
        self.outages += other.outages;
        self.suspensions += other.suspensions;
        self.shared_confirmations += other.shared_confirmations;
        self.calls += other.calls;
    }
}

/// Runs the simulation of `seed` to its end, on a runtime of its own on this thread.
///
/// # Errors
///
/// The first [`Violation`] of a safety or liveness property.
pub fn run(seed: u64) -> std::result::Result<Report, Violation> {
    crate::backoff::seed_jitter(Some(seed));
    let world = Arc::new(World::new(seed));
    let sampler = Arc::clone(&world);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .on_thread_park(move || lock(&sampler.checker).sample())
        .build();
    let outcome = match runtime {
        Ok(runtime) => {
            let simulated = Arc::clone(&world);
            let result = runtime.block_on(async move {
                let result = Arc::clone(&simulated).simulate().await;
                if let Err(what) = &result {
                    simulated.violation(what.clone());
                }
                result
            });
            drop(runtime);
            result
        }
        Err(err) => Err(format!("cannot build a runtime: {err}")),
    };
    crate::backoff::seed_jitter(None);
    let checker = lock(&world.checker);
    if let Some((at, what)) = checker.violations.first() {
        return Err(Violation {
            seed,
            at: *at,
            what: what.clone(),
        });
    }
    if let Err(what) = outcome {
        return Err(Violation {
            seed,
            at: checker.elapsed(),
            what,
        });
    }
    let mut report = *lock(&world.report);
    report.terms = checker.elected.len() as u64;
    Ok(report)
}

/// Everything one run shares: the seeded generator, the store, the checker.
struct World {
    rng: Mutex<StdRng>,
    store: Mutex<Store>,
    changes: watch::Sender<u64>,
    /// Faults happen while this is true.
    chaos: Mutex<bool>,
    outage: Mutex<bool>,
    /// The store keeps a lease this many times the candidate's TTL (as etcd may).
    lease_factor: u32,
    /// The store's clock: `rate` times as fast as the candidates' (within the safety
    /// margin's assumption), and ahead of it by the time the candidates' machine spent
    /// suspended.
    store_clock: Mutex<StoreClock>,
    /// Renewals may answer with an earlier confirmation of the same term (as a driver
    /// sharing one keep-alive between elections does), when this is true.
    shared_confirmations: bool,
    checker: Mutex<Checker>,
    report: Mutex<Report>,
    /// Each slot's current election.
    current: Mutex<Vec<Option<Election>>>,
    /// How many elections the candidates run for (slot `i` in election `i % elections`),
    /// so that drivers hold several at once.
    elections: usize,
    tracing: bool,
}

/// The store's clock against the candidates' (Tokio's paused clock).
struct StoreClock {
    epoch: Option<Instant>,
    rate: f64,
    /// How long the candidates' machine was suspended: the store's clock ran on meanwhile.
    skew: Duration,
}

/// The event-checking tasks of every election made.
type Instances = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// Every election's state in the store. The fence counter is shared, so tokens are unique
/// across elections (and increase in each).
#[derive(Default)]
struct Store {
    elections: std::collections::BTreeMap<String, ElectionStore>,
    fence: u64,
}

#[derive(Default)]
struct ElectionStore {
    holder: Option<Holder>,
    /// The last holder whose lease ran out.
    expired: Option<Holder>,
}

#[derive(Clone)]
struct Holder {
    id: String,
    token: u64,
    expires_at: Instant,
}

impl Store {
    fn election(&mut self, name: &str) -> &mut ElectionStore {
        self.elections.entry(name.to_owned()).or_default()
    }

    fn live(&mut self, name: &str, now: Instant) -> Option<&mut Holder> {
        let election = self.election(name);
        if election
            .holder
            .as_ref()
            .is_some_and(|h| h.expires_at <= now)
        {
            election.expired = election.holder.take();
        }
        election.holder.as_mut()
    }
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let lease_factor = if rng.random_bool(0.5) { 1 } else { 10 };
        // Up to 1.5% apart: within the default safety margin (2% of the TTL).
        let rate = 1.0 + rng.random_range(-0.015..=0.015);
        let shared_confirmations = rng.random_bool(0.5);
        let elections = rng.random_range(1..=2usize);
        World {
            rng: Mutex::new(rng),
            store: Mutex::new(Store::default()),
            changes: watch::Sender::new(0),
            chaos: Mutex::new(true),
            outage: Mutex::new(false),
            lease_factor,
            store_clock: Mutex::new(StoreClock {
                epoch: None,
                rate,
                skew: Duration::ZERO,
            }),
            shared_confirmations,
            elections,
            checker: Mutex::new(Checker::default()),
            report: Mutex::new(Report::default()),
            current: Mutex::new(Vec::new()),
            tracing: std::env::var_os("SIM_TRACE").is_some(),
        }
    }

    fn draw<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut lock(&self.rng))
    }

    /// The store's clock now.
    fn store_now(&self) -> Instant {
        let clock = lock(&self.store_clock);
        let now = Instant::now();
        let Some(epoch) = clock.epoch else {
            return now;
        };
        epoch + now.duration_since(epoch).mul_f64(clock.rate) + clock.skew
    }

    /// The candidates' instant at which the store's clock reads `at` (or now, if it has).
    fn client_at(&self, at: Instant) -> Instant {
        let clock = lock(&self.store_clock);
        let Some(epoch) = clock.epoch else {
            return at;
        };
        let store_elapsed = at.saturating_duration_since(epoch);
        epoch + store_elapsed.saturating_sub(clock.skew).div_f64(clock.rate)
    }

    /// The candidates' machine sleeps for `duration`: their monotonic clock (Tokio's)
    /// stands still, the store's runs on, and the boot clock they read counts it.
    fn suspend(&self, duration: Duration) {
        lock(&self.store_clock).skew += duration;
        crate::clock::simulate_suspension(duration);
        self.trace(|| format!("the candidates' machine was suspended for {duration:?}"));
    }

    fn chaos(&self) -> bool {
        *lock(&self.chaos)
    }

    fn count(&self, f: impl FnOnce(&mut Report)) {
        f(&mut lock(&self.report));
    }

    fn violation(&self, what: String) {
        lock(&self.checker).violation(what);
    }

    async fn simulate(self: Arc<Self>) -> std::result::Result<(), String> {
        lock(&self.checker).start = Some(Instant::now());
        lock(&self.store_clock).epoch = Some(Instant::now());
        // Each election gets two slots at least: slot 0 stays passive at the end.
        let slots = self.draw(|rng| rng.random_range(2 * self.elections..=5usize));
        let drivers: Vec<SimDriver> = (0..self.draw(|rng| rng.random_range(1..=slots)))
            .map(|_| SimDriver {
                world: Arc::clone(&self),
                partition: Arc::new(Mutex::new(None)),
                confirmations: Arc::default(),
            })
            .collect();
        *lock(&self.current) = vec![None; slots];
        let instances = Arc::new(Mutex::new(Vec::new()));
        let mut actors = JoinSet::new();
        for slot in 0..slots {
            let driver = drivers[slot % drivers.len()].clone();
            let election = self.candidate(slot, &driver, &instances);
            actors.spawn(Arc::clone(&self).act(
                slot,
                election,
                drivers.clone(),
                Arc::clone(&instances),
            ));
        }
        actors.spawn(Arc::clone(&self).inject_faults(drivers.clone()));

        // The chaos phase.
        sleep(CHAOS).await;
        *lock(&self.chaos) = false;
        *lock(&self.outage) = false;
        for driver in &drivers {
            *lock(&driver.partition) = None;
        }
        actors.abort_all();
        while let Some(joined) = actors.join_next().await {
            match joined {
                Ok(()) => {}
                Err(err) if err.is_cancelled() => {}
                Err(err) => return Err(format!("an actor panicked: {err}")),
            }
        }
        // Each slot keeps its current election: slot 0 stays passive (whatever its term
        // and leftovers), the others run.
        let mut elections = std::mem::take(&mut *lock(&self.current));
        let quiet = Instant::now();
        lock(&self.checker).quiet_at = Some(quiet);
        let stop = tokio_util::sync::CancellationToken::new();
        let mut runs = JoinSet::new();
        for (slot, election) in elections.iter_mut().enumerate().skip(1) {
            let driver = drivers[slot % drivers.len()].clone();
            let election = election
                .get_or_insert_with(|| self.candidate(slot, &driver, &instances))
                .clone();
            let stop = stop.clone();
            runs.spawn(async move { election.run(stop.cancelled_owned()).await });
        }

        // Liveness: in each election, a leader once faults stopped, late effects landed
        // and a bound passed.
        let names: Vec<String> = (0..self.elections)
            .map(|i| election_of(i, self.elections))
            .collect();
        for name in &names {
            self.check_liveness(name, quiet).await?;
        }

        // Shut down: every run resigns, every election is dropped, every stream ends.
        stop.cancel();
        while let Some(joined) = runs.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(format!("run() failed at shutdown: {err}")),
                Err(err) => return Err(format!("a run panicked: {err}")),
            }
        }
        drop(elections);
        let closed_by = Instant::now() + 4 * TTL;
        let instances = std::mem::take(&mut *lock(&instances));
        for instance in instances {
            match timeout(closed_by - Instant::now(), instance).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(format!("an event checker panicked: {err}")),
                Err(_) => {
                    return Err(
                        "an election's event stream did not end after it was dropped".into(),
                    );
                }
            }
        }
        sleep(2 * TTL).await;
        let now = self.store_now();
        for name in &names {
            if let Some(h) = lock(&self.store).live(name, now).cloned()
                && lock(&self.checker).elected.contains(&h.token)
            {
                return Err(format!(
                    "every election was closed, yet the store still holds term {} of {} in {name}",
                    h.token, h.id
                ));
            }
        }
        Ok(())
    }

    /// Once faults stopped (at `quiet`), election `name` gets a leader within the bound
    /// (later only behind an orphan of a late effect, until its lease ends), and no term
    /// whose candidate reported it ended is left in the store.
    async fn check_liveness(&self, name: &str, quiet: Instant) -> std::result::Result<(), String> {
        let mut due = quiet + MAX_LATE + LIVENESS;
        loop {
            sleep_until(due).await;
            if lock(&self.checker).leaders_after_quiet.contains(name) {
                break;
            }
            let elected = lock(&self.checker).elected.clone();
            let holder = {
                let now = self.store_now();
                lock(&self.store).live(name, now).cloned()
            };
            match holder {
                // A late campaign effect made a candidate the holder without its knowing:
                // it blocks the election until the store's lease ends, as a real store's
                // would. Wait for that.
                Some(h) if !elected.contains(&h.token) => {
                    due = self.client_at(h.expires_at) + 2 * TTL;
                }
                Some(h) => {
                    return Err(format!(
                        "no leader in {name} {:?} after faults stopped: the store still holds \
                         term {} of {}, which its candidate no longer leads",
                        due - quiet,
                        h.token,
                        h.id
                    ));
                }
                None => {
                    // An orphan whose lease ran out just now: the waiters are on their way.
                    let expired = lock(&self.store).election(name).expired.clone();
                    if let Some(h) = expired
                        && !elected.contains(&h.token)
                        && self.client_at(h.expires_at) + 2 * TTL > due
                    {
                        due = self.client_at(h.expires_at) + 2 * TTL;
                        continue;
                    }
                    return Err(format!(
                        "no leader in {name} {:?} after faults stopped, and nobody holds the store",
                        due - quiet
                    ));
                }
            }
        }
        let ended = lock(&self.checker).ended.clone();
        let now = self.store_now();
        if let Some(h) = lock(&self.store).live(name, now).cloned()
            && ended.contains(&h.token)
            && self.client_at(h.expires_at) > quiet + MAX_LATE + LIVENESS + TTL
        {
            return Err(format!(
                "term {} of {name} ended, yet the store still holds it after faults stopped",
                h.token
            ));
        }
        Ok(())
    }

    /// A new candidate in `slot` (the slot's current one), with a task that checks its
    /// events.
    fn candidate(
        self: &Arc<Self>,
        slot: usize,
        driver: &SimDriver,
        instances: &Instances,
    ) -> Election {
        let retry_min = TTL / 10;
        let name = election_of(slot, self.elections);
        let election = Election::builder(driver.clone(), name.as_str())
            .ttl(TTL)
            .retry(retry_min, TTL)
            .build()
            .unwrap_or_else(|err| panic!("the simulation's settings are valid: {err}"));
        lock(&self.checker).statuses.push(Believer {
            slot,
            id: election.id().to_owned(),
            election: name.clone(),
            status: election.status(),
        });
        let replaced = lock(&self.current)[slot].replace(election.clone());
        drop(replaced);
        let mut events = election.subscribe();
        let world = Arc::clone(self);
        lock(instances).push(tokio::spawn(async move {
            let mut open: Option<u64> = None;
            while let Some(event) = events.next().await {
                world.on_event(slot, &name, &mut open, &event);
            }
            if let Some(token) = open {
                world.violation(format!(
                    "slot {slot}: term {token} was elected and never ended (stream closed)"
                ));
            }
        }));
        election
    }

    fn on_event(&self, slot: usize, name: &str, open: &mut Option<u64>, event: &Event) {
        self.trace(|| format!("slot {slot}: {event:?}"));
        let mut checker = lock(&self.checker);
        match *event {
            Event::Elected { fencing_token } => {
                checker.sample();
                if let Some(previous) = open.replace(fencing_token) {
                    checker.violation(format!(
                        "slot {slot}: term {fencing_token} elected before term {previous} ended"
                    ));
                }
                if let Some(&last) = checker.last_elected.get(name)
                    && fencing_token <= last
                {
                    checker.violation(format!(
                        "slot {slot}: fencing token {fencing_token} after {last} in {name}: \
                         not increasing"
                    ));
                }
                checker.last_elected.insert(name.to_owned(), fencing_token);
                checker.elected.insert(fencing_token);
            }
            Event::Lost { fencing_token, .. } | Event::Resigned { fencing_token } => {
                if *open != Some(fencing_token) {
                    checker.violation(format!(
                        "slot {slot}: {event:?} without a matching Elected (open: {open:?})"
                    ));
                }
                *open = None;
                checker.ended.insert(fencing_token);
            }
        }
    }

    /// One candidate's behaviour in the chaos phase: a random mix of API calls, some
    /// concurrent, some cancelled midway, until the task is aborted.
    async fn act(
        self: Arc<Self>,
        slot: usize,
        mut election: Election,
        drivers: Vec<SimDriver>,
        instances: Instances,
    ) {
        let mut background = JoinSet::new();
        let mut last_term: Option<Term> = None;
        loop {
            self.count(|r| r.calls += 1);
            let action = self.draw(|rng| rng.random_range(0..100u32));
            match action {
                0..=21 => {
                    let limit = self.draw(|rng| {
                        rng.random_bool(0.5)
                            .then(|| Duration::from_millis(rng.random_range(0..2000)))
                    });
                    let campaign = election.campaign();
                    let result = match limit {
                        Some(limit) => timeout(limit, campaign).await.ok(),
                        None => Some(campaign.await),
                    };
                    if let Some(Ok(term)) = result {
                        last_term = Some(term);
                    }
                }
                22..=35 => {
                    let cancel_after = self.draw(|rng| {
                        rng.random_bool(0.3)
                            .then(|| Duration::from_millis(rng.random_range(0..60)))
                    });
                    self.checked_resign(slot, &election, None, cancel_after)
                        .await;
                }
                36..=43 => {
                    if let Some(term) = last_term.clone() {
                        let cancel_after = self.draw(|rng| {
                            rng.random_bool(0.3)
                                .then(|| Duration::from_millis(rng.random_range(0..60)))
                        });
                        self.checked_resign(slot, &election, Some(term), cancel_after)
                            .await;
                    }
                }
                44..=55 => {
                    let lasts = self.draw(|rng| Duration::from_millis(rng.random_range(0..5000)));
                    let e = election.clone();
                    background.spawn(async move {
                        let _ = e.run(sleep(lasts)).await;
                    });
                }
                56..=62 => {
                    let e = election.clone();
                    let limit = self.draw(|rng| Duration::from_millis(rng.random_range(0..3000)));
                    background.spawn(async move {
                        let _ = timeout(limit, e.campaign()).await;
                    });
                }
                63..=67 => {
                    // At the held term's deadline, when its holder task and a campaign may
                    // run in either order.
                    if let Some(term) = last_term.clone() {
                        sleep_until(Instant::from_std(term.deadline())).await;
                        if let Ok(Ok(term)) = timeout(TTL, election.campaign()).await {
                            last_term = Some(term);
                        }
                    }
                }
                68..=72 => {
                    // Drop the candidate (every clone), then a new one, maybe elsewhere.
                    background.abort_all();
                    while background.join_next().await.is_some() {}
                    last_term = None;
                    let driver = if self.draw(|rng| rng.random_bool(0.5)) {
                        drivers[slot % drivers.len()].clone()
                    } else {
                        drivers[self.draw(|rng| rng.random_range(0..drivers.len()))].clone()
                    };
                    election = self.candidate(slot, &driver, &instances);
                }
                _ => {
                    let pause = self.draw(|rng| Duration::from_millis(rng.random_range(0..1000)));
                    sleep(pause).await;
                }
            }
            // Reap finished background calls.
            while let Some(Some(_)) = background.join_next().now_or_never() {}
        }
    }

    /// Resigns (the election, or `term`), maybe cancelling the call after a while, and
    /// checks that no term elected meanwhile was resigned by it.
    async fn checked_resign(
        &self,
        slot: usize,
        election: &Election,
        term: Option<Term>,
        cancel_after: Option<Duration>,
    ) {
        let mut events = election.subscribe();
        let resign = async {
            match &term {
                Some(term) => term.resign().await,
                None => election.resign().await,
            }
        };
        match cancel_after {
            Some(limit) => {
                let _ = timeout(limit, resign).await;
                return;
            }
            None => {
                let _ = resign.await;
            }
        }
        let mut elected = BTreeSet::new();
        while let Some(Some(event)) = events.next().now_or_never() {
            match event {
                Event::Elected { fencing_token } => {
                    elected.insert(fencing_token);
                }
                Event::Resigned { fencing_token }
                | Event::Lost {
                    fencing_token,
                    reason: LossReason::ResignFailed,
                } if elected.contains(&fencing_token) => {
                    self.violation(format!(
                        "slot {slot}: resign() resigned term {fencing_token}, which was \
                         elected while it ran"
                    ));
                }
                _ => {}
            }
        }
    }

    /// Partitions drivers and takes the store away, until the chaos phase ends.
    async fn inject_faults(self: Arc<Self>, drivers: Vec<SimDriver>) {
        loop {
            let pause = self.draw(|rng| Duration::from_millis(rng.random_range(0..3000)));
            sleep(pause).await;
            let lasts = self.draw(|rng| Duration::from_millis(rng.random_range(0..3000)));
            if self.draw(|rng| rng.random_bool(0.15)) {
                // The candidates' machine is suspended (a laptop lid, a VM paused).
                let duration = self.draw(|rng| Duration::from_millis(rng.random_range(1..2500)));
                self.count(|r| r.suspensions += 1);
                self.suspend(duration);
                continue;
            }
            let which = self.draw(|rng| rng.random_range(0..=drivers.len()));
            self.count(|r| r.outages += 1);
            if which == drivers.len() {
                *lock(&self.outage) = true;
                sleep(lasts).await;
                *lock(&self.outage) = false;
            } else {
                let mode = if self.draw(|rng| rng.random_bool(0.5)) {
                    Partition::Refuse
                } else {
                    Partition::Hang
                };
                *lock(&drivers[which].partition) = Some(mode);
                sleep(lasts).await;
                *lock(&drivers[which].partition) = None;
            }
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Prints a line of the schedule when `SIM_TRACE` is set (for replaying one seed).
    fn trace(&self, line: impl FnOnce() -> String) {
        if self.tracing {
            let at = lock(&self.checker).elapsed();
            println!("[{:>9.3}s] {}", at.as_secs_f64(), line());
        }
    }
}

/// Watches every candidate's status and events.
#[derive(Default)]
struct Checker {
    start: Option<Instant>,
    /// The status of every candidate made.
    statuses: Vec<Believer>,
    /// The last token elected in each election.
    last_elected: std::collections::BTreeMap<String, u64>,
    /// Tokens valid at the last sample.
    valid: BTreeSet<u64>,
    /// Tokens seen valid, then not: they must never be valid again.
    dead: BTreeSet<u64>,
    elected: BTreeSet<u64>,
    ended: BTreeSet<u64>,
    quiet_at: Option<Instant>,
    /// The elections that had a leader after faults stopped.
    leaders_after_quiet: BTreeSet<String>,
    violations: Vec<(Duration, String)>,
}

/// One candidate the checker watches.
struct Believer {
    slot: usize,
    id: String,
    election: String,
    status: Status,
}

impl Checker {
    fn elapsed(&self) -> Duration {
        self.start
            .map_or(Duration::ZERO, |start| Instant::now().duration_since(start))
    }

    fn violation(&mut self, what: String) {
        let at = self.elapsed();
        self.violations.push((at, what));
    }

    /// The store just gave term `token` of `election` to candidate `id`.
    fn granted(&mut self, id: &str, election: &str, token: u64) {
        let believers: Vec<(usize, u64)> = self
            .statuses
            .iter()
            .filter(|b| b.id != id && b.election == election)
            .filter_map(|b| Some((b.slot, b.status.fencing_token()?)))
            .collect();
        if !believers.is_empty() {
            self.violation(format!(
                "the store granted term {token} of {election} while (slot, term) \
                 {believers:?} still led"
            ));
        }
    }

    fn sample(&mut self) {
        let mut leaders: std::collections::BTreeMap<&str, Vec<(usize, u64)>> =
            std::collections::BTreeMap::new();
        for b in &self.statuses {
            if let Some(token) = b.status.fencing_token() {
                leaders
                    .entry(b.election.as_str())
                    .or_default()
                    .push((b.slot, token));
            }
        }
        let mut found = Vec::new();
        for (election, leading) in &leaders {
            if leading.len() > 1 {
                found.push(format!(
                    "two leaders at once in {election} (slot, token): {leading:?}"
                ));
            }
        }
        let now_valid: BTreeSet<u64> = leaders
            .values()
            .flatten()
            .map(|&(_, token)| token)
            .collect();
        let with_leader: Vec<String> = leaders.keys().map(|name| (*name).to_owned()).collect();
        for what in found {
            self.violation(what);
        }
        for token in &now_valid {
            if self.dead.contains(token) {
                self.violation(format!(
                    "term {token} leads again after is_leader() was false"
                ));
            }
        }
        let gone: Vec<u64> = self.valid.difference(&now_valid).copied().collect();
        self.dead.extend(gone);
        self.valid = now_valid;
        if self.quiet_at.is_some() {
            self.leaders_after_quiet.extend(with_leader);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Partition {
    /// Requests fail at once.
    Refuse,
    /// Requests hang until the client's timeout, without effect.
    Hang,
}

/// A [`Driver`] on the simulated store.
#[derive(Clone)]
struct SimDriver {
    world: Arc<World>,
    partition: Arc<Mutex<Option<Partition>>>,
    /// The send time of the latest request that extended each (candidate, term).
    confirmations: Arc<Mutex<std::collections::HashMap<(String, u64), Instant>>>,
}

/// The random end of a candidate id, to tell candidates apart in traces.
fn short(id: &str) -> &str {
    id.rsplit('-').next().unwrap_or(id)
}

fn unreachable_store() -> Error {
    Error::store(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "simulated store unreachable",
    ))
}

impl SimDriver {
    /// Sends `op` to the store: it lands after a delay (maybe after the caller gave up)
    /// and its answer comes back after another (or never).
    async fn request<T: Send + fmt::Debug + 'static>(
        &self,
        label: String,
        op: impl FnOnce(&mut Store, Instant) -> (T, bool) + Send + 'static,
    ) -> Result<T> {
        self.request_within(REQUEST_TIMEOUT, label, op).await
    }

    /// [`request`](Self::request), waiting up to `limit` for the answer.
    async fn request_within<T: Send + fmt::Debug + 'static>(
        &self,
        limit: Duration,
        label: String,
        op: impl FnOnce(&mut Store, Instant) -> (T, bool) + Send + 'static,
    ) -> Result<T> {
        let world = &self.world;
        world.count(|r| r.requests += 1);
        let partition = *lock(&self.partition);
        if *lock(&world.outage) {
            return Err(unreachable_store());
        }
        match partition {
            Some(Partition::Refuse) => return Err(unreachable_store()),
            Some(Partition::Hang) => {
                sleep(limit).await;
                return Err(Error::Timeout(limit));
            }
            None => {}
        }
        let chaos = world.chaos();
        let (fail, effect_after, answer_after) = world.draw(|rng| {
            let fail = chaos && rng.random_bool(0.04);
            let late = chaos && rng.random_bool(0.04);
            let lost = chaos && rng.random_bool(0.04);
            let effect_after = if late {
                REQUEST_TIMEOUT
                    + Duration::from_millis(
                        rng.random_range(0..=(MAX_LATE - REQUEST_TIMEOUT).as_millis() as u64),
                    )
            } else {
                Duration::from_millis(rng.random_range(0..=20))
            };
            // Most answers come at once; some later than the safety margin, up to the
            // caller's limit (several TTLs for a campaign), as real networks do.
            let answer_after = (!lost).then(|| {
                if chaos && rng.random_bool(0.2) {
                    Duration::from_millis(rng.random_range(20..=limit.as_millis() as u64))
                } else {
                    Duration::from_millis(rng.random_range(0..=20))
                }
            });
            (fail, effect_after, answer_after)
        });
        if fail {
            world.count(|r| r.failures += 1);
            sleep(effect_after.min(REQUEST_TIMEOUT)).await;
            return Err(unreachable_store());
        }
        if effect_after + answer_after.unwrap_or(MAX_LATE) >= limit {
            world.count(|r| {
                if effect_after >= limit {
                    r.late_effects += 1;
                } else {
                    r.lost_answers += 1;
                }
            });
        }
        let (tx, rx) = oneshot::channel();
        let effect_world = Arc::clone(world);
        tokio::spawn(async move {
            sleep(effect_after).await;
            let (out, changed) = {
                let now = effect_world.store_now();
                op(&mut lock(&effect_world.store), now)
            };
            effect_world.trace(|| format!("{label} -> {out:?} (answer {answer_after:?})"));
            if changed {
                effect_world.changed();
            }
            if let Some(after) = answer_after {
                sleep(after).await;
                let _ = tx.send(out);
            } else {
                // The answer is lost: the caller times out.
                drop(tx);
            }
        });
        let answer = async {
            match rx.await {
                Ok(out) => out,
                Err(_) => std::future::pending().await,
            }
        };
        timeout(limit, answer)
            .await
            .map_err(|_| Error::Timeout(limit))
    }

    fn lease(&self, candidate: &Candidate) -> Duration {
        candidate.ttl * self.world.lease_factor
    }

    /// Records that the store extended term `token` of `id` by a request sent at `at`.
    fn confirmed(&self, id: &str, token: u64, at: Instant) {
        let mut confirmations = lock(&self.confirmations);
        let last = confirmations.entry((id.to_owned(), token)).or_insert(at);
        *last = (*last).max(at);
    }

    /// An earlier confirmation of the same term, no older than the grant being renewed, to
    /// answer a renewal with (as one keep-alive shared by every election on a lease does),
    /// sometimes.
    fn shared_confirmation(&self, candidate: &Candidate, grant: &Grant) -> Option<Grant> {
        if !self.world.shared_confirmations {
            return None;
        }
        let at = *lock(&self.confirmations).get(&(candidate.id.clone(), grant.fencing_token))?;
        if at < grant.confirmed_at || !self.world.draw(|rng| rng.random_bool(0.3)) {
            return None;
        }
        self.world.count(|r| r.shared_confirmations += 1);
        Some(Grant::new(grant.fencing_token, at, candidate.ttl))
    }
}

#[async_trait]
impl Driver for SimDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        let mut changes = self.world.changes.subscribe();
        loop {
            changes.borrow_and_update();
            let sent_at = Instant::now();
            let id = candidate.id.clone();
            let lease = self.lease(candidate);
            let world = Arc::clone(&self.world);
            let name = candidate.election.clone();
            let acquired = self
                .request_within(
                    CAMPAIGN_TIMEOUT,
                    format!("acquire {} in {name}", short(&candidate.id)),
                    move |store, now| {
                        if let Some(holder) = store.live(&name, now)
                            && holder.id != id
                        {
                            return (Err(holder.expires_at), false);
                        }
                        store.fence += 1;
                        let token = store.fence;
                        // The exact instant an overlap could begin: nobody else may still
                        // believe it leads when the store hands the election over.
                        lock(&world.checker).granted(&id, &name, token);
                        store.election(&name).holder = Some(Holder {
                            id,
                            token,
                            expires_at: now + lease,
                        });
                        (Ok(token), true)
                    },
                )
                .await?;
            match acquired {
                Ok(token) => {
                    self.confirmed(&candidate.id, token, sent_at);
                    return Ok(Grant::new(token, sent_at, candidate.ttl));
                }
                Err(expires_at) => {
                    let expires_at = self.world.client_at(expires_at);
                    tokio::select! {
                        biased;
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return Err(unreachable_store());
                            }
                        }
                        () = sleep_until(expires_at) => {}
                    }
                }
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        if let Some(shared) = self.shared_confirmation(candidate, grant) {
            return Ok(shared);
        }
        let sent_at = Instant::now();
        let id = candidate.id.clone();
        let token = grant.fencing_token;
        let lease = self.lease(candidate);
        let name = candidate.election.clone();
        let renewed = self
            .request(
                format!("renew {} {token}", short(&candidate.id)),
                move |store, now| match store.live(&name, now) {
                    Some(holder) if holder.id == id && holder.token == token => {
                        holder.expires_at = now + lease;
                        (true, false)
                    }
                    _ => (false, false),
                },
            )
            .await?;
        if renewed {
            self.confirmed(&candidate.id, token, sent_at);
            Ok(Grant::new(token, sent_at, candidate.ttl))
        } else {
            Err(Error::TermGone)
        }
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        // Deletes only by exact token: a request may land late, after this candidate's
        // next term began, and must not delete that one. Without a token, read it first.
        let token = match fencing_token {
            Some(token) => token,
            None => {
                let id = candidate.id.clone();
                let name = candidate.election.clone();
                let label = format!("read own {}", short(&candidate.id));
                let held = self
                    .request(label, move |store, _now| {
                        let token = store
                            .election(&name)
                            .holder
                            .as_ref()
                            .filter(|h| h.id == id)
                            .map(|h| h.token);
                        (token, false)
                    })
                    .await?;
                match held {
                    Some(token) => token,
                    None => return Ok(()),
                }
            }
        };
        let id = candidate.id.clone();
        let name = candidate.election.clone();
        let label = format!("resign {} {token}", short(&candidate.id));
        self.request(label, move |store, _now| {
            let election = store.election(&name);
            let ours = election
                .holder
                .as_ref()
                .is_some_and(|h| h.id == id && h.token == token);
            if ours {
                election.holder = None;
            }
            ((), ours)
        })
        .await
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        let name = election.to_owned();
        self.request("leader".to_owned(), move |store, now| {
            let info = store
                .live(&name, now)
                .map(|h| LeaderInfo::new(h.id.clone(), h.id.clone(), h.token));
            (info, false)
        })
        .await
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let driver = self.clone();
        let election = election.to_owned();
        futures::stream::once(async move { driver.leader(&election).await }).boxed()
    }

    /// The store pushes the end of a term (its lease expired, or it was deleted), after
    /// a delay of its own, as etcd's watch does.
    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        let world = Arc::clone(&self.world);
        let id = candidate.id.clone();
        let name = candidate.election.clone();
        let delay = world.draw(|rng| Duration::from_millis(rng.random_range(0..=50)));
        Box::pin(async move {
            let mut changes = world.changes.subscribe();
            loop {
                changes.borrow_and_update();
                let expires_at = {
                    let now = world.store_now();
                    match lock(&world.store).live(&name, now) {
                        Some(h) if h.id == id && h.token == fencing_token => Some(h.expires_at),
                        _ => None,
                    }
                };
                let Some(expires_at) = expires_at else {
                    break;
                };
                let expires_at = world.client_at(expires_at);
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = sleep_until(expires_at) => {}
                }
            }
            sleep(delay).await;
            world.trace(|| format!("pushed: term {fencing_token} of {} is gone", short(&id)));
        })
    }
}
