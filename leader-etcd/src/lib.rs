#![doc = include_str!("../README.md")]

mod beyond;
mod builder;
mod campaign;
mod client_io;
mod confirm;
mod error;
mod expiry;
mod gone;
mod held;
pub mod io;
mod keys;
mod lease;
mod observe;
mod url;
mod wait;
mod watches;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use leader_core::{Candidate, CandidateInfo, Driver, Error, Grant, LeaderInfo, Result, Term};
use tokio::time::{Instant, timeout};
use tracing::debug;

use crate::error::from_etcd;
use crate::held::HeldKeys;
use crate::io::{EtcdIo, lease_not_found};
use crate::keys::{CandidateKey, Keys};
use crate::lease::Leases;
use crate::wait::Waited;

pub use builder::{EtcdDriverBuilder, Settings};
pub use client_io::ClientIo;
pub use etcd_client;
pub use url::SCHEMES;

/// The default for [`EtcdDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Driver`] for etcd, speaking etcd's own election protocol.
///
/// Each candidate creates the key `<prefix><election>/<lease id in hex>` (only if absent,
/// in a transaction), attached to the driver's lease for its TTL; the key with the lowest
/// create revision leads; each waiter watches only the deletion of the key created just
/// before its own. The fencing token is the leader key's create revision. So Rust
/// candidates, `etcdctl elect` and Go's `concurrency.Election` contend in one election
/// correctly.
///
/// One lease per distinct TTL keeps every election with that TTL alive, with one
/// keep-alive per third of the lease TTL, however many elections and candidates share the
/// driver; a renewal adds one read of its term's key. One watch stream per driver watches
/// the keys of the terms its candidates hold, so a leader whose key is deleted learns it at
/// once (see [`term_gone`](Self::term_gone)).
/// Cheap to clone: clones share the connection, the leases and the watch.
#[derive(Clone)]
pub struct EtcdDriver {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every request to etcd goes through it.
    io: Arc<dyn EtcdIo>,
    /// The etcd client under `io`, when it is one.
    client: Option<Client>,
    prefix: String,
    lease_ttl: Option<Duration>,
    request_timeout: Duration,
    leases: Leases,
    /// The key of each candidate that has one: created before the request is sent, so a
    /// cancelled campaign can always be withdrawn.
    keys: Mutex<Keys>,
    held: HeldKeys,
    reads: confirm::Reads,
    /// The watches of waiting candidates and observers, on one stream.
    watches: watches::Watches,
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
            settings: Settings::default(),
        }
    }

    /// A driver whose every request to etcd goes through `io`, with the options
    /// `settings`: the seam between the protocol and the I/O. The other constructors use
    /// [`ClientIo`] (etcd-client); the crate's simulation test passes a model of etcd on a
    /// simulated network, so that the protocol that ships is the one it explores.
    /// [`client`](Self::client) is `None` on such a driver.
    pub fn with_io(io: Arc<dyn EtcdIo>, settings: Settings) -> Self {
        EtcdDriver {
            inner: Arc::new(Inner {
                io,
                client: None,
                prefix: settings.prefix,
                lease_ttl: settings.lease_ttl,
                request_timeout: settings.request_timeout,
                leases: Leases::new(),
                keys: Mutex::new(Keys::default()),
                held: HeldKeys::new(),
                reads: confirm::Reads::default(),
                watches: watches::Watches::new(),
            }),
        }
    }

    /// Connects to etcd at `endpoints` (`"127.0.0.1:2379"` or `"http://host:2379"`) and
    /// returns a driver with the default options, on a client with
    /// [`default_connect_options`](Self::default_connect_options).
    pub async fn connect<E: AsRef<str>, S: AsRef<[E]>>(endpoints: S) -> Result<Self> {
        Self::connect_with(endpoints, Self::default_connect_options()).await
    }

    /// The client options [`connect`](Self::connect) uses, to start from in
    /// [`connect_with`](Self::connect_with): a 5 s connect timeout, HTTP/2 keep-alive pings
    /// every 5 s (so that a dead connection is noticed), and
    /// [`with_require_leader(true)`](ConnectOptions::with_require_leader), as `etcdctl
    /// elect` does: a member cut off from its cluster's quorum then fails requests and ends
    /// watches with an error (soon after it loses its leader), instead of leaving a waiting
    /// candidate stalled on a watch that cannot fire. And
    /// [`with_auto_token_refresh(true)`](ConnectOptions::with_auto_token_refresh): with a
    /// user and password, etcd's auth token expires (after `--auth-token-ttl`, 5 minutes by
    /// default); without a refresh every request after that fails and every election dies.
    pub fn default_connect_options() -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true)
            .with_auto_token_refresh(true)
    }

    /// Connects to etcd at `endpoints` with the client options `options` (credentials with
    /// `with_user`, TLS, timeouts) and returns a driver with the default options. Bad
    /// credentials are [`Error::Denied`].
    ///
    /// `options` are used as given. Start from
    /// [`default_connect_options`](Self::default_connect_options), or set
    /// [`with_require_leader(true)`](ConnectOptions::with_require_leader) (without it, a
    /// candidate waiting in line through a member that lost its quorum waits on a watch
    /// that stays silent until the member rejoins) and, with a user,
    /// [`with_auto_token_refresh(true)`](ConnectOptions::with_auto_token_refresh) (without
    /// it, every request fails once the auth token expires).
    ///
    /// TLS (feature `tls`): `https://` endpoints and
    /// `options.with_tls(etcd_client::TlsOptions::new().ca_certificate(…).identity(…))`.
    pub async fn connect_with<E: AsRef<str>, S: AsRef<[E]>>(
        endpoints: S,
        options: ConnectOptions,
    ) -> Result<Self> {
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(refused_at_connect)?;
        Ok(Self::new(client))
    }

    /// Connects to etcd at `endpoints` with the client options `options`, and returns a
    /// builder for the driver's own options (a key prefix, say). Bad credentials are
    /// [`Error::Denied`]; see [`connect_with`](Self::connect_with) about `options`.
    pub async fn connect_builder<E: AsRef<str>, S: AsRef<[E]>>(
        endpoints: S,
        options: ConnectOptions,
    ) -> Result<EtcdDriverBuilder> {
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(refused_at_connect)?;
        Ok(Self::builder(client))
    }

    /// The etcd client, to share with the rest of the service; `None` for a driver built
    /// by [`with_io`](Self::with_io) (it has no client of its own).
    pub fn client(&self) -> Option<&Client> {
        self.inner.client.as_ref()
    }

    /// The key prefix of `election`'s candidates: `<prefix><election>/`.
    pub fn election_prefix(&self, election: &str) -> String {
        format!("{}{election}/", self.inner.prefix)
    }

    /// Resolves when etcd says that `candidate`'s term `fencing_token` is gone: its key was
    /// deleted (by an operator, by a late request, or by etcd when the lease was revoked or
    /// expired) or overwritten (an operator's `etcdctl put`), or a renewal found it gone.
    /// Resolves at once if this driver does not know that term as held (never elected, or
    /// replaced by a newer term of the candidate); never resolves for a term that ends by a
    /// resignation through this driver.
    ///
    /// The push side of [`renew`](Driver::renew): after it resolves, `renew` for that term
    /// returns [`Error::TermGone`] at once. Changes of a held key are seen through the
    /// driver's watch of its held keys, about one round trip after they happen; while that
    /// watch is being restarted after an error, at the term's next renewal (which reads the
    /// key whatever the watch says).
    pub fn term_gone(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
    ) -> impl Future<Output = ()> + Send + 'static {
        let gone = self
            .inner
            .term_key(&candidate.id, fencing_token)
            .map(|key| key.gone);
        async move {
            if let Some(gone) = gone {
                gone.cancelled_owned().await;
            }
        }
    }
}

impl EtcdDriver {
    /// Runs the etcd operations `ops` in one transaction, only while `term`'s key stands in
    /// etcd with its create revision (the term's fencing token): a compare in the same
    /// transaction, so a leader whose term has ended (its key deleted, its lease expired, a
    /// newer term elected) writes nothing, however late its request arrives.
    ///
    /// # Errors
    ///
    /// [`Error::Fenced`] (with the key as `resource`, and nothing written) when the term's
    /// key no longer stands, or when this driver does not hold the term (it ended here,
    /// or it is another driver's); a store error otherwise (then, as with any request, the
    /// transaction may or may not have been applied: it applied only if the term stood).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(driver: leader_etcd::EtcdDriver, term: leader_core::Term) -> leader_core::Result<()> {
    /// use leader_etcd::etcd_client::TxnOp;
    /// driver
    ///     .txn_if_leader(&term, vec![TxnOp::put("reports/last-run", "2026-12-03", None)])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn txn_if_leader(
        &self,
        term: &Term,
        ops: Vec<etcd_client::TxnOp>,
    ) -> Result<etcd_client::TxnResponse> {
        self.inner.txn_if_held(term.fencing_token(), ops).await
    }
}

impl std::fmt::Debug for EtcdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let leases: Vec<String> = self
            .inner
            .leases
            .live()
            .into_iter()
            .map(|(seconds, id)| format!("{id:x} ({seconds}s)"))
            .collect();
        f.debug_struct("EtcdDriver")
            .field("prefix", &self.inner.prefix)
            .field("leases", &leases)
            .finish_non_exhaustive()
    }
}

/// Refuses election names that etcd cannot keep apart: a name with a `/` would nest (the
/// keys of election `svc/x` are under `svc/x/`, inside the range `svc/` of election `svc`,
/// whose leader would then be `svc/x`'s), and the empty name's keys would be the prefix's.
fn check_election_name(election: &str) -> Result<()> {
    if election.is_empty() {
        return Err(Error::invalid_config(
            "name",
            "an etcd election needs a non-empty name",
        ));
    }
    if election.contains('/') {
        return Err(Error::invalid_config(
            "name",
            format!(
                "etcd election names cannot contain `/`: the keys of election `{election}` \
                 would lie inside the key range of election `{}`, and the two would mix",
                election.split('/').next().unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// A failed connection's error: a refusal says to check the credentials.
fn refused_at_connect(err: etcd_client::Error) -> Error {
    match from_etcd(err) {
        Error::Denied(source) => Error::denied(error::Refusal::new(source, String::new())),
        other => other,
    }
}

/// Takes a std mutex whether or not a panic poisoned it: the data under these locks is
/// always left consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    /// One etcd request, with the driver's timeout.
    async fn request<T>(&self, future: impl Future<Output = Result<T>>) -> Result<T> {
        match timeout(self.request_timeout, future).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(self.request_timeout)),
        }
    }
}

impl EtcdDriver {
    async fn campaign_term(&self, candidate: &Candidate) -> Result<Grant> {
        let began = Instant::now();
        let inner = &self.inner;
        let slot = inner.leases.slot(inner.lease_seconds(candidate.ttl));
        slot.serves(candidate.ttl);
        let (lease, lease_ttl) = inner.ensure_lease(&slot).await?;
        let key = inner.allocate_key(candidate, lease, &slot);
        let prefix = self.election_prefix(&candidate.election);
        // Once, and once more each time a handover passes the key over (see below), or the
        // lease lapses for a TTL before this candidate leads (see `Inner::lapses`).
        let (key, revision, verified_at, confirmed_at) = loop {
            // Before the create: a lapse of the lease from here on spoils the key.
            let lapses = inner.lapses(&slot, lease, candidate.ttl).await;
            if lapses.is_none() {
                return Err(Error::TermGone);
            }
            let (revision, gone, line) = match inner.create_key(candidate, &key, &prefix).await {
                Ok(created) => created,
                Err(err) => {
                    if lease_not_found(&err) {
                        inner.lease_lost(&slot, lease).await;
                    }
                    return Err(err);
                }
            };
            let key = CandidateKey {
                create_revision: revision,
                gone,
                ..key.clone()
            };
            match inner
                .wait_for_predecessors(
                    &prefix,
                    &key.key,
                    revision,
                    &slot,
                    lease,
                    (candidate.ttl, lapses, line),
                )
                .await
            {
                Ok(Waited::Lead(at)) => {
                    // A keep-alive sent after this call began (the background one usually
                    // is, after a wait in line), so the grant is no older than the campaign.
                    // The wait showed the key on the lease, with nothing below it, at `at`:
                    // the lease lives until the keep-alive's confirmation + TTL at least, and
                    // the watch of held keys (from that revision on) reports any change to
                    // the key since; and no lapse of the lease since the create let the
                    // next in line end the key's term (see `Inner::lapses`).
                    //
                    // And no older than half the TTL: a confirmation from before a lapse
                    // still going on would give a grant whose deadline passed, which the
                    // core renews; that renewal's keep-alive would end the lapse with
                    // nobody comparing the count, while the next in line may be proving the
                    // term's end. A keep-alive sent now counts such a lapse before the
                    // comparison below. The background keep-alive comes every third of the
                    // lease's TTL (a second more than the TTL), so from a TTL of 2 s on a
                    // healthy lease needs no extra request; at 1 s (a keep-alive every
                    // 667 ms) about a quarter of the grants cost one.
                    let not_before = Instant::now()
                        .checked_sub(candidate.ttl / 2)
                        .map_or(began, |recent| recent.max(began));
                    let confirmed_at = inner.keep_alive(&slot, lease, not_before).await?;
                    if inner.lapses(&slot, lease, candidate.ttl).await == lapses {
                        break (key, revision, at, confirmed_at);
                    }
                    debug!(key = %key.key, "the etcd lease lapsed for a TTL since the key was created: creating it again");
                }
                // Passed over by a handover: the new key's create revision is above every
                // term so far, so only a later handover can pass it over again (in a
                // rolling deploy, one per replica): each time, create it again.
                Ok(Waited::Recreate) => {}
                Err(err) => {
                    if matches!(err, Error::TermGone) {
                        key.gone.cancel();
                    }
                    return Err(err);
                }
            }
        };
        // Never longer than the candidate's TTL: the key's TTL side key says so to the next
        // in line, which relies on it to end this term once its deadline has passed
        // (src/expiry.rs).
        let ttl = candidate.ttl.min(lease_ttl);
        inner.hold_term(&key, verified_at);
        Ok(Grant::new(
            u64::try_from(revision).unwrap_or(0),
            confirmed_at,
            ttl,
        ))
    }

    /// Renews the term of `grant`. Every held term's renewal is in flight at once each round
    /// (they rest on the lease's shared keep-alives), so this future is kept small: not an
    /// async fn, which keeps its arguments twice, and no waiter of its own on the term's
    /// `gone` token: it checks it before, between and after its steps, and a step that fails
    /// once the token is cancelled fails with `TermGone`, as a race on it would have. The
    /// core's holder races the token beside the request; `elect()`'s renewal of a stale
    /// grant learns of the watch's news at the next step (its read is what counts).
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn renew_term<'a>(
        &'a self,
        candidate: &'a Candidate,
        grant: &'a Grant,
    ) -> impl Future<Output = Result<Grant>> + Send + 'a {
        async move {
            let inner = &self.inner;
            let Some(key) = inner.term_key(&candidate.id, grant.fencing_token) else {
                return Err(Error::TermGone);
            };
            if key.gone.is_cancelled() {
                return Err(Error::TermGone);
            }
            // A term past its deadline stays ended: the next in line may have proved so
            // (`crate::expiry`) and be deleting the key, which a keep-alive landing now would
            // not stop. (The core renews a grant that came stale from a slow campaign.) So
            // neither a renewal begun after the deadline nor one answered after it counts:
            // the core's holder takes a renewal only before the old deadline too, and a
            // grant renewed by `elect()` must keep to that rule as well. The deadline is the
            // holder's, less the default safety margin: the next in line's proof counts
            // the TTL on etcd's clock, which may run that much faster than this one's. (A
            // larger margin set on the election moves the holder's own deadline earlier;
            // `elect()`'s renewal of a stale grant is held to this one.)
            let deadline = grant.confirmed_at
                + grant
                    .ttl
                    .saturating_sub(leader_core::default_safety_margin(grant.ttl));
            if deadline <= Instant::now() {
                return Err(Error::TermGone);
            }
            let max_age = grant.ttl / 3;
            // The lease's last keep-alive will do if it is recent, and it is never older
            // than the grant's, which came from the same lease.
            let not_before = Instant::now()
                .checked_sub(max_age)
                .map_or(grant.confirmed_at, |recent| recent.max(grant.confirmed_at));
            if let Some(confirmed_at) = inner.read_covers(key.create_revision, not_before) {
                return Ok(Grant::new(grant.fencing_token, confirmed_at, grant.ttl));
            }
            let gone_or = |err| {
                if key.gone.is_cancelled() {
                    Error::TermGone
                } else {
                    err
                }
            };
            let confirmed_at = inner
                .keep_alive(&key.slot, key.lease, not_before)
                .await
                .map_err(gone_or)?;
            if key.gone.is_cancelled() {
                return Err(Error::TermGone);
            }
            // The lease lives until at least `confirmed_at` + its TTL; a linearizable read
            // after that shows the term's key still on it (the watch of held keys only ever
            // says that it is gone, never that it is not).
            inner
                .confirm_key(&key, confirmed_at)
                .await
                .map_err(gone_or)?;
            if key.gone.is_cancelled() || deadline <= Instant::now() {
                return Err(Error::TermGone);
            }
            Ok(Grant::new(grant.fencing_token, confirmed_at, grant.ttl))
        }
    }

    async fn resign_term(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        let inner = &self.inner;
        let Some(key) = inner.candidate_key(&candidate.id) else {
            return Ok(());
        };
        // Recorded as failing until it succeeds, so that an attempt whose future is dropped
        // (the core's timeout) counts too; bounded: see `LeaseSlot::withdrawal_failed`.
        key.slot
            .withdrawal_failed(&key.key, key.lease, Instant::now());
        let result = self.withdraw_key(candidate, &key, fencing_token).await;
        if result.is_ok() {
            key.slot.withdrawn(&key.key);
        }
        result
    }

    async fn withdraw_key(
        &self,
        candidate: &Candidate,
        key: &CandidateKey,
        fencing_token: Option<u64>,
    ) -> Result<()> {
        let inner = &self.inner;
        // The term to delete, by its create revision: the one asked for, or else the one
        // this candidate is known to hold, or else (a create whose answer never came) the
        // one etcd shows on this candidate's key and lease once no create can land any
        // more. Never by the key alone, so that a late request cannot delete a term begun
        // after it.
        let (revision, only) = match fencing_token {
            Some(token) => match i64::try_from(token) {
                Ok(revision) if revision > 0 => (Some(revision), Some(revision)),
                _ => {
                    debug!(
                        fencing_token = token,
                        "no etcd key has this create revision"
                    );
                    return Ok(());
                }
            },
            None if key.create_revision > 0 => (Some(key.create_revision), None),
            None => {
                // A create may be in flight: etcd may apply it after any read. Revoke its
                // attempt lease first; etcd orders that with the create, which either
                // landed before (the read below sees it) or fails as a whole.
                if key.attempt != 0 {
                    inner.revoke_attempt(&key.slot, key.attempt).await?;
                }
                let revision = inner.own_revision(key).await?;
                if revision.is_none() {
                    inner.delete_sides_if_absent(&key.key).await?;
                }
                (revision, None)
            }
        };
        if let Some(revision) = revision {
            // Stop watching the term first: the core stepped down before it asked, and the
            // delete's own event is no news (it would be logged as a term gone).
            inner.release_term(revision);
            inner.delete_own(&key.key, revision, true).await?;
        }
        lock(&inner.keys).forget(&candidate.id, &key.key, only);
        Ok(())
    }

    /// `err`, with a refusal ([`Error::Denied`]) explained: which permission the user needs
    /// for `election`.
    fn explain(&self, election: &str, err: Error) -> Error {
        match err {
            Error::Denied(source) => Error::denied(error::Refusal::new(
                source,
                format!("{}{election}", self.inner.prefix),
            )),
            other => other,
        }
    }
}

#[async_trait]
impl Driver for EtcdDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        check_election_name(&candidate.election)?;
        self.campaign_term(candidate)
            .await
            .map_err(|err| self.explain(&candidate.election, err))
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        self.renew_term(candidate, grant)
            .await
            .map_err(|err| self.explain(&candidate.election, err))
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        self.resign_term(candidate, fencing_token)
            .await
            .map_err(|err| self.explain(&candidate.election, err))
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        check_election_name(election)?;
        let prefix = self.election_prefix(election);
        match self.inner.leader_of(&prefix).await {
            Ok((leader, _)) => Ok(leader),
            Err(err) => Err(self.explain(election, err)),
        }
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        if let Err(err) = check_election_name(election) {
            return futures::stream::once(async move { Err(err) })
                .chain(futures::stream::pending())
                .boxed();
        }
        let driver = self.clone();
        let election = election.to_owned();
        observe::observe(Arc::clone(&self.inner), self.election_prefix(&election))
            .map(move |item| item.map_err(|err| driver.explain(&election, err)))
            .boxed()
    }

    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        Box::pin(EtcdDriver::term_gone(self, candidate, fencing_token))
    }

    /// Clones share their state: they are one driver.
    fn instance_id(&self) -> usize {
        Arc::as_ptr(&self.inner).cast::<()>() as usize
    }

    fn check_name(&self, election: &str) -> Result<()> {
        check_election_name(election)
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        check_election_name(election)?;
        self.inner
            .candidates_of(&self.election_prefix(election))
            .await
            .map_err(|err| self.explain(election, err))
    }

    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        self.inner
            .hand_over_term(
                &candidate.id,
                fencing_token,
                nominee,
                &self.election_prefix(&candidate.election),
                candidate.ttl,
            )
            .await
            .map_err(|err| self.explain(&candidate.election, err))
    }

    async fn proclaim(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        value: &[u8],
    ) -> Result<()> {
        self.inner
            .proclaim_value(&candidate.id, fencing_token, value)
            .await
            .map_err(|err| self.explain(&candidate.election, err))
    }
}
