//! A fault-injection suite for the election: real candidate processes (the
//! `chaos-candidate` binary), real stores (`leader-testkit`), a TCP [`FaultProxy`] between
//! each candidate and its store, and a checker of the safety properties over what the
//! candidates recorded.
//!
//! Each candidate samples `status.is_leader()` every millisecond from a plain thread and
//! records, for every sample that said "leader", its fencing token and CLOCK_MONOTONIC
//! readings taken just before and just after the check. CLOCK_MONOTONIC is one clock for
//! all processes on a machine, so spans of different processes compare exactly.
//!
//! The checker reports, per fault kind, the failover time (median and max), and across the
//! whole run: overlapping leadership spans, fencing tokens that go backwards or are reused,
//! and rounds after which no leader came back within the stated bound.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use leader_core::Driver;
use leader_core::testing::FaultProxy;
use leader_testkit::{EtcdServer, RedisServer};
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

/// The span of one term in one process, from its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Which candidate process (index into the files given to [`read_spans`]).
    pub process: usize,
    /// The term's fencing token.
    pub token: u64,
    /// Clock before the first check that said "leader".
    pub first_before: u64,
    /// Clock after the first check that said "leader".
    pub first_after: u64,
    /// Clock before the last check that said "leader".
    pub last_before: u64,
    /// Clock after the last check that said "leader".
    pub last_after: u64,
}

impl Span {
    /// The interval during which this process surely believed it led: between the end of
    /// its first "leader" check and the start of its last.
    fn sure(&self) -> (u64, u64) {
        (self.first_after, self.last_before)
    }

    /// The widest interval it may have believed it led, sampling jitter included.
    fn widest(&self) -> (u64, u64) {
        (self.first_before, self.last_after)
    }
}

fn intersect(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0.max(b.0) < a.1.min(b.1)
}

/// Reads the samples files of candidate processes (index = position in `files`) into
/// one span per (process, fencing token).
pub fn read_spans(files: &[PathBuf]) -> io::Result<Vec<Span>> {
    let mut spans = Vec::new();
    for (process, file) in files.iter().enumerate() {
        let mut by_token: HashMap<u64, Span> = HashMap::new();
        let reader = match std::fs::File::open(file) {
            Ok(f) => io::BufReader::new(f),
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for line in reader.lines() {
            let line = line?;
            let mut fields = line.split_whitespace().map(str::parse::<u64>);
            let (Some(Ok(token)), Some(Ok(before)), Some(Ok(after))) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue; // a line cut short by SIGKILL
            };
            by_token
                .entry(token)
                .and_modify(|s| {
                    s.first_before = s.first_before.min(before);
                    s.first_after = s.first_after.min(after);
                    s.last_before = s.last_before.max(before);
                    s.last_after = s.last_after.max(after);
                })
                .or_insert(Span {
                    process,
                    token,
                    first_before: before,
                    first_after: after,
                    last_before: before,
                    last_after: after,
                });
        }
        spans.extend(by_token.into_values());
    }
    spans.sort_by_key(|s| s.first_before);
    Ok(spans)
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Check {
    /// Spans checked.
    pub spans: usize,
    /// Pairs of spans of different processes that surely overlapped: a safety violation.
    pub overlaps: Vec<(Span, Span)>,
    /// Pairs that overlap only within sampling jitter (one side's check straddled a
    /// descheduling): reported, not a violation.
    pub jitter_overlaps: usize,
    /// Fencing tokens that went backwards in time or were used by two processes.
    pub token_violations: Vec<String>,
}

/// Checks that no two processes' spans overlap, and that fencing tokens increase with
/// time and are never reused.
pub fn check(spans: &[Span]) -> Check {
    let mut result = Check {
        spans: spans.len(),
        ..Check::default()
    };
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.process == b.process {
                continue;
            }
            if intersect(a.sure(), b.sure()) {
                result.overlaps.push((*a, *b));
            } else if intersect(a.widest(), b.widest()) {
                result.jitter_overlaps += 1;
            }
        }
    }
    let mut owner: HashMap<u64, usize> = HashMap::new();
    for span in spans {
        if let Some(&other) = owner.get(&span.token)
            && other != span.process
        {
            result.token_violations.push(format!(
                "token {} used by processes {other} and {}",
                span.token, span.process
            ));
        }
        owner.insert(span.token, span.process);
    }
    for pair in spans.windows(2) {
        let (earlier, later) = (pair[0], pair[1]);
        if later.token < earlier.token {
            result.token_violations.push(format!(
                "token {} (process {}) began after token {} (process {})",
                later.token, later.process, earlier.token, earlier.process
            ));
        }
    }
    result
}

/// A store, as the chaos suite, its candidate process and the benchmarks name it.
///
/// In a chaos [`run`], etcd is a 3-member cluster (candidate `i` talks to member `i`) and
/// Redis is one redis-server with `appendonly yes` + `appendfsync always`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// etcd, through `leader-etcd`.
    Etcd,
    /// Redis, through `leader-redis`.
    Redis,
}

impl Backend {
    /// `etcd` or `redis`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Redis => "redis",
        }
    }

    /// The backend called `name` (`etcd` or `redis`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "etcd" => Some(Backend::Etcd),
            "redis" => Some(Backend::Redis),
            _ => None,
        }
    }

    /// A driver connected to `endpoint` (etcd: `host:port`; Redis: `redis://host:port`).
    pub async fn connect(self, endpoint: &str) -> leader_core::Result<Arc<dyn Driver>> {
        Ok(match self {
            Backend::Etcd => Arc::new(leader_etcd::EtcdDriver::connect([endpoint]).await?),
            Backend::Redis => Arc::new(leader_redis::RedisDriver::connect(endpoint).await?),
        })
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
    /// Hold the leader's connection to the store for 2 × TTL, then let it go.
    Partition,
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
            Fault::Partition => "partition leader 2xTTL",
            Fault::StoreRestart => "store restart",
            Fault::MemberLoss => "etcd member loss",
        }
    }

    fn all(backend: Backend) -> Vec<Fault> {
        let mut faults = vec![
            Fault::Kill,
            Fault::Term,
            Fault::Stop,
            Fault::Partition,
            Fault::StoreRestart,
        ];
        if backend == Backend::Etcd {
            faults.push(Fault::MemberLoss);
        }
        faults
    }

    /// How long after the fault a leader must be back.
    fn bound(self, ttl: Duration) -> Duration {
        match self {
            Fault::StoreRestart => ttl * 2 + Duration::from_secs(15),
            _ => ttl * 2 + Duration::from_secs(3),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store.
    pub backend: Backend,
    /// Faults to inject (one per round, cycling through the kinds).
    pub rounds: usize,
    /// The election TTL.
    pub ttl: Duration,
    /// The `chaos-candidate` binary.
    pub candidate: PathBuf,
}

/// What a run measured and found.
#[derive(Debug)]
pub struct Report {
    /// The store.
    pub backend: Backend,
    /// The TTL.
    pub ttl: Duration,
    /// Per fault kind, the time from the fault to the next "elected".
    pub failovers: BTreeMap<Fault, Vec<Duration>>,
    /// Rounds after which no leader came back in time.
    pub liveness_failures: Vec<String>,
    /// The checker's findings.
    pub check: Check,
}

impl Report {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.check.overlaps.is_empty()
            && self.check.token_violations.is_empty()
            && self.liveness_failures.is_empty()
    }

    /// A table of the figures.
    pub fn table(&self) -> String {
        let rounds: usize = self.failovers.values().map(Vec::len).sum();
        let mut out = format!(
            "chaos on {}: {rounds} faults, TTL {:?}\n{:<24} {:>6} {:>16} {:>16}\n",
            self.backend.name(),
            self.ttl,
            "fault",
            "rounds",
            "failover median",
            "failover max"
        );
        for (fault, times) in &self.failovers {
            let mut sorted = times.clone();
            sorted.sort();
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
            let max = sorted.last().copied().unwrap_or_default();
            let ttl = self.ttl.as_secs_f64();
            out.push_str(&format!(
                "{:<24} {:>6} {:>8.3}s {:>5.2}xTTL {:>8.3}s {:>5.2}xTTL\n",
                fault.name(),
                times.len(),
                median.as_secs_f64(),
                median.as_secs_f64() / ttl,
                max.as_secs_f64(),
                max.as_secs_f64() / ttl,
            ));
        }
        out.push_str(&format!(
            "spans checked: {}; overlaps: {} (within sampling jitter only: {}); \
             fencing violations: {}; liveness failures: {}\n",
            self.check.spans,
            self.check.overlaps.len(),
            self.check.jitter_overlaps,
            self.check.token_violations.len(),
            self.liveness_failures.len()
        ));
        for (a, b) in self.check.overlaps.iter().take(5) {
            out.push_str(&format!("  OVERLAP: {a:?} and {b:?}\n"));
        }
        for violation in self.check.token_violations.iter().take(5) {
            out.push_str(&format!("  FENCING: {violation}\n"));
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
}

impl Store {
    fn upstream(&self, slot: usize) -> SocketAddr {
        match self {
            Store::Etcd(server) => server.client_addr(slot % 3),
            Store::Redis(server) => server.addr(),
        }
    }
}

/// One candidate position: its proxy outlives the processes started in it.
struct Slot {
    proxy: FaultProxy,
    child: Option<Child>,
    generation: usize,
    file: PathBuf,
    leading: bool,
}

struct Run {
    config: Config,
    dir: tempfile::TempDir,
    election: String,
    slots: Vec<Slot>,
    files: Vec<PathBuf>,
    events: mpsc::UnboundedReceiver<(usize, usize, String, Instant)>,
    events_tx: mpsc::UnboundedSender<(usize, usize, String, Instant)>,
}

impl Run {
    fn endpoint(&self, proxy: SocketAddr) -> String {
        match self.config.backend {
            Backend::Etcd => proxy.to_string(),
            Backend::Redis => format!("redis://{proxy}"),
        }
    }

    fn spawn(&mut self, slot: usize) -> BoxResult<()> {
        let generation = self.files.len();
        let file = self
            .dir
            .path()
            .join(format!("slot{slot}-process{generation}.samples"));
        let endpoint = self.endpoint(self.slots[slot].proxy.addr());
        let mut child = Command::new(&self.config.candidate)
            .arg(self.config.backend.name())
            .arg(endpoint)
            .arg(&self.election)
            .arg(self.config.ttl.as_millis().to_string())
            .arg(&file)
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
        self.files.push(file.clone());
        let s = &mut self.slots[slot];
        s.child = Some(child);
        s.generation = generation;
        s.file = file;
        s.leading = false;
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

    /// Applies one event line to the slots' state; returns the slot if it was elected.
    fn apply(&mut self, slot: usize, generation: usize, line: &str) -> Option<usize> {
        let s = &mut self.slots[slot];
        if s.generation != generation {
            return None;
        }
        if line.starts_with("elected") {
            s.leading = true;
            Some(slot)
        } else {
            s.leading = false;
            None
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
            if let Some(slot) = self.apply(slot, generation, &line)
                && Some(slot) != exclude
            {
                return Some((slot, at));
            }
        }
    }

    /// The slot that leads now, waiting for one if needed.
    async fn leader(&mut self, limit: Duration) -> Option<usize> {
        while let Ok((slot, generation, line, _)) = self.events.try_recv() {
            self.apply(slot, generation, &line);
        }
        if let Some(slot) = self.slots.iter().position(|s| s.leading) {
            return Some(slot);
        }
        self.elected(None, limit).await.map(|(slot, _)| slot)
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
            if self.apply(slot, generation, &line).is_some() {
                elected_at = Some(at);
            }
        }
        match self.slots.iter().position(|s| s.leading) {
            Some(slot) => Some((slot, elected_at.unwrap_or(restarted))),
            None => self.elected(None, limit).await,
        }
    }

    async fn respawn(&mut self, slot: usize) -> BoxResult<()> {
        if let Some(mut child) = self.slots[slot].child.take() {
            let _ = timeout(Duration::from_secs(10), child.wait()).await;
            let _ = child.kill().await;
        }
        self.spawn(slot)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> BoxResult<T> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// Starts the store and three candidates, injects `config.rounds` faults, stops
/// everything, and checks what the candidates recorded.
pub async fn run(config: Config) -> BoxResult<Report> {
    let backend = config.backend;
    let ttl = config.ttl;
    let mut store = blocking(move || -> io::Result<Store> {
        Ok(match backend {
            Backend::Etcd => Store::Etcd(EtcdServer::start_cluster(3)?),
            Backend::Redis => Store::Redis(RedisServer::start_persistent()?),
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
            file: PathBuf::new(),
            leading: false,
        });
    }
    let mut run = Run {
        election: format!("chaos-{}", std::process::id()),
        dir: tempfile::Builder::new().prefix("leader-chaos-").tempdir()?,
        config,
        slots,
        files: Vec::new(),
        events,
        events_tx,
    };
    for slot in 0..3 {
        run.spawn(slot)?;
    }

    let faults = Fault::all(backend);
    let mut failovers: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let mut liveness_failures = Vec::new();
    for round in 0..run.config.rounds {
        let fault = faults[round % faults.len()];
        let Some(leader) = run.leader(Duration::from_secs(30)).await else {
            liveness_failures.push(format!("round {round}: no leader before {fault:?}"));
            break;
        };
        let bound = fault.bound(ttl);
        let started = Instant::now();
        let elected = match fault {
            Fault::Kill | Fault::Term => {
                let signal = if fault == Fault::Kill {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                kill(run.pid(leader)?, signal)?;
                let elected = run.elected(Some(leader), bound).await;
                run.respawn(leader).await?;
                elected
            }
            Fault::Stop => {
                let pid = run.pid(leader)?;
                kill(pid, Signal::SIGSTOP)?;
                let elected = run.elected(Some(leader), bound).await;
                sleep_until(started + ttl.mul_f64(1.5)).await;
                kill(pid, Signal::SIGCONT)?;
                elected
            }
            Fault::Partition => {
                run.slots[leader].proxy.hold();
                let elected = run.elected(Some(leader), bound).await;
                sleep_until(started + ttl * 2).await;
                run.slots[leader].proxy.pass();
                elected
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
                    }
                    Ok(store)
                })
                .await??;
                for slot in &run.slots {
                    slot.proxy.cut();
                }
                run.back_after_restart(bound).await
            }
            Fault::MemberLoss => {
                let member = leader % 3;
                if let Store::Etcd(server) = &mut store {
                    server.kill(member);
                }
                let elected = run.elected(Some(leader), bound).await;
                store = blocking(move || -> io::Result<Store> {
                    if let Store::Etcd(server) = &mut store {
                        server.restart(member)?;
                    }
                    Ok(store)
                })
                .await??;
                elected
            }
        };
        match elected {
            Some((_, at)) => failovers
                .entry(fault)
                .or_default()
                .push(at.duration_since(started)),
            None => liveness_failures.push(format!(
                "round {round}: no leader within {bound:?} after {fault:?}"
            )),
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
    }

    for slot in 0..run.slots.len() {
        if let Ok(pid) = run.pid(slot) {
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
    for slot in &mut run.slots {
        if let Some(mut child) = slot.child.take()
            && timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
        {
            let _ = child.kill().await;
        }
    }
    let files = run.files.clone();
    let spans = blocking(move || read_spans(&files)).await??;
    drop(store);
    Ok(Report {
        backend,
        ttl,
        failovers,
        liveness_failures,
        check: check(&spans),
    })
}

/// Reads `CHAOS_ROUNDS` (default `default`).
pub fn rounds_from_env(default: usize) -> usize {
    std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(process: usize, token: u64, from: u64, to: u64) -> Span {
        Span {
            process,
            token,
            first_before: from,
            first_after: from + 1,
            last_before: to - 1,
            last_after: to,
        }
    }

    #[test]
    fn disjoint_spans_with_increasing_tokens_pass() {
        let result = check(&[
            span(0, 1, 0, 100),
            span(1, 2, 200, 300),
            span(0, 3, 400, 500),
        ]);
        assert!(result.overlaps.is_empty() && result.token_violations.is_empty());
    }

    #[test]
    fn overlapping_spans_are_found() {
        let result = check(&[span(0, 1, 0, 100), span(1, 2, 50, 300)]);
        assert_eq!(result.overlaps.len(), 1);
    }

    #[test]
    fn overlap_within_one_samples_jitter_is_not_a_violation() {
        // Process 0's last check straddled process 1's first: only the widest spans meet.
        let result = check(&[span(0, 1, 0, 101), span(1, 2, 100, 300)]);
        assert!(result.overlaps.is_empty());
        assert_eq!(result.jitter_overlaps, 1);
    }

    #[test]
    fn tokens_going_back_or_reused_are_found() {
        let back = check(&[span(0, 5, 0, 100), span(1, 4, 200, 300)]);
        assert_eq!(back.token_violations.len(), 1);
        let reused = check(&[span(0, 5, 0, 100), span(1, 5, 200, 300)]);
        assert!(!reused.token_violations.is_empty());
    }

    #[test]
    fn samples_files_become_spans_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a");
        std::fs::write(&file, "7 10 11\n7 20 21\n8 40 41\n8 5").unwrap();
        let spans = read_spans(&[file, dir.path().join("missing")]).unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(
            (spans[0].token, spans[0].first_before, spans[0].last_after),
            (7, 10, 21)
        );
        assert_eq!((spans[1].token, spans[1].last_after), (8, 41));
    }
}
