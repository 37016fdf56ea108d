//! [`MemoryDriver`]: an in-process store with real lease expiry, for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use crate::{Candidate, CandidateInfo, Driver, Error, Grant, LeaderInfo, Result};

/// An in-process store shared by any number of [`MemoryDriver`]s: leases expire on the
/// Tokio clock (so `tokio::time::pause()` controls them), fencing tokens come from a counter
/// per election, and switches simulate faults.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> leader_core::Result<()> {
/// use leader_core::{Election, testing::MemoryStore};
///
/// let store = MemoryStore::new();
/// let election = Election::builder(store.driver(), "jobs").build()?;
/// let term = election.campaign().await?;
/// assert!(election.status().is_leader());
/// assert_eq!(term.fencing_token(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    elections: Mutex<HashMap<String, ElectionState>>,
    available: AtomicBool,
    /// Bumped at every change; waiters and observers watch it.
    changes: watch::Sender<u64>,
}

impl Default for StoreInner {
    fn default() -> Self {
        StoreInner {
            elections: Mutex::new(HashMap::new()),
            available: AtomicBool::new(true),
            changes: watch::Sender::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct ElectionState {
    holder: Option<Holder>,
    fence: u64,
    /// The candidates waiting in `campaign`, in order of arrival, with their values.
    waiting: Vec<(String, Vec<u8>)>,
    /// A handover's nominee and the nomination's expiry.
    nomination: Option<(String, Instant)>,
}

#[derive(Debug, Clone)]
struct Holder {
    id: String,
    value: Vec<u8>,
    fencing_token: u64,
    expires_at: Instant,
}

impl ElectionState {
    /// The live nomination, if any: it ends at its expiry or when the nominee stops waiting.
    fn live_nomination(&mut self, now: Instant) -> Option<&(String, Instant)> {
        let waiting = &self.waiting;
        if self
            .nomination
            .as_ref()
            .is_some_and(|(id, until)| *until <= now || !waiting.iter().any(|(w, _)| w == id))
        {
            self.nomination = None;
        }
        self.nomination.as_ref()
    }

    /// The holder, if its lease has not expired (expired ones are dropped here).
    fn live_holder(&mut self, now: Instant) -> Option<&mut Holder> {
        if self.holder.as_ref().is_some_and(|h| h.expires_at <= now) {
            self.holder = None;
        }
        self.holder.as_mut()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new driver connected to this store, with its own connection switch.
    pub fn driver(&self) -> MemoryDriver {
        MemoryDriver {
            store: self.clone(),
            connected: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Makes the whole store reachable or not: while unreachable, every call of every
    /// driver fails with [`Error::Store`], and leases keep expiring.
    pub fn set_available(&self, available: bool) {
        self.inner.available.store(available, Ordering::SeqCst);
        self.changed();
    }

    /// Deletes the leader's key of `election` behind its back, as an operator (or an
    /// expiry the leader did not see) would.
    pub fn revoke(&self, election: &str) {
        if let Some(state) = self.elections().get_mut(election) {
            state.holder = None;
        }
        self.changed();
    }

    fn elections(&self) -> MutexGuard<'_, HashMap<String, ElectionState>> {
        self.inner
            .elections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|version| *version += 1);
    }

    /// The leader of `election` and when its lease expires.
    fn holder(&self, election: &str) -> Option<Holder> {
        let now = Instant::now();
        self.elections()
            .get_mut(election)
            .and_then(|state| state.live_holder(now).cloned())
    }
}

/// A [`Driver`] over a [`MemoryStore`]. Cheap to clone; clones share the connection
/// switch.
#[derive(Debug, Clone)]
pub struct MemoryDriver {
    store: MemoryStore,
    connected: Arc<AtomicBool>,
}

impl MemoryDriver {
    /// A driver on a store of its own.
    pub fn new() -> Self {
        MemoryStore::new().driver()
    }

    /// The store this driver talks to.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Cuts (`false`) or restores (`true`) this driver's connection to the store, as a
    /// network partition would: calls fail, and the store keeps its leases running.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.store.changed();
    }

    fn check_reachable(&self) -> Result<()> {
        if self.connected.load(Ordering::SeqCst)
            && self.store.inner.available.load(Ordering::SeqCst)
        {
            Ok(())
        } else {
            Err(Error::store(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "memory store unreachable",
            )))
        }
    }

    /// Takes the lead if nobody holds it; otherwise returns when the holder's lease ends.
    fn try_acquire(&self, candidate: &Candidate) -> std::result::Result<Grant, Instant> {
        let now = Instant::now();
        let mut elections = self.store.elections();
        let state = elections.entry(candidate.election.clone()).or_default();
        if let Some(holder) = state.live_holder(now)
            && holder.id != candidate.id
        {
            return Err(holder.expires_at);
        }
        let nominated = match state.live_nomination(now) {
            Some((nominee, until)) if *nominee != candidate.id => return Err(*until),
            Some(_) => true,
            None => false,
        };
        // The line is kept in order of arrival: the head is elected next.
        let holds = state.holder.as_ref().is_some_and(|h| h.id == candidate.id);
        if !nominated
            && !holds
            && state
                .waiting
                .first()
                .is_some_and(|(head, _)| *head != candidate.id)
        {
            return Err(now + candidate.ttl);
        }
        state.nomination = None;
        state.fence += 1;
        state.holder = Some(Holder {
            id: candidate.id.clone(),
            value: candidate.value.clone(),
            fencing_token: state.fence,
            expires_at: now + candidate.ttl,
        });
        Ok(Grant::new(state.fence, now, candidate.ttl))
    }
}

/// A candidate's place among the waiters, while its `campaign` runs.
struct InLine {
    store: MemoryStore,
    election: String,
    id: String,
}

impl InLine {
    fn enter(store: &MemoryStore, candidate: &Candidate) -> Self {
        let mut elections = store.elections();
        let state = elections.entry(candidate.election.clone()).or_default();
        if !state.waiting.iter().any(|(id, _)| *id == candidate.id) {
            state
                .waiting
                .push((candidate.id.clone(), candidate.value.clone()));
        }
        InLine {
            store: store.clone(),
            election: candidate.election.clone(),
            id: candidate.id.clone(),
        }
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        if let Some(state) = self.store.elections().get_mut(&self.election) {
            state.waiting.retain(|(id, _)| *id != self.id);
        }
        self.store.changed();
    }
}

impl Default for MemoryDriver {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Driver for MemoryDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        let mut changes = self.store.inner.changes.subscribe();
        let _in_line = InLine::enter(&self.store, candidate);
        loop {
            changes.borrow_and_update();
            self.check_reachable()?;
            let expires_at = match self.try_acquire(candidate) {
                Ok(grant) => {
                    self.store.changed();
                    return Ok(grant);
                }
                Err(expires_at) => expires_at,
            };
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Error::store(std::io::Error::other("memory store dropped")));
                    }
                }
                () = sleep_until(expires_at) => {}
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        self.check_reachable()?;
        let now = Instant::now();
        let mut elections = self.store.elections();
        let holder = elections
            .get_mut(&candidate.election)
            .and_then(|state| state.live_holder(now))
            .filter(|h| h.id == candidate.id && h.fencing_token == grant.fencing_token)
            .ok_or(Error::TermGone)?;
        holder.expires_at = now + candidate.ttl;
        Ok(Grant::new(grant.fencing_token, now, candidate.ttl))
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        self.check_reachable()?;
        let removed = {
            let mut elections = self.store.elections();
            match elections.get_mut(&candidate.election) {
                Some(state)
                    if state.holder.as_ref().is_some_and(|h| {
                        h.id == candidate.id && fencing_token.is_none_or(|t| t == h.fencing_token)
                    }) =>
                {
                    state.holder = None;
                    true
                }
                Some(state)
                    if fencing_token.is_none()
                        && state
                            .nomination
                            .as_ref()
                            .is_some_and(|(id, _)| *id == candidate.id) =>
                {
                    state.nomination = None;
                    true
                }
                _ => false,
            }
        };
        if removed {
            self.store.changed();
        }
        Ok(())
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        self.check_reachable()?;
        let now = Instant::now();
        let mut elections = self.store.elections();
        let Some(state) = elections.get_mut(election) else {
            return Ok(Vec::new());
        };
        let holder = state.live_holder(now).cloned();
        let mut line: Vec<CandidateInfo> = holder
            .iter()
            .map(|h| CandidateInfo::new(h.id.clone(), h.value.clone(), true))
            .collect();
        line.extend(
            state
                .waiting
                .iter()
                .filter(|(id, _)| holder.as_ref().is_none_or(|h| h.id != *id))
                .map(|(id, value)| CandidateInfo::new(id.clone(), value.clone(), false)),
        );
        Ok(line)
    }

    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        self.check_reachable()?;
        let now = Instant::now();
        {
            let mut elections = self.store.elections();
            let state = elections
                .get_mut(&candidate.election)
                .ok_or(Error::TermGone)?;
            state
                .live_holder(now)
                .filter(|h| h.id == candidate.id && h.fencing_token == fencing_token)
                .ok_or(Error::TermGone)?;
            if !state.waiting.iter().any(|(id, _)| id == nominee) {
                return Err(Error::NotWaiting {
                    id: nominee.to_owned(),
                });
            }
            state.holder = None;
            state.nomination = Some((nominee.to_owned(), now + candidate.ttl));
        }
        self.store.changed();
        Ok(())
    }

    async fn proclaim(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        value: &[u8],
    ) -> Result<()> {
        self.check_reachable()?;
        let now = Instant::now();
        {
            let mut elections = self.store.elections();
            let holder = elections
                .get_mut(&candidate.election)
                .and_then(|state| state.live_holder(now))
                .filter(|h| h.id == candidate.id && h.fencing_token == fencing_token)
                .ok_or(Error::TermGone)?;
            holder.value = value.to_vec();
        }
        self.store.changed();
        Ok(())
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        self.check_reachable()?;
        Ok(self
            .store
            .holder(election)
            .map(|h| LeaderInfo::new(h.id, h.value, h.fencing_token)))
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let driver = self.clone();
        let election = election.to_owned();
        let changes = self.store.inner.changes.subscribe();
        futures::stream::unfold(
            (driver, election, changes, true),
            |(driver, election, mut changes, first)| async move {
                if !first {
                    let expiry = driver
                        .store
                        .holder(&election)
                        .map(|h| h.expires_at)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                        }
                        () = sleep_until(expiry) => {}
                    }
                }
                changes.borrow_and_update();
                let item = driver.leader(&election).await;
                Some((item, (driver, election, changes, false)))
            },
        )
        .boxed()
    }
}
