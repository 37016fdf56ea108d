//! [`run`]: a whole chaos run, round after round, and the injection of each fault.

use std::collections::BTreeMap;
use std::io;
use std::process::Stdio;
use std::time::Duration;

use leader_testkit::FaultProxy;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::checker::{self, Tampering};
use crate::fault::target_phase;
use crate::orchestra::{Run, Slot};
use crate::report::Round;
use crate::store::Store;
use crate::{BoxResult, Config, Fault, Report, StoreKind, monotonic_ns, timeline, to_monotonic_ns};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> BoxResult<T> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// How soon after the tampering an overlap it causes must end: etcd and PostgreSQL
/// announce the deletion to the old leader within a round trip (20 ms, with room for a
/// busy machine); Redis does not announce a `DEL`, and the old leader finds its key gone at
/// its next renewal (TTL/3) plus a round trip (50 ms).
pub fn tamper_bound(backend: StoreKind, ttl: Duration) -> Duration {
    match backend {
        StoreKind::Etcd | StoreKind::Postgres => Duration::from_millis(20),
        StoreKind::Redis => ttl / 3 + Duration::from_millis(50),
    }
}

/// What one injection did: the (new) leader and when, and when the fault was lifted.
struct Injected {
    elected: Option<(usize, Instant)>,
    lifted: Option<Instant>,
}

/// Starts the store and three candidates, injects `config.rounds` faults, stops
/// everything, and checks what the candidates logged.
pub async fn run(config: Config) -> BoxResult<Report> {
    let run_started_ns = monotonic_ns();
    let backend = config.backend;
    let ttl = config.ttl;
    let dir = tempfile::Builder::new().prefix("leader-chaos-").tempdir()?;
    let mut store = match &config.clock_store {
        Some(helper) => Store::start_faked(backend, helper, dir.path()).await?,
        None => match config.redis_topology {
            Some(topology) => blocking(move || Store::start_topology(topology)).await??,
            None => blocking(move || Store::start(backend)).await??,
        },
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut slots = Vec::new();
    for slot in 0..3 {
        slots.push(Slot::new(FaultProxy::start(store.upstream(slot)).await?));
    }
    let mut run = Run {
        direct_url: store.direct_url(),
        election: format!("chaos-{}", std::process::id()),
        dir,
        config,
        slots,
        files: Vec::new(),
        killed: Vec::new(),
        events,
        events_tx,
        bad_exits: Vec::new(),
        pauses: Vec::new(),
        tampered: Vec::new(),
        down: Vec::new(),
        processes: Vec::new(),
    };
    for slot in 0..3 {
        run.spawn(slot)?;
    }
    let observer_log = run.dir.path().join("observer.log");
    let mut observer = Command::new(&run.config.observer)
        .arg(store.url())
        .arg(&run.election)
        .arg(&observer_log)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;

    let faults = run
        .config
        .faults
        .clone()
        .unwrap_or_else(|| Fault::all(backend));
    let mut liveness_failures = Vec::new();
    let mut rounds: Vec<Round> = Vec::new();
    let mut fault_spans: Vec<timeline::FaultSpan> = Vec::new();
    for round in 0..run.config.rounds {
        let fault = faults[round % faults.len()];
        let Some(leader) = run.leader(Duration::from_secs(30)).await else {
            liveness_failures.push(format!("round {round}: no leader before {fault:?}"));
            break;
        };
        let (leader, phase_after_renewal) = aim(&mut run, leader, round / faults.len()).await;
        let waiter = (leader + 1 + round % 2) % run.slots.len();
        let bound = fault.bound(backend, ttl);
        let started = Instant::now();
        let started_ns = monotonic_ns();
        let (Injected { elected, lifted }, back) =
            inject(&mut run, store, fault, leader, waiter, started).await?;
        store = back;
        fault_spans.push(timeline::FaultSpan {
            fault,
            lane: match fault {
                Fault::StoreRestart | Fault::MasterFailover => None,
                Fault::WaiterKill | Fault::WaiterPartition => Some(waiter),
                _ => Some(leader),
            },
            from_ns: started_ns,
            to_ns: lifted.map_or(started_ns, |at| to_monotonic_ns(at.into_std())),
        });
        // A fault that needs no new leader is measured from its end: how long until a
        // leader was there again.
        let measured_from = if fault.fails_over() {
            started
        } else {
            lifted.unwrap_or(started)
        };
        let recovery = elected.map(|(_, at)| at.saturating_duration_since(measured_from));
        if recovery.is_none() {
            liveness_failures.push(format!(
                "round {round}: no leader within {bound:?} after {fault:?}"
            ));
        }
        if fault.heals_leader() {
            // Retry delays are at most the TTL; a lost term is noticed by the deadline.
            let limit = ttl * 2 + Duration::from_secs(1);
            if !run.rejoined(leader, started, limit).await {
                liveness_failures.push(format!(
                    "round {round}: after {fault:?}, the healed leader neither leads nor \
                     campaigned again within {limit:?}"
                ));
            }
        }
        if (round + 1) % 25 == 0 {
            eprintln!(
                "chaos {}: {}/{} faults injected, {} liveness failures so far",
                backend.name(),
                round + 1,
                run.config.rounds,
                liveness_failures.len()
            );
        }
        // Let the faulted candidate rejoin before the next round.
        sleep(ttl / 2).await;
        rounds.push(Round {
            round,
            fault,
            phase: phase_after_renewal.map(|d| d.as_secs_f64() / (ttl / 3).as_secs_f64()),
            phase_after_renewal,
            started_ns,
            lifted_ns: lifted.map_or(started_ns, |at| to_monotonic_ns(at.into_std())),
            ended_ns: monotonic_ns(),
            recovery,
            bound,
            leaderless: Duration::ZERO,
        });
    }
    finish(
        run,
        store,
        observer_log,
        &mut observer,
        rounds,
        liveness_failures,
        fault_spans,
        run_started_ns,
    )
    .await
}

/// Waits for the fault's phase: a point of the leader's renewal interval (the bins in turn
/// for successive faults of a kind), counted from the leader's last renewal as its log
/// shows it. Returns the leader then and how long after its last renewal it is (what the
/// round records, whether or not the aim was met).
async fn aim(run: &mut Run, leader: usize, occurrence: usize) -> (usize, Option<Duration>) {
    let interval = run.config.ttl / 3;
    let target = interval.mul_f64(target_phase(occurrence));
    let give_up = Instant::now() + interval * 3;
    let current = |run: &mut Run| {
        run.drain();
        run.slots
            .iter()
            .enumerate()
            .find_map(|(slot, s)| Some((slot, s.leading?)))
    };
    loop {
        let Some((slot, token)) = current(run) else {
            return (leader, None);
        };
        let since = run.since_renewal(slot, token);
        let wait = match since {
            // No renewal logged: a new term renews at the interval's end; aim anyway.
            None => target,
            // A renewal is due or under way (its answer not in yet): wait for it.
            Some(since) if since >= interval => Duration::from_millis(5),
            Some(since) if since <= target => target - since,
            Some(since) => interval + target - since,
        };
        if Instant::now() + wait > give_up {
            return (slot, since);
        }
        sleep(wait).await;
        let Some((slot, token)) = current(run) else {
            return (leader, None);
        };
        let now = run.since_renewal(slot, token);
        if now.is_none_or(|now| now.abs_diff(target) < Duration::from_millis(5)) {
            return (slot, now);
        }
    }
}

/// Waits (up to `limit`) until the leader in `slot` logs a deadline from an answer that
/// came more than 10 ms after `slowed` (so the proxy held it), then returns at once: the
/// partition that follows must come before the next renewal is sent, so that the last
/// request the store saw is the last one answered, late.
async fn slowed_renewal(run: &mut Run, slot: usize, slowed: Instant, limit: Duration) {
    let token = run.slots[slot].leading;
    let Some(token) = token else {
        sleep(limit).await;
        return;
    };
    let mut last = run.last_deadline(slot, token);
    while slowed.elapsed() < limit {
        sleep(Duration::from_millis(2)).await;
        let now = run.last_deadline(slot, token);
        if now != last {
            if slowed.elapsed() > Duration::from_millis(10) {
                return;
            }
            last = now;
        }
    }
}

/// Injects one fault and waits for what must follow it.
async fn inject(
    run: &mut Run,
    mut store_out: Store,
    fault: Fault,
    leader: usize,
    waiter: usize,
    started: Instant,
) -> BoxResult<(Injected, Store)> {
    let ttl = run.config.ttl;
    let bound = fault.bound(run.config.backend, ttl);
    // A deleted key or a revoked lease ends the term; the next may go to anyone, the old
    // leader included.
    let exclude = (fault.fails_over() && !fault.tampers()).then_some(leader);
    let mut lifted = None;
    let elected = match fault {
        Fault::Kill | Fault::Term => {
            let signal = if fault == Fault::Kill {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            run.signal(leader, signal)?;
            let elected = run.elected(exclude, bound).await;
            run.respawn(leader).await?;
            elected
        }
        Fault::Stop | Fault::ShortPause => {
            let pause = if fault == Fault::Stop {
                ttl.mul_f64(1.5)
            } else {
                ttl / 3
            };
            let generation = run.slots[leader].generation;
            let from = monotonic_ns();
            run.signal(leader, Signal::SIGSTOP)?;
            let elected = if fault == Fault::Stop {
                run.elected(exclude, bound).await
            } else {
                None
            };
            sleep_until(started + pause).await;
            run.signal(leader, Signal::SIGCONT)?;
            run.pauses.push((generation, from, monotonic_ns()));
            lifted = Some(Instant::now());
            match elected {
                Some(elected) => Some(elected),
                None => run.some_leader(bound).await,
            }
        }
        Fault::Partition
        | Fault::LostAnswers
        | Fault::Latency
        | Fault::SlowAnswersThenPartition => {
            let proxy = &run.slots[leader].proxy;
            let mut partitioned = started;
            match fault {
                Fault::Partition => proxy.hold(),
                Fault::LostAnswers => proxy.hold_answers(),
                Fault::Latency => proxy.delay(ttl / 10),
                _ => {
                    let (slow_for, delay) = Fault::slow_answers(ttl);
                    proxy.delay_answers(delay);
                    slowed_renewal(run, leader, started, slow_for).await;
                    run.slots[leader].proxy.hold();
                    partitioned = Instant::now();
                }
            }
            let elected = if fault.fails_over() {
                run.elected(exclude, bound).await
            } else {
                None
            };
            sleep_until(partitioned + ttl * 2).await;
            run.slots[leader].proxy.pass();
            lifted = Some(Instant::now());
            match elected {
                Some(elected) => Some(elected),
                None if !fault.fails_over() => run.some_leader(bound).await,
                None => None,
            }
        }
        Fault::ClockForwardPartition => {
            store_out.step_clock(ttl / 2, false)?;
            run.slots[leader].proxy.hold();
            let elected = run.elected(exclude, bound).await;
            sleep_until(started + ttl * 2).await;
            run.slots[leader].proxy.pass();
            lifted = Some(Instant::now());
            elected
        }
        Fault::ClockBackKill => {
            store_out.step_clock(ttl / 2, true)?;
            run.signal(leader, Signal::SIGKILL)?;
            let elected = run.elected(exclude, bound).await;
            run.respawn(leader).await?;
            elected
        }
        Fault::WaiterKill => {
            run.signal(waiter, Signal::SIGKILL)?;
            run.respawn(waiter).await?;
            lifted = Some(Instant::now());
            run.some_leader(bound).await
        }
        Fault::WaiterPartition => {
            run.slots[waiter].proxy.hold();
            sleep(ttl * 2).await;
            run.slots[waiter].proxy.pass();
            lifted = Some(Instant::now());
            run.some_leader(bound).await
        }
        Fault::DeleteKey | Fault::RevokeLease => {
            let token = run.slots[leader].leading;
            let (at_ns, answered_ns) = store_out
                .tamper(&run.election, fault == Fault::RevokeLease)
                .await?;
            if let Some(token) = token {
                run.tampered.push(Tampering {
                    token,
                    at_ns,
                    answered_ns,
                    lease_of: (fault == Fault::RevokeLease).then_some(run.slots[leader].generation),
                });
            }
            run.elected(exclude, bound).await
        }
        Fault::StoreRestart => {
            store_out = blocking(move || -> io::Result<Store> {
                store_out.restart()?;
                Ok(store_out)
            })
            .await??;
            for slot in &run.slots {
                slot.proxy.cut();
            }
            lifted = Some(Instant::now());
            run.back_after_restart(bound).await
        }
        Fault::MasterFailover => {
            let election = run.election.clone();
            store_out = blocking(move || -> io::Result<Store> {
                store_out.fail_over_master(&election)?;
                Ok(store_out)
            })
            .await??;
            lifted = Some(Instant::now());
            run.some_leader(bound).await
        }
        Fault::MemberPartition => {
            let member = leader % 3;
            store_out.isolate_member(member)?;
            let elected = run.elected(exclude, bound).await;
            sleep_until(started + ttl * 2).await;
            store_out.heal_member(member)?;
            lifted = Some(Instant::now());
            elected
        }
        Fault::MemberLoss => {
            let member = leader % 3;
            store_out.kill_member(member);
            let elected = run.elected(exclude, bound).await;
            store_out = blocking(move || -> io::Result<Store> {
                store_out.restart_member(member)?;
                Ok(store_out)
            })
            .await??;
            // A fault that fails over is measured from its start: this end is only drawn.
            lifted = Some(Instant::now());
            elected
        }
    };
    Ok((Injected { elected, lifted }, store_out))
}

/// Stops the candidates and the observer, reads the logs, checks them.
#[allow(clippy::too_many_arguments)]
async fn finish(
    mut run: Run,
    store: Store,
    observer_log: std::path::PathBuf,
    observer: &mut tokio::process::Child,
    mut rounds: Vec<Round>,
    liveness_failures: Vec<String>,
    fault_spans: Vec<timeline::FaultSpan>,
    run_started_ns: u64,
) -> BoxResult<Report> {
    for slot in 0..run.slots.len() {
        if run.pid(slot).is_ok() {
            let _ = run.signal(slot, Signal::SIGCONT);
            let _ = run.signal(slot, Signal::SIGTERM);
        }
    }
    for slot in 0..run.slots.len() {
        run.reap(slot).await;
    }
    if let Some(id) = observer.id() {
        let _ = kill(Pid::from_raw(i32::try_from(id)?), Signal::SIGTERM);
    }
    match timeout(Duration::from_secs(10), observer.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        other => run
            .bad_exits
            .push(format!("the observer ended with {other:?}")),
    }
    let observed_log = blocking(move || checker::read_observer_log(&observer_log)).await??;
    let files = run.files.clone();
    let killed = run.killed.clone();
    let logs = blocking(move || -> io::Result<Vec<checker::ProcessLog>> {
        files
            .iter()
            .enumerate()
            .map(|(process, file)| checker::read_log(process, file, killed[process]))
            .collect()
    })
    .await??;
    store.stop().await;
    // Each term of the driven election counts for the round in which it began.
    let mut terms_per_fault: BTreeMap<Fault, usize> = BTreeMap::new();
    for term in logs.iter().flat_map(|log| log.terms_of(0)) {
        let Some(elected) = term.elected_ns else {
            continue;
        };
        if let Some(round) = rounds
            .iter()
            .find(|r| (r.started_ns..r.ended_ns).contains(&elected))
        {
            *terms_per_fault.entry(round.fault).or_default() += 1;
        }
    }
    let down: Vec<(usize, u64, u64)> = run.down.iter().chain(&run.pauses).copied().collect();
    for round in &mut rounds {
        round.leaderless = Duration::from_nanos(checker::leaderless_ns(
            &logs,
            &down,
            round.started_ns,
            round.ended_ns,
        ));
    }
    let timeline = timeline::Timeline::new(
        run_started_ns,
        monotonic_ns(),
        run.slots.len(),
        run.processes.clone(),
        fault_spans,
        &logs,
    );
    let bound = tamper_bound(run.config.backend, run.config.ttl);
    Ok(Report {
        terms_per_fault,
        backend: run.config.backend,
        ttl: run.config.ttl,
        elections: run.config.elections,
        rounds,
        liveness_failures,
        bad_exits: run.bad_exits.clone(),
        observed: checker::compare_observer(&observed_log, &logs),
        check: checker::check(
            &logs,
            &run.pauses,
            &run.tampered,
            u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX),
        ),
        timeline,
    })
}
