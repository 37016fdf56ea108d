//! [`Election`], its builder, [`Status`] and [`Term`]: the state machine shared by all
//! drivers.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::driver::{Candidate, Driver, Grant, LeaderInfo};
use crate::event::{Event, EventStream, LossReason};
use crate::{Config, Error, Result};

/// The shortest TTL [`ElectionBuilder::build`] accepts.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// The longest TTL [`ElectionBuilder::build`] accepts.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest value [`ElectionBuilder::build`] accepts, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// The longest election name [`ElectionBuilder::build`] accepts, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// One candidate in one named election.
///
/// Create it with [`Election::builder`]. It is a cheap handle: clones share the candidacy,
/// the status and the events. When the last clone is dropped, the candidacy is withdrawn
/// and any held term resigned in the background (on the Tokio runtime that drops it).
///
/// See the [crate documentation](crate) for an example and for the guarantees.
#[derive(Clone)]
pub struct Election {
    handle: Arc<Handle>,
}

/// Withdraws the candidacy when the last [`Election`] clone goes away.
struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let core = Arc::clone(&self.core);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(core.close());
            }
            Err(_) => {
                warn!(
                    election = %core.candidate.election,
                    "election dropped outside a Tokio runtime: stepping down locally; \
                     the store keeps this candidate's key until its TTL runs out"
                );
                core.step_down_locally();
            }
        }
    }
}

pub(crate) struct Core {
    driver: Arc<dyn Driver>,
    candidate: Candidate,
    safety_margin: Option<Duration>,
    retry_min: Duration,
    retry_max: Duration,
    shared: Arc<Shared>,
    /// Serialises every call that creates or deletes this candidate's key in the store
    /// (campaign, resign, withdrawal), so a late withdrawal can never delete a newer term.
    campaign_lock: Arc<tokio::sync::Mutex<()>>,
}

struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    term: Option<Arc<TermState>>,
    /// A resignation stepped down but its store call failed: `resign()` retries it.
    pending_withdrawal: bool,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
}

struct TermState {
    fencing_token: u64,
    elected_at: Instant,
    deadline: Mutex<Instant>,
    ended: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks is always left consistent, so a panic elsewhere while
    // holding one does not make it unusable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TermState {
    fn deadline(&self) -> Instant {
        *lock(&self.deadline)
    }

    fn is_valid(&self) -> bool {
        !self.ended.is_cancelled() && Instant::now() < self.deadline()
    }
}

impl State {
    fn emit(&mut self, event: Event) {
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }
}

impl Shared {
    fn valid_term(&self) -> Option<Arc<TermState>> {
        lock(&self.state)
            .term
            .as_ref()
            .filter(|term| term.is_valid())
            .cloned()
    }
}

impl Election {
    /// Starts building a candidate for election `name` on `driver`.
    ///
    /// `driver` is any [`Driver`], including an `Arc<dyn Driver>`; several elections may
    /// share one driver (clone it).
    pub fn builder(driver: impl Driver, name: impl Into<String>) -> ElectionBuilder {
        ElectionBuilder::new(Arc::new(driver), name.into())
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.core().candidate.election
    }

    /// This candidate's id: `hostname-pid-random`, unique per process and per election.
    pub fn id(&self) -> &str {
        &self.core().candidate.id
    }

    /// The value observers see while this candidate leads.
    pub fn value(&self) -> &[u8] {
        &self.core().candidate.value
    }

    /// The TTL this candidate asks the store for.
    pub fn ttl(&self) -> Duration {
        self.core().candidate.ttl
    }

    /// A cheap handle to ask "do I lead?" from anywhere, without awaiting.
    pub fn status(&self) -> Status {
        Status {
            shared: Arc::clone(&self.core().shared),
        }
    }

    /// The term this candidate holds now, if any.
    pub fn term(&self) -> Option<Term> {
        let core = self.core();
        core.shared.valid_term().map(|state| Term {
            state,
            core: Arc::clone(core),
        })
    }

    /// Every change of this candidate's leadership from now on, in order, never coalesced.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.core().shared.state).subscribers.push(tx);
        EventStream { rx }
    }

    /// Campaigns and waits until this candidate leads; returns the new term (or the one it
    /// already holds).
    ///
    /// Cancel-safe: dropping the future withdraws the candidacy (in the background), so a
    /// candidate that gave up never blocks the others. A store error ends the campaign with
    /// `Err`; [`run`](Self::run) is the loop that keeps trying.
    pub async fn campaign(&self) -> Result<Term> {
        Arc::clone(self.core()).campaign().await
    }

    /// Steps down and deletes this candidate's term from the store, so that a waiting
    /// candidate takes over in about one store round trip.
    ///
    /// `is_leader()` is false before the store is asked. Returns [`Error::NotALeader`] if
    /// this candidate holds no term. If the store call fails, the error is returned, the
    /// term is reported [lost](LossReason::ResignFailed), and calling `resign` again retries
    /// the deletion; the store drops the key at its TTL at the latest.
    pub async fn resign(&self) -> Result<()> {
        self.core().resign(None).await
    }

    /// Campaigns, holds the term while it lasts, and campaigns again after a loss or a store
    /// error (with jittered exponential backoff), until `shutdown` resolves; then resigns.
    ///
    /// A term that ends for any reason, including a `resign()` called elsewhere, is
    /// followed by a new campaign after a backoff delay (this candidate then queues behind
    /// the others). Returns `Ok(())` after a clean shutdown, or the error of the final
    /// resignation.
    pub async fn run<F>(&self, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()>,
    {
        let core = self.core();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::new(core.retry_min, core.retry_max);
        loop {
            let campaigned = tokio::select! {
                biased;
                () = &mut shutdown => break,
                result = self.campaign() => result,
            };
            match campaigned {
                Ok(term) => {
                    info!(election = %self.name(), fencing_token = term.fencing_token(), "elected");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = term.lost() => {}
                    }
                    if term.state.elected_at.elapsed() >= self.ttl() {
                        backoff.reset();
                    }
                }
                Err(err) => {
                    warn!(election = %self.name(), error = %ErrorChain(&err), "campaign failed");
                }
            }
            let delay = backoff.next_delay();
            debug!(election = %self.name(), ?delay, "campaigning again after a delay");
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = sleep(delay) => {}
            }
        }
        match self.resign().await {
            Ok(()) | Err(Error::NotALeader) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Who leads this election now, as the store says.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.core().driver.leader(self.name()).await
    }

    /// The leader of this election: the current one first, then each change, including
    /// "no leader" (`None`). Store errors are yielded as `Err` items and the stream goes on.
    pub fn observe(&self) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let mut last: Option<Option<LeaderInfo>> = None;
        self.core()
            .driver
            .observe(self.name())
            .filter_map(move |item| {
                let out = match item {
                    Ok(leader) if last.as_ref() == Some(&leader) => None,
                    Ok(leader) => {
                        last = Some(leader.clone());
                        Some(Ok(leader))
                    }
                    Err(err) => {
                        last = None;
                        Some(Err(err))
                    }
                };
                futures::future::ready(out)
            })
            .boxed()
    }

    fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.core();
        f.debug_struct("Election")
            .field("name", &core.candidate.election)
            .field("id", &core.candidate.id)
            .field("ttl", &core.candidate.ttl)
            .field("is_leader", &self.status().is_leader())
            .finish_non_exhaustive()
    }
}

impl Core {
    fn margin_for(&self, ttl: Duration) -> Duration {
        self.safety_margin
            .unwrap_or_else(|| (ttl / 50).max(Duration::from_millis(1)))
    }

    fn deadline_of(&self, grant: &Grant) -> Instant {
        grant.confirmed_at + grant.ttl.saturating_sub(self.margin_for(grant.ttl))
    }

    async fn campaign(self: Arc<Self>) -> Result<Term> {
        let guard = Arc::clone(&self.campaign_lock).lock_owned().await;
        if let Some(state) = self.shared.valid_term() {
            return Ok(Term { state, core: self });
        }
        let mut withdrawal = Withdrawal {
            core: Some(Arc::clone(&self)),
            guard: Some(guard),
        };
        debug!(election = %self.candidate.election, id = %self.candidate.id, "campaigning");
        let mut grant = self.driver.campaign(&self.candidate).await?;
        if self.deadline_of(&grant) <= Instant::now() {
            // Elected after a long wait on a stale confirmation: confirm once more before
            // believing it.
            grant = self.renew_within(&grant, self.candidate.ttl).await?;
            if self.deadline_of(&grant) <= Instant::now() {
                return Err(Error::Timeout(self.candidate.ttl));
            }
        }
        let term = self.start_term(grant);
        withdrawal.disarm();
        Ok(term)
    }

    async fn renew_within(&self, grant: &Grant, limit: Duration) -> Result<Grant> {
        match timeout(limit, self.driver.renew(&self.candidate, grant)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    fn start_term(self: &Arc<Self>, grant: Grant) -> Term {
        let state = Arc::new(TermState {
            fencing_token: grant.fencing_token,
            elected_at: Instant::now(),
            deadline: Mutex::new(self.deadline_of(&grant)),
            ended: CancellationToken::new(),
        });
        {
            let mut st = lock(&self.shared.state);
            if let Some(old) = st.term.take() {
                // Only an expired term can still be here: its holder task has not run yet.
                old.ended.cancel();
                st.emit(Event::Lost {
                    fencing_token: old.fencing_token,
                    reason: LossReason::Expired,
                });
            }
            st.term = Some(Arc::clone(&state));
            st.pending_withdrawal = false;
            st.emit(Event::Elected {
                fencing_token: grant.fencing_token,
            });
        }
        tokio::spawn(Arc::clone(self).hold(Arc::clone(&state), grant));
        Term {
            state,
            core: Arc::clone(self),
        }
    }

    /// Ends `term` with `event` if it is still the current one. Returns whether it was.
    fn end_term(&self, term: &Arc<TermState>, event: Event) -> bool {
        let mut st = lock(&self.shared.state);
        match &st.term {
            Some(current) if Arc::ptr_eq(current, term) => {
                st.term = None;
                term.ended.cancel();
                st.emit(event);
                true
            }
            _ => false,
        }
    }

    /// Renews `term` every third of its TTL until it ends; ends it at its deadline.
    async fn hold(self: Arc<Self>, term: Arc<TermState>, mut grant: Grant) {
        let retry = (grant.ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut next_renewal = grant.confirmed_at + grant.ttl / 3;
        let lost = |reason| Event::Lost {
            fencing_token: term.fencing_token,
            reason,
        };
        loop {
            let deadline = term.deadline();
            tokio::select! {
                biased;
                () = term.ended.cancelled() => return,
                () = sleep_until(deadline) => {
                    self.end_expired(&term);
                    return;
                }
                () = sleep_until(next_renewal) => {}
            }
            let renewed = tokio::select! {
                biased;
                () = term.ended.cancelled() => return,
                () = sleep_until(deadline) => {
                    self.end_expired(&term);
                    return;
                }
                renewed = self.driver.renew(&self.candidate, &grant) => renewed,
            };
            match renewed {
                Ok(renewed) if renewed.fencing_token == grant.fencing_token => {
                    let new_deadline = self.deadline_of(&renewed);
                    {
                        let mut deadline = lock(&term.deadline);
                        if new_deadline > *deadline {
                            *deadline = new_deadline;
                        }
                    }
                    grant = renewed;
                    next_renewal = (grant.confirmed_at + grant.ttl / 3).max(Instant::now() + retry);
                }
                Ok(other) => {
                    warn!(
                        election = %self.candidate.election,
                        fencing_token = term.fencing_token,
                        store_token = other.fencing_token,
                        "store renewed a different term; stepping down"
                    );
                    self.end_term(&term, lost(LossReason::Gone));
                    return;
                }
                Err(Error::TermGone) => {
                    warn!(
                        election = %self.candidate.election,
                        fencing_token = term.fencing_token,
                        "the store no longer holds this term; stepping down"
                    );
                    self.end_term(&term, lost(LossReason::Gone));
                    return;
                }
                Err(err) => {
                    warn!(
                        election = %self.candidate.election,
                        fencing_token = term.fencing_token,
                        error = %ErrorChain(&err),
                        "renewal failed; retrying until the deadline"
                    );
                    next_renewal = Instant::now() + retry;
                }
            }
        }
    }

    fn end_expired(&self, term: &Arc<TermState>) {
        if self.end_term(
            term,
            Event::Lost {
                fencing_token: term.fencing_token,
                reason: LossReason::Expired,
            },
        ) {
            warn!(
                election = %self.candidate.election,
                fencing_token = term.fencing_token,
                "term not renewed before its deadline; stepped down"
            );
        }
    }

    async fn resign(&self, only: Option<&Arc<TermState>>) -> Result<()> {
        // A follower gets its answer at once, even while a campaign of its own waits
        // (holding the campaign lock) in another task.
        {
            let st = lock(&self.shared.state);
            let nothing_to_do = match only {
                Some(term) => !st.term.as_ref().is_some_and(|t| Arc::ptr_eq(t, term)),
                None => st.term.is_none() && !st.pending_withdrawal,
            };
            if nothing_to_do {
                return Err(Error::NotALeader);
            }
        }
        let _guard = self.campaign_lock.lock().await;
        let term = {
            let mut st = lock(&self.shared.state);
            let current = st.term.clone();
            let term = match (current, only) {
                (Some(current), Some(only)) if !Arc::ptr_eq(&current, only) => {
                    return Err(Error::NotALeader);
                }
                (None, Some(_)) => return Err(Error::NotALeader),
                (None, None) if !st.pending_withdrawal => return Err(Error::NotALeader),
                (current, _) => current,
            };
            // Step down before the store is asked, so that this candidate never believes it
            // leads once someone else could be elected.
            if let Some(term) = &term {
                st.term = None;
                term.ended.cancel();
            }
            st.pending_withdrawal = true;
            term
        };
        let limit = self.candidate.ttl.max(Duration::from_secs(1));
        let result = match timeout(limit, self.driver.resign(&self.candidate)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(limit)),
        };
        let mut st = lock(&self.shared.state);
        match result {
            Ok(()) => {
                st.pending_withdrawal = false;
                if let Some(term) = term {
                    info!(election = %self.candidate.election, fencing_token = term.fencing_token, "resigned");
                    st.emit(Event::Resigned {
                        fencing_token: term.fencing_token,
                    });
                }
                Ok(())
            }
            Err(err) => {
                if let Some(term) = term {
                    st.emit(Event::Lost {
                        fencing_token: term.fencing_token,
                        reason: LossReason::ResignFailed,
                    });
                }
                Err(err)
            }
        }
    }

    /// The last handle is gone: withdraw the candidacy, resign any term, end the streams.
    async fn close(self: Arc<Self>) {
        match self.resign(None).await {
            Ok(()) | Err(Error::NotALeader) => {}
            Err(err) => warn!(
                election = %self.candidate.election,
                error = %ErrorChain(&err),
                "could not resign while closing; the store drops the key at its TTL"
            ),
        }
        lock(&self.shared.state).subscribers.clear();
    }

    fn step_down_locally(&self) {
        let mut st = lock(&self.shared.state);
        if let Some(term) = st.term.take() {
            term.ended.cancel();
            st.emit(Event::Lost {
                fencing_token: term.fencing_token,
                reason: LossReason::ResignFailed,
            });
        }
        st.subscribers.clear();
    }
}

/// Withdraws a campaign that did not finish (its future was dropped, or it failed): asks
/// the driver to remove the candidate, in the background, still holding the campaign lock.
struct Withdrawal {
    core: Option<Arc<Core>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Withdrawal {
    fn disarm(&mut self) {
        self.core = None;
        self.guard = None;
    }
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        let (Some(core), Some(guard)) = (self.core.take(), self.guard.take()) else {
            return;
        };
        // Until the withdrawal is done, `resign()` waits for it rather than answering
        // "not a leader" while the store may still hold this candidate's key.
        lock(&core.shared.state).pending_withdrawal = true;
        let withdraw = {
            let core = Arc::clone(&core);
            async move {
                let _guard = guard;
                let limit = core.candidate.ttl.max(Duration::from_secs(1));
                let result = timeout(limit, core.driver.resign(&core.candidate)).await;
                let failed = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(err)) => Some(err),
                    Err(_) => Some(Error::Timeout(limit)),
                };
                match failed {
                    None => lock(&core.shared.state).pending_withdrawal = false,
                    Some(err) => warn!(
                        election = %core.candidate.election,
                        error = %ErrorChain(&err),
                        "could not withdraw an abandoned campaign; resign() retries it"
                    ),
                }
            }
        };
        // Without a runtime it stays pending: a later resign() retries it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(withdraw);
        }
    }
}

/// Answers "does this candidate lead?" without awaiting. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Status {
    shared: Arc<Shared>,
}

impl Status {
    /// Whether this candidate holds a term whose deadline has not passed.
    ///
    /// The deadline is checked here, on the monotonic clock, not only by a background
    /// task: a process that wakes from a long pause sees `false` before anything else runs.
    pub fn is_leader(&self) -> bool {
        self.shared.valid_term().is_some()
    }

    /// The fencing token of the held term, if this candidate leads.
    pub fn fencing_token(&self) -> Option<u64> {
        self.shared.valid_term().map(|term| term.fencing_token)
    }

    /// The deadline of the held term, if this candidate leads: see [`Term::deadline`].
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.shared
            .valid_term()
            .map(|term| term.deadline().into_std())
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Status")
            .field("is_leader", &self.is_leader())
            .field("fencing_token", &self.fencing_token())
            .finish()
    }
}

/// A term this candidate holds: information, not a guard. Dropping it does not resign.
#[derive(Clone)]
pub struct Term {
    state: Arc<TermState>,
    core: Arc<Core>,
}

impl Term {
    /// Strictly greater than the token of every earlier term of this election. Pass it to
    /// the storage your leader writes to, so that it can reject a deposed leader's writes.
    pub fn fencing_token(&self) -> u64 {
        self.state.fencing_token
    }

    /// The instant (monotonic clock) after which this candidate must not act as leader:
    /// the send time of the last successful grant or renewal, plus the TTL, minus the
    /// safety margin. It moves forward at each renewal.
    pub fn deadline(&self) -> std::time::Instant {
        self.state.deadline().into_std()
    }

    /// Whether the term still holds: not ended, deadline not passed.
    pub fn is_valid(&self) -> bool {
        self.state.is_valid()
    }

    /// Cancelled when the term ends, for any reason; at the latest at the deadline (unless
    /// the process is paused then: [`Status::is_leader`] is the check that never lags).
    /// Hand it to leader-only work so that it stops with the term.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.state.ended.clone()
    }

    /// Resolves when the term ends.
    pub async fn lost(&self) {
        self.state.ended.cancelled().await;
    }

    /// Resigns this term, as [`Election::resign`], or returns [`Error::NotALeader`] if it
    /// already ended.
    pub async fn resign(&self) -> Result<()> {
        self.core.resign(Some(&self.state)).await
    }
}

impl fmt::Debug for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Term")
            .field("fencing_token", &self.state.fencing_token)
            .field("deadline", &self.state.deadline())
            .field("is_valid", &self.state.is_valid())
            .finish()
    }
}

/// Builds an [`Election`]; see [`Election::builder`].
#[must_use = "an ElectionBuilder does nothing until build() is called"]
pub struct ElectionBuilder {
    driver: Arc<dyn Driver>,
    name: String,
    value: Option<Vec<u8>>,
    ttl: Duration,
    safety_margin: Option<Duration>,
    retry_min: Duration,
    retry_max: Duration,
}

impl ElectionBuilder {
    fn new(driver: Arc<dyn Driver>, name: String) -> Self {
        let defaults = Config::default();
        ElectionBuilder {
            driver,
            name,
            value: None,
            ttl: defaults.ttl,
            safety_margin: defaults.safety_margin,
            retry_min: defaults.retry_min,
            retry_max: defaults.retry_max,
        }
    }

    /// Takes every setting from `config`, including the election name.
    pub fn config(mut self, config: &Config) -> Self {
        self.name.clone_from(&config.name);
        self.value = config.value.as_ref().map(|v| v.as_bytes().to_vec());
        self.ttl = config.ttl;
        self.safety_margin = config.safety_margin;
        self.retry_min = config.retry_min;
        self.retry_max = config.retry_max;
        self
    }

    /// What observers see about this candidate while it leads (an address, say). Defaults
    /// to the candidate id.
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// The lease: a crashed leader is replaced about this long after its last renewal.
    /// Defaults to 10 seconds; at least [`MIN_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Subtracted from each deadline for clock-rate drift between this process and the
    /// store. Defaults to 2% of the TTL (at least 1ms); must be under half the TTL.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The range of delays [`Election::run`] waits between campaigns after a loss or an
    /// error (doubling, with jitter). Defaults to 200ms to 10s.
    pub fn retry(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    /// Checks the settings and creates the candidate. Nothing is sent to the store until
    /// it campaigns.
    pub fn build(self) -> Result<Election> {
        let name = self.name;
        if name.is_empty() {
            return Err(Error::invalid_config("name", "must not be empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Error::invalid_config(
                "name",
                format!("is {} bytes; at most {MAX_NAME_LEN} allowed", name.len()),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::invalid_config(
                "name",
                "must not contain control characters",
            ));
        }
        if !(MIN_TTL..=MAX_TTL).contains(&self.ttl) {
            return Err(Error::invalid_config(
                "ttl",
                format!(
                    "is {:?}; it must be between {MIN_TTL:?} and {MAX_TTL:?}",
                    self.ttl
                ),
            ));
        }
        if let Some(margin) = self.safety_margin
            && margin >= self.ttl / 2
        {
            return Err(Error::invalid_config(
                "safetyMargin",
                format!(
                    "is {margin:?}; it must be under half the TTL ({:?})",
                    self.ttl / 2
                ),
            ));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(Error::invalid_config(
                "retryMin",
                format!(
                    "is {:?}; it must be above zero and at most retryMax ({:?})",
                    self.retry_min, self.retry_max
                ),
            ));
        }
        let id = candidate_id();
        let value = self.value.unwrap_or_else(|| id.clone().into_bytes());
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::invalid_config(
                "value",
                format!("is {} bytes; at most {MAX_VALUE_LEN} allowed", value.len()),
            ));
        }
        let core = Arc::new(Core {
            driver: self.driver,
            candidate: Candidate {
                election: name,
                id,
                value,
                ttl: self.ttl,
            },
            safety_margin: self.safety_margin,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
            }),
            campaign_lock: Arc::new(tokio::sync::Mutex::new(())),
        });
        Ok(Election {
            handle: Arc::new(Handle { core }),
        })
    }
}

impl fmt::Debug for ElectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElectionBuilder")
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// `hostname-pid-random`: unique per process and per election handle.
fn candidate_id() -> String {
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// Displays an error with its chain of sources, for logs.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}
