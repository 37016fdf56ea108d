//! One simulated run: the candidates' behaviour, the faults, and the end-of-run checks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use leader_core::{Election, Event, LossReason, Term};
use rand::Rng;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::net::{ClientId, Net, Partition, lock};
use super::{CHAOS, EXCUSED, LIVENESS, MAX_LATE, Model, Report, TTL, Violation};

/// The names of the simulated elections: each a prefix of the next, so that a driver that
/// finds an election's keys by prefix without a delimiter mixes two of them up.
const ELECTIONS: [&str; 3] = ["sim", "sim-1", "sim-10"];

/// The election of candidate slot `slot` when a run has `elections` of them.
fn election_of(slot: usize, elections: usize) -> String {
    ELECTIONS[slot % elections].to_owned()
}

/// How many times each election is handed over once faults stopped.
const HANDOFFS: usize = 3;

/// A candidate's `run()` after faults stopped, which `stop` ends (it resigns).
struct Run {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<leader_core::Result<()>>,
}

impl Run {
    fn start(election: Election, parent: &CancellationToken) -> Run {
        let stop = parent.child_token();
        let ends = stop.clone();
        let handle = tokio::spawn(async move { election.run(ends.cancelled_owned()).await });
        Run { stop, handle }
    }

    /// Ends the run (if `stop` was not cancelled yet) and waits for it.
    async fn finish(self) -> Result<(), String> {
        self.stop.cancel();
        match self.handle.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("run() failed at shutdown: {err}")),
            Err(err) => Err(format!("a run panicked: {err}")),
        }
    }
}

/// The event-checking tasks of every election made.
type Instances = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// Runs seed `seed` on a model made by `make`; `package` is named in a violation.
pub(crate) fn run<M: Model>(
    seed: u64,
    package: &str,
    make: impl FnOnce(&Net) -> M,
) -> Result<Report, Violation> {
    leader_core::testing::seed_jitter(Some(seed));
    let net = Net::new(seed);
    let sampler = net.clone();
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder
        .enable_time()
        .start_paused(true)
        .on_thread_park(move || sampler.checker().sample(true));
    // Unbiased select! and watch channels draw from the runtime's generator: seeded, a
    // schedule replays exactly (the workspace's .cargo/config.toml sets tokio_unstable).
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let runtime = builder.build();
    let outcome = match runtime {
        Ok(runtime) => {
            let result = runtime.block_on(async {
                // The model is made inside the runtime: it may spawn tasks.
                let world = Arc::new(World::new(net.clone(), make(&net)));
                let result = Arc::clone(&world).simulate().await;
                // A last look, as at a park: no suspect of `Checker::sample` goes unreported.
                net.checker().sample(true);
                if let Err(what) = &result {
                    net.violation(what.clone());
                }
                result
            });
            drop(runtime);
            result
        }
        Err(err) => Err(format!("cannot build a runtime: {err}")),
    };
    leader_core::testing::seed_jitter(None);
    let checker = net.checker();
    let violation = |at, what| Violation {
        seed,
        at,
        what,
        package: package.to_owned(),
    };
    if let Some((at, what)) = checker.violations.first() {
        return Err(violation(*at, what.clone()));
    }
    if let Err(what) = outcome {
        return Err(violation(checker.elapsed(), what));
    }
    let mut report = net.report();
    report.terms = checker.elected.len() as u64;
    Ok(report)
}

/// Everything one run shares: the network, the model, the candidates.
struct World<M: Model> {
    net: Net,
    model: M,
    /// Each slot's current election.
    current: Mutex<Vec<Option<Election>>>,
    /// The client (driver) of each slot's current election.
    clients: Mutex<Vec<ClientId>>,
    /// How many elections the candidates run for (slot `i` in election `i % elections`),
    /// so that drivers hold several at once.
    elections: usize,
}

impl<M: Model> World<M> {
    fn new(net: Net, model: M) -> Self {
        // Up to three elections, some on one driver: a driver batches their renewals.
        let elections = net.draw(|rng| rng.random_range(1..=ELECTIONS.len()));
        net.checker().exact_grants = model.exact_grants();
        World {
            net,
            model,
            current: Mutex::new(Vec::new()),
            clients: Mutex::new(Vec::new()),
            elections,
        }
    }

    fn draw<T>(&self, f: impl FnOnce(&mut rand::rngs::StdRng) -> T) -> T {
        self.net.draw(f)
    }

    async fn simulate(self: Arc<Self>) -> Result<(), String> {
        self.net.start();
        // Each election gets two slots at least: slot 0 stays passive at the end.
        let slots = self.draw(|rng| rng.random_range(2 * self.elections..=6usize));
        let clients = self.draw(|rng| rng.random_range(1..=slots));
        let drivers: Vec<(ClientId, M::Driver)> = (0..clients)
            .map(|i| (ClientId(i), self.model.driver(&self.net, ClientId(i))))
            .collect();
        *lock(&self.current) = vec![None; slots];
        *lock(&self.clients) = vec![ClientId(0); slots];
        let instances = Arc::new(Mutex::new(Vec::new()));
        let mut actors = JoinSet::new();
        for slot in 0..slots {
            let (client, driver) = drivers[slot % drivers.len()].clone();
            let election = self.candidate(slot, client, &driver, &instances);
            actors.spawn(Arc::clone(&self).act(
                slot,
                election,
                drivers.iter().map(|(_, d)| d.clone()).collect(),
                Arc::clone(&instances),
            ));
        }
        let ids: Vec<ClientId> = drivers.iter().map(|(id, _)| *id).collect();
        actors.spawn(Arc::clone(&self).inject_faults(ids));

        // The chaos phase.
        sleep(CHAOS).await;
        self.net.calm();
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
        self.net.checker().quiet_at = Some(quiet);
        let stop = CancellationToken::new();
        let mut runs: Vec<Option<Run>> = (0..elections.len()).map(|_| None).collect();
        for (slot, election) in elections.iter_mut().enumerate().skip(1) {
            let (client, driver) = drivers[slot % drivers.len()].clone();
            let election = election
                .get_or_insert_with(|| self.candidate(slot, client, &driver, &instances))
                .clone();
            runs[slot] = Some(Run::start(election, &stop));
        }

        // Liveness: in each election, a leader once faults stopped, late effects landed
        // and the longest orphan expired.
        let orphan = self.model.orphan_bound(TTL);
        let due = quiet + MAX_LATE + orphan + LIVENESS;
        let names: Vec<String> = (0..self.elections)
            .map(|i| election_of(i, self.elections))
            .collect();
        sleep_until(due).await;
        for name in &names {
            if !self.net.checker().leaders_after_quiet.contains(name) {
                return Err(format!(
                    "no leader in {name} {:?} after faults stopped",
                    due - quiet
                ));
            }
        }

        self.handoffs(&elections, &mut runs, &stop).await?;
        self.handovers(&elections).await?;
        self.takeovers(&elections).await?;
        self.notices(&elections).await?;

        // Shut down: every run resigns, every election is dropped, every stream ends.
        stop.cancel();
        for run in runs.into_iter().flatten() {
            run.finish().await?;
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
        // Every candidate closed (its event stream ended with its core) on a calm store:
        // each withdrew its own term, none is left to expire.
        if let Some(terms) = self.model.terms_left(&self.net)
            && !terms.is_empty()
        {
            return Err(format!(
                "every election was dropped and closed with faults stopped, yet the {} store \
                 still holds terms: {}",
                self.model.name(),
                terms.join(", ")
            ));
        }
        // Every late effect landed long ago and faults stopped: nothing of a dropped
        // election outlives it by more than 2 x TTL (the documented bound; bookkeeping a
        // driver leaves to expire, such as Redis's line, must expire by then).
        sleep(2 * TTL).await;
        let left = self.model.leftovers(&self.net);
        if !left.is_empty() {
            return Err(format!(
                "every election was dropped, yet the {} store still holds: {}",
                self.model.name(),
                left.join(", ")
            ));
        }
        drop(drivers);
        Ok(())
    }

    /// With faults stopped: in each election, the leader resigns (its `run()` ends) while
    /// the others wait in line, and another candidate must be elected within the model's
    /// [`handoff_bound`](Model::handoff_bound); then the old leader runs again. A wakeup
    /// that is lost or late (a waiter left to find out at its next refresh) fails here,
    /// where the liveness bound would let it pass.
    async fn handoffs(
        &self,
        elections: &[Option<Election>],
        runs: &mut [Option<Run>],
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let Some(bound) = self.model.handoff_bound(TTL) else {
            return Ok(());
        };
        for round in 0..HANDOFFS {
            // The candidates that ran again (and the others) stand in line by then.
            sleep(TTL).await;
            for name in (0..self.elections).map(|i| election_of(i, self.elections)) {
                let ours: Vec<usize> = (0..elections.len())
                    .filter(|&slot| election_of(slot, self.elections) == name)
                    .collect();
                let leading = |slot: &usize| {
                    elections[*slot]
                        .as_ref()
                        .is_some_and(|e| e.status().is_leader())
                };
                // Slot 0 is passive: a term it holds is not handed over.
                let Some(leader) = ours.iter().copied().filter(|&s| s > 0).find(leading) else {
                    continue;
                };
                let waiting: Vec<usize> = ours
                    .iter()
                    .copied()
                    .filter(|&s| s > 0 && s != leader)
                    .collect();
                if waiting.is_empty() {
                    continue;
                }
                let Some(run) = runs[leader].take() else {
                    continue;
                };
                // In the second round, one waiter (maybe the head, maybe woken already)
                // leaves at the same instant: a wakeup it got must pass on to the next.
                let leaves = (round == 1 && waiting.len() >= 2)
                    .then(|| waiting[self.draw(|rng| rng.random_range(0..waiting.len()))]);
                let mut elected = futures::stream::select_all(
                    ours.iter()
                        .filter(|&&s| s != leader && Some(s) != leaves)
                        .filter_map(|&s| elections[s].as_ref())
                        .map(Election::subscribe),
                )
                .filter(|event| std::future::ready(matches!(event, Event::Elected { .. })));
                let started = Instant::now();
                self.net
                    .trace(|| format!("handoff: slot {leader} of {name} resigns"));
                run.stop.cancel();
                let left = leaves.and_then(|s| runs[s].take().map(|run| (s, run)));
                if let Some((slot, run)) = &left {
                    self.net
                        .trace(|| format!("handoff: slot {slot} of {name} leaves the line"));
                    run.stop.cancel();
                }
                let next = timeout(bound, elected.next()).await;
                let took = started.elapsed();
                run.finish().await?;
                if let Some((slot, run)) = left {
                    run.finish().await?;
                    if let Some(election) = &elections[slot] {
                        runs[slot] = Some(Run::start(election.clone(), stop));
                    }
                }
                match next {
                    Ok(Some(_)) => self.net.count(|r| {
                        r.handoffs += 1;
                        r.slowest_handoff = r.slowest_handoff.max(took);
                    }),
                    _ => {
                        return Err(format!(
                            "faults stopped, slot {leader} resigned {name} (slot {leaves:?} left \
                             the line at once), and none of slots {waiting:?} waiting was \
                             elected within {bound:?} (the model's handoff bound): a lost or \
                             late wakeup"
                        ));
                    }
                }
                if let Some(election) = &elections[leader] {
                    runs[leader] = Some(Run::start(election.clone(), stop));
                }
            }
        }
        Ok(())
    }

    /// With faults stopped: in each election, `leader()` and `candidates()` name the
    /// leader (by its token; the leader first in the line), then the leader hands its term
    /// over to a waiting candidate drawn at random (the head of the line or any other)
    /// while it campaigns again at once, and the nominee must be the next candidate
    /// elected, within the model's [`handoff_bound`](Model::handoff_bound) (the driver
    /// wakes the nominee: `Driver::hand_over`). A nominee that misses its wakeup, or a
    /// store that refuses a nominee it lists, fails here on whatever the chaos left in the
    /// store. DESIGN.md's stronger promise, that nobody else can be elected for a TTL, is
    /// checked only as far as the old leader's campaign races the nominee: on a calm
    /// network the woken nominee usually lands first (the scripted scenarios hold the
    /// nominee back to check it).
    async fn handovers(&self, elections: &[Option<Election>]) -> Result<(), String> {
        let Some(bound) = self.model.handoff_bound(TTL) else {
            return Ok(());
        };
        // The candidates that ran again after the handoffs stand in line by then.
        sleep(TTL).await;
        for name in (0..self.elections).map(|i| election_of(i, self.elections)) {
            let ours: Vec<usize> = (0..elections.len())
                .filter(|&slot| election_of(slot, self.elections) == name)
                .collect();
            let election = |slot: usize| elections[slot].as_ref();
            // Slot 0 is passive: a term it holds is not handed over.
            let Some(leader) = ours
                .iter()
                .copied()
                .filter(|&s| s > 0)
                .find(|&s| election(s).is_some_and(|e| e.status().is_leader()))
            else {
                continue;
            };
            let waiting: Vec<usize> = ours
                .iter()
                .copied()
                .filter(|&s| s > 0 && s != leader && election(s).is_some())
                .collect();
            if waiting.is_empty() {
                continue;
            }
            let nominee = waiting[self.draw(|rng| rng.random_range(0..waiting.len()))];
            let (Some(from), Some(to)) = (election(leader), election(nominee)) else {
                continue;
            };
            // The read paths first, on a calm store, after a proclamation: who leads (this
            // term, by its token, with the value just proclaimed; `LeaderInfo::id` is the
            // store's identifier, on etcd the lease), and the line (this leader first; the
            // nominee in it, once the handover finds it waiting).
            let token = from.status().fencing_token();
            let value = format!("handing-over-{leader}");
            let Some(term) = from.term() else {
                continue;
            };
            // A driver without proclamations (the toy store) keeps the value it
            // campaigned with: only the token is compared then.
            let proclaimed = match timeout(bound, term.proclaim(value.clone())).await {
                Ok(Ok(())) => Some(value.into_bytes()),
                Ok(Err(leader_core::Error::Unsupported { .. })) => None,
                other => {
                    return Err(format!(
                        "faults stopped and slot {leader} leads {name}, but its proclamation \
                         answered {other:?}"
                    ));
                }
            };
            let valued = |v: &[u8]| proclaimed.as_ref().is_none_or(|p| p.as_slice() == v);
            let read = timeout(bound, from.leader()).await;
            if !matches!(&read, Ok(Ok(Some(info)))
                if Some(info.fencing_token) == token && valued(&info.value))
            {
                return Err(format!(
                    "faults stopped and slot {leader} leads {name} (token {token:?}, value \
                     {proclaimed:?} just proclaimed), but leader() answered {read:?}"
                ));
            }
            let line = match timeout(bound, from.candidates()).await {
                Ok(Ok(line)) => line,
                // A driver without the list (nor handovers, then): nothing more to check.
                Ok(Err(leader_core::Error::Unsupported { .. })) => {
                    self.net.count(|r| r.handovers_skipped += 1);
                    continue;
                }
                other => {
                    return Err(format!(
                        "faults stopped, and candidates() of {name} answered {other:?}"
                    ));
                }
            };
            if !line
                .first()
                .is_some_and(|c| c.is_leader && c.id == from.id() && valued(&c.value))
                || line.iter().skip(1).any(|c| c.is_leader)
            {
                return Err(format!(
                    "faults stopped and slot {leader} leads {name}, but candidates() listed \
                     {line:?}"
                ));
            }
            // Every candidate of the election, the old leader included (its run() stands
            // again at once): the first one elected after the handover must be the nominee.
            let mut elected = futures::stream::select_all(ours.iter().filter_map(|&s| {
                election(s).map(|e| {
                    e.subscribe()
                        .filter_map(move |event| {
                            std::future::ready(matches!(event, Event::Elected { .. }).then_some(s))
                        })
                        .boxed()
                })
            }));
            let started = Instant::now();
            self.net.trace(|| {
                format!("handover: slot {leader} of {name} hands over to slot {nominee}")
            });
            match timeout(bound, from.hand_over(to.id())).await {
                Ok(Ok(())) if !line.iter().any(|c| c.id == to.id()) => {
                    return Err(format!(
                        "slot {leader} handed {name} over to slot {nominee}, which was waiting, \
                         but candidates() just before did not list it: {line:?}"
                    ));
                }
                Ok(Ok(())) => {}
                // A store that refuses a nominee it lists as waiting: every handover would
                // be a plain resignation, and the phase would check nothing.
                Ok(Err(leader_core::Error::NotWaiting { .. }))
                    if line.iter().any(|c| c.id == to.id() && !c.is_leader) =>
                {
                    return Err(format!(
                        "faults stopped, and slot {leader}'s handover of {name} to slot \
                         {nominee} was refused as not waiting, but candidates() just before \
                         listed it: {line:?}"
                    ));
                }
                // Not in the line (yet) as the store sees it, or a driver without
                // handovers: no promise to check.
                Ok(Err(
                    leader_core::Error::NotWaiting { .. } | leader_core::Error::Unsupported { .. },
                )) => {
                    self.net.count(|r| r.handovers_skipped += 1);
                    continue;
                }
                Ok(Err(err)) => {
                    return Err(format!(
                        "faults stopped, and slot {leader}'s handover of {name} to slot \
                         {nominee} failed: {err}"
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "faults stopped, and slot {leader}'s handover of {name} to slot \
                         {nominee} took longer than {bound:?}"
                    ));
                }
            }
            // The old leader stands again at once (its run() waits a backoff first),
            // racing the nominee's wakeup: a store that let anyone but the nominee take
            // the term would elect it. Dropped once someone is elected (a withdrawal).
            let rival = async {
                if let Err(err) = from.campaign().await {
                    self.net
                        .trace(|| format!("handover: slot {leader}'s campaign failed: {err}"));
                }
                std::future::pending::<()>().await;
            };
            let first = async {
                tokio::select! {
                    slot = elected.next() => slot,
                    () = rival => None,
                }
            };
            let left = bound.saturating_sub(started.elapsed());
            match timeout(left, first).await {
                Ok(Some(slot)) if slot == nominee => {
                    let took = started.elapsed();
                    self.net.count(|r| {
                        r.handovers += 1;
                        r.slowest_handoff = r.slowest_handoff.max(took);
                    });
                }
                Ok(Some(slot)) => {
                    let who = if slot == leader {
                        " (the old leader, campaigning again)"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "slot {leader} handed {name} over to slot {nominee}, which waited in \
                         line, but slot {slot}{who} was elected first"
                    ));
                }
                _ => {
                    let store = timeout(bound, from.leader()).await;
                    return Err(format!(
                        "slot {leader} handed {name} over to slot {nominee}, which waited in \
                         line, and none of its candidates was elected within {bound:?} (the \
                         model's handoff bound; the store now says: {store:?}): the nominee's \
                         wakeup was lost or late, or its campaign failed"
                    ));
                }
            }
        }
        Ok(())
    }

    /// With faults stopped: in each election, the leader's driver is cut off (its
    /// requests hang, as a crashed process's never come), and once its term's lease ends
    /// in the store a candidate waiting on another driver must be elected, within the
    /// model's [`takeover_bound`](Model::takeover_bound) after the old leader's own
    /// deadline. A head that waits past the lease's end for its next refresh fails here.
    async fn takeovers(&self, elections: &[Option<Election>]) -> Result<(), String> {
        let Some(bound) = self.model.takeover_bound(TTL) else {
            return Ok(());
        };
        for name in (0..self.elections).map(|i| election_of(i, self.elections)) {
            // The candidates cut off before (and the others) stand in line by then.
            sleep(TTL).await;
            let clients = lock(&self.clients).clone();
            let ours: Vec<usize> = (0..elections.len())
                .filter(|&slot| election_of(slot, self.elections) == name)
                .collect();
            let status = |slot: usize| elections[slot].as_ref().map(Election::status);
            let Some(leader) = ours
                .iter()
                .copied()
                .filter(|&s| s > 0)
                .find(|&s| status(s).is_some_and(|st| st.is_leader()))
            else {
                continue;
            };
            let Some(deadline) = status(leader).and_then(|st| st.deadline()) else {
                continue;
            };
            let deadline = Instant::from_std(deadline);
            let cut = clients[leader];
            // Every other runner waits on another driver (a waiter cut off with the leader
            // could head the line, and the next would wait for its own driver's refresh).
            let waiting: Vec<usize> = ours
                .iter()
                .copied()
                .filter(|&s| s > 0 && s != leader)
                .collect();
            if waiting.is_empty() || waiting.iter().any(|&s| clients[s] == cut) {
                continue;
            }
            let mut elected = futures::stream::select_all(
                waiting
                    .iter()
                    .filter_map(|&s| elections[s].as_ref())
                    .map(Election::subscribe),
            )
            .filter(|event| std::future::ready(matches!(event, Event::Elected { .. })));
            self.net.trace(|| {
                format!(
                    "takeover: c{} (slot {leader}, leading {name}) is cut off",
                    cut.0
                )
            });
            self.net.set_partition(cut, Some(Partition::Hang));
            let next = tokio::time::timeout_at(deadline + bound, elected.next()).await;
            let took = Instant::now().saturating_duration_since(deadline);
            self.net.set_partition(cut, None);
            match next {
                Ok(Some(_)) => self.net.count(|r| {
                    r.takeovers += 1;
                    r.slowest_takeover = r.slowest_takeover.max(took);
                }),
                _ => {
                    return Err(format!(
                        "faults stopped, c{} leading {name} (slot {leader}) was cut off, and \
                         none of slots {waiting:?} waiting on other drivers was elected within \
                         {bound:?} of its deadline (the model's takeover bound): a head that \
                         missed the lease's end",
                        cut.0
                    ));
                }
            }
        }
        Ok(())
    }

    /// With faults stopped: in each election, an operator ends the leader's term in the
    /// store ([`Model::end_term`]), and the leader must step down within the model's
    /// [`notice_bound`](Model::notice_bound) (the store's notice, not its next renewal).
    async fn notices(&self, elections: &[Option<Election>]) -> Result<(), String> {
        let Some(bound) = self.model.notice_bound(TTL) else {
            return Ok(());
        };
        for name in (0..self.elections).map(|i| election_of(i, self.elections)) {
            // The candidates cut off before stand in line again by then.
            sleep(TTL).await;
            let ours: Vec<usize> = (0..elections.len())
                .filter(|&slot| election_of(slot, self.elections) == name)
                .collect();
            let Some((leader, election)) = ours
                .iter()
                .filter(|&&s| s > 0)
                .filter_map(|&s| Some((s, elections[s].as_ref()?)))
                .find(|(_, e)| e.status().is_leader())
            else {
                continue;
            };
            let mut ended = election.subscribe().filter(|event| {
                std::future::ready(matches!(event, Event::Lost { .. } | Event::Resigned { .. }))
            });
            let Some(what) = self.model.end_term(&self.net, &name) else {
                continue;
            };
            self.net
                .trace(|| format!("notice: an operator ended slot {leader}'s term: {what}"));
            let started = Instant::now();
            match timeout(bound, ended.next()).await {
                Ok(Some(_)) => {
                    let took = started.elapsed();
                    self.net.count(|r| {
                        r.notices += 1;
                        r.slowest_notice = r.slowest_notice.max(took);
                    });
                }
                _ => {
                    return Err(format!(
                        "faults stopped, an operator ended the term of slot {leader} in \
                         {name} ({what}), and it still led {bound:?} later (the model's \
                         notice bound): the store's notice was lost"
                    ));
                }
            }
        }
        Ok(())
    }

    /// A new candidate in `slot` (the slot's current one), with a task that checks its
    /// events.
    fn candidate(
        self: &Arc<Self>,
        slot: usize,
        client: ClientId,
        driver: &M::Driver,
        instances: &Instances,
    ) -> Election {
        let retry_min = TTL / 10;
        let name = election_of(slot, self.elections);
        let election = Election::builder(driver.clone(), name.as_str())
            .ttl(TTL)
            .retry(retry_min, TTL)
            .build()
            .unwrap_or_else(|err| panic!("the simulation's settings are valid: {err}"));
        self.net.checker().statuses.push(super::checker::Believer {
            slot,
            id: election.id().to_owned(),
            election: name.clone(),
            status: election.status(),
        });
        lock(&self.clients)[slot] = client;
        let replaced = lock(&self.current)[slot].replace(election.clone());
        drop(replaced);
        let mut events = election.subscribe();
        let world = Arc::clone(self);
        let id = election.id().to_owned();
        lock(instances).push(tokio::spawn(async move {
            let mut open: Option<u64> = None;
            while let Some(event) = events.next().await {
                world.on_event(slot, &id, &name, &mut open, &event);
            }
            if let Some(token) = open {
                world.net.violation(format!(
                    "slot {slot}: term {token} was elected and never ended (stream closed)"
                ));
            }
        }));
        election
    }

    fn on_event(&self, slot: usize, id: &str, name: &str, open: &mut Option<u64>, event: &Event) {
        self.net.trace(|| format!("slot {slot}: {event:?}"));
        let mut checker = self.net.checker();
        match *event {
            Event::Elected { fencing_token } => {
                checker.reissued(id, name, fencing_token);
                checker.sample(false);
                if let Some(previous) = open.replace(fencing_token) {
                    checker.violation(format!(
                        "slot {slot}: term {fencing_token} elected before term {previous} ended"
                    ));
                }
                let excused = checker.excused();
                if checker.exact_grants
                    && !excused
                    && !checker
                        .grants
                        .contains(&(id.to_owned(), name.to_owned(), fencing_token))
                {
                    checker.violation(format!(
                        "slot {slot}: elected to term {fencing_token} of {name}, which the \
                         store never granted to it (it leads on a record that was gone)"
                    ));
                }
                // A term an operator ended may be announced after a newer one (its
                // answer was in flight): excused with it.
                let excused = excused || checker.term_excused(name, id);
                if let Some(&last) = checker.last_elected.get(name)
                    && fencing_token <= last
                    && !excused
                {
                    checker.violation(format!(
                        "slot {slot}: fencing token {fencing_token} after {last} in {name}: \
                         not increasing"
                    ));
                }
                let last = checker.last_elected.entry(name.to_owned()).or_insert(0);
                *last = (*last).max(fencing_token);
                checker.elected.insert((name.to_owned(), fencing_token));
            }
            Event::Lost { fencing_token, .. } | Event::Resigned { fencing_token } => {
                if *open != Some(fencing_token) {
                    checker.violation(format!(
                        "slot {slot}: {event:?} without a matching Elected (open: {open:?})"
                    ));
                }
                *open = None;
            }
            _ => checker.violation(format!(
                "slot {slot}: an event the checker does not know: {event:?}"
            )),
        }
    }

    /// One candidate's behaviour in the chaos phase: a random mix of API calls, some
    /// concurrent, some cancelled midway, until the task is aborted.
    async fn act(
        self: Arc<Self>,
        slot: usize,
        mut election: Election,
        drivers: Vec<M::Driver>,
        instances: Instances,
    ) {
        let mut background = JoinSet::new();
        let mut last_term: Option<Term> = None;
        loop {
            self.net.count(|r| r.calls += 1);
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
                22..=30 => {
                    let cancel_after = self.cancel_after();
                    self.checked_resign(slot, &election, None, cancel_after)
                        .await;
                }
                31..=35 => {
                    // Leaves the line (a campaign in the background, if any); a held term
                    // stays.
                    let limit = self.draw(|rng| Duration::from_millis(rng.random_range(0..500)));
                    let _ = timeout(limit, election.withdraw()).await;
                }
                36..=43 => {
                    if let Some(term) = last_term.clone() {
                        let cancel_after = self.cancel_after();
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
                    let index = if self.draw(|rng| rng.random_bool(0.5)) {
                        slot % drivers.len()
                    } else {
                        self.draw(|rng| rng.random_range(0..drivers.len()))
                    };
                    let driver = drivers[index].clone();
                    election = self.candidate(slot, ClientId(index), &driver, &instances);
                }
                73..=76 => {
                    // A planned handover of the held term to another candidate of this
                    // election (its current one), maybe cancelled midway.
                    if let Some(term) = last_term.clone()
                        && let Some(nominee) = self.other_candidate(slot)
                    {
                        let limit = self.cancel_after().unwrap_or(TTL);
                        let _ = timeout(limit, term.hand_over(&nominee)).await;
                    }
                }
                77..=79 => {
                    // A new value for the held term's observers.
                    if let Some(term) = last_term.clone() {
                        let value = self.draw(|rng| rng.random_range(0..1000u32));
                        let limit = self.cancel_after().unwrap_or(TTL);
                        let _ = timeout(limit, term.proclaim(format!("v{value}"))).await;
                    }
                }
                80..=81 => {
                    // The read-only calls: the line, and who leads.
                    let _ = timeout(TTL, election.candidates()).await;
                    let _ = timeout(TTL, election.leader()).await;
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

    /// The id of another slot's current candidate in `slot`'s election, drawn at random.
    fn other_candidate(&self, slot: usize) -> Option<String> {
        let current = lock(&self.current);
        let others: Vec<String> = current
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != slot && other % self.elections == slot % self.elections)
            .filter_map(|(_, election)| election.as_ref().map(|e| e.id().to_owned()))
            .collect();
        drop(current);
        if others.is_empty() {
            return None;
        }
        let pick = self.draw(|rng| rng.random_range(0..others.len()));
        others.into_iter().nth(pick)
    }

    fn cancel_after(&self) -> Option<Duration> {
        self.draw(|rng| {
            rng.random_bool(0.3)
                .then(|| Duration::from_millis(rng.random_range(0..60)))
        })
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
                    self.net.violation(format!(
                        "slot {slot}: resign() resigned term {fencing_token}, which was \
                         elected while it ran"
                    ));
                }
                _ => {}
            }
        }
    }

    /// Suspends the candidates' machine, tampers with the store, restarts it, partitions
    /// clients and takes the store away, until the chaos phase ends.
    async fn inject_faults(self: Arc<Self>, clients: Vec<ClientId>) {
        loop {
            let pause = self.draw(|rng| Duration::from_millis(rng.random_range(0..3000)));
            sleep(pause).await;
            let lasts = self.draw(|rng| Duration::from_millis(rng.random_range(0..3000)));
            let kind = self.draw(|rng| rng.random_range(0..100u32));
            match kind {
                0..=12 => {
                    // The candidates' machine is suspended (a laptop lid, a VM paused).
                    let duration =
                        self.draw(|rng| Duration::from_millis(rng.random_range(1..2500)));
                    self.net.count(|r| r.suspensions += 1);
                    self.net.suspend(duration);
                }
                13..=17 => {
                    // The model excuses the granted terms it ends (`Net::tampered`).
                    if let Some(what) = self.model.tamper(&self.net) {
                        self.net.count(|r| r.tampering += 1);
                        self.net.trace(|| format!("an operator tampered: {what}"));
                    }
                }
                18..=24 => {
                    let kept = !self.model.volatile() || self.draw(|rng| rng.random_bool(0.5));
                    self.net.count(|r| {
                        r.restarts += 1;
                        r.data_lost += u64::from(!kept);
                    });
                    self.net.set_outage(true);
                    self.model.restart(&self.net, kept);
                    if !kept {
                        self.net.checker().excuse(Instant::now() + EXCUSED, true);
                    }
                    self.net
                        .trace(|| format!("the store restarted (data kept: {kept})"));
                    sleep(lasts.min(TTL)).await;
                    self.net.set_outage(false);
                }
                _ => {
                    let which = self.draw(|rng| rng.random_range(0..=clients.len()));
                    self.net.count(|r| r.outages += 1);
                    if which == clients.len() {
                        self.net
                            .trace(|| format!("the store is away for {lasts:?}"));
                        self.net.set_outage(true);
                        sleep(lasts).await;
                        self.net.set_outage(false);
                    } else {
                        let mode = if self.draw(|rng| rng.random_bool(0.5)) {
                            Partition::Refuse
                        } else {
                            Partition::Hang
                        };
                        let client = clients[which];
                        self.net.trace(|| {
                            format!("c{} is partitioned ({mode:?}) for {lasts:?}", client.0)
                        });
                        self.net.set_partition(client, Some(mode));
                        sleep(lasts).await;
                        self.net.set_partition(client, None);
                    }
                }
            }
        }
    }
}
