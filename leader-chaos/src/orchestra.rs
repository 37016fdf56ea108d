//! The orchestrator's side of a run: the candidate slots (each a proxy and the processes
//! started in it, one after another), their processes' events, and waiting for leaders.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use leader_testkit::FaultProxy;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::checker::Tampering;
use crate::{BoxResult, Config, StoreKind, UnsafeMode, monotonic_ns, timeline};

/// One candidate position: its proxy outlives the processes started in it.
pub(crate) struct Slot {
    pub(crate) proxy: FaultProxy,
    pub(crate) child: Option<Child>,
    pub(crate) generation: usize,
    pub(crate) leading: Option<u64>,
    /// The last `campaigning` or `elected` line of the current process.
    pub(crate) active_at: Option<Instant>,
    /// Whether its last line was `campaigning`: it is in a campaign (waiting in line).
    pub(crate) campaigning: bool,
    /// Set when the orchestrator SIGKILLed the process (a signal exit is expected).
    pub(crate) killed: bool,
}

impl Slot {
    pub(crate) fn new(proxy: FaultProxy) -> Slot {
        Slot {
            proxy,
            child: None,
            generation: usize::MAX,
            leading: None,
            active_at: None,
            campaigning: false,
            killed: false,
        }
    }
}

/// A process's event line: its slot, its process number, the line, when it was read.
pub(crate) type EventLine = (usize, usize, String, Instant);

pub(crate) struct Run {
    pub(crate) config: Config,
    /// The URL candidates use instead of their proxy's (Redis under Sentinel).
    pub(crate) direct_url: Option<String>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) election: String,
    pub(crate) slots: Vec<Slot>,
    pub(crate) files: Vec<PathBuf>,
    /// Per process (generation), whether it was SIGKILLed (its log may end torn).
    pub(crate) killed: Vec<bool>,
    pub(crate) events: mpsc::UnboundedReceiver<EventLine>,
    pub(crate) events_tx: mpsc::UnboundedSender<EventLine>,
    pub(crate) bad_exits: Vec<String>,
    pub(crate) pauses: Vec<(usize, u64, u64)>,
    pub(crate) tampered: Vec<Tampering>,
    /// Per process, when it could not work: SIGKILLed (until forever), as (process, from,
    /// to); the pauses are in `pauses`.
    pub(crate) down: Vec<(usize, u64, u64)>,
    /// Per process (generation): its slot, when it started and when it was reaped.
    pub(crate) processes: Vec<timeline::ProcessSpan>,
}

impl Run {
    pub(crate) fn endpoint(&self, proxy: SocketAddr) -> String {
        if let Some(url) = &self.direct_url {
            return url.clone();
        }
        match self.config.backend {
            StoreKind::Postgres => format!("postgres://postgres@{proxy}/postgres"),
            backend => format!("{}://{proxy}", backend.name()),
        }
    }

    pub(crate) fn spawn(&mut self, slot: usize) -> BoxResult<()> {
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
            .arg(format!("--elections={}", self.config.elections))
            .args(self.config.unsafe_mode.map(|mode| match mode {
                UnsafeMode::Lease => "--unsafe=lease",
                UnsafeMode::AnswerTime => "--unsafe=answer-time",
            }))
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

    pub(crate) fn pid(&self, slot: usize) -> BoxResult<Pid> {
        let id = self.slots[slot]
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or("candidate not running")?;
        Ok(Pid::from_raw(i32::try_from(id)?))
    }

    pub(crate) fn signal(&mut self, slot: usize, signal: Signal) -> BoxResult<()> {
        if signal == Signal::SIGKILL {
            self.slots[slot].killed = true;
            let generation = self.slots[slot].generation;
            self.killed[generation] = true;
            self.down.push((generation, monotonic_ns(), u64::MAX));
        }
        kill(self.pid(slot)?, signal)?;
        Ok(())
    }

    /// Applies one event line to the slots' state; returns the slot if it was elected.
    pub(crate) fn apply(
        &mut self,
        slot: usize,
        generation: usize,
        line: &str,
        at: Instant,
    ) -> Option<usize> {
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

    pub(crate) fn drain(&mut self) {
        while let Ok((slot, generation, line, at)) = self.events.try_recv() {
            self.apply(slot, generation, &line, at);
        }
    }

    /// Waits until a slot other than `exclude` is elected; returns it and when.
    pub(crate) async fn elected(
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
    pub(crate) async fn leader(&mut self, limit: Duration) -> Option<usize> {
        self.drain();
        if let Some(slot) = self.slots.iter().position(|s| s.leading.is_some()) {
            return Some(slot);
        }
        self.elected(None, limit).await.map(|(slot, _)| slot)
    }

    /// Some leader within `limit` from now (the current one, if it still leads when the
    /// events so far are applied); with when it was (last) elected or now.
    pub(crate) async fn some_leader(&mut self, limit: Duration) -> Option<(usize, Instant)> {
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
    pub(crate) async fn back_after_restart(&mut self, limit: Duration) -> Option<(usize, Instant)> {
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
    pub(crate) async fn reap(&mut self, slot: usize) {
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
                || (self.slots[slot].killed && status.signal() == Some(Signal::SIGKILL as i32));
            if !expected {
                self.bad_exits.push(format!(
                    "slot {slot} (process {}) exited with {status}",
                    self.slots[slot].generation
                ));
            }
        }
    }

    pub(crate) async fn respawn(&mut self, slot: usize) -> BoxResult<()> {
        self.reap(slot).await;
        self.spawn(slot)
    }

    /// Whether `slot` leads, or is in a campaign it began after `since` (waiting in line),
    /// waiting up to `limit` for either.
    pub(crate) async fn rejoined(&mut self, slot: usize, since: Instant, limit: Duration) -> bool {
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

    /// The last deadline the leader in `slot` logged for term `token`.
    pub(crate) fn last_deadline(&self, slot: usize, token: u64) -> Option<u64> {
        let file = self.files.get(self.slots[slot].generation)?;
        crate::checker::last_deadline(file, token).ok()?
    }

    /// How long ago the leader in `slot` (term `token`) last renewed: its last logged
    /// deadline less the lease it was counted from (TTL less the default safety margin).
    pub(crate) fn since_renewal(&self, slot: usize, token: u64) -> Option<Duration> {
        let deadline = self.last_deadline(slot, token)?;
        let ttl = self.config.ttl;
        let margin = (ttl / 50).max(Duration::from_millis(2));
        let lease = u64::try_from((ttl - margin).as_nanos()).ok()?;
        let confirmed = deadline.checked_sub(lease)?;
        Some(Duration::from_nanos(monotonic_ns().checked_sub(confirmed)?))
    }
}
