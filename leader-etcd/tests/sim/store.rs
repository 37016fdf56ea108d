//! The state of the modelled etcd: keys with revisions, leases, history for watches and
//! reads at a revision, compaction. No I/O, no time of its own: callers pass the store's
//! clock (`Net::store_now`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use leader_etcd::io::{
    Compare, CompareOp, Kv, LeaseGrant, LeaseTtl, Op, OpResult, Range, RangeResult, Sort, Target,
    Txn, TxnResult, WatchEvent, WatchMessage, WatchRequest,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How often etcd looks for expired leases (its `leaseRevokeRate` loop runs every 500 ms).
pub const SWEEP: Duration = Duration::from_millis(500);

/// A request etcd refuses as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// etcdserver: requested lease not found.
    LeaseNotFound,
    /// etcdserver: mvcc: required revision has been compacted.
    Compacted,
    /// etcdserver: mvcc: required revision is a future revision.
    FutureRevision,
    /// etcdserver: duplicate key given in txn request (two writes of one key in a branch).
    DuplicateKey,
    /// etcdserver: too many operations in txn request (a list of a transaction, or of a
    /// nested one, longer than `--max-txn-ops`, 128 by default).
    TooManyOps,
}

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// Whether a list of `txn`, or of a transaction nested in it, is longer than etcd allows:
/// `--max-txn-ops` bounds a transaction's longest list, and a nested transaction's lists
/// by what the transactions it is nested in leave of it (etcd's `checkTxnRequest`).
fn too_many_ops(txn: &Txn) -> bool {
    let longest = txn
        .compare
        .len()
        .max(txn.success.len())
        .max(txn.failure.len());
    longest > MAX_TXN_OPS
        || txn
            .success
            .iter()
            .chain(&txn.failure)
            .any(|op| matches!(op, Op::Reads(ranges) if ranges.len() > MAX_TXN_OPS - longest))
}

/// Whether a branch writes a key twice (a put and a put, or a put inside a deleted range),
/// which etcd refuses before looking at the compares.
fn duplicate_writes(ops: &[Op]) -> bool {
    let mut puts: BTreeSet<&[u8]> = BTreeSet::new();
    for op in ops {
        if let Op::Put { key, .. } = op
            && !puts.insert(key)
        {
            return true;
        }
    }
    ops.iter().any(|op| match op {
        Op::Delete { key, end } => puts.iter().any(|put| in_range(put, key, end)),
        _ => false,
    })
}

/// A lease.
#[derive(Debug, Clone)]
pub struct Lease {
    pub ttl: i64,
    /// On the store's clock.
    pub expiry: Instant,
    pub keys: BTreeSet<Vec<u8>>,
}

/// The lessor of a deposed etcd leader (one cut off from its cluster), which answers what
/// reaches it until it steps down (etcd's CheckQuorum; a paused one later still): it never
/// sees the keep-alives the new leader accepts, so it reads a renewed lease low. Two ways
/// to reach it:
/// - A client whose member forwarded its first lease read there just before the change:
///   the member stamps the answer with the raft term it knows when the answer comes, the
///   new one, and knows the new leader from then on (src/expiry.rs rests on this).
/// - A client connected to the deposed leader itself ([`stuck`](Self::stuck)): its lease
///   reads answer stale with the old raft term, its keep-alives succeed there (etcd 3.4's
///   lessor renews without raft) without reaching the new leader, and everything that
///   needs raft or a linearizable read (grants, revocations, ranges, transactions,
///   watches) fails.
#[derive(Debug, Clone)]
pub struct DeposedLessor {
    /// Each lease's granted TTL and expiry as the deposed lessor knows them.
    pub leases: BTreeMap<i64, (i64, Instant)>,
    /// Until when it answers.
    pub until: Instant,
    /// The raft term it was leader in.
    pub raft_term: u64,
    /// The clients that read a lease since the change (their member knows the new leader).
    pub learnt: BTreeSet<usize>,
    /// Whether each client that made a request since the change is connected to the
    /// deposed leader (drawn at its first request).
    pub stuck: BTreeMap<usize, bool>,
}

impl DeposedLessor {
    /// The lease `id` as this lessor reads it at `now`, with its raft term `raft_term`:
    /// the remaining time truncated toward zero, negative once expired (it never has a
    /// revocation committed), -1 for a lease it never had.
    fn time_to_live(&self, id: i64, now: Instant, raft_term: u64) -> LeaseTtl {
        match self.leases.get(&id) {
            Some(&(ttl, expiry)) => LeaseTtl {
                ttl: if expiry >= now {
                    expiry.duration_since(now).as_secs() as i64
                } else {
                    -(now.duration_since(expiry).as_secs() as i64)
                },
                granted: ttl,
                raft_term,
            },
            None => LeaseTtl {
                ttl: -1,
                granted: 0,
                raft_term,
            },
        }
    }
}

/// A watch on a stream.
#[derive(Debug, Clone)]
pub struct Watch {
    pub request: WatchRequest,
}

/// An open watch stream: its watches and where its messages go (to the stream's delivery
/// task, which delays them and drops the stream when its client is cut off).
#[derive(Debug)]
pub struct Stream {
    pub client: usize,
    pub watches: BTreeMap<i64, Watch>,
    pub out: mpsc::UnboundedSender<WatchMessage>,
}

/// The modelled etcd.
#[derive(Debug)]
pub struct Store {
    pub revision: i64,
    pub compacted: i64,
    pub kvs: BTreeMap<Vec<u8>, Kv>,
    /// Every revision's events, in order.
    pub history: Vec<(i64, Vec<WatchEvent>)>,
    pub leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    pub streams: BTreeMap<u64, Stream>,
    next_stream: u64,
    /// Per election: the key that leads and its create revision, as last reported.
    pub leaders: BTreeMap<String, (Vec<u8>, i64)>,
    /// Terms handed since the last look: (candidate id, election, token).
    pub grants: Vec<(String, String, u64)>,
    /// etcd's raft term: one more at each restart (a new etcd leader).
    pub raft_term: u64,
    /// The lessor of the etcd leader the last restart deposed, while it may still answer.
    pub deposed: Option<DeposedLessor>,
    /// etcd's shortest lease, in seconds: shorter grants get this TTL. 1 s with the
    /// test servers' 10 ms heartbeat; 2 s with etcd's default settings (1.5 x the
    /// election timeout, rounded up), under which a 1 s TTL runs on a 2 s lease.
    pub min_ttl: i64,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            revision: 1,
            compacted: 0,
            kvs: BTreeMap::new(),
            history: Vec::new(),
            leases: BTreeMap::new(),
            next_lease: 0x694d_0000_0000,
            streams: BTreeMap::new(),
            next_stream: 1,
            leaders: BTreeMap::new(),
            grants: Vec::new(),
            raft_term: 2,
            deposed: None,
            min_ttl: 1,
        }
    }
}

fn compare(kv: Option<&Kv>, compare: &Compare) -> bool {
    use std::cmp::Ordering;
    let ordering = match (&compare.target, kv) {
        (Target::Value(_), None) => return false,
        (Target::Value(value), Some(kv)) => kv.value.as_slice().cmp(value.as_slice()),
        (Target::CreateRevision(n), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(n),
        (Target::ModRevision(n), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(n),
        (Target::Version(n), kv) => kv.map_or(0, |kv| kv.version).cmp(n),
        (Target::Lease(n), kv) => kv.map_or(0, |kv| kv.lease).cmp(n),
    };
    match compare.op {
        CompareOp::Equal => ordering == Ordering::Equal,
        CompareOp::NotEqual => ordering != Ordering::Equal,
        CompareOp::Less => ordering == Ordering::Less,
        CompareOp::Greater => ordering == Ordering::Greater,
    }
}

fn in_range(key: &[u8], start: &[u8], end: &Option<Vec<u8>>) -> bool {
    Range {
        key: start.to_vec(),
        end: end.clone(),
        ..Range::default()
    }
    .contains(key)
}

impl Store {
    /// Keys in `range` as of now, or as of `range.revision`.
    pub fn range(&self, range: &Range) -> Result<RangeResult, Refusal> {
        let mut kvs: Vec<Kv> = if range.revision > 0 {
            if range.revision < self.compacted {
                return Err(Refusal::Compacted);
            }
            if range.revision > self.revision {
                return Err(Refusal::FutureRevision);
            }
            self.at(range.revision)
                .into_values()
                .filter(|kv| range.contains(&kv.key))
                .collect()
        } else {
            self.kvs
                .values()
                .filter(|kv| range.contains(&kv.key))
                .cloned()
                .collect()
        };
        kvs.retain(|kv| {
            (range.min_create_revision == 0 || kv.create_revision >= range.min_create_revision)
                && (range.max_create_revision == 0
                    || kv.create_revision <= range.max_create_revision)
        });
        match range.sort {
            Sort::Key => {}
            Sort::CreateAscend => kvs.sort_by_key(|kv| kv.create_revision),
            Sort::CreateDescend => kvs.sort_by_key(|kv| std::cmp::Reverse(kv.create_revision)),
        }
        let mut more = false;
        if range.limit > 0 && kvs.len() > range.limit as usize {
            kvs.truncate(range.limit as usize);
            more = true;
        }
        if range.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        Ok(RangeResult { kvs, more })
    }

    /// Every key as of `revision`, rebuilt from the history (reads at a revision are rare).
    fn at(&self, revision: i64) -> BTreeMap<Vec<u8>, Kv> {
        let mut state = self.kvs.clone();
        for (rev, events) in self.history.iter().rev() {
            if *rev <= revision {
                break;
            }
            for event in events.iter().rev() {
                // Undo: what the key was before this event.
                let before = self.before(&event.kv.key, *rev);
                match before {
                    Some(kv) => state.insert(kv.key.clone(), kv),
                    None => state.remove(&event.kv.key),
                };
            }
        }
        state
    }

    /// The key as it was just before revision `revision` (from the history).
    fn before(&self, key: &[u8], revision: i64) -> Option<Kv> {
        self.history
            .iter()
            .rev()
            .filter(|(rev, _)| *rev < revision)
            .flat_map(|(_, events)| events.iter().rev())
            .find(|event| event.kv.key == key)
            .and_then(|event| (!event.deleted).then(|| event.kv.clone()))
    }

    /// Runs a transaction.
    pub fn txn(&mut self, txn: &Txn) -> Result<TxnResult, Refusal> {
        if too_many_ops(txn) {
            return Err(Refusal::TooManyOps);
        }
        if duplicate_writes(&txn.success) || duplicate_writes(&txn.failure) {
            return Err(Refusal::DuplicateKey);
        }
        let succeeded = txn.compare.iter().all(|c| compare(self.kvs.get(&c.key), c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // etcd checks every put's lease, and every read's revision, before applying any.
        for op in ops {
            match op {
                Op::Put { lease, .. } if *lease != 0 && !self.leases.contains_key(lease) => {
                    return Err(Refusal::LeaseNotFound);
                }
                Op::Get(range) if range.revision > 0 && range.revision < self.compacted => {
                    return Err(Refusal::Compacted);
                }
                Op::Reads(ranges)
                    if ranges
                        .iter()
                        .any(|r| r.revision > 0 && r.revision < self.compacted) =>
                {
                    return Err(Refusal::Compacted);
                }
                _ => {}
            }
        }
        let next = self.revision + 1;
        let mut events = Vec::new();
        let mut results = Vec::new();
        for op in ops {
            match op {
                Op::Get(range) => results.push(OpResult::Get(self.range(range)?)),
                Op::Reads(ranges) => results.push(OpResult::Reads(
                    ranges
                        .iter()
                        .map(|range| self.range(range))
                        .collect::<Result<_, _>>()?,
                )),
                Op::Put { key, value, lease } => {
                    self.put(key, value, *lease, next, &mut events);
                    results.push(OpResult::Put);
                }
                Op::Delete { key, end } => {
                    let keys: Vec<Vec<u8>> = self
                        .kvs
                        .keys()
                        .filter(|k| in_range(k, key, end))
                        .cloned()
                        .collect();
                    for k in &keys {
                        self.delete(k, next, &mut events);
                    }
                    results.push(OpResult::Delete(keys.len() as i64));
                }
            }
        }
        self.commit(events);
        Ok(TxnResult {
            revision: self.revision,
            succeeded,
            results,
        })
    }

    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        revision: i64,
        events: &mut Vec<WatchEvent>,
    ) {
        let old = self.kvs.get(key).cloned();
        if let Some(old) = &old
            && old.lease != 0
            && let Some(l) = self.leases.get_mut(&old.lease)
        {
            l.keys.remove(key);
        }
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.insert(key.to_vec());
        }
        let kv = Kv {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: old.as_ref().map_or(revision, |o| o.create_revision),
            mod_revision: revision,
            version: old.as_ref().map_or(1, |o| o.version + 1),
            lease,
        };
        self.kvs.insert(key.to_vec(), kv.clone());
        events.push(WatchEvent { deleted: false, kv });
    }

    fn delete(&mut self, key: &[u8], revision: i64, events: &mut Vec<WatchEvent>) {
        if let Some(old) = self.kvs.remove(key) {
            if old.lease != 0
                && let Some(l) = self.leases.get_mut(&old.lease)
            {
                l.keys.remove(key);
            }
            events.push(WatchEvent {
                deleted: true,
                kv: Kv {
                    key: key.to_vec(),
                    mod_revision: revision,
                    ..Kv::default()
                },
            });
        }
    }

    /// Ends a write: a new revision if anything changed, its events to the watches.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        self.revision += 1;
        let revision = self.revision;
        for stream in self.streams.values() {
            for (id, watch) in &stream.watches {
                let matching = matching(&watch.request, &events);
                if !matching.is_empty() {
                    let _ = stream.out.send(WatchMessage {
                        watch_id: *id,
                        events: matching,
                        ..WatchMessage::default()
                    });
                }
            }
        }
        self.history.push((revision, events));
        self.look_for_grants();
    }

    /// Records the terms handed by this revision: each election's leading key (of a
    /// candidate with an id side key), when it is a new one. Who leads, as the driver's
    /// protocol decides it (`wait.rs`): nobody while a nomination stands; after a term
    /// elected on a nomination (the marker `<election>\0elected` holds its create
    /// revision), that nominee's key while it lasts, then the lowest key if it was created
    /// after the marker's term (older keys are passed over: they create theirs again);
    /// otherwise the lowest key.
    fn look_for_grants(&mut self) {
        let mut lowest: BTreeMap<String, (Vec<u8>, i64)> = BTreeMap::new();
        let mut by_revision: BTreeMap<(String, i64), Vec<u8>> = BTreeMap::new();
        for kv in self.kvs.values() {
            let Ok(key) = std::str::from_utf8(&kv.key) else {
                continue;
            };
            let Some((election, _)) = key.split_once('/') else {
                continue;
            };
            if election.contains('\0') {
                continue;
            }
            by_revision.insert((election.to_owned(), kv.create_revision), kv.key.clone());
            let entry = lowest
                .entry(election.to_owned())
                .or_insert((kv.key.clone(), kv.create_revision));
            if kv.create_revision < entry.1 {
                *entry = (kv.key.clone(), kv.create_revision);
            }
        }
        let mut leading = BTreeMap::new();
        for (election, (key, revision)) in lowest {
            if self
                .kvs
                .contains_key(format!("{election}\0nominee").as_bytes())
            {
                continue;
            }
            let marker = self
                .kvs
                .get(format!("{election}\0elected").as_bytes())
                .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok());
            let leader = match marker {
                None => Some((key, revision)),
                Some(m) => match by_revision.get(&(election.clone(), m)) {
                    Some(nominee) => Some((nominee.clone(), m)),
                    None => (revision > m).then_some((key, revision)),
                },
            };
            if let Some(leader) = leader {
                leading.insert(election, leader);
            }
        }
        for (election, (key, revision)) in &leading {
            if self.leaders.get(election) == Some(&(key.clone(), *revision)) {
                continue;
            }
            let name = String::from_utf8_lossy(key).into_owned();
            let (_, suffix) = name.rsplit_once('/').unwrap_or((&name, ""));
            let id_key = format!("{election}\0id\0{suffix}").into_bytes();
            if let Some(id) = self.kvs.get(&id_key) {
                self.grants.push((
                    String::from_utf8_lossy(&id.value).into_owned(),
                    election.clone(),
                    *revision as u64,
                ));
            }
        }
        self.leaders = leading;
    }

    /// The candidate id of candidate key `key` (`<election>/<suffix>`), from its id side
    /// key; empty if it has none.
    pub fn holder(&self, key: &[u8]) -> String {
        let name = String::from_utf8_lossy(key);
        let Some((election, suffix)) = name.rsplit_once('/') else {
            return String::new();
        };
        let id_key = format!("{election}\0id\0{suffix}").into_bytes();
        self.kvs
            .get(&id_key)
            .map(|id| String::from_utf8_lossy(&id.value).into_owned())
            .unwrap_or_default()
    }

    /// Grants a lease of `ttl` seconds.
    pub fn grant(&mut self, ttl: i64, now: Instant) -> LeaseGrant {
        self.next_lease += 0x1_0001;
        let ttl = ttl.max(self.min_ttl);
        self.leases.insert(
            self.next_lease,
            Lease {
                ttl,
                expiry: now + Duration::from_secs(ttl as u64),
                keys: BTreeSet::new(),
            },
        );
        LeaseGrant {
            id: self.next_lease,
            ttl,
        }
    }

    /// Revokes lease `id`: every key on it deleted at one revision.
    pub fn revoke(&mut self, id: i64) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let next = self.revision + 1;
        let mut events = Vec::new();
        for key in &lease.keys {
            self.delete(key, next, &mut events);
        }
        self.commit(events);
        true
    }

    /// A keep-alive: the lease's TTL, or 0 if there is none. A lease whose expiry has
    /// passed is not renewed even before the sweep revokes it (etcd's lessor revokes it
    /// then and answers "lease not found").
    pub fn keep_alive(&mut self, id: i64, now: Instant) -> i64 {
        if self
            .leases
            .get(&id)
            .is_some_and(|lease| lease.expiry <= now)
        {
            self.revoke(id);
            return 0;
        }
        match self.leases.get_mut(&id) {
            Some(lease) => {
                lease.expiry = now + Duration::from_secs(lease.ttl as u64);
                lease.ttl
            }
            None => 0,
        }
    }

    /// The remaining TTL in whole seconds, truncated toward zero (an expired lease not yet
    /// swept reads 0, as in etcd 3.4 until a second past its expiry, which the 500 ms
    /// sweep never lets happen), or -1; at the current raft term.
    pub fn time_to_live(&mut self, id: i64, now: Instant) -> LeaseTtl {
        match self.leases.get(&id) {
            Some(lease) => LeaseTtl {
                ttl: lease.expiry.saturating_duration_since(now).as_secs() as i64,
                granted: lease.ttl,
                raft_term: self.raft_term,
            },
            None => LeaseTtl {
                ttl: -1,
                granted: 0,
                raft_term: self.raft_term,
            },
        }
    }

    /// A new etcd leader takes over at `now` (a restart of the store); the old leader's
    /// lessor may answer reads until `deposed_until`.
    pub fn change_leader(&mut self, now: Instant, deposed_until: Instant) {
        let leases = self
            .leases
            .iter()
            .map(|(&id, lease)| (id, (lease.ttl, lease.expiry)))
            .collect();
        self.deposed = Some(DeposedLessor {
            leases,
            until: deposed_until,
            raft_term: self.raft_term,
            learnt: BTreeSet::new(),
            stuck: BTreeMap::new(),
        });
        // A new leader's lessor resets every lease's remaining TTL to its TTL.
        for lease in self.leases.values_mut() {
            lease.expiry = now + Duration::from_secs(lease.ttl as u64);
        }
        self.raft_term += 1;
    }

    /// Whether `client`, making a request at `now`, is connected to the deposed leader
    /// ([`DeposedLessor::stuck`]); `draw` decides at its first request after the change.
    pub fn on_deposed(&mut self, client: usize, now: Instant, draw: impl FnOnce() -> bool) -> bool {
        match self.deposed.as_mut() {
            Some(d) if now < d.until => *d.stuck.entry(client).or_insert_with(draw),
            _ => false,
        }
    }

    /// A keep-alive of lease `id` that reached the deposed leader at `now`: its lessor
    /// renews the lease it knows, if not expired (the new leader never hears of it).
    pub fn keep_alive_deposed(&mut self, id: i64, now: Instant) -> i64 {
        let Some(d) = self.deposed.as_mut() else {
            return 0;
        };
        match d.leases.get_mut(&id) {
            Some((ttl, expiry)) if *expiry > now => {
                *expiry = now + Duration::from_secs(*ttl as u64);
                *ttl
            }
            _ => 0,
        }
    }

    /// A lease read that reached the deposed leader at `now` from a client connected to
    /// it: stale, with the old raft term.
    pub fn time_to_live_deposed(&mut self, id: i64, now: Instant) -> LeaseTtl {
        match &self.deposed {
            Some(d) => d.time_to_live(id, now, d.raft_term),
            None => self.time_to_live(id, now),
        }
    }

    /// Whether `client`'s read at `now` could still reach the deposed leader's lessor.
    pub fn may_reach_deposed(&self, client: usize, now: Instant) -> bool {
        self.deposed
            .as_ref()
            .is_some_and(|d| now < d.until && !d.learnt.contains(&client))
    }

    /// [`time_to_live`](Self::time_to_live) read by `client` at `now`; `deposed`: the
    /// read reached the deposed leader's lessor (if [`may_reach_deposed`]), which answers
    /// from what it knew when it was deposed, stamped with the current raft term.
    ///
    /// [`may_reach_deposed`]: Self::may_reach_deposed
    pub fn time_to_live_of(
        &mut self,
        client: usize,
        id: i64,
        now: Instant,
        deposed: bool,
    ) -> LeaseTtl {
        let reachable = self.may_reach_deposed(client, now);
        let raft_term = self.raft_term;
        if let Some(d) = self.deposed.as_mut() {
            d.learnt.insert(client);
            if reachable && deposed {
                return d.time_to_live(id, now, raft_term);
            }
        }
        self.time_to_live(id, now)
    }

    /// Revokes every lease whose expiry has passed: etcd's sweep, every [`SWEEP`]. Until
    /// then an expired lease's keys stand, as in etcd.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expiry <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke(id);
        }
    }

    /// Compacts the history up to `revision`: reads and watches from before it are
    /// refused (the model keeps the events, to rebuild older states simply).
    pub fn compact(&mut self, revision: i64) {
        let revision = revision.min(self.revision);
        if revision > self.compacted {
            self.compacted = revision;
        }
    }

    /// Opens a stream for `client`: its id.
    pub fn open_stream(&mut self, client: usize, out: mpsc::UnboundedSender<WatchMessage>) -> u64 {
        let id = self.next_stream;
        self.next_stream += 1;
        self.streams.insert(
            id,
            Stream {
                client,
                watches: BTreeMap::new(),
                out,
            },
        );
        id
    }

    /// Creates a watch on stream `stream`: confirms it, then sends the history from its
    /// start revision (or cancels it if that was compacted away).
    pub fn add_watch(&mut self, stream: u64, request: WatchRequest) {
        let Some(open) = self.streams.get_mut(&stream) else {
            return;
        };
        let id = request.id;
        let _ = open.out.send(WatchMessage {
            watch_id: id,
            created: true,
            ..WatchMessage::default()
        });
        let start = request.start_revision;
        if start > 0 && start < self.compacted {
            let _ = open.out.send(WatchMessage {
                watch_id: id,
                canceled: true,
                compact_revision: self.compacted,
                cancel_reason: "mvcc: required revision has been compacted".into(),
                ..WatchMessage::default()
            });
            return;
        }
        if start > 0 {
            for (revision, events) in &self.history {
                if *revision < start {
                    continue;
                }
                let mut matching = matching(&request, events);
                if *revision <= self.compacted {
                    // A compaction at R keeps the keys' versions at R but drops the
                    // deletions (tombstones) up to R: a watch from R does not see them.
                    matching.retain(|event| !event.deleted);
                }
                if !matching.is_empty() {
                    let _ = open.out.send(WatchMessage {
                        watch_id: id,
                        events: matching,
                        ..WatchMessage::default()
                    });
                }
            }
        }
        open.watches.insert(id, Watch { request });
    }

    /// Cancels watch `id` of stream `stream` (etcd confirms it).
    pub fn cancel_watch(&mut self, stream: u64, id: i64) {
        if let Some(open) = self.streams.get_mut(&stream)
            && open.watches.remove(&id).is_some()
        {
            let _ = open.out.send(WatchMessage {
                watch_id: id,
                canceled: true,
                ..WatchMessage::default()
            });
        }
    }

    /// What is left: every key, and every lease with keys on it.
    pub fn leftovers(&self) -> Vec<String> {
        // Known and bounded, left out here: the marker of a term elected on a handover
        // (`<election>\0elected`, no lease) stays until the next leader elected in line
        // deletes it, so an election whose last term came from a handover keeps that one
        // key after every candidate left (see SIMULATION.md).
        let mut left: Vec<String> = self
            .kvs
            .values()
            .filter(|kv| !kv.key.ends_with(b"\0elected"))
            .map(|kv| {
                format!(
                    "key {:?} (lease {:x}, created at {})",
                    String::from_utf8_lossy(&kv.key),
                    kv.lease,
                    kv.create_revision
                )
            })
            .collect();
        left.extend(
            self.leases
                .iter()
                .filter(|(_, lease)| !lease.keys.is_empty())
                .map(|(id, lease)| format!("lease {id:x} with {} keys", lease.keys.len())),
        );
        left
    }
}

/// The events of `events` that `request` watches.
fn matching(request: &WatchRequest, events: &[WatchEvent]) -> Vec<WatchEvent> {
    events
        .iter()
        .filter(|event| in_range(&event.kv.key, &request.key, &request.end))
        .filter(|event| !request.no_put || event.deleted)
        .cloned()
        .collect()
}
