#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchFilterType, WatchOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use leader_core::{Candidate, Driver, Error, Grant, LeaderInfo, Result};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

pub use etcd_client;

/// The default for [`EtcdDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Driver`] for etcd, speaking etcd's own election protocol.
///
/// Each candidate creates the key `<prefix><election>/<lease id in hex>` (only if absent,
/// in a transaction), attached to the driver's lease; the key with the lowest create
/// revision leads; each waiter watches only the deletion of the key created just before its
/// own. The fencing token is the leader key's create revision. So Rust candidates,
/// `etcdctl elect` and Go's `concurrency.Election` contend in one election correctly.
///
/// One lease per driver keeps every election on it alive, with one keep-alive per third of
/// the lease TTL, however many elections and candidates share the driver. Cheap to clone:
/// clones share the connection and the lease.
#[derive(Clone)]
pub struct EtcdDriver {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    lease_ttl: Option<Duration>,
    request_timeout: Duration,
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// The id of the live lease, or 0; waiters watch it to notice the lease's loss.
    lease_id: watch::Sender<i64>,
    /// The key of each candidate that has one: created before the request is sent, so a
    /// cancelled campaign can always be withdrawn.
    keys: Mutex<HashMap<String, CandidateKey>>,
}

#[derive(Debug, Clone)]
struct CandidateKey {
    key: String,
    lease: i64,
    /// 0 until the key is known to exist.
    create_revision: i64,
}

struct Lease {
    id: i64,
    ttl: Duration,
    alive: bool,
    /// Send time of the last request that the server answered with the lease still alive.
    confirmed_at: Instant,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Set while a keep-alive waits for its answer; if it is still set at the next call, the
    /// previous call was cancelled and the stream may deliver its stale answer: start anew.
    in_flight: bool,
}

/// Builds an [`EtcdDriver`] with options.
#[derive(Clone)]
#[must_use = "an EtcdDriverBuilder does nothing until build() is called"]
pub struct EtcdDriverBuilder {
    client: Client,
    prefix: String,
    lease_ttl: Option<Duration>,
    request_timeout: Duration,
}

impl EtcdDriverBuilder {
    /// A prefix put before every election key (`svc/` makes election `jobs` use keys under
    /// `svc/jobs/`). Defaults to none, which uses exactly the keys of `etcdctl elect jobs`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The TTL of the driver's lease, rounded up to whole seconds (etcd's unit). Defaults to
    /// the TTL of the first election that campaigns on the driver. Terms of elections with a
    /// shorter TTL still step down by their own deadline.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// The longest wait for one etcd request (not for a campaign, which waits as long as it
    /// takes). Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The driver. Nothing is sent to etcd until a candidate campaigns.
    pub fn build(self) -> EtcdDriver {
        EtcdDriver {
            inner: Arc::new(Inner {
                client: self.client,
                prefix: self.prefix,
                lease_ttl: self.lease_ttl,
                request_timeout: self.request_timeout,
                lease: tokio::sync::Mutex::new(None),
                lease_id: watch::Sender::new(0),
                keys: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl EtcdDriver {
    /// A driver on a connected client, with the default options.
    pub fn new(client: Client) -> Self {
        Self::builder(client).build()
    }

    /// A builder for a driver on a connected client.
    pub fn builder(client: Client) -> EtcdDriverBuilder {
        EtcdDriverBuilder {
            client,
            prefix: String::new(),
            lease_ttl: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Connects to etcd at `endpoints` (`"127.0.0.1:2379"` or `"http://host:2379"`) and
    /// returns a driver with the default options.
    pub async fn connect<E: AsRef<str>, S: AsRef<[E]>>(endpoints: S) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(Error::store)?;
        Ok(Self::new(client))
    }

    /// The etcd client, to share with the rest of the service.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The key prefix of `election`'s candidates: `<prefix><election>/`.
    pub fn election_prefix(&self, election: &str) -> String {
        format!("{}{election}/", self.inner.prefix)
    }
}

impl std::fmt::Debug for EtcdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDriver")
            .field("prefix", &self.inner.prefix)
            .field("lease_id", &*self.inner.lease_id.borrow())
            .finish_non_exhaustive()
    }
}

fn store_err(err: etcd_client::Error) -> Error {
    Error::store(err)
}

/// A store error for something etcd did that the protocol does not expect.
fn unexpected(what: impl Into<String>) -> Error {
    Error::store(std::io::Error::other(what.into()))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether etcd says the lease does not exist (expired or revoked).
fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        _ => false,
    }
}

impl Inner {
    async fn request<T>(
        &self,
        future: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match timeout(self.request_timeout, future).await {
            Ok(result) => result.map_err(store_err),
            Err(_) => Err(Error::Timeout(self.request_timeout)),
        }
    }

    /// The live lease (granting one if there is none), as (id, ttl).
    async fn ensure_lease(self: &Arc<Self>, ttl: Duration) -> Result<(i64, Duration)> {
        let mut lease = self.lease.lock().await;
        if let Some(current) = lease.as_ref()
            && current.alive
        {
            return Ok((current.id, current.ttl));
        }
        let wanted = self.lease_ttl.unwrap_or(ttl);
        let seconds = (wanted.as_secs() + u64::from(wanted.subsec_nanos() > 0)).max(1);
        let sent_at = Instant::now();
        let granted = self
            .request(
                self.client
                    .clone()
                    .lease_grant(i64::try_from(seconds).unwrap_or(i64::MAX), None),
            )
            .await?;
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        if granted_ttl.is_zero() {
            return Err(unexpected(format!(
                "etcd granted lease {:x} with TTL {}: {}",
                granted.id(),
                granted.ttl(),
                granted.error()
            )));
        }
        debug!(lease = %format!("{:x}", granted.id()), ttl = ?granted_ttl, "granted etcd lease");
        *lease = Some(Lease {
            id: granted.id(),
            ttl: granted_ttl,
            alive: true,
            confirmed_at: sent_at,
            keeper: None,
            in_flight: false,
        });
        self.lease_id.send_replace(granted.id());
        tokio::spawn(keep_lease_alive(
            Arc::downgrade(self),
            granted.id(),
            granted_ttl,
        ));
        Ok((granted.id(), granted_ttl))
    }

    /// Confirms lease `id` is alive: returns the send time of a keep-alive answered within
    /// `max_age`, sending one if the last is older. Coalesces all callers into one stream.
    async fn keep_alive(&self, id: i64, max_age: Duration) -> Result<Instant> {
        let mut guard = self.lease.lock().await;
        let lease = match guard.as_mut() {
            Some(lease) if lease.id == id && lease.alive => lease,
            _ => return Err(Error::TermGone),
        };
        if lease.confirmed_at.elapsed() < max_age {
            return Ok(lease.confirmed_at);
        }
        if lease.in_flight {
            lease.keeper = None;
        }
        let sent_at = Instant::now();
        let answer = match lease.keeper.as_mut() {
            None => {
                match self.request(self.client.clone().lease_keep_alive(id)).await {
                    // The first keep-alive is sent and answered inside `lease_keep_alive`.
                    Ok(keeper) => {
                        lease.keeper = Some(keeper);
                        Ok(1)
                    }
                    Err(Error::Store(err))
                        if err
                            .downcast_ref::<etcd_client::Error>()
                            .is_some_and(is_lease_not_found) =>
                    {
                        Ok(0)
                    }
                    Err(err) => Err(err),
                }
            }
            Some((keeper, stream)) => {
                lease.in_flight = true;
                let sent = self.request(keeper.keep_alive()).await;
                let answered = match sent {
                    Ok(()) => self.request(stream.message()).await,
                    Err(err) => Err(err),
                };
                lease.in_flight = false;
                match answered {
                    Ok(Some(response)) => Ok(response.ttl()),
                    Ok(None) => Err(unexpected("etcd closed the keep-alive stream")),
                    Err(err) => Err(err),
                }
            }
        };
        match answer {
            Ok(ttl) if ttl > 0 => {
                lease.confirmed_at = sent_at;
                Ok(sent_at)
            }
            Ok(_) => {
                warn!(lease = %format!("{id:x}"), "etcd lease expired or was revoked");
                lease.alive = false;
                lease.keeper = None;
                self.lease_id.send_replace(0);
                Err(Error::TermGone)
            }
            Err(err) => {
                lease.keeper = None;
                Err(err)
            }
        }
    }

    /// Marks lease `id` dead (etcd said so), so the next campaign grants a new one.
    async fn lease_lost(&self, id: i64) {
        let mut guard = self.lease.lock().await;
        if let Some(lease) = guard.as_mut()
            && lease.id == id
        {
            lease.alive = false;
            lease.keeper = None;
            self.lease_id.send_replace(0);
        }
    }

    /// A key for `candidate` on lease `lease`, unique among this driver's candidates:
    /// `<prefix><election>/<lease hex>`, with `_<n>` after it for a second candidate of the
    /// same election on the same driver.
    fn allocate_key(&self, candidate: &Candidate, lease: i64) -> CandidateKey {
        let mut keys = lock(&self.keys);
        if let Some(existing) = keys.get(&candidate.id)
            && existing.lease == lease
        {
            return existing.clone();
        }
        let used: HashSet<&str> = keys.values().map(|k| k.key.as_str()).collect();
        let base = format!("{}{}/{lease:x}", self.prefix, candidate.election);
        let key = std::iter::once(base.clone())
            .chain((1..).map(|n| format!("{base}_{n}")))
            .find(|k| !used.contains(k.as_str()))
            .unwrap_or(base);
        let entry = CandidateKey {
            key,
            lease,
            create_revision: 0,
        };
        keys.insert(candidate.id.clone(), entry.clone());
        entry
    }

    /// Creates `key` if absent; if it exists (an earlier term of this candidate), deletes
    /// it and creates it again, so that each term gets a new create revision.
    async fn create_key(&self, key: &CandidateKey, value: &[u8]) -> Result<i64> {
        for _ in 0..2 {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    key.key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(key.lease)),
                )])
                .or_else([TxnOp::get(key.key.as_str(), None)]);
            let response = self.request(self.client.clone().txn(txn)).await?;
            if response.succeeded() {
                let revision = response.header().map(|h| h.revision()).unwrap_or(0);
                if revision <= 0 {
                    return Err(unexpected("etcd answered a transaction without a revision"));
                }
                return Ok(revision);
            }
            // The key exists: a term of ours that ended; delete it (only if still ours).
            self.delete_own(key).await?;
        }
        Err(unexpected(format!(
            "etcd key {} keeps existing after deletion",
            key.key
        )))
    }

    /// Deletes `key` if it is still attached to this candidate's lease: never anyone else's.
    async fn delete_own(&self, key: &CandidateKey) -> Result<()> {
        let delete = Txn::new()
            .when([Compare::lease(
                key.key.as_str(),
                CompareOp::Equal,
                key.lease,
            )])
            .and_then([TxnOp::delete(key.key.as_str(), None)]);
        self.request(self.client.clone().txn(delete)).await?;
        Ok(())
    }

    /// Waits until no key of the election has a create revision below `revision`,
    /// watching only the predecessor's deletion. Fails if the lease is lost meanwhile.
    async fn wait_for_predecessors(&self, prefix: &str, revision: i64, lease: i64) -> Result<()> {
        let mut lease_changes = self.lease_id.subscribe();
        loop {
            if *lease_changes.borrow_and_update() != lease {
                return Err(Error::TermGone);
            }
            let options = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(revision - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let response = self
                .request(self.client.clone().get(prefix, Some(options)))
                .await?;
            let Some(predecessor) = response.kvs().first() else {
                return Ok(());
            };
            let predecessor = predecessor.key().to_vec();
            let from = response.header().map(|h| h.revision()).unwrap_or(0) + 1;
            debug!(
                predecessor = %String::from_utf8_lossy(&predecessor),
                "waiting for the predecessor's deletion"
            );
            let options = WatchOptions::new()
                .with_start_revision(from)
                .with_filters([WatchFilterType::NoPut]);
            let mut watch = self
                .request(self.client.clone().watch(predecessor, Some(options)))
                .await?;
            loop {
                let message = tokio::select! {
                    message = watch.message() => message.map_err(store_err)?,
                    changed = lease_changes.changed() => {
                        if changed.is_err() || *lease_changes.borrow_and_update() != lease {
                            return Err(Error::TermGone);
                        }
                        continue;
                    }
                };
                let Some(message) = message else {
                    return Err(unexpected("etcd closed the watch stream"));
                };
                if message.canceled() {
                    // Compacted or cancelled by the server: look again.
                    break;
                }
                if message
                    .events()
                    .iter()
                    .any(|event| event.event_type() == EventType::Delete)
                {
                    break;
                }
            }
        }
    }

    /// Whether `key` exists with `revision` and `lease` (etcd-io/etcd#11051: a campaign
    /// whose lease expired while it waited must not report success).
    async fn key_is_ours(&self, key: &CandidateKey, revision: i64) -> Result<bool> {
        let response = self
            .request(self.client.clone().get(key.key.as_str(), None))
            .await?;
        Ok(response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == revision && kv.lease() == key.lease))
    }

    async fn leader_of(&self, prefix: &str) -> Result<(Option<LeaderInfo>, i64)> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let response = self
            .request(self.client.clone().get(prefix, Some(options)))
            .await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let leader = response.kvs().first().map(|kv| {
            LeaderInfo::new(
                String::from_utf8_lossy(&kv.key()[prefix.len().min(kv.key().len())..]),
                kv.value(),
                u64::try_from(kv.create_revision()).unwrap_or(0),
            )
        });
        Ok((leader, revision))
    }
}

/// Keeps lease `id` alive every third of its TTL while the driver exists and the lease is
/// current, so that waiting candidates keep their place in line.
async fn keep_lease_alive(inner: Weak<Inner>, id: i64, ttl: Duration) {
    let period = ttl / 3;
    let first_retry = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut retry = first_retry;
    let mut failures = 0u32;
    let mut delay = period;
    loop {
        sleep(delay).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match inner.keep_alive(id, period).await {
            Ok(confirmed_at) => {
                if failures > 0 {
                    debug!(lease = %format!("{id:x}"), failures, "etcd keep-alive works again");
                }
                failures = 0;
                retry = first_retry;
                delay = (confirmed_at + period).saturating_duration_since(Instant::now());
                delay = delay.max(first_retry);
            }
            Err(Error::TermGone) => return,
            Err(err) => {
                // Log the first failure and then every tenth, not every retry.
                if failures.is_multiple_of(10) {
                    warn!(
                        lease = %format!("{id:x}"),
                        error = %err,
                        failures = failures + 1,
                        "etcd keep-alive failed; retrying with backoff"
                    );
                }
                failures = failures.saturating_add(1);
                delay = retry;
                // Back off up to the keep-alive period: a waiting candidate needs no more.
                retry = (retry * 2).min(period.max(first_retry));
            }
        }
    }
}

#[async_trait]
impl Driver for EtcdDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        let inner = &self.inner;
        let (lease, lease_ttl) = inner.ensure_lease(candidate.ttl).await?;
        let key = inner.allocate_key(candidate, lease);
        let revision = match inner.create_key(&key, &candidate.value).await {
            Ok(revision) => revision,
            Err(err) => {
                if matches!(&err, Error::Store(e) if e.downcast_ref::<etcd_client::Error>().is_some_and(is_lease_not_found))
                {
                    inner.lease_lost(lease).await;
                }
                return Err(err);
            }
        };
        if let Some(entry) = lock(&inner.keys).get_mut(&candidate.id) {
            entry.create_revision = revision;
        }
        let prefix = self.election_prefix(&candidate.election);
        inner
            .wait_for_predecessors(&prefix, revision, lease)
            .await?;
        if !inner.key_is_ours(&key, revision).await? {
            warn!(key = %key.key, "campaign key vanished while waiting (lease expired?)");
            return Err(Error::TermGone);
        }
        let ttl = candidate.ttl.min(lease_ttl);
        let confirmed_at = inner.keep_alive(lease, ttl / 3).await?;
        Ok(Grant::new(
            u64::try_from(revision).unwrap_or(0),
            confirmed_at,
            ttl,
        ))
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        let key = lock(&self.inner.keys).get(&candidate.id).cloned();
        let Some(key) =
            key.filter(|k| u64::try_from(k.create_revision).ok() == Some(grant.fencing_token))
        else {
            return Err(Error::TermGone);
        };
        let confirmed_at = self.inner.keep_alive(key.lease, grant.ttl / 3).await?;
        Ok(Grant::new(grant.fencing_token, confirmed_at, grant.ttl))
    }

    async fn resign(&self, candidate: &Candidate, _fencing_token: Option<u64>) -> Result<()> {
        let key = lock(&self.inner.keys).get(&candidate.id).cloned();
        let Some(key) = key else {
            return Ok(());
        };
        self.inner.delete_own(&key).await?;
        let mut keys = lock(&self.inner.keys);
        if keys.get(&candidate.id).is_some_and(|k| k.key == key.key) {
            keys.remove(&candidate.id);
        }
        Ok(())
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        let prefix = self.election_prefix(election);
        Ok(self.inner.leader_of(&prefix).await?.0)
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let (tx, rx) = mpsc::channel(16);
        let inner = Arc::clone(&self.inner);
        let prefix = self.election_prefix(election);
        tokio::spawn(async move {
            tokio::select! {
                () = observe_loop(&inner, &prefix, &tx) => {}
                () = tx.closed() => {}
            }
        });
        tokio_stream_from(rx)
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Sends the leader, then again after every change under `prefix`; on errors, sends the
/// error and starts over after a pause.
async fn observe_loop(inner: &Inner, prefix: &str, tx: &mpsc::Sender<Result<Option<LeaderInfo>>>) {
    let retry = Duration::from_millis(500);
    loop {
        let result: Result<()> = async {
            let (leader, revision) = inner.leader_of(prefix).await?;
            if tx.send(Ok(leader)).await.is_err() {
                return Ok(());
            }
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut watch = inner
                .request(inner.client.clone().watch(prefix, Some(options)))
                .await?;
            loop {
                let Some(message) = watch.message().await.map_err(store_err)? else {
                    return Err(unexpected("etcd closed the watch stream"));
                };
                if message.canceled() {
                    return Err(unexpected(format!(
                        "etcd cancelled the watch: {}",
                        message.cancel_reason()
                    )));
                }
                if message.events().is_empty() {
                    continue;
                }
                let (leader, _) = inner.leader_of(prefix).await?;
                if tx.send(Ok(leader)).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(err) => {
                if tx.send(Err(err)).await.is_err() {
                    return;
                }
                sleep(retry).await;
            }
        }
    }
}
