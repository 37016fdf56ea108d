//! A toy store (one key per election, a fence counter, leases) and a toy [`Driver`] on it:
//! the model leader-core's own simulation explores its state machine with, without any
//! real driver's protocol.
//!
//! Its quirks stand for what real drivers do to the core: a store may keep a lease ten
//! times the candidate's TTL (as etcd may), a renewal may be answered from an earlier,
//! shared confirmation of the same term (as a keep-alive shared by every election on a
//! lease is), and the store pushes the end of a term (`term_gone`) after a delay.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use leader_core::{Candidate, Driver, Error, Grant, LeaderInfo, Result};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use super::net::{ClientId, Net, lock};
use super::{Model, REQUEST_TIMEOUT};

/// How long a toy client waits for the answer to a campaign request: several TTLs.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_millis(2500);

/// The toy store, with its quirks drawn from the run's seed.
pub struct ToyModel {
    state: Arc<ToyState>,
}

struct ToyState {
    store: Mutex<Store>,
    changes: watch::Sender<u64>,
    /// The store keeps a lease this many times the candidate's TTL (as etcd may).
    lease_factor: u32,
    /// Renewals may answer with an earlier confirmation of the same term.
    shared_confirmations: bool,
}

/// Every election's state in the store. The fence counter is shared, so tokens are unique
/// across elections (and increase in each).
#[derive(Default)]
struct Store {
    elections: BTreeMap<String, Holder>,
    fence: u64,
}

#[derive(Clone, Debug)]
struct Holder {
    id: String,
    token: u64,
    expires_at: Instant,
}

impl Store {
    /// The live holder of `name` at the store's instant `now` (an expired one is gone).
    fn live(&mut self, name: &str, now: Instant) -> Option<&mut Holder> {
        if self
            .elections
            .get(name)
            .is_some_and(|h| h.expires_at <= now)
        {
            self.elections.remove(name);
        }
        self.elections.get_mut(name)
    }
}

impl ToyModel {
    /// A toy store whose quirks are drawn from `net`'s seed.
    pub fn new(net: &Net) -> Self {
        let (lease_factor, shared_confirmations) = net.draw(|rng| {
            (
                if rng.random_bool(0.5) { 1 } else { 10 },
                rng.random_bool(0.5),
            )
        });
        ToyModel {
            state: Arc::new(ToyState {
                store: Mutex::new(Store::default()),
                changes: watch::Sender::new(0),
                lease_factor,
                shared_confirmations,
            }),
        }
    }
}

impl Model for ToyModel {
    type Driver = ToyDriver;

    fn name(&self) -> &'static str {
        "toy"
    }

    fn driver(&self, net: &Net, client: ClientId) -> ToyDriver {
        ToyDriver {
            net: net.clone(),
            client,
            state: Arc::clone(&self.state),
            confirmations: Arc::default(),
        }
    }

    fn tamper(&self, net: &Net) -> Option<String> {
        // An operator deletes the key of a term.
        let mut store = lock(&self.state.store);
        let names: Vec<String> = store.elections.keys().cloned().collect();
        if names.is_empty() {
            return None;
        }
        let name = &names[net.draw(|rng| rng.random_range(0..names.len()))];
        let holder = store.elections.remove(name)?;
        drop(store);
        net.tampered(name, holder.token, &holder.id, true);
        self.state.changes.send_modify(|v| *v += 1);
        Some(format!(
            "deleted term {} of {} in {name}",
            holder.token,
            short(&holder.id)
        ))
    }

    fn exact_grants(&self) -> bool {
        true
    }

    fn leftovers(&self, net: &Net) -> Vec<String> {
        let now = net.store_now();
        let mut store = lock(&self.state.store);
        let names: Vec<String> = store.elections.keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|name| {
                let h = store.live(&name, now)?;
                Some(format!("term {} of {} in {name}", h.token, short(&h.id)))
            })
            .collect()
    }

    fn handoff_bound(&self, ttl: Duration) -> Option<Duration> {
        // The store tells every waiter at once: a handover takes no time on a quiet
        // network (0 ns on 2,000 seeds); a tenth of the TTL is leader-core's shortest retry.
        Some(ttl / 10)
    }

    fn orphan_bound(&self, ttl: Duration) -> Duration {
        ttl * self.state.lease_factor
    }
}

/// A [`Driver`] on the toy store.
#[derive(Clone)]
pub struct ToyDriver {
    net: Net,
    client: ClientId,
    state: Arc<ToyState>,
    /// The send time of the latest request that extended each (candidate, term).
    confirmations: Arc<Mutex<HashMap<(String, u64), Instant>>>,
}

/// The random end of a candidate id, to tell candidates apart in traces.
fn short(id: &str) -> &str {
    id.rsplit('-').next().unwrap_or(id)
}

impl ToyDriver {
    /// Sends `op` to the store through the network, waiting up to `limit`.
    async fn request<T: Send + std::fmt::Debug + 'static>(
        &self,
        limit: Duration,
        label: String,
        op: impl FnOnce(&mut Store, Instant) -> (T, bool) + Send + 'static,
    ) -> Result<T> {
        let state = Arc::clone(&self.state);
        let net = self.net.clone();
        self.net
            .call(self.client, limit, label, move || {
                let now = net.store_now();
                let (out, changed) = op(&mut lock(&state.store), now);
                if changed {
                    state.changes.send_modify(|v| *v += 1);
                }
                out
            })
            .await
            .map_err(super::Fault::into_error)
    }

    fn lease(&self, candidate: &Candidate) -> Duration {
        candidate.ttl * self.state.lease_factor
    }

    /// Records that the store extended term `token` of `id` by a request sent at `at`.
    fn confirmed(&self, id: &str, token: u64, at: Instant) {
        let mut confirmations = lock(&self.confirmations);
        let last = confirmations.entry((id.to_owned(), token)).or_insert(at);
        *last = (*last).max(at);
    }

    /// An earlier confirmation of the same term, no older than the grant being renewed, to
    /// answer a renewal with (as one keep-alive shared by every election on a lease does),
    /// sometimes.
    fn shared_confirmation(&self, candidate: &Candidate, grant: &Grant) -> Option<Grant> {
        if !self.state.shared_confirmations {
            return None;
        }
        let at = *lock(&self.confirmations).get(&(candidate.id.clone(), grant.fencing_token))?;
        if at < grant.confirmed_at || !self.net.draw(|rng| rng.random_bool(0.3)) {
            return None;
        }
        self.net.count(|r| r.model_events += 1);
        Some(Grant::new(grant.fencing_token, at, candidate.ttl))
    }
}

#[async_trait]
impl Driver for ToyDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        let mut changes = self.state.changes.subscribe();
        loop {
            changes.borrow_and_update();
            let sent_at = Instant::now();
            let id = candidate.id.clone();
            let lease = self.lease(candidate);
            let net = self.net.clone();
            let name = candidate.election.clone();
            let acquired = self
                .request(
                    CAMPAIGN_TIMEOUT,
                    format!("acquire {} in {name}", short(&candidate.id)),
                    move |store, now| {
                        if let Some(holder) = store.live(&name, now)
                            && holder.id != id
                        {
                            return (Err(holder.expires_at), false);
                        }
                        store.fence += 1;
                        let token = store.fence;
                        // The exact instant an overlap could begin: nobody else may still
                        // believe it leads when the store hands the election over.
                        net.granted(&id, &name, token);
                        store.elections.insert(
                            name,
                            Holder {
                                id,
                                token,
                                expires_at: now + lease,
                            },
                        );
                        (Ok(token), true)
                    },
                )
                .await?;
            match acquired {
                Ok(token) => {
                    self.confirmed(&candidate.id, token, sent_at);
                    return Ok(Grant::new(token, sent_at, candidate.ttl));
                }
                Err(expires_at) => {
                    let expires_at = self.net.client_at(expires_at);
                    tokio::select! {
                        biased;
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return Err(super::Fault::Unreachable.into_error());
                            }
                        }
                        () = sleep_until(expires_at) => {}
                    }
                }
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        if let Some(shared) = self.shared_confirmation(candidate, grant) {
            return Ok(shared);
        }
        let sent_at = Instant::now();
        let id = candidate.id.clone();
        let token = grant.fencing_token;
        let lease = self.lease(candidate);
        let name = candidate.election.clone();
        let renewed = self
            .request(
                REQUEST_TIMEOUT,
                format!("renew {} {token}", short(&candidate.id)),
                move |store, now| match store.live(&name, now) {
                    Some(holder) if holder.id == id && holder.token == token => {
                        holder.expires_at = now + lease;
                        (true, false)
                    }
                    _ => (false, false),
                },
            )
            .await?;
        if renewed {
            self.confirmed(&candidate.id, token, sent_at);
            Ok(Grant::new(token, sent_at, candidate.ttl))
        } else {
            Err(Error::TermGone)
        }
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        // Deletes only by exact token: a request may land late, after this candidate's
        // next term began, and must not delete that one. Without a token, read it first.
        let token = match fencing_token {
            Some(token) => token,
            None => {
                let id = candidate.id.clone();
                let name = candidate.election.clone();
                let label = format!("read own {}", short(&candidate.id));
                let held = self
                    .request(REQUEST_TIMEOUT, label, move |store, _now| {
                        let token = store
                            .elections
                            .get(&name)
                            .filter(|h| h.id == id)
                            .map(|h| h.token);
                        (token, false)
                    })
                    .await?;
                match held {
                    Some(token) => token,
                    None => return Ok(()),
                }
            }
        };
        let id = candidate.id.clone();
        let name = candidate.election.clone();
        let label = format!("resign {} {token}", short(&candidate.id));
        self.request(REQUEST_TIMEOUT, label, move |store, _now| {
            let ours = store
                .elections
                .get(&name)
                .is_some_and(|h| h.id == id && h.token == token);
            if ours {
                store.elections.remove(&name);
            }
            ((), ours)
        })
        .await
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        let name = election.to_owned();
        self.request(REQUEST_TIMEOUT, "leader".to_owned(), move |store, now| {
            let info = store
                .live(&name, now)
                .map(|h| LeaderInfo::new(h.id.clone(), h.id.clone(), h.token));
            (info, false)
        })
        .await
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let driver = self.clone();
        let election = election.to_owned();
        futures::stream::once(async move { driver.leader(&election).await }).boxed()
    }

    /// The store pushes the end of a term (its lease expired, or it was deleted), after
    /// a delay of its own, as etcd's watch does.
    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        let net = self.net.clone();
        let state = Arc::clone(&self.state);
        let id = candidate.id.clone();
        let name = candidate.election.clone();
        let delay = net.draw(|rng| Duration::from_millis(rng.random_range(0..=50)));
        Box::pin(async move {
            let mut changes = state.changes.subscribe();
            loop {
                changes.borrow_and_update();
                let expires_at = {
                    let now = net.store_now();
                    match lock(&state.store).live(&name, now) {
                        Some(h) if h.id == id && h.token == fencing_token => Some(h.expires_at),
                        _ => None,
                    }
                };
                let Some(expires_at) = expires_at else {
                    break;
                };
                let expires_at = net.client_at(expires_at);
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = sleep_until(expires_at) => {}
                }
            }
            sleep(delay).await;
            net.trace(|| format!("pushed: term {fencing_token} of {} is gone", short(&id)));
        })
    }
}
