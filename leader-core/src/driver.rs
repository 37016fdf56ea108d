//! The [`Driver`] trait that store backends implement, and the types it exchanges with
//! [`Election`](crate::Election).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::time::Instant;

use crate::Result;

/// One candidate in one election, as the driver sees it.
///
/// [`Election`](crate::Election) creates exactly one `Candidate` per election handle and
/// passes the same one to every driver call, so a driver can key its own bookkeeping on
/// [`id`](Self::id).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Candidate {
    /// The election's name, as given to [`Election::builder`](crate::Election::builder).
    pub election: String,
    /// Unique per process and per election handle: `hostname-pid-random`. Never reused, so
    /// a driver may use it as an ownership token.
    pub id: String,
    /// What observers see about this candidate while it leads.
    pub value: Vec<u8>,
    /// The lease the candidate asks for. A driver may grant a longer one (see
    /// [`Grant::ttl`]), never a shorter one.
    pub ttl: Duration,
}

impl Candidate {
    /// A candidate `id` in `election`, campaigning with `value` for a lease of `ttl`.
    /// [`Election`](crate::Election) makes these; drivers' own tests may too.
    pub fn new(
        election: impl Into<String>,
        id: impl Into<String>,
        value: impl Into<Vec<u8>>,
        ttl: Duration,
    ) -> Self {
        Candidate {
            election: election.into(),
            id: id.into(),
            value: value.into(),
            ttl,
        }
    }
}

/// The store's confirmation that a candidate holds (or still holds) a term.
///
/// The safety of the whole library rests on one promise a driver makes with each `Grant`:
/// **the store will not let another candidate lead this election before
/// `confirmed_at + ttl`** (on this process's monotonic clock), unless this candidate resigns.
/// A driver keeps that promise by taking `confirmed_at` *before* it sends the request that
/// created or extended the lease, and by making `ttl` no longer than the lease the store
/// applied.
///
/// A grant from [`Driver::campaign`] is confirmed by a request sent after the call began.
/// A renewal may answer with an earlier confirmation that it shares with other terms (one
/// keep-alive for every election on a lease), but never one older than the confirmation of
/// the grant it renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grant {
    /// Strictly increasing across the terms of one election, across all candidates.
    pub fencing_token: u64,
    /// The send time of the store request that created or extended the lease.
    pub confirmed_at: Instant,
    /// How long after `confirmed_at` the store keeps the term at least.
    pub ttl: Duration,
}

impl Grant {
    /// A grant of term `fencing_token`, confirmed by a request sent at `confirmed_at`, that
    /// the store keeps for at least `ttl` after that.
    pub fn new(fencing_token: u64, confirmed_at: Instant, ttl: Duration) -> Self {
        Grant {
            fencing_token,
            confirmed_at,
            ttl,
        }
    }
}

/// Who leads an election, as the store says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct LeaderInfo {
    /// The store's identifier of the leading candidate (etcd: the key's lease in hex; Redis
    /// and memory: the candidate id).
    pub id: String,
    /// The value the leader campaigned with.
    pub value: Vec<u8>,
    /// The fencing token of the leader's current term.
    pub fencing_token: u64,
}

impl LeaderInfo {
    /// The leader `id`, which campaigned with `value`, in its term `fencing_token`.
    pub fn new(id: impl Into<String>, value: impl Into<Vec<u8>>, fencing_token: u64) -> Self {
        LeaderInfo {
            id: id.into(),
            value: value.into(),
            fencing_token,
        }
    }

    /// The value as UTF-8 text, with invalid bytes replaced.
    pub fn value_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// One candidate standing in an election, as [`Driver::candidates`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct CandidateInfo {
    /// The candidate's id: its [`Election::id`](crate::Election::id) (etcd: for keys that
    /// another client, such as `etcdctl elect`, created, the key's lease in hex).
    pub id: String,
    /// The value the candidate campaigns with (the leader's: its current value).
    pub value: Vec<u8>,
    /// Whether this candidate leads.
    pub is_leader: bool,
}

impl CandidateInfo {
    /// Candidate `id` with `value`, leading or not.
    pub fn new(id: impl Into<String>, value: impl Into<Vec<u8>>, is_leader: bool) -> Self {
        CandidateInfo {
            id: id.into(),
            value: value.into(),
            is_leader,
        }
    }

    /// The value as UTF-8 text, with invalid bytes replaced.
    pub fn value_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// The store primitives an election needs. Implemented once per store (`leader-etcd`,
/// `leader-redis`, and [`MemoryDriver`](crate::testing::MemoryDriver) for tests).
///
/// A driver is thin: it talks to the store and nothing else. Deadlines, the renewal loop,
/// events, re-campaigning and backoff live in [`Election`](crate::Election), once, for all
/// drivers.
///
/// # Contract
///
/// * **Identity.** A term belongs to one [`Candidate`] (by [`Candidate::id`]) and is named
///   by its [`Grant::fencing_token`]. Calls for one candidate are never concurrent with
///   each other except [`renew`](Self::renew), which may overlap nothing but itself being
///   abandoned; calls for different candidates may run concurrently on one driver.
/// * **Atomicity.** Taking the lead and producing the fencing token happen in one atomic
///   store operation (etcd: a transaction, whose create revision is the token; Redis: one
///   Lua script that sets the key and increments the fence counter). Renewal and
///   resignation compare ownership and act in one atomic operation: a driver must never
///   extend or delete another candidate's key.
/// * **Fencing tokens** increase strictly from term to term within an election, whichever
///   candidate holds the term, including when the same candidate campaigns again.
/// * **Waiting.** [`campaign`](Self::campaign) blocks until elected without polling the
///   store in a loop: it waits on a store notification (etcd: a watch on the predecessor's
///   key; Redis: pub/sub) and, where the store cannot notify, on a timer set to the current
///   lease's expiry. Idle cost must not grow with the number of waiting candidates.
/// * **Cancellation and late effects.** Every method may be cancelled by dropping its
///   future, and a request may take effect in the store after its caller gave up on it
///   (the answer was lost, or the request was delayed past its timeout).
///   [`Election`](crate::Election) then calls [`resign`](Self::resign) for the same
///   candidate, which must remove whatever a half-finished `campaign` left in the store.
///   Every store-side change must therefore be conditional on the term it is meant for, so
///   that a late one cannot touch a newer term: when `resign` is given a fencing token it
///   deletes that term only.
/// * **Errors.** Store failures are returned as [`Error::Store`](crate::Error::Store) or
///   [`Error::Timeout`](crate::Error::Timeout); a driver never panics on them and never
///   retries in a tight loop. All methods may be retried by the caller. A refusal that
///   retrying cannot fix (bad credentials, a missing permission) is
///   [`Error::Denied`](crate::Error::Denied), which [`Election::run`](crate::Election::run)
///   returns instead of retrying.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Enters `candidate` into its election and waits until it leads.
    ///
    /// On success the store holds a term for this candidate and the returned grant
    /// describes it. If the candidate already had a key from an earlier term, the driver
    /// starts a new term with a new, higher fencing token.
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant>;

    /// Extends the lease of the term described by `grant`.
    ///
    /// Returns a grant with the same fencing token and a later `confirmed_at`, or
    /// [`Error::TermGone`](crate::Error::TermGone) if the store no longer holds that term
    /// for this candidate (never extending anyone else's).
    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant>;

    /// Removes this candidate from the election: deletes its term if it holds one, and its
    /// place in line if it waits. Succeeds if there is nothing to remove. Only ever touches
    /// this candidate's own key. Lets a waiting candidate take over in about one round trip.
    ///
    /// With `Some(fencing_token)`, the driver deletes the term with that token only (a
    /// newer term of the same candidate stays). With `None` (a campaign whose answer never
    /// came), it removes whatever this candidate has in the election, but still by exact
    /// identity: it reads the candidate's key (and its token) first, then deletes that one,
    /// so that this request, if it lands late, cannot delete a term begun after it.
    /// Removing a place in line is likewise conditional on that place.
    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()>;

    /// Who leads `election` now, if anyone.
    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>>;

    /// A stream of the leader of `election`: its current value first, then a new item
    /// whenever it may have changed (it may repeat itself; the caller removes duplicates).
    /// A store error is yielded as an `Err` item and the stream goes on; it ends only when
    /// dropped.
    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>>;

    /// Resolves when the store says the term `fencing_token` of `candidate` is gone (its
    /// key deleted, its lease revoked or expired), for stores that can push that (etcd: a
    /// watch on the leader's own key). The leader then steps down within a round trip
    /// instead of at its next renewal. Called once per term, after the grant; dropped when
    /// the term ends. Defaults to never resolving: the next renewal notices.
    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        let _ = (candidate, fencing_token);
        Box::pin(futures::future::pending())
    }

    /// Every candidate standing in `election`: the leader first, then the waiters in the
    /// order they would lead (where the store keeps an order; otherwise in the store's
    /// order). Defaults to [`Error::Unsupported`](crate::Error::Unsupported).
    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        let _ = election;
        Err(crate::Error::Unsupported {
            operation: "candidates",
        })
    }

    /// Ends the term `fencing_token` of `candidate` and nominates `nominee` (the id of a
    /// candidate waiting in the same election) as the next leader, in one atomic store
    /// operation: deletes the term, records a nomination that lasts one TTL (the
    /// candidate's, by the store's clock) during which no candidate but the nominee can be
    /// elected, and wakes the nominee. The nomination ends when the nominee is elected,
    /// when it withdraws ([`resign`](Self::resign) removes a nomination naming it), or at
    /// its expiry; then the line resumes.
    ///
    /// Errors, with nothing changed in the store: [`Error::TermGone`](crate::Error::TermGone)
    /// if the term is no longer held; [`Error::NotWaiting`](crate::Error::NotWaiting) if
    /// `nominee` is not waiting in this election. Defaults to
    /// [`Error::Unsupported`](crate::Error::Unsupported).
    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        let _ = (candidate, fencing_token, nominee);
        Err(crate::Error::Unsupported {
            operation: "hand_over",
        })
    }

    /// Sets the value observers see ([`leader`](Self::leader), [`observe`](Self::observe),
    /// [`candidates`](Self::candidates)) for the term `fencing_token` of `candidate`, only
    /// while the store holds that term: same term, same fencing token, no re-election.
    /// [`Error::TermGone`](crate::Error::TermGone), with nothing written, otherwise.
    /// Defaults to [`Error::Unsupported`](crate::Error::Unsupported).
    async fn proclaim(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        value: &[u8],
    ) -> Result<()> {
        let _ = (candidate, fencing_token, value);
        Err(crate::Error::Unsupported {
            operation: "proclaim",
        })
    }

    /// Whether this store can hold an election named `election`: called by
    /// [`ElectionBuilder::build`](crate::ElectionBuilder::build), so that a name the store
    /// rejects is an [`Error::InvalidConfig`](crate::Error::InvalidConfig) at once, not an
    /// error at every campaign. Defaults to accepting every name.
    fn check_name(&self, election: &str) -> Result<()> {
        let _ = election;
        Ok(())
    }

    /// Which driver this is, among the drivers of the process: the terms held on one
    /// driver and elected on one runtime rest in one task of that runtime (see the crate's
    /// ARCHITECTURE notes on holders). Unique among live drivers and stable for the driver's
    /// life; it decides nothing else, so two drivers that answered the same would only share
    /// that task. Defaults to the address of `self`. A driver whose clones share their
    /// state returns the address of that state; one that wraps another and forwards to it
    /// (as `Arc<D>` does) forwards this too, so that wrapping it again for each election
    /// still shares the task.
    fn instance_id(&self) -> usize {
        std::ptr::from_ref(self).cast::<()>() as usize
    }
}

/// The future of a forwarded method, as `#[async_trait]` declares it.
type Forwarded<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Forwards every call, handing on the driver's own boxed future rather than boxing one
/// more around it (`#[async_trait]` would): the elections of a process built on an
/// `Arc<dyn Driver>` renew through here, thousands of them at once. Every method is
/// forwarded: none may fall back to the trait's default.
#[deny(clippy::missing_trait_methods)]
impl<D: Driver + ?Sized> Driver for Arc<D> {
    fn campaign<'l0, 'l1, 'a>(&'l0 self, candidate: &'l1 Candidate) -> Forwarded<'a, Grant>
    where
        'l0: 'a,
        'l1: 'a,
        Self: 'a,
    {
        (**self).campaign(candidate)
    }

    fn renew<'l0, 'l1, 'l2, 'a>(
        &'l0 self,
        candidate: &'l1 Candidate,
        grant: &'l2 Grant,
    ) -> Forwarded<'a, Grant>
    where
        'l0: 'a,
        'l1: 'a,
        'l2: 'a,
        Self: 'a,
    {
        (**self).renew(candidate, grant)
    }

    fn resign<'l0, 'l1, 'a>(
        &'l0 self,
        candidate: &'l1 Candidate,
        fencing_token: Option<u64>,
    ) -> Forwarded<'a, ()>
    where
        'l0: 'a,
        'l1: 'a,
        Self: 'a,
    {
        (**self).resign(candidate, fencing_token)
    }

    fn leader<'l0, 'l1, 'a>(&'l0 self, election: &'l1 str) -> Forwarded<'a, Option<LeaderInfo>>
    where
        'l0: 'a,
        'l1: 'a,
        Self: 'a,
    {
        (**self).leader(election)
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        (**self).observe(election)
    }

    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        (**self).term_gone(candidate, fencing_token)
    }

    fn candidates<'l0, 'l1, 'a>(&'l0 self, election: &'l1 str) -> Forwarded<'a, Vec<CandidateInfo>>
    where
        'l0: 'a,
        'l1: 'a,
        Self: 'a,
    {
        (**self).candidates(election)
    }

    fn hand_over<'l0, 'l1, 'l2, 'a>(
        &'l0 self,
        candidate: &'l1 Candidate,
        fencing_token: u64,
        nominee: &'l2 str,
    ) -> Forwarded<'a, ()>
    where
        'l0: 'a,
        'l1: 'a,
        'l2: 'a,
        Self: 'a,
    {
        (**self).hand_over(candidate, fencing_token, nominee)
    }

    fn proclaim<'l0, 'l1, 'l2, 'a>(
        &'l0 self,
        candidate: &'l1 Candidate,
        fencing_token: u64,
        value: &'l2 [u8],
    ) -> Forwarded<'a, ()>
    where
        'l0: 'a,
        'l1: 'a,
        'l2: 'a,
        Self: 'a,
    {
        (**self).proclaim(candidate, fencing_token, value)
    }

    fn check_name(&self, election: &str) -> Result<()> {
        (**self).check_name(election)
    }

    fn instance_id(&self) -> usize {
        (**self).instance_id()
    }
}
