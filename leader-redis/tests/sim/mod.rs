//! The Redis model for the simulation ([`RedisModel`]) and the simulated I/O layer the
//! driver's protocol runs on ([`SimIo`]): every request through `Net::call`, pushed
//! messages through `Net::push_delay` and lost when the client's link drops.

#![allow(dead_code, unreachable_pub)]

pub mod lua;
pub mod store;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use leader_core::{Error, Result};
use leader_redis::RedisDriver;
use leader_redis::io::{
    Acquire, AcquireReply, Candidates, HandOver, HandOverReply, LeaderReply, Message, Proclaim,
    PubSub, PubSubConnection, RedisIo, Refresh, RefreshReply, Renewal, Resign,
};
use leader_redis::redis::Value;
use leader_redis::wire::{self, ScriptCall};
use leader_testkit::sim::{ClientId, Model, Net, REQUEST_TIMEOUT};
use rand::Rng;
use store::{Conn, Store};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

/// The driver's key prefix in the simulation.
pub const PREFIX: &str = "leader:";

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One simulated Redis server, with what was drawn for this seed.
pub struct RedisModel {
    store: Arc<Mutex<Store>>,
    /// Answers withheld (for scripted scenarios): requests land, their callers wait on.
    stall: Arc<std::sync::atomic::AtomicBool>,
    /// Renewals one call per term, as on a Cluster (no batching across elections).
    per_slot: bool,
}

impl RedisModel {
    /// A model whose options are drawn from `net`'s seed: keyspace notifications on or off,
    /// renewals batched (one server) or not (as on a Cluster).
    pub fn new(net: &Net) -> Self {
        let (keyspace, per_slot) = net.draw(|rng| (rng.random_bool(0.5), rng.random_bool(0.25)));
        // A Cluster does not use keyspace notifications (they are node-local).
        Self::with(net, keyspace && !per_slot, per_slot)
    }

    /// A model with these options.
    pub fn with(net: &Net, keyspace: bool, per_slot: bool) -> Self {
        RedisModel {
            store: Arc::new(Mutex::new(Store::new(net.clone(), keyspace))),
            stall: Arc::default(),
            per_slot,
        }
    }

    /// The simulated I/O layer of `client`.
    pub fn io(&self, net: &Net, client: ClientId) -> SimIo {
        SimIo {
            net: net.clone(),
            client,
            store: Arc::clone(&self.store),
            stall: Arc::clone(&self.stall),
            per_slot: self.per_slot,
        }
    }

    /// From now on, requests land but their answers never come back (`false`: they do
    /// again, for requests sent from then on).
    pub fn withhold_answers(&self, on: bool) {
        self.stall.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Panics if a script failed in the model or gave an answer the driver cannot read
    /// (the random seeds count these as violations; scripted scenarios call this).
    pub fn assert_no_faults(&self) {
        let faults = lock(&self.store).faults.clone();
        assert!(
            faults.is_empty(),
            "the model met what Redis cannot do: {faults:?}"
        );
    }

    /// Runs `f` on the store now (for tests: a look, or tampering).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = lock(&self.store);
        store.begin();
        f(&mut store)
    }
}

impl Model for RedisModel {
    type Driver = RedisDriver;

    fn name(&self) -> &'static str {
        "redis"
    }

    fn driver(&self, net: &Net, client: ClientId) -> RedisDriver {
        RedisDriver::with_io(Arc::new(self.io(net, client)), PREFIX)
    }

    fn tamper(&self, net: &Net) -> Option<String> {
        let mut store = lock(&self.store);
        store.begin();
        // An operator deletes a leader key (a term or a nomination), or a line.
        let keys: Vec<String> = store
            .keys
            .keys()
            .filter(|k| k.ends_with(":leader") || k.ends_with(":line"))
            .cloned()
            .collect();
        if keys.is_empty() {
            return None;
        }
        let key = keys[net.draw(|rng| rng.random_range(0..keys.len()))].clone();
        Some(operator_del(&mut store, net, &key))
    }

    fn end_term(&self, net: &Net, election: &str) -> Option<String> {
        // Only for scripted scenarios: without a `notice_bound` the random runs' notice
        // phase leaves Redis out (a leader learns of it at its next renewal).
        let mut store = lock(&self.store);
        store.begin();
        let key = store
            .keys
            .keys()
            .find(|key| {
                key.ends_with(":leader")
                    && store.term_of(key).is_some_and(|(of, _, _)| of == election)
            })?
            .clone();
        Some(operator_del(&mut store, net, &key))
    }

    fn restart(&self, net: &Net, kept: bool) {
        // With `appendfsync always` every acknowledged write survives; without
        // persistence the data is gone, the fencing counters too: tokens start over at 1,
        // as the README documents (the harness excuses overlaps and token order until
        // every term confirmed before has passed its deadline, and counts a reissued
        // token as a new term). Pub/sub connections drop either way (the harness drops
        // every client's link).
        let mut store = lock(&self.store);
        store.begin();
        if !kept {
            store.keys.clear();
            store.replica.clear();
            store.operator_unreplicated = false;
        } else if !store.operator_unreplicated
            && net.draw(|rng| {
                rng.random_bool(if store.replica_down_until.is_some() {
                    0.9
                } else {
                    0.3
                })
            })
        {
            // Sentinel fails over to the replica (the harness counts it as a restart that
            // kept the data: with `WAIT` every write a caller was told succeeded is there;
            // the ones that answered an error, or no answer, may be lost).
            let lost = store
                .keys
                .iter()
                .filter(|&(key, entry)| {
                    store
                        .replica
                        .get(key)
                        .is_none_or(|kept| kept.val != entry.val || kept.expires != entry.expires)
                })
                .count()
                + store
                    .replica
                    .keys()
                    .filter(|key| !store.keys.contains_key(*key))
                    .count();
            if lost > 0 {
                net.model_event();
            }
            net.trace(|| format!("Sentinel promoted the replica ({lost} keys differ)"));
            store.fail_over();
        }
        store.conns.clear();
    }

    fn volatile(&self) -> bool {
        true
    }

    fn leftovers(&self, _net: &Net) -> Vec<String> {
        let mut store = lock(&self.store);
        store.begin();
        store
            .keys
            .iter()
            // The fencing counter stays by design (tokens keep increasing).
            .filter(|(k, _)| !k.ends_with(":fence"))
            .map(|(k, e)| format!("{k} = {:?} (expires {:?})", e.val, e.expires))
            .collect()
    }

    fn terms_left(&self, _net: &Net) -> Option<Vec<String>> {
        let mut store = lock(&self.store);
        store.begin();
        Some(
            store
                .keys
                .iter()
                .filter(|(_, e)| matches!(&e.val, store::Val::Str(v) if v.starts_with(b"L\n")))
                .map(|(k, e)| format!("{k} = {:?} (expires {:?})", e.val, e.expires))
                .collect(),
        )
    }

    fn handoff_bound(&self, ttl: Duration) -> Option<Duration> {
        // The resignation wakes the head at once on a quiet network (0 ns on 2,000 seeds);
        // a wakeup left to the next refresh costs two thirds of the TTL.
        Some(ttl / 10)
    }

    fn takeover_bound(&self, ttl: Duration) -> Option<Duration> {
        // The head's timer is at the lease's end plus a jitter (at most 78 ms after the old
        // leader's deadline on 2,000 seeds); a head that waits for its driver's next
        // refresh instead costs up to two thirds of the TTL.
        Some(ttl / 5)
    }

    fn orphan_bound(&self, ttl: Duration) -> Duration {
        // A late acquisition's key lives its lease from when it landed; Redis expires it
        // within its sweep (100 ms; the model at the next request).
        ttl + Duration::from_millis(100)
    }
}

/// The driver's I/O on the model: each script one request through the network, applied
/// atomically when it lands.
#[derive(Clone)]
pub struct SimIo {
    net: Net,
    client: ClientId,
    store: Arc<Mutex<Store>>,
    stall: Arc<std::sync::atomic::AtomicBool>,
    per_slot: bool,
}

/// `value` read as the driver reads it; an answer the driver cannot read is a fault of
/// the scripts (Redis gave what they returned): the seed fails.
fn readable<T>(s: &mut Store, read: fn(Value) -> Result<T>, value: Value) -> Result<T> {
    let shown = format!("{value:?}");
    read(value).inspect_err(|err| {
        s.fault(format!(
            "the driver cannot read a script's answer {shown}: {}",
            leader_core::ErrorChain(err)
        ));
    })
}

/// `WAIT 1` after a write that just ran on `s`: whether the replica acknowledged it. In
/// the chaos phase the replica's link sometimes goes down (2 % of writes, for 0.1 to 2 s);
/// until it is back every write answers an error, as a driver built with
/// `.replicas(1, ..)` reports a `WAIT` that too few replicas acknowledged in time.
fn replicate(s: &mut Store) -> bool {
    let net = s.net.clone();
    let down_for = (net.chaos() && net.draw(|rng| rng.random_bool(0.02)))
        .then(|| net.draw(|rng| Duration::from_millis(rng.random_range(100..2000))));
    s.replicate(down_for)
}

/// The error a write gets when its `WAIT` fell short: it landed on the master.
fn shortfall(net: &Net, client: ClientId) -> Error {
    let client = client.0;
    net.trace(|| format!("c{client}: WAIT shortfall: the write landed, the caller gets an error"));
    Error::store(std::io::Error::other(
        "WAIT: 0 of 1 replicas acknowledged the write in time (simulated)",
    ))
}

/// Whether `SIM_TRACE` asks for the schedule (labels are only made then).
fn tracing() -> bool {
    static TRACING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACING.get_or_init(|| std::env::var_os("SIM_TRACE").is_some())
}

impl SimIo {
    /// One of the driver's scripts, `call`, run on the model when it lands; its answer
    /// read with `read` (the real client's reading).
    async fn script<T: Send + std::fmt::Debug + 'static>(
        &self,
        label: impl FnOnce() -> String,
        call: ScriptCall,
        read: fn(Value) -> Result<T>,
    ) -> Result<T> {
        if !call.writes {
            return self
                .request(label, move |s| {
                    s.eval(&call).and_then(|value| readable(s, read, value))
                })
                .await?;
        }
        self.write(label, move |s| {
            s.eval(&call).and_then(|value| readable(s, read, value))
        })
        .await
    }

    /// A script that writes, `f` run on the model when it lands, then `WAIT 1`: a write
    /// the replica did not acknowledge answers the `WAIT` error.
    async fn write<T: Send + std::fmt::Debug + 'static>(
        &self,
        label: impl FnOnce() -> String,
        f: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (answer, acknowledged) = self
            .request(label, move |s| {
                let answer = f(s);
                (answer, replicate(s))
            })
            .await?;
        match answer {
            Ok(_) if !acknowledged => Err(shortfall(&self.net, self.client)),
            answer => answer,
        }
    }

    async fn request<T: Send + std::fmt::Debug + 'static>(
        &self,
        label: impl FnOnce() -> String,
        f: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> Result<T> {
        let store = Arc::clone(&self.store);
        let label = if tracing() { label() } else { String::new() };
        let withheld = self.stall.load(std::sync::atomic::Ordering::SeqCst);
        let answer = self
            .net
            .call(self.client, REQUEST_TIMEOUT, label, move || {
                let mut store = lock(&store);
                store.begin();
                f(&mut store)
            })
            .await;
        if withheld {
            return std::future::pending().await;
        }
        answer.map_err(|fault| fault.into_error())
    }
}

fn short(s: &str) -> &str {
    s.rsplit(['{', ':']).next().unwrap_or(s)
}

#[async_trait]
impl RedisIo for SimIo {
    async fn acquire(&self, r: &Acquire) -> Result<AcquireReply> {
        let label = || format!("ACQUIRE {} by {}", r.leader, r.owner);
        let call = wire::acquire(r);
        let owner = r.owner.clone();
        // `<prefix>{<election>}:leader`
        let election = r
            .leader
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map_or_else(|| r.leader.clone(), |(name, _)| name.to_owned());
        let writes = call.writes;
        let run = move |s: &mut Store| {
            let answer = s
                .eval(&call)
                .and_then(|value| readable(s, wire::acquire_reply, value));
            if let Ok(AcquireReply::Elected(token)) = answer {
                // The checker's record of grants: a token the store hands out again
                // after a data loss is a new term (`Checker::reissued`).
                s.net.granted(&owner, &election, token.unsigned_abs());
            }
            answer
        };
        if writes {
            self.write(label, run).await
        } else {
            self.request(label, run).await?
        }
    }

    async fn renew(&self, terms: &[Renewal]) -> Result<Vec<bool>> {
        let label = || {
            format!(
                "RENEW {:?}",
                terms
                    .iter()
                    .map(|t| format!("{}#{}", t.leader, t.token))
                    .collect::<Vec<_>>()
            )
        };
        self.script(label, wire::renew(terms), wire::renew_reply)
            .await
    }

    async fn resign(&self, r: &Resign) -> Result<bool> {
        let label = || format!("RESIGN {} by {} token {:?}", r.leader, r.owner, r.token);
        let (call, owner) = (wire::resign(r), r.owner.clone());
        self.write(label, move |s| {
            *s.resigns.entry(owner).or_default() += 1;
            s.eval(&call)
                .and_then(|value| readable(s, wire::resign_reply, value))
        })
        .await
    }

    async fn refresh(&self, r: &Refresh) -> Result<RefreshReply> {
        let label = || {
            let owners: Vec<String> = r
                .places
                .iter()
                .map(|p| {
                    String::from_utf8_lossy(p.split(|b| *b == b'\n').next().unwrap_or_default())
                        .into_owned()
                })
                .collect();
            format!("REFRESH {} ({} places: {owners:?})", r.line, r.places.len())
        };
        self.script(label, wire::refresh(r), wire::refresh_reply)
            .await
    }

    async fn leader(&self, leader: &str) -> Result<Option<LeaderReply>> {
        let label = || format!("LEADER {leader}");
        self.script(label, wire::leader(leader), wire::leader_reply)
            .await
    }

    async fn candidates(&self, r: &Candidates) -> Result<Vec<(String, Vec<u8>)>> {
        let label = || format!("CANDIDATES {}", r.leader);
        self.script(label, wire::candidates(r), wire::candidates_reply)
            .await
    }

    async fn hand_over(&self, r: &HandOver) -> Result<HandOverReply> {
        let label = || format!("HAND_OVER {} to {}", r.leader, r.nominee);
        self.script(label, wire::hand_over(r), wire::hand_over_reply)
            .await
    }

    async fn proclaim(&self, r: &Proclaim) -> Result<bool> {
        let label = || format!("PROCLAIM {}", r.leader);
        self.script(label, wire::proclaim(r), wire::proclaim_reply)
            .await
    }

    async fn holds(&self, leader: &str, owner: &str, token: u64) -> Result<bool> {
        let label = || format!("HOLDS {leader} {} #{token}", short(owner));
        self.script(label, wire::holds(leader, owner, token), wire::holds_reply)
            .await
    }

    async fn pubsub(&self, _attempt: usize) -> Result<PubSubConnection> {
        let net = self.net.clone();
        let store = Arc::clone(&self.store);
        let client = self.client;
        let opened = self
            .request(
                || "PUBSUB connect".to_owned(),
                move |s| open(s, &net, &store, client),
            )
            .await?;
        let Opened { id, messages } = opened;
        let messages = futures::stream::unfold(messages, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        })
        .boxed();
        Ok(PubSubConnection {
            commands: Box::new(SimPubSub {
                io: self.clone(),
                id,
            }),
            messages,
        })
    }

    fn keyspace(&self) -> Option<String> {
        lock(&self.store).keyspace.clone()
    }

    fn per_slot(&self) -> bool {
        self.per_slot
    }

    fn topology(&self) -> &'static str {
        "simulated"
    }

    fn jitter(&self, spread: u64) -> u64 {
        self.net.draw(|rng| rng.random_range(1..=spread.max(1)))
    }
}

/// A new pub/sub connection: its id and the receiving end of its messages.
struct Opened {
    id: u64,
    messages: mpsc::UnboundedReceiver<Message>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pub/sub connection {}", self.id)
    }
}

/// Opens a pub/sub connection of `client` in the store, with a task that delivers its
/// messages in order, each at its time, until the client's link drops (the connection is
/// then gone, and so is what was published meanwhile) or the client drops it.
fn open(s: &mut Store, net: &Net, store: &Arc<Mutex<Store>>, client: ClientId) -> Opened {
    let id = s.next_conn;
    s.next_conn += 1;
    let (tx, mut scheduled) = mpsc::unbounded_channel::<(Instant, Message)>();
    let (out, messages) = mpsc::unbounded_channel();
    let mut link = net.link(client);
    let generation = *link.borrow_and_update();
    s.conns.insert(
        id,
        Conn {
            client,
            channels: Default::default(),
            tx,
            link: link.clone(),
            generation,
            last: Instant::now(),
        },
    );
    let store = Arc::downgrade(store);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = link.changed() => break,
                () = out.closed() => break,
                next = scheduled.recv() => {
                    let Some((at, message)) = next else { break };
                    tokio::select! {
                        biased;
                        _ = link.changed() => break,
                        () = sleep_until(at) => {}
                    }
                    if out.send(message).is_err() {
                        break;
                    }
                }
            }
        }
        if let Some(store) = store.upgrade() {
            lock(&store).conns.remove(&id);
        }
    });
    Opened { id, messages }
}

/// The commands of a simulated pub/sub connection.
struct SimPubSub {
    io: SimIo,
    id: u64,
}

fn closed() -> Error {
    Error::store(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "simulated pub/sub connection closed",
    ))
}

#[async_trait]
impl PubSub for SimPubSub {
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool> {
        let id = self.id;
        let label = || format!("SUBSCRIBE {channels:?} on {id}");
        let channels = channels.to_vec();
        let alive = self
            .io
            .request(label, move |s| match s.conns.get_mut(&id) {
                Some(conn) if conn.alive() => {
                    conn.channels.extend(channels);
                    true
                }
                _ => false,
            })
            .await?;
        if alive { Ok(true) } else { Err(closed()) }
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        let id = self.id;
        let label = || format!("UNSUBSCRIBE {channel} on {id}");
        let channel = channel.to_owned();
        let alive = self
            .io
            .request(label, move |s| match s.conns.get_mut(&id) {
                Some(conn) if conn.alive() => {
                    conn.channels.remove(&channel);
                    true
                }
                _ => false,
            })
            .await?;
        if alive { Ok(()) } else { Err(closed()) }
    }

    async fn ping(&mut self) -> Result<()> {
        let id = self.id;
        let alive = self
            .io
            .request(
                || format!("PING on {id}"),
                move |s| s.conns.get(&id).is_some_and(Conn::alive),
            )
            .await?;
        if alive { Ok(()) } else { Err(closed()) }
    }
}

/// An operator's `DEL key`: a term deleted (its leader cannot know at once) is excused; a
/// nomination or a line deleted excuses nothing. What was done, for the trace.
fn operator_del(store: &mut Store, net: &Net, key: &str) -> String {
    let what = format!("DEL {key} ({:?})", store.keys.get(key).map(|e| &e.val));
    if let Some((election, token, owner)) = store.term_of(key) {
        net.tampered(&election, token, &owner, true);
    }
    store.del(key);
    // Replicated like any write; while the replica's link is down, no failover may lose it
    // (see `Store::operator_unreplicated`).
    if !store.replicate(None) {
        store.operator_unreplicated = true;
    }
    what
}
