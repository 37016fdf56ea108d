//! The network between the simulated processes and the simulated store, the store's clock,
//! and the run's seeded generator: what every store model sends its requests through.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep, timeout};

use super::checker::Checker;
use super::{LATE_CAP, LATE_SPREAD, MAX_LATE, Report};

/// More requests than this at one instant of the paused clock: a retry loop that never
/// waits (DESIGN.md forbids hot retry loops), which would hang the run.
const HOT_LOOP: u64 = 10_000;

/// Locks `mutex`, whatever a panicking holder left (the checker reports panics itself).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which simulated process (one driver and its connections) a request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub usize);

/// Why a simulated request failed.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Refused or failed without effect (connection refused, reset before sending).
    Unreachable,
    /// No answer within the caller's limit; the effect may have landed, or land later.
    Timeout(Duration),
}

impl Fault {
    /// As the error a driver returns: [`Error::Store`](leader_core::Error::Store) or
    /// [`Error::Timeout`](leader_core::Error::Timeout).
    pub fn into_error(self) -> leader_core::Error {
        match self {
            Fault::Unreachable => leader_core::Error::store(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "simulated store unreachable",
            )),
            Fault::Timeout(limit) => leader_core::Error::Timeout(limit),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Unreachable => f.write_str("simulated store unreachable"),
            Fault::Timeout(limit) => write!(f, "no answer within {limit:?}"),
        }
    }
}

impl std::error::Error for Fault {}

/// How a partitioned client's requests fail.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Partition {
    /// At once.
    Refuse,
    /// After the caller's limit, without effect.
    Hang,
}

/// The store's clock against the candidates' (Tokio's paused clock).
struct StoreClock {
    epoch: Option<Instant>,
    /// How fast it runs against the candidates' clock.
    rate: f64,
    /// How long the candidates' machine was suspended: the store's clock ran on meanwhile.
    skew: Duration,
}

/// Requests held back by [`Net::hold`].
struct HoldRule {
    client: ClientId,
    label: String,
    released: watch::Receiver<bool>,
}

/// Requests held back by [`Net::hold`]: they land when this is released or dropped.
pub struct Held {
    release: watch::Sender<bool>,
}

impl Held {
    /// Lets the held requests land now, and no longer holds new ones.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release.send_replace(true);
    }
}

/// One run's network, clocks, generator and checker. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    inner: Arc<Inner>,
}

struct Inner {
    rng: Mutex<StdRng>,
    /// Faults happen while this is true.
    chaos: Mutex<bool>,
    outage: Mutex<bool>,
    partitions: Mutex<BTreeMap<ClientId, Partition>>,
    links: Mutex<BTreeMap<ClientId, watch::Sender<u64>>>,
    /// When the last message pushed to each client arrives: pushes stay in order.
    pushed: Mutex<BTreeMap<ClientId, Instant>>,
    /// Requests held back by scripted scenarios ([`Net::hold`]).
    holds: Mutex<Vec<HoldRule>>,
    /// The instant of the last request and how many were sent at it.
    instant_requests: Mutex<(Option<Instant>, u64)>,
    store_clock: Mutex<StoreClock>,
    checker: Mutex<Checker>,
    report: Mutex<Report>,
    tracing: bool,
}

impl Net {
    /// A network for the run of `seed`, with faults on (the chaos phase).
    pub(crate) fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // Up to 1.5% apart: within the default safety margin (2% of the TTL).
        let rate = 1.0 + rng.random_range(-0.015..=0.015);
        Net {
            inner: Arc::new(Inner {
                rng: Mutex::new(rng),
                chaos: Mutex::new(true),
                outage: Mutex::new(false),
                partitions: Mutex::new(BTreeMap::new()),
                links: Mutex::new(BTreeMap::new()),
                pushed: Mutex::new(BTreeMap::new()),
                holds: Mutex::new(Vec::new()),
                instant_requests: Mutex::new((None, 0)),
                store_clock: Mutex::new(StoreClock {
                    epoch: None,
                    rate,
                    skew: Duration::ZERO,
                }),
                checker: Mutex::new(Checker::default()),
                report: Mutex::new(Report::default()),
                tracing: std::env::var_os("SIM_TRACE").is_some(),
            }),
        }
    }

    /// A network without faults, for differential tests that compare a model with its
    /// real store: every request lands at once and is answered at once, the store's clock
    /// is the candidates'. Works on any Tokio runtime (paused or not).
    pub fn quiet() -> Self {
        let net = Net::new(0);
        *lock(&net.inner.chaos) = false;
        lock(&net.inner.store_clock).rate = 1.0;
        // The trace's times count from here.
        lock(&net.inner.checker).start = Some(Instant::now());
        net
    }

    /// Sends one request from `client`. `effect` runs against the store at the instant the
    /// request lands: after a delay, maybe after the caller gave up (it runs in a task of
    /// its own, so dropping the returned future does not stop it). Its value comes back
    /// after another delay, sometimes later than the safety margin, or never: the caller
    /// waits `limit`, then gets [`Fault::Timeout`]. A partitioned or unreachable client
    /// gets [`Fault::Unreachable`] at once, or [`Fault::Timeout`] after `limit`, without
    /// effect. Faults happen only in the chaos phase.
    ///
    /// # Errors
    ///
    /// [`Fault`], as above.
    pub async fn call<T: Send + fmt::Debug + 'static>(
        &self,
        client: ClientId,
        limit: Duration,
        label: impl Into<String>,
        effect: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Fault> {
        self.count(|r| r.requests += 1);
        if self.hot_loop(client) {
            sleep(limit).await;
            return Err(Fault::Timeout(limit));
        }
        if *lock(&self.inner.outage) {
            return Err(Fault::Unreachable);
        }
        let partition = lock(&self.inner.partitions).get(&client).copied();
        match partition {
            Some(Partition::Refuse) => return Err(Fault::Unreachable),
            Some(Partition::Hang) => {
                sleep(limit).await;
                return Err(Fault::Timeout(limit));
            }
            None => {}
        }
        let chaos = self.chaos();
        let (fail, effect_after, answer_after) = self.draw(|rng| {
            let fail = chaos && rng.random_bool(0.04);
            let late = chaos && rng.random_bool(0.04);
            let lost = chaos && rng.random_bool(0.04);
            // A late effect lands after the caller gave up (its own limit, or up to
            // LATE_CAP for callers that wait longer), as a request stuck in a queue does.
            let effect_after = if late {
                limit.min(LATE_CAP)
                    + Duration::from_millis(rng.random_range(0..=LATE_SPREAD.as_millis() as u64))
            } else if chaos {
                Duration::from_millis(rng.random_range(0..=20))
            } else {
                Duration::ZERO
            };
            // Most answers come at once; some later than the safety margin, up to the
            // caller's limit (several TTLs for a campaign), as real networks do.
            let answer_after = (!lost).then(|| {
                if chaos && rng.random_bool(0.2) {
                    Duration::from_millis(rng.random_range(20..=limit.as_millis().max(20) as u64))
                } else if chaos {
                    Duration::from_millis(rng.random_range(0..=20))
                } else {
                    Duration::ZERO
                }
            });
            (fail, effect_after, answer_after)
        });
        if fail {
            self.count(|r| r.failures += 1);
            sleep(effect_after.min(limit)).await;
            return Err(Fault::Unreachable);
        }
        if effect_after + answer_after.unwrap_or(MAX_LATE) >= limit {
            self.count(|r| {
                if effect_after >= limit {
                    r.late_effects += 1;
                } else {
                    r.lost_answers += 1;
                }
            });
        }
        let label = label.into();
        let gate = self.gate(client, &label);
        let (tx, rx) = oneshot::channel();
        let net = self.clone();
        tokio::spawn(async move {
            if !effect_after.is_zero() {
                sleep(effect_after).await;
            }
            if let Some(mut gate) = gate {
                // Held back by a scripted scenario: lands once released, however late.
                let _ = gate.wait_for(|released| *released).await;
            }
            let out = effect();
            net.trace(|| {
                format!(
                    "c{}: {label} -> {out:?} (answer {answer_after:?})",
                    client.0
                )
            });
            match answer_after {
                Some(after) => {
                    if !after.is_zero() {
                        sleep(after).await;
                    }
                    let _ = tx.send(out);
                }
                // The answer is lost: the caller times out.
                None => drop(tx),
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
            .map_err(|_| Fault::Timeout(limit))
    }

    /// Holds back the effect of every request that `client` sends from now on whose label
    /// starts with `label` (as the models name them: `keep-alive`, say) until the returned
    /// [`Held`] is released or dropped: requests stuck on their way, for scripted scenarios
    /// that need them to land at a chosen moment. The caller still gives up after its
    /// limit; the effects land anyway once released, all at that instant, in no set
    /// order. Each answer then comes as [`Net::call`] draws it: at once on a quiet
    /// network.
    #[must_use = "the requests are released when the handle is dropped"]
    pub fn hold(&self, client: ClientId, label: impl Into<String>) -> Held {
        let (release, released) = watch::channel(false);
        lock(&self.inner.holds).push(HoldRule {
            client,
            label: label.into(),
            released,
        });
        Held { release }
    }

    /// The gate of a request of `client` labelled `label`, if a [`Net::hold`] holds it.
    fn gate(&self, client: ClientId, label: &str) -> Option<watch::Receiver<bool>> {
        let mut holds = lock(&self.inner.holds);
        holds.retain(|rule| !*rule.released.borrow());
        holds
            .iter()
            .find(|rule| rule.client == client && label.starts_with(&rule.label))
            .map(|rule| rule.released.clone())
    }

    /// Whether `client` reaches the store now (no partition, no outage).
    pub fn reachable(&self, client: ClientId) -> bool {
        !*lock(&self.inner.outage) && !lock(&self.inner.partitions).contains_key(&client)
    }

    /// A counter that grows each time `client`'s connections drop (a partition, an outage,
    /// a store restart): a model ends that client's subscriptions, watches and LISTENs when
    /// it changes, as the real stores do.
    pub fn link(&self, client: ClientId) -> watch::Receiver<u64> {
        lock(&self.inner.links)
            .entry(client)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// The delay before a message the store pushes (a watch event, a pub/sub message, a
    /// NOTIFY) reaches `client`, or `None` when it is lost (the client is cut off now).
    /// Messages to one client arrive in the order they were pushed: each delay ends no
    /// earlier than the one before it.
    pub fn push_delay(&self, client: ClientId) -> Option<Duration> {
        if !self.reachable(client) {
            return None;
        }
        let chaos = self.chaos();
        let delay = self.draw(|rng| {
            if chaos {
                Duration::from_millis(rng.random_range(0..=50))
            } else {
                Duration::ZERO
            }
        });
        let now = Instant::now();
        let mut pushed = lock(&self.inner.pushed);
        let last = pushed.entry(client).or_insert(now);
        let at = (now + delay).max(*last);
        *last = at;
        Some(at - now)
    }

    /// Counts a request at this instant; true (and a violation, once) when a client sends
    /// more than [`HOT_LOOP`] at one instant.
    fn hot_loop(&self, client: ClientId) -> bool {
        let now = Instant::now();
        let mut seen = lock(&self.inner.instant_requests);
        if seen.0 == Some(now) {
            seen.1 += 1;
        } else {
            *seen = (Some(now), 1);
        }
        let count = seen.1;
        drop(seen);
        if count == HOT_LOOP {
            self.violation(format!(
                "{HOT_LOOP} requests at one instant (the last from c{}): a retry loop that \
                 never waits",
                client.0
            ));
        }
        count >= HOT_LOOP
    }

    /// The store's clock now: it runs up to 1.5% faster or slower than the candidates', and
    /// on while their machine is suspended. Every expiry a model keeps runs on it.
    pub fn store_now(&self) -> Instant {
        let clock = lock(&self.inner.store_clock);
        let now = Instant::now();
        let Some(epoch) = clock.epoch else {
            return now;
        };
        epoch + now.duration_since(epoch).mul_f64(clock.rate) + clock.skew
    }

    /// The candidates' (Tokio) instant at which the store's clock reads `at` (or now, if
    /// it has).
    pub fn client_at(&self, at: Instant) -> Instant {
        let clock = lock(&self.inner.store_clock);
        let Some(epoch) = clock.epoch else {
            return at;
        };
        let store_elapsed = at.saturating_duration_since(epoch);
        epoch + store_elapsed.saturating_sub(clock.skew).div_f64(clock.rate)
    }

    /// A draw from the run's seeded generator: the only randomness a model may use.
    pub fn draw<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut lock(&self.inner.rng))
    }

    /// True in the chaos phase: models tamper and inject faults of their own only then.
    pub fn chaos(&self) -> bool {
        *lock(&self.inner.chaos)
    }

    /// A line of the schedule, printed when `SIM_TRACE` is set (to replay one seed).
    pub fn trace(&self, line: impl FnOnce() -> String) {
        if self.inner.tracing {
            let at = lock(&self.inner.checker).elapsed();
            println!("[{:>9.3}s] {}", at.as_secs_f64(), line());
        }
    }

    /// The store hands term `token` of `election` to candidate `id` now: an exact check
    /// that nobody else of that election still believes it leads.
    pub fn granted(&self, id: &str, election: &str, token: u64) {
        lock(&self.inner.checker).granted(id, election, token);
    }

    /// An operator's change (in [`Model::tamper`](super::Model::tamper)) ends or edits
    /// term `token` of `election`, which the store had granted to candidate `holder`: its
    /// leader cannot know at once, so an overlap with a term of `holder` there is excused
    /// for a while (2 x TTL). Call it before
    /// reporting the grants the change makes. Only the terms reported here are excused:
    /// a record deleted while its candidate still waited excuses nothing. `ends`: the
    /// change ends the term in the store (its renewals must fail from now on), so its
    /// leader must not lead past that while (a driver that renews it anyway fails).
    pub fn tampered(&self, election: &str, token: u64, holder: &str, ends: bool) {
        let until = Instant::now() + super::EXCUSED;
        lock(&self.inner.checker).tampered(election, token, holder, until, ends);
        self.trace(|| format!("term {token} of {election} tampered with (ended: {ends})"));
    }

    // What the harness itself does with the network.

    pub(crate) fn start(&self) {
        let now = Instant::now();
        lock(&self.inner.checker).start = Some(now);
        lock(&self.inner.store_clock).epoch = Some(now);
    }

    pub(crate) fn checker(&self) -> MutexGuard<'_, Checker> {
        lock(&self.inner.checker)
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut Report)) {
        f(&mut lock(&self.inner.report));
    }

    /// Counts one model-specific event (the report's `model events`): for a model to
    /// show how often its rare behaviour ran.
    pub fn model_event(&self) {
        self.count(|r| r.model_events += 1);
    }

    pub(crate) fn report(&self) -> Report {
        *lock(&self.inner.report)
    }

    /// Records a violation: the seed fails with `what`. For a model that meets what
    /// cannot happen (a script of the driver that fails in the model, say).
    pub fn violation(&self, what: String) {
        self.checker().violation(what);
    }

    /// Faults stop.
    pub(crate) fn calm(&self) {
        *lock(&self.inner.chaos) = false;
        *lock(&self.inner.outage) = false;
        lock(&self.inner.partitions).clear();
    }

    /// The candidates' machine sleeps for `duration`: their monotonic clock (Tokio's)
    /// stands still, the store's runs on, and the boot clock they read counts it.
    pub(crate) fn suspend(&self, duration: Duration) {
        lock(&self.inner.store_clock).skew += duration;
        leader_core::testing::simulate_suspension(duration);
        self.trace(|| format!("the candidates' machine was suspended for {duration:?}"));
    }

    /// The store goes away (or comes back): every client's connections drop, both times
    /// (a subscription whose request landed while the store was away is dropped too).
    pub(crate) fn set_outage(&self, down: bool) {
        *lock(&self.inner.outage) = down;
        for link in lock(&self.inner.links).values() {
            link.send_modify(|n| *n += 1);
        }
    }

    /// Partitions `client` (or heals it): its connections drop, both times.
    pub(crate) fn set_partition(&self, client: ClientId, partition: Option<Partition>) {
        match partition {
            Some(partition) => {
                lock(&self.inner.partitions).insert(client, partition);
            }
            None => {
                lock(&self.inner.partitions).remove(&client);
            }
        }
        if let Some(link) = lock(&self.inner.links).get(&client) {
            link.send_modify(|n| *n += 1);
        }
    }
}
