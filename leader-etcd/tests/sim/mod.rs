//! A model of etcd for the driver's protocol: [`EtcdModel`] for the simulation
//! (`tests/simulation.rs`) and [`SimIo`] on a quiet network for the differential test
//! (`tests/differential.rs`). What it covers and leaves out: `SIMULATION.md`.

#![allow(dead_code, unreachable_pub)]

pub mod io;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leader_etcd::{EtcdDriver, Settings};
use leader_testkit::sim::{ClientId, Model, Net, REQUEST_TIMEOUT};
use rand::Rng;
use tokio::time::sleep;

/// How long after a restart (an etcd leader change) the deposed leader still answers (see
/// `store::DeposedLessor`): longer than etcd's CheckQuorum lets a running one (about two
/// election timeouts; a paused one answers forwarded reads for up to the forwarding
/// timeout), so that it outlasts the store's outage after the restart (up to the TTL) and
/// the first requests after it can still reach it.
const DEPOSED_FOR: Duration = Duration::from_secs(2);

pub use io::{SimIo, apply};
pub use store::{SWEEP, Store};

/// The modelled etcd, shared by every simulated process of a run.
pub struct EtcdModel {
    pub store: Arc<Mutex<Store>>,
}

impl EtcdModel {
    /// A fresh etcd, with its lease sweep running (made inside the run's runtime).
    pub fn new(net: &Net) -> Self {
        // The driver asks for leases a second longer than the TTL (2 s for the harness's
        // 1 s). Two thirds of the seeds run a shortest lease at or below that (etcd's
        // default is 2 s, the test servers' 1 s); a third a shortest lease of 3 s, longer
        // than asked, behind which a reading of 1 already proves a term's deadline passed
        // (src/expiry.rs). A quiet network (the differential test) runs 1 s, as the test
        // server does.
        let min_ttl = if net.chaos() {
            net.draw(|rng| rng.random_range(1..=3i64))
        } else {
            1
        };
        let mut store = Store::default();
        store.min_ttl = min_ttl;
        let store = Arc::new(Mutex::new(store));
        let sweeper = Arc::clone(&store);
        let clock = net.clone();
        tokio::spawn(async move {
            loop {
                sleep(SWEEP).await;
                apply(&sweeper, &clock, |s| s.expire(clock.store_now()));
            }
        });
        EtcdModel { store }
    }

    /// An I/O layer for `client` on `net`, with `limit` as its request timeout.
    pub fn io(&self, net: &Net, client: ClientId, limit: Duration) -> SimIo {
        SimIo {
            net: net.clone(),
            client,
            store: Arc::clone(&self.store),
            limit,
        }
    }
}

/// The driver's settings in the simulation: the harness's request timeout.
pub fn settings() -> Settings {
    let mut settings = Settings::default();
    settings.request_timeout = REQUEST_TIMEOUT;
    settings
}

/// The lease TTL the driver asks for a candidate of `ttl`: whole seconds, rounded up, and a
/// second more (src/lease.rs).
fn lease_seconds(ttl: Duration) -> u64 {
    (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1) + 1
}

impl Model for EtcdModel {
    type Driver = EtcdDriver;

    fn name(&self) -> &'static str {
        "etcd"
    }

    fn driver(&self, net: &Net, client: ClientId) -> EtcdDriver {
        EtcdDriver::with_io(Arc::new(self.io(net, client, REQUEST_TIMEOUT)), settings())
    }

    fn tamper(&self, net: &Net) -> Option<String> {
        let kind = net.draw(|rng| rng.random_range(0..5u32));
        let pick = net.draw(|rng| rng.random_range(0..1_000_000usize));
        // The granted terms an operator's change ends or edits (an election's lowest key)
        // are reported first: their leaders cannot know before their watch or renewal
        // tells them, so the harness excuses overlaps with them; then the terms the change
        // hands over are reported as grants. A waiting key deleted excuses nothing.
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        // `ends`: the change deletes the key (a put keeps the term: same key, same lease).
        let hit = |s: &Store, ends: bool, touched: &dyn Fn(&[u8]) -> bool| {
            for (election, (key, revision)) in &s.leaders {
                if touched(key) {
                    net.tampered(election, *revision as u64, &s.holder(key), ends);
                }
            }
        };
        let done = (|| {
            let candidates: Vec<Vec<u8>> = s
                .kvs
                .keys()
                .filter(|k| !k.contains(&0) && k.contains(&b'/'))
                .cloned()
                .collect();
            match kind {
                0 | 1 if !candidates.is_empty() => {
                    let key = candidates[pick % candidates.len()].clone();
                    let name = String::from_utf8_lossy(&key).into_owned();
                    hit(&s, kind == 0, &|k| k == key.as_slice());
                    if kind == 0 {
                        let txn = leader_etcd::io::Txn::new()
                            .and_then([leader_etcd::io::Op::delete(key)]);
                        let _ = s.txn(&txn);
                        Some(format!("etcdctl del {name}"))
                    } else {
                        // An operator's put that keeps the key's lease (`etcdctl put
                        // --ignore-lease`): a lease-less put would make a key that nobody
                        // owns and that blocks the election until deleted by hand.
                        let lease = s.kvs.get(&key).map_or(0, |kv| kv.lease);
                        let txn = leader_etcd::io::Txn::new()
                            .and_then([leader_etcd::io::Op::put(key, "tampered", lease)]);
                        let _ = s.txn(&txn);
                        Some(format!("etcdctl put --ignore-lease {name} tampered"))
                    }
                }
                2 => {
                    let leases: Vec<i64> = s
                        .leases
                        .iter()
                        .filter(|(_, l)| !l.keys.is_empty())
                        .map(|(id, _)| *id)
                        .collect();
                    let id = *leases.get(pick % leases.len().max(1))?;
                    let keys = s
                        .leases
                        .get(&id)
                        .map(|l| l.keys.clone())
                        .unwrap_or_default();
                    hit(&s, true, &|k| keys.contains(k));
                    s.revoke(id);
                    Some(format!("etcdctl lease revoke {id:x}"))
                }
                3 if !candidates.is_empty() => {
                    // Every key of one election (`<name>/`: names nest as prefixes).
                    let key =
                        String::from_utf8_lossy(&candidates[pick % candidates.len()]).into_owned();
                    let name = key.rsplit_once('/').map_or(key.as_str(), |(e, _)| e);
                    let election = format!("{name}/");
                    hit(&s, true, &|k| k.starts_with(election.as_bytes()));
                    let txn = leader_etcd::io::Txn::new().and_then([leader_etcd::io::Op::Delete {
                        key: election.clone().into_bytes(),
                        end: Some(leader_etcd::io::prefix_end(election.as_bytes())),
                    }]);
                    let _ = s.txn(&txn);
                    Some(format!("etcdctl del --prefix {election}"))
                }
                4 => {
                    let revision = s.revision;
                    s.compact(revision);
                    Some(format!("etcdctl compact {revision}"))
                }
                _ => None,
            }
        })();
        let grants = std::mem::take(&mut s.grants);
        drop(s);
        for (id, election, token) in grants {
            net.granted(&id, &election, token);
        }
        done
    }

    fn end_term(&self, net: &Net, election: &str) -> Option<String> {
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let (key, revision) = s.leaders.get(election)?.clone();
        net.tampered(election, revision as u64, &s.holder(&key), true);
        let txn = leader_etcd::io::Txn::new().and_then([leader_etcd::io::Op::delete(key.clone())]);
        let _ = s.txn(&txn);
        let grants = std::mem::take(&mut s.grants);
        drop(s);
        for (id, election, token) in grants {
            net.granted(&id, &election, token);
        }
        Some(format!("etcdctl del {}", String::from_utf8_lossy(&key)))
    }

    fn notice_bound(&self, ttl: Duration) -> Option<Duration> {
        // The leader learns of the deletion from its watch or its next renewal's read (a
        // third of the TTL: at most 332 ms on 2,000 seeds); half the TTL catches a leader
        // that trusts neither.
        Some(ttl / 2)
    }

    fn exact_grants(&self) -> bool {
        true
    }

    fn restart(&self, net: &Net, kept: bool) {
        let _ = kept; // etcd keeps its data.
        let now = net.store_now();
        apply(&self.store, net, |s| {
            // As on an etcd leader change: every lease's remaining TTL is reset to its TTL,
            // and the deposed leader's lessor may answer a client's first read for a while.
            s.change_leader(now, now + DEPOSED_FOR);
            // Watch streams drop with the connections (their serving tasks end).
            s.streams.clear();
        });
    }

    fn leftovers(&self, net: &Net) -> Vec<String> {
        apply(&self.store, net, |s| s.leftovers())
    }

    fn terms_left(&self, net: &Net) -> Option<Vec<String>> {
        // Every key (a candidate's key and its side keys go together), but the marker of
        // a handover's term (see `leftovers`).
        Some(apply(&self.store, net, |s| s.leftovers()))
    }

    fn handoff_bound(&self, ttl: Duration) -> Option<Duration> {
        // The resignation's delete reaches the next waiter's watch at once on a quiet
        // network: 0 ns on 2,000 seeds. A tenth of the TTL (leader-core's shortest retry)
        // is far below any fallback (a renewal, a retry after an error).
        Some(ttl / 10)
    }

    fn takeover_bound(&self, ttl: Duration) -> Option<Duration> {
        let min_ttl = self.store.lock().unwrap_or_else(|p| p.into_inner()).min_ttl;
        let lease = Duration::from_secs(lease_seconds(ttl).max(min_ttl.unsigned_abs()));
        // The lease (a second longer than the TTL, or etcd's shortest) runs on after the
        // old leader's deadline; then it ends at the sweep after it (every 500 ms), and the
        // delete reaches the head's watch at once, within the safety margin and the clocks'
        // rate difference. The head usually proves the deadline passed (src/expiry.rs)
        // long before, but not always: one that began waiting less than a second before
        // (its first read waits a second) or behind several keys falls back on the sweep.
        // The fast path's timing is checked by the scripted scenario in
        // tests/simulation.rs; here its safety.
        Some(lease.saturating_sub(ttl) + SWEEP + Duration::from_millis(200))
    }

    fn orphan_bound(&self, ttl: Duration) -> Duration {
        let min_ttl = self.store.lock().unwrap_or_else(|p| p.into_inner()).min_ttl;
        Duration::from_secs(lease_seconds(ttl).max(min_ttl.unsigned_abs())) + SWEEP
    }
}
