//! A fault-injection suite for the election: real candidate processes (the
//! `chaos-candidate` binary), real stores (`leader-testkit`), a TCP [`FaultProxy`] between
//! each candidate and its store, and an exact [checker] of the safety properties over what
//! the candidates logged.
//!
//! Each candidate logs every transition on CLOCK_MONOTONIC (elected with the library's own
//! first instant of belief, each new deadline, the end of each term), and samples
//! `status.is_leader()` every millisecond as a cross-check. CLOCK_MONOTONIC is one clock
//! for all processes on a machine, so the processes' terms compare exactly.
//!
//! The report gives, per fault kind, the failover time (median and max) against its bound,
//! and across the whole run: overlapping terms, sampled overlaps, flips, sampling gaps,
//! fencing tokens that go backwards or are reused, candidates that exited badly, and rounds
//! after which no leader came back within the bound or a healed candidate did not campaign
//! again.
//!
//! The [`Report`] also keeps a [`timeline::Timeline`] of the run (each candidate's
//! processes and terms, and the faults' windows), which [`timeline::write_svg`] draws.

pub mod checker;
pub mod timeline;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use leader_testkit::FaultProxy;
use leader_testkit::{EtcdServer, PostgresServer, RedisServer};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of this machine.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// A `std::time::Instant` (CLOCK_MONOTONIC on Linux) as [`monotonic_ns`] nanoseconds.
pub fn to_monotonic_ns(instant: std::time::Instant) -> u64 {
    // Read both clocks back to back; retry if something came between them.
    let mut best = (u64::MAX, 0u64);
    for _ in 0..3 {
        let before = monotonic_ns();
        let now = std::time::Instant::now();
        let after = monotonic_ns();
        let at = if instant <= now {
            before.saturating_sub(u64::try_from((now - instant).as_nanos()).unwrap_or(u64::MAX))
        } else {
            before.saturating_add(u64::try_from((instant - now).as_nanos()).unwrap_or(u64::MAX))
        };
        let spread = after.saturating_sub(before);
        if spread < best.0 {
            best = (spread, at);
        }
    }
    best.1
}

/// Which store a chaos run starts (its candidates reach it by URL, through
/// `leader::connect`).
///
/// In a chaos [`run`], etcd is a 3-member cluster (candidate `i` talks to member `i`) and
/// Redis is one redis-server with `appendonly yes` + `appendfsync always`; PostgreSQL one
/// server (`fsync=off`: a killed server keeps what the OS has, which is every commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// etcd, through `leader-etcd`.
    Etcd,
    /// Redis, through `leader-redis`.
    Redis,
    /// PostgreSQL, through `leader-postgres`.
    Postgres,
}

impl StoreKind {
    /// `etcd`, `redis` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Etcd => "etcd",
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// The faults, injected in this order, round after round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL the leader (then start a fresh candidate in its place).
    Kill,
    /// SIGTERM the leader: it resigns (then start a fresh candidate in its place).
    Term,
    /// SIGSTOP the leader for 1.5 × TTL, then SIGCONT.
    Stop,
    /// SIGSTOP the leader for a third of the TTL: a pause shorter than the lease.
    ShortPause,
    /// Hold the leader's connection to the store for 2 × TTL, then let it go.
    Partition,
    /// For 2 × TTL the leader's requests reach the store and take effect, but the answers
    /// are held: every renewal looks failed although it succeeded.
    LostAnswers,
    /// Every packet between the leader and the store is delayed by a tenth of the TTL, for
    /// 2 × TTL.
    Latency,
    /// SIGKILL a waiting candidate (then start a fresh one in its place).
    WaiterKill,
    /// Partition a waiting candidate from the store for 2 × TTL.
    WaiterPartition,
    /// Delete the leader's key in the store, as an operator might (PostgreSQL: its row).
    DeleteKey,
    /// etcd only: revoke the leader's lease.
    RevokeLease,
    /// Kill the whole store and start it again on the same data.
    StoreRestart,
    /// etcd only: kill the member the leader talks to, then start it again.
    MemberLoss,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "sigkill leader",
            Fault::Term => "sigterm leader",
            Fault::Stop => "sigstop leader 1.5xTTL",
            Fault::ShortPause => "sigstop leader TTL/3",
            Fault::Partition => "partition leader 2xTTL",
            Fault::LostAnswers => "lost answers 2xTTL",
            Fault::Latency => "latency TTL/10 2xTTL",
            Fault::WaiterKill => "sigkill waiter",
            Fault::WaiterPartition => "partition waiter 2xTTL",
            Fault::DeleteKey => "delete leader key",
            Fault::RevokeLease => "revoke leader lease",
            Fault::StoreRestart => "store restart",
            Fault::MemberLoss => "etcd member loss",
        }
    }

    /// A few letters, for the timeline's fault marks.
    fn short(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Term => "term",
            Fault::Stop => "stop",
            Fault::ShortPause => "pause",
            Fault::Partition => "part",
            Fault::LostAnswers => "lost",
            Fault::Latency => "slow",
            Fault::WaiterKill => "w-kill",
            Fault::WaiterPartition => "w-part",
            Fault::DeleteKey => "del",
            Fault::RevokeLease => "revoke",
            Fault::StoreRestart => "restart",
            Fault::MemberLoss => "member",
        }
    }

    fn all(backend: StoreKind) -> Vec<Fault> {
        let mut faults = vec![
            Fault::Kill,
            Fault::Term,
            Fault::Stop,
            Fault::ShortPause,
            Fault::Partition,
            Fault::LostAnswers,
            Fault::Latency,
            Fault::WaiterKill,
            Fault::WaiterPartition,
            Fault::DeleteKey,
            Fault::StoreRestart,
        ];
        if backend == StoreKind::Etcd {
            faults.push(Fault::RevokeLease);
            faults.push(Fault::MemberLoss);
        }
        faults
    }

    /// Whether a new leader must be elected (the leader was taken away), or only some
    /// leader must exist afterwards.
    fn fails_over(self) -> bool {
        !matches!(
            self,
            Fault::ShortPause
                | Fault::Latency
                | Fault::WaiterKill
                | Fault::WaiterPartition
                | Fault::StoreRestart
        )
    }

    /// How long after the fault a (new) leader must be there. A crash costs the TTL plus
    /// the store's expiry sweep (etcd checks leases twice a second; Redis expires keys
    /// within 100 ms) plus a second; a graceful handover under a second.
    fn bound(self, backend: StoreKind, ttl: Duration) -> Duration {
        let second = Duration::from_secs(1);
        let sweep = match backend {
            StoreKind::Etcd => Duration::from_millis(500),
            StoreKind::Redis | StoreKind::Postgres => Duration::from_millis(100),
        };
        match self {
            Fault::Term | Fault::RevokeLease => second,
            // Redis does not announce a DEL, nor PostgreSQL a DELETE by hand: the
            // waiters' timers are set to the key's expiry, up to a TTL away.
            Fault::DeleteKey => match backend {
                StoreKind::Etcd => second,
                StoreKind::Redis | StoreKind::Postgres => ttl + second,
            },
            Fault::Kill | Fault::Stop | Fault::Partition | Fault::MemberLoss => {
                ttl + sweep + second
            }
            // The renewals that land keep the key alive until the leader's withdrawal, or
            // (Redis, whose withdrawal must read first) its expiry, lands.
            Fault::LostAnswers => ttl * 2 + sweep + second,
            Fault::ShortPause | Fault::Latency => ttl + sweep + second,
            Fault::WaiterKill | Fault::WaiterPartition => second,
            Fault::StoreRestart => Duration::from_secs(15),
        }
    }

    /// Whether the faulted candidate was the leader and must campaign again (or still
    /// lead) once the fault is over.
    fn heals_leader(self) -> bool {
        matches!(
            self,
            Fault::Stop
                | Fault::ShortPause
                | Fault::Partition
                | Fault::LostAnswers
                | Fault::Latency
        )
    }
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
    /// Runs the candidates with `--unsafe` (deadlines that ignore the lease), to show
    /// that the checker catches them.
    pub unsafe_candidates: bool,
}

/// What a run measured and found.
#[derive(Debug)]
pub struct Report {
    /// The store.
    pub backend: StoreKind,
    /// The TTL.
    pub ttl: Duration,
    /// Per fault kind, the time from the fault to the next leader, and the bound.
    pub failovers: BTreeMap<Fault, (Vec<Duration>, Duration)>,
    /// Rounds after which no leader came back in time, or a healed candidate did not
    /// campaign again.
    pub liveness_failures: Vec<String>,
    /// Candidates that exited with a status nobody asked for.
    pub bad_exits: Vec<String>,
    /// The checker's findings.
    pub check: checker::Check,
    /// Per fault kind, the terms that began in its rounds (all checked exactly).
    pub terms_per_fault: BTreeMap<Fault, usize>,
    /// The observer's view, compared with the candidates'.
    pub observed: checker::Observed,
    /// What happened when, for a picture of the run ([`timeline::write_svg`]).
    pub timeline: timeline::Timeline,
}

impl Report {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.check.passed()
            && self.observed.passed()
            && self.liveness_failures.is_empty()
            && self.bad_exits.is_empty()
    }

    /// A table of the figures.
    pub fn table(&self) -> String {
        let rounds: usize = self.failovers.values().map(|(t, _)| t.len()).sum();
        let ttl = self.ttl.as_secs_f64();
        let mut out = format!(
            "chaos on {}: {rounds} faults, TTL {:?}\n{:<24} {:>6} {:>6} {:>10} {:>10} {:>10}\n",
            self.backend.name(),
            self.ttl,
            "fault",
            "rounds",
            "terms",
            "median",
            "worst",
            "bound"
        );
        for (fault, (times, bound)) in &self.failovers {
            let mut sorted = times.clone();
            sorted.sort();
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
            let max = sorted.last().copied().unwrap_or_default();
            out.push_str(&format!(
                "{:<24} {:>6} {:>6} {:>9.3}s {:>9.3}s {:>9.3}s\n",
                fault.name(),
                times.len(),
                self.terms_per_fault.get(fault).copied().unwrap_or(0),
                median.as_secs_f64(),
                max.as_secs_f64(),
                bound.as_secs_f64(),
            ));
        }
        let c = &self.check;
        out.push_str(&format!(
            "terms checked exactly: {}; overlapping terms: {}; sampled overlaps: {} (within a \
             sample's duration only: {}); flips: {}; sampling gaps over 5 ms across a \
             handover: {} (elsewhere, reported only: {}; longest {:.1} ms); unsampled terms: {}; unreadable lines: {}; fencing violations: {}; \
             bad exits: {}; liveness failures: {}; overlaps after tampering (documented \
             limit, not failed): {}\n",
            c.terms,
            c.overlaps.len(),
            c.sampled_overlaps.len(),
            c.jitter_overlaps,
            c.flips.len(),
            c.gaps.len(),
            c.quiet_gaps,
            c.max_gap_ns as f64 / 1e6,
            c.unsampled.len(),
            c.unreadable.len(),
            c.token_violations.len(),
            self.bad_exits.len(),
            self.liveness_failures.len(),
            c.overlaps_after_tampering.len(),
        ));
        let _ = ttl;
        let o = &self.observed;
        out.push_str(&format!(
            "observer: {} leader changes seen; tokens going back: {}; terms never seen (too \
             short to observe): {}; tokens seen that no candidate logged (a campaign whose \
             answer was lost): {}\n",
            o.changes,
            o.backwards.len(),
            o.unseen_terms,
            o.unknown_tokens.len()
        ));
        for violation in o.backwards.iter().take(5) {
            out.push_str(&format!("  VIOLATION: {violation}\n"));
        }
        for violation in c.violations().iter().take(10) {
            out.push_str(&format!("  VIOLATION: {violation}\n"));
        }
        for tampered in c.overlaps_after_tampering.iter().take(5) {
            out.push_str(&format!("  after tampering: {tampered}\n"));
        }
        for exit in self.bad_exits.iter().take(5) {
            out.push_str(&format!("  EXIT: {exit}\n"));
        }
        for failure in self.liveness_failures.iter().take(5) {
            out.push_str(&format!("  LIVENESS: {failure}\n"));
        }
        out
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

enum Store {
    Etcd(EtcdServer),
    Redis(RedisServer),
    Postgres(PostgresServer),
}

impl Store {
    fn upstream(&self, slot: usize) -> SocketAddr {
        match self {
            Store::Etcd(server) => server.client_addr(slot % 3),
            Store::Redis(server) => server.addr(),
            Store::Postgres(server) => server.addr(),
        }
    }

    /// Deletes the leader's key (`revoke`: revokes its lease instead, etcd only), as an
    /// operator would, bypassing the candidates.
    async fn tamper(&self, election: &str, revoke: bool) -> BoxResult<()> {
        match self {
            Store::Etcd(server) => {
                use leader_etcd::etcd_client::{Client, GetOptions, SortOrder, SortTarget};
                let endpoints = server.endpoints();
                let mut client = Client::connect(endpoints, None).await?;
                let prefix = format!("{election}/");
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1);
                let response = client.get(prefix.as_str(), Some(options)).await?;
                let kv = response
                    .kvs()
                    .first()
                    .ok_or("no leader key to tamper with")?;
                if revoke {
                    client.lease_revoke(kv.lease()).await?;
                } else {
                    client.delete(kv.key(), None).await?;
                }
            }
            Store::Redis(server) => {
                let client = leader_redis::redis::Client::open(server.url())?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                let key = format!("leader:{{{election}}}:leader");
                let _: i64 = leader_redis::redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await?;
            }
            Store::Postgres(server) => {
                use leader_postgres::tokio_postgres;
                let (client, connection) =
                    tokio_postgres::connect(&server.url(), tokio_postgres::NoTls).await?;
                let driving = tokio::spawn(connection);
                client
                    .execute("DELETE FROM leader_elections WHERE name = $1", &[&election])
                    .await?;
                drop(client);
                let _ = driving.await;
            }
        }
        Ok(())
    }
}

/// One candidate position: its proxy outlives the processes started in it.
struct Slot {
    proxy: FaultProxy,
    child: Option<Child>,
    generation: usize,
    leading: Option<u64>,
    /// The last `campaigning` or `elected` line of the current process.
    active_at: Option<Instant>,
    /// Whether its last line was `campaigning`: it is in a campaign (waiting in line).
    campaigning: bool,
    /// Set when the orchestrator SIGKILLed the process (a signal exit is expected).
    killed: bool,
}

struct Run {
    config: Config,
    dir: tempfile::TempDir,
    election: String,
    slots: Vec<Slot>,
    files: Vec<PathBuf>,
    /// Per process (generation), whether it was SIGKILLed (its log may end torn).
    killed: Vec<bool>,
    events: mpsc::UnboundedReceiver<(usize, usize, String, Instant)>,
    events_tx: mpsc::UnboundedSender<(usize, usize, String, Instant)>,
    bad_exits: Vec<String>,
    pauses: Vec<(usize, u64, u64)>,
    tampered: Vec<u64>,
    /// Per process (generation): its slot, when it started and when it was reaped.
    processes: Vec<timeline::ProcessSpan>,
}

impl Run {
    fn endpoint(&self, proxy: SocketAddr) -> String {
        match self.config.backend {
            StoreKind::Postgres => format!("postgres://postgres@{proxy}/postgres"),
            backend => format!("{}://{proxy}", backend.name()),
        }
    }

    fn spawn(&mut self, slot: usize) -> BoxResult<()> {
        let generation = self.files.len();
        let file = self
            .dir
            .path()
            .join(format!("slot{slot}-process{generation}.log"));
        let endpoint = self.endpoint(self.slots[slot].proxy.addr());
        let mut child = Command::new(&self.config.candidate)
            .arg(endpoint)
            .arg(&self.election)
            .arg(self.config.ttl.as_millis().to_string())
            .arg(&file)
            .args(self.config.unsafe_candidates.then_some("--unsafe"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send((slot, generation, line, Instant::now())).is_err() {
                    return;
                }
            }
        });
        self.files.push(file);
        self.killed.push(false);
        self.processes.push(timeline::ProcessSpan {
            process: generation,
            lane: slot,
            started_ns: monotonic_ns(),
            exited_ns: None,
            killed: false,
        });
        let s = &mut self.slots[slot];
        s.child = Some(child);
        s.generation = generation;
        s.leading = None;
        s.active_at = None;
        s.campaigning = false;
        s.killed = false;
        Ok(())
    }

    fn pid(&self, slot: usize) -> BoxResult<Pid> {
        let id = self.slots[slot]
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or("candidate not running")?;
        Ok(Pid::from_raw(i32::try_from(id)?))
    }

    fn signal(&mut self, slot: usize, signal: Signal) -> BoxResult<()> {
        if signal == Signal::SIGKILL {
            self.slots[slot].killed = true;
            let generation = self.slots[slot].generation;
            self.killed[generation] = true;
        }
        kill(self.pid(slot)?, signal)?;
        Ok(())
    }

    /// Applies one event line to the slots' state; returns the slot if it was elected.
    fn apply(&mut self, slot: usize, generation: usize, line: &str, at: Instant) -> Option<usize> {
        let s = &mut self.slots[slot];
        if s.generation != generation {
            return None;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("elected") => {
                s.leading = words.next().and_then(|t| t.parse().ok());
                s.active_at = Some(at);
                s.campaigning = false;
                Some(slot)
            }
            Some("campaigning") => {
                s.active_at = Some(at);
                s.campaigning = true;
                None
            }
            Some("lost" | "resigned" | "resigning") => {
                s.leading = None;
                None
            }
            _ => None,
        }
    }

    fn drain(&mut self) {
        while let Ok((slot, generation, line, at)) = self.events.try_recv() {
            self.apply(slot, generation, &line, at);
        }
    }

    /// Waits until a slot other than `exclude` is elected; returns it and when.
    async fn elected(
        &mut self,
        exclude: Option<usize>,
        limit: Duration,
    ) -> Option<(usize, Instant)> {
        let deadline = Instant::now() + limit;
        loop {
            let next = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.events.recv(),
            )
            .await
            .ok()??;
            let (slot, generation, line, at) = next;
            if let Some(slot) = self.apply(slot, generation, &line, at)
                && Some(slot) != exclude
            {
                return Some((slot, at));
            }
        }
    }

    /// The slot that leads now, waiting for one if needed.
    async fn leader(&mut self, limit: Duration) -> Option<usize> {
        self.drain();
        if let Some(slot) = self.slots.iter().position(|s| s.leading.is_some()) {
            return Some(slot);
        }
        self.elected(None, limit).await.map(|(slot, _)| slot)
    }

    /// Some leader within `limit` from now (the current one, if it still leads when the
    /// events so far are applied); with when it was (last) elected or now.
    async fn some_leader(&mut self, limit: Duration) -> Option<(usize, Instant)> {
        let now = Instant::now();
        self.drain();
        if let Some(slot) = self.slots.iter().position(|s| s.leading.is_some()) {
            return Some((slot, now));
        }
        self.elected(None, limit).await
    }

    /// After a store restart, a leader is back either because a new term began or
    /// because the leader's term survived (a persistent Redis, or etcd's leases, which
    /// outlive a short restart): wait one and a half TTLs for the dust to settle, then
    /// look.
    async fn back_after_restart(&mut self, limit: Duration) -> Option<(usize, Instant)> {
        let restarted = Instant::now();
        let settle = restarted + self.config.ttl.mul_f64(1.5);
        let mut elected_at = None;
        while let Ok(Some((slot, generation, line, at))) = timeout(
            settle.saturating_duration_since(Instant::now()),
            self.events.recv(),
        )
        .await
        {
            if self.apply(slot, generation, &line, at).is_some() {
                elected_at = Some(at);
            }
        }
        match self.slots.iter().position(|s| s.leading.is_some()) {
            Some(slot) => Some((slot, elected_at.unwrap_or(restarted))),
            None => self.elected(None, limit).await,
        }
    }

    /// Waits for the process in `slot` to exit (killing it after 10 s), and records an
    /// exit status nobody asked for.
    async fn reap(&mut self, slot: usize) {
        let Some(mut child) = self.slots[slot].child.take() else {
            return;
        };
        let waited = timeout(Duration::from_secs(10), child.wait()).await;
        let generation = self.slots[slot].generation;
        if let Some(span) = self.processes.get_mut(generation) {
            span.exited_ns = Some(monotonic_ns());
            span.killed = self.killed[generation];
        }
        let status = match waited {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.kill().await;
                self.bad_exits.push(format!(
                    "slot {slot} (process {}) did not exit within 10 s",
                    self.slots[slot].generation
                ));
                None
            }
        };
        if let Some(status) = status {
            use std::os::unix::process::ExitStatusExt;
            let expected = status.success()
                || (self.slots[slot].killed && status.signal() == Some(libc_sigkill()));
            if !expected {
                self.bad_exits.push(format!(
                    "slot {slot} (process {}) exited with {status}",
                    self.slots[slot].generation
                ));
            }
        }
    }

    async fn respawn(&mut self, slot: usize) -> BoxResult<()> {
        self.reap(slot).await;
        self.spawn(slot)
    }

    /// Whether `slot` leads, or is in a campaign it began after `since` (waiting in line),
    /// waiting up to `limit` for either.
    async fn rejoined(&mut self, slot: usize, since: Instant, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.drain();
            let s = &self.slots[slot];
            if s.leading.is_some() || (s.campaigning && s.active_at.is_some_and(|at| at >= since)) {
                return true;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return false;
            }
            match timeout(wait, self.events.recv()).await {
                Ok(Some((slot, generation, line, at))) => {
                    self.apply(slot, generation, &line, at);
                }
                _ => return false,
            }
        }
    }
}

fn libc_sigkill() -> i32 {
    Signal::SIGKILL as i32
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> BoxResult<T> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// Starts the store and three candidates, injects `config.rounds` faults, stops
/// everything, and checks what the candidates logged.
pub async fn run(config: Config) -> BoxResult<Report> {
    let run_started_ns = monotonic_ns();
    let backend = config.backend;
    let ttl = config.ttl;
    let mut store = blocking(move || -> io::Result<Store> {
        Ok(match backend {
            StoreKind::Etcd => Store::Etcd(EtcdServer::start_cluster(3)?),
            StoreKind::Redis => Store::Redis(RedisServer::start_persistent()?),
            StoreKind::Postgres => Store::Postgres(PostgresServer::start()?),
        })
    })
    .await??;
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut slots = Vec::new();
    for slot in 0..3 {
        slots.push(Slot {
            proxy: FaultProxy::start(store.upstream(slot)).await?,
            child: None,
            generation: usize::MAX,
            leading: None,
            active_at: None,
            campaigning: false,
            killed: false,
        });
    }
    let mut run = Run {
        election: format!("chaos-{}", std::process::id()),
        dir: tempfile::Builder::new().prefix("leader-chaos-").tempdir()?,
        config,
        slots,
        files: Vec::new(),
        killed: Vec::new(),
        events,
        events_tx,
        bad_exits: Vec::new(),
        pauses: Vec::new(),
        tampered: Vec::new(),
        processes: Vec::new(),
    };
    for slot in 0..3 {
        run.spawn(slot)?;
    }
    let observer_log = run.dir.path().join("observer.log");
    let observer_url = match &store {
        Store::Etcd(server) => format!(
            "etcd://{}",
            (0..3)
                .map(|member| server.client_addr(member).to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        Store::Redis(server) => server.url(),
        Store::Postgres(server) => server.url(),
    };
    let mut observer = Command::new(&run.config.observer)
        .arg(observer_url)
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
    let mut failovers: BTreeMap<Fault, (Vec<Duration>, Duration)> = BTreeMap::new();
    let mut liveness_failures = Vec::new();
    let mut rounds: Vec<(Fault, u64, u64)> = Vec::new();
    let mut fault_spans: Vec<timeline::FaultSpan> = Vec::new();
    for round in 0..run.config.rounds {
        let fault = faults[round % faults.len()];
        let Some(leader) = run.leader(Duration::from_secs(30)).await else {
            liveness_failures.push(format!("round {round}: no leader before {fault:?}"));
            break;
        };
        // A random phase of the renewal interval, so that faults do not always land just
        // after a grant.
        sleep(ttl.mul_f64(rand_fraction(round) / 3.0)).await;
        run.drain();
        let leader = run
            .slots
            .iter()
            .position(|s| s.leading.is_some())
            .unwrap_or(leader);
        let waiter = (leader + 1 + round % 2) % run.slots.len();
        let bound = fault.bound(backend, ttl);
        let started = Instant::now();
        let started_ns = monotonic_ns();
        // A deleted key or a revoked lease ends the term; the next may go to anyone, the
        // old leader included.
        let exclude = (fault.fails_over()
            && !matches!(fault, Fault::DeleteKey | Fault::RevokeLease))
        .then_some(leader);
        let mut fault_over = None;
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
                fault_over = Some(Instant::now());
                match elected {
                    Some(elected) => Some(elected),
                    None => run.some_leader(bound).await,
                }
            }
            Fault::Partition | Fault::LostAnswers | Fault::Latency => {
                let proxy = &run.slots[leader].proxy;
                match fault {
                    Fault::Partition => proxy.hold(),
                    Fault::LostAnswers => proxy.hold_answers(),
                    _ => proxy.delay(ttl / 10),
                }
                let elected = if fault.fails_over() {
                    run.elected(exclude, bound).await
                } else {
                    None
                };
                sleep_until(started + ttl * 2).await;
                run.slots[leader].proxy.pass();
                fault_over = Some(Instant::now());
                match elected {
                    Some(elected) => Some(elected),
                    None if !fault.fails_over() => run.some_leader(bound).await,
                    None => None,
                }
            }
            Fault::WaiterKill => {
                run.signal(waiter, Signal::SIGKILL)?;
                run.respawn(waiter).await?;
                fault_over = Some(Instant::now());
                run.some_leader(bound).await
            }
            Fault::WaiterPartition => {
                run.slots[waiter].proxy.hold();
                sleep(ttl * 2).await;
                run.slots[waiter].proxy.pass();
                fault_over = Some(Instant::now());
                run.some_leader(bound).await
            }
            Fault::DeleteKey | Fault::RevokeLease => {
                if let Some(token) = run.slots[leader].leading {
                    run.tampered.push(token);
                }
                store
                    .tamper(&run.election, fault == Fault::RevokeLease)
                    .await?;
                run.elected(exclude, bound).await
            }
            Fault::StoreRestart => {
                store = blocking(move || -> io::Result<Store> {
                    match &mut store {
                        Store::Etcd(server) => {
                            for member in 0..3 {
                                server.kill(member);
                            }
                            for member in 0..3 {
                                server.restart(member)?;
                            }
                        }
                        Store::Redis(server) => {
                            server.kill();
                            server.restart()?;
                        }
                        Store::Postgres(server) => {
                            server.kill();
                            server.restart()?;
                        }
                    }
                    Ok(store)
                })
                .await??;
                for slot in &run.slots {
                    slot.proxy.cut();
                }
                fault_over = Some(Instant::now());
                run.back_after_restart(bound).await
            }
            Fault::MemberLoss => {
                let member = leader % 3;
                if let Store::Etcd(server) = &mut store {
                    server.kill(member);
                }
                let elected = run.elected(exclude, bound).await;
                store = blocking(move || -> io::Result<Store> {
                    if let Store::Etcd(server) = &mut store {
                        server.restart(member)?;
                    }
                    Ok(store)
                })
                .await??;
                // A fault that fails over is measured from its start: this end is only
                // drawn.
                fault_over = Some(Instant::now());
                elected
            }
        };
        fault_spans.push(timeline::FaultSpan {
            fault,
            lane: match fault {
                Fault::StoreRestart => None,
                Fault::WaiterKill | Fault::WaiterPartition => Some(waiter),
                _ => Some(leader),
            },
            from_ns: started_ns,
            to_ns: fault_over.map_or(started_ns, |at| to_monotonic_ns(at.into_std())),
        });
        // A fault that needs no new leader is measured from its end: how long until a
        // leader was there again.
        let measured_from = if fault.fails_over() {
            started
        } else {
            fault_over.unwrap_or(started)
        };
        let entry = failovers
            .entry(fault)
            .or_insert_with(|| (Vec::new(), bound));
        match elected {
            Some((_, at)) => entry.0.push(at.saturating_duration_since(measured_from)),
            None => liveness_failures.push(format!(
                "round {round}: no leader within {bound:?} after {fault:?}"
            )),
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
        rounds.push((fault, started_ns, monotonic_ns()));
    }

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
    drop(store);
    // Each term counts for the round in which it began.
    let mut terms_per_fault: BTreeMap<Fault, usize> = BTreeMap::new();
    for term in logs.iter().flat_map(|log| log.terms.values()) {
        let Some(elected) = term.elected_ns else {
            continue;
        };
        if let Some((fault, _, _)) = rounds
            .iter()
            .find(|(_, from, to)| (*from..*to).contains(&elected))
        {
            *terms_per_fault.entry(*fault).or_default() += 1;
        }
    }
    let timeline = timeline::Timeline::new(
        run_started_ns,
        monotonic_ns(),
        run.slots.len(),
        run.processes.clone(),
        fault_spans,
        &logs,
    );
    Ok(Report {
        terms_per_fault,
        backend,
        ttl,
        failovers,
        liveness_failures,
        bad_exits: run.bad_exits.clone(),
        observed: checker::compare_observer(&observed_log, &logs),
        check: checker::check(&logs, &run.pauses, &run.tampered),
        timeline,
    })
}

/// A fraction in [0, 1) that varies from round to round (a fixed sequence, so that runs
/// are comparable).
fn rand_fraction(round: usize) -> f64 {
    // The golden ratio's fractional part spreads successive rounds evenly.
    (round as f64 * 0.618_033_988_749_895).fract()
}

/// Reads `CHAOS_ROUNDS` (default `default`).
pub fn rounds_from_env(default: usize) -> usize {
    std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}
