//! The term machinery behind the handles: campaigning under one lock, holding a term
//! (renewals, the deadline), ending it (exactly one end event), and withdrawing whatever an
//! ended term or an abandoned campaign left in the store.
//!
//! Invariants kept here, which the simulation in `testing::sim` checks:
//! * Every call that creates or deletes this candidate's key runs under `campaign_lock`,
//!   so a withdrawal can never race a newer term's creation.
//! * A term's deadline only moves forward while it has not passed; once `is_valid()` was
//!   false it stays false ([`TermState::extend`]).
//! * A term is ended in one synchronous step (`State::term` cleared, token cancelled, one
//!   event emitted), and every end that the store did not confirm leaves a
//!   [`Leftover`] that is withdrawn before the next campaign and by one background task.
//! * A campaign runs in a task of its own, so a resign() that withdraws it never waits on a
//!   future nobody polls; a resign() never ends a term started after it was called.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, debug_span, field, info, info_span, warn};

use crate::backoff::Backoff;
use crate::builder::{DeadlineHook, Settings};
use crate::clock::SuspendOffset;
use crate::driver::{Candidate, Driver, Grant};
use crate::event::{Event, LossReason};
use crate::telemetry;
use crate::{Error, Result};

/// Takes a std mutex whether or not a panic poisoned it: the data under these locks is
/// always left consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) struct Core {
    pub(crate) driver: Arc<dyn Driver>,
    pub(crate) candidate: Candidate,
    pub(crate) settings: Settings,
    pub(crate) shared: Arc<Shared>,
    /// Serialises every call that creates or deletes this candidate's key in the store
    /// (campaign, resign, withdrawal), so a late withdrawal can never delete a newer term.
    campaign_lock: Arc<tokio::sync::Mutex<()>>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The election's name, for metrics.
    name: String,
    term: Option<Arc<TermState>>,
    /// What this candidate may still have in the store although it holds no term.
    leftover: Option<Leftover>,
    /// The campaigns in flight, by id: resign() withdraws them.
    campaigns: Vec<(u64, CancellationToken)>,
    next_campaign: u64,
    /// How many terms were started: resign() never ends one started after it was called.
    started: u64,
    /// Whether the background withdrawer runs.
    withdrawer: bool,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
}

/// How [`Core::end_term`] ends a term in the store.
enum Ending {
    /// Deletes it.
    Resign,
    /// Deletes it and nominates this candidate as the next leader.
    HandOver(String),
}

/// Something of this candidate's that the store may still hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftover {
    /// The key of this term, which ended without the store confirming its deletion.
    Term(u64),
    /// Whatever a campaign that did not finish left, or several leftovers at once.
    Unknown,
}

impl Leftover {
    fn fencing_token(self) -> Option<u64> {
        match self {
            Leftover::Term(token) => Some(token),
            Leftover::Unknown => None,
        }
    }

    fn and(this: Option<Leftover>, other: Leftover) -> Leftover {
        match this {
            None => other,
            Some(this) if this == other => this,
            Some(_) => Leftover::Unknown,
        }
    }
}

impl State {
    fn emit(&mut self, event: Event) {
        telemetry::transition(&self.name, &event);
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Ends the current term, if it is `term`: one synchronous step, one event.
    fn end(&mut self, term: &Arc<TermState>, event: Event) -> bool {
        match &self.term {
            Some(current) if Arc::ptr_eq(current, term) => {
                self.term = None;
                term.end();
                if !matches!(event, Event::Resigned { .. }) {
                    // Not just this term: a campaign answer lost earlier may have landed
                    // late and left a newer key of this candidate. Read, then delete.
                    self.leftover = Some(Leftover::Unknown);
                }
                self.emit(event);
                true
            }
            _ => false,
        }
    }
}

impl Shared {
    pub(crate) fn new(name: &str) -> Self {
        Shared {
            state: Mutex::new(State {
                name: name.to_owned(),
                ..State::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn valid_term(&self) -> Option<Arc<TermState>> {
        self.state()
            .term
            .as_ref()
            .filter(|term| term.is_valid())
            .cloned()
    }

    #[cfg(test)]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.state().subscribers.len()
    }

    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.state();
        st.subscribers.retain(|tx| !tx.is_closed());
        st.subscribers.push(tx);
        rx
    }
}

/// One term of this candidate.
pub(crate) struct TermState {
    pub(crate) fencing_token: u64,
    /// The number of this term among the candidate's terms (from 1).
    seq: u64,
    /// Taken just before the term became visible: the first instant of belief.
    pub(crate) elected_at: Instant,
    /// When the term was ended (stepped down), if it was.
    ended_at: Mutex<Option<Instant>>,
    clock: Mutex<TermClock>,
    pub(crate) ended: CancellationToken,
    on_deadline: Option<DeadlineHook>,
}

/// A reading of the suspend offset, with the instant it was taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    at: Instant,
    offset: SuspendOffset,
}

impl Reading {
    pub(crate) fn now() -> Self {
        Reading {
            at: Instant::now(),
            offset: SuspendOffset::now(),
        }
    }
}

struct TermClock {
    deadline: Instant,
    /// Taken no later than the confirmation `deadline` rests on: a suspension of the
    /// machine since then shortens the deadline by as much.
    confirmed: Reading,
    /// Set the first time the deadline is seen passed: the term never becomes valid again.
    passed: bool,
}

impl TermClock {
    fn holds(&mut self) -> bool {
        if !self.passed {
            let now = Instant::now() + self.confirmed.offset.suspended_since();
            self.passed = now >= self.deadline;
        }
        !self.passed
    }
}

impl TermState {
    fn new(
        fencing_token: u64,
        seq: u64,
        deadline: Instant,
        confirmed: Reading,
        on_deadline: Option<DeadlineHook>,
    ) -> Self {
        if let Some(hook) = &on_deadline {
            (hook.0)(fencing_token, deadline.into_std());
        }
        TermState {
            fencing_token,
            seq,
            elected_at: Instant::now(),
            ended_at: Mutex::new(None),
            clock: Mutex::new(TermClock {
                deadline,
                confirmed,
                passed: false,
            }),
            ended: CancellationToken::new(),
            on_deadline,
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        lock(&self.clock).deadline
    }

    /// Resolves once the term's deadline has passed, counting a suspension of the machine,
    /// within milliseconds of the process running again (Tokio's timers alone would wait out
    /// the time the machine slept). With `fixed`, that deadline instead of the current one.
    pub(crate) async fn expired(&self, fixed: Option<Instant>) {
        let mut suspensions = crate::clock::suspensions();
        loop {
            let due = {
                let mut clock = lock(&self.clock);
                let deadline = fixed.unwrap_or(clock.deadline);
                let suspended = clock.confirmed.offset.suspended_since();
                if !clock.holds() || Instant::now() + suspended >= deadline {
                    return;
                }
                deadline - suspended
            };
            tokio::select! {
                () = sleep_until(due) => {}
                changed = suspensions.changed() => {
                    if changed.is_err() {
                        sleep_until(due).await;
                    }
                }
            }
        }
    }

    /// Steps down: records the instant, then cancels the token. Call it with the state
    /// lock held, as the term leaves `State::term`.
    fn end(&self) {
        lock(&self.ended_at).get_or_insert_with(Instant::now);
        self.ended.cancel();
    }

    pub(crate) fn ended_at(&self) -> Option<Instant> {
        *lock(&self.ended_at)
    }

    pub(crate) fn is_valid(&self) -> bool {
        !self.ended.is_cancelled() && lock(&self.clock).holds()
    }

    /// Moves the deadline to `deadline`, which a confirmation sent at `confirmed_at` vouches
    /// for; `reading` was taken before the renewal was asked for. Returns false, moving
    /// nothing, if the current deadline has already passed: a late renewal never revives a
    /// term.
    ///
    /// The suspension reference moves to `reading` only if it predates the confirmation (a
    /// driver may answer with an earlier confirmation it shares between elections):
    /// otherwise a suspension between the confirmation and the reading would be forgotten.
    /// The old reference predates the old confirmation, hence the new one too.
    fn extend(&self, deadline: Instant, confirmed_at: Instant, reading: Reading) -> bool {
        let mut clock = lock(&self.clock);
        if !clock.holds() {
            return false;
        }
        if deadline > clock.deadline {
            if let Some(hook) = &self.on_deadline {
                (hook.0)(self.fencing_token, deadline.into_std());
            }
            clock.deadline = deadline;
            if reading.at <= confirmed_at {
                clock.confirmed = reading;
            }
        }
        true
    }
}

impl Core {
    pub(crate) fn new(driver: Arc<dyn Driver>, candidate: Candidate, settings: Settings) -> Self {
        let shared = Arc::new(Shared::new(&candidate.election));
        Core {
            driver,
            candidate,
            settings,
            shared,
            campaign_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn name(&self) -> &str {
        &self.candidate.election
    }

    fn deadline_of(&self, grant: &Grant) -> Instant {
        grant.confirmed_at
            + grant
                .ttl
                .saturating_sub(self.settings.margin_for(grant.ttl))
    }

    /// The longest wait for a resignation or withdrawal request.
    fn resign_limit(&self) -> Duration {
        self.candidate.ttl.max(Duration::from_secs(1))
    }

    /// Campaigns until elected, or returns the term this candidate holds.
    ///
    /// The campaign runs in a task of its own: a resign() that withdraws it must not wait
    /// for its caller to poll it again. Dropping this future withdraws it.
    pub(crate) async fn campaign(self: Arc<Self>) -> Result<(Arc<TermState>, Arc<Self>)> {
        // Registered before waiting for the lock, so that a resign() that comes later
        // always finds it and withdraws it rather than waiting for it to be elected.
        let withdrawn = CancellationToken::new();
        let id = {
            let mut st = self.shared.state();
            st.next_campaign += 1;
            let id = st.next_campaign;
            st.campaigns.push((id, withdrawn.clone()));
            id
        };
        // Unlisted when the campaign ends, or when its task is dropped without running.
        let registered = Registered {
            core: Arc::clone(&self),
            id,
        };
        let (tx, rx) = oneshot::channel();
        let core = Arc::clone(&self);
        let token = withdrawn.clone();
        let campaign = async move {
            let _registered = registered;
            let result = tokio::select! {
                biased;
                () = token.cancelled() => Err(Error::Withdrawn),
                term = Arc::clone(&core).campaign_locked(&token) => term,
            };
            if let Err(Ok(term)) = tx.send(result) {
                // The caller gave up just as the term began: it asked to withdraw.
                let _ = core.resign(Some(&term)).await;
            }
        };
        let span = info_span!(
            "campaign",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            fencing_token = field::Empty,
        );
        let campaign = campaign.instrument(span);
        let _withdraw_if_dropped = withdrawn.clone().drop_guard();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(campaign);
            }
            // Polled outside Tokio: run it here (a resign() then waits for it).
            Err(_) => campaign.await,
        }
        let result = rx.await.unwrap_or(Err(Error::Withdrawn));
        _withdraw_if_dropped.disarm();
        result.map(|term| (term, self))
    }

    async fn campaign_locked(
        self: Arc<Self>,
        withdrawn: &CancellationToken,
    ) -> Result<Arc<TermState>> {
        let guard = Arc::clone(&self.campaign_lock).lock_owned().await;
        {
            let mut st = self.shared.state();
            if let Some(term) = st.term.clone() {
                if term.is_valid() {
                    return Ok(term);
                }
                // Expired, and its holder task has not ended it yet: end it here, before the
                // driver is asked for a new term, so that nothing can renew it meanwhile.
                let event = Event::Lost {
                    fencing_token: term.fencing_token,
                    reason: LossReason::Expired,
                };
                st.end(&term, event);
            }
        }
        // From here on, giving up (an error, a dropped future, a resign()) withdraws
        // whatever the campaign may have left in the store.
        let mut withdrawal = Withdrawal {
            core: Some(Arc::clone(&self)),
            guard: Some(guard),
        };
        let (grant, reading) = self.elect().await?;
        let term = self.start_term(grant, reading, withdrawn)?;
        withdrawal.disarm();
        Ok(term)
    }

    /// Clears what earlier terms left, then waits in the driver until elected; returns a
    /// grant whose deadline has not passed.
    async fn elect(&self) -> Result<(Grant, Reading)> {
        self.withdraw_leftover().await?;
        debug!(election = %self.name(), id = %self.candidate.id, "campaigning");
        let confirmed = Reading::now();
        let granted = self.driver.campaign(&self.candidate).await;
        telemetry::store_result(self.name(), "campaign", &granted);
        let grant = granted?;
        if self.holds(&grant, confirmed) {
            return Ok((grant, confirmed));
        }
        // Elected after a long wait on a stale confirmation: confirm once more.
        let before_renewal = Reading::now();
        let limit = self.candidate.ttl;
        let renewed = self
            .renew(&grant, limit)
            .instrument(self.renewal_span(grant.fencing_token))
            .await;
        let renewed = renewed?;
        // As in `TermState::extend`: a renewal may answer with an earlier confirmation it
        // shares with other terms, older than `before_renewal`; a suspension between the
        // two must still count, so the reference is then the reading taken before the
        // campaign, which predates the grant's confirmation, hence the renewal's too.
        let reference = if before_renewal.at <= renewed.confirmed_at {
            before_renewal
        } else {
            confirmed
        };
        if self.holds(&renewed, reference) {
            Ok((renewed, reference))
        } else {
            Err(Error::Timeout(limit))
        }
    }

    /// One renewal request, given up after `limit`: timed and counted for the metrics.
    async fn renew(&self, grant: &Grant, limit: Duration) -> Result<Grant> {
        let started = Instant::now();
        let renewed = timeout(limit, self.driver.renew(&self.candidate, grant))
            .await
            .unwrap_or(Err(Error::Timeout(limit)));
        telemetry::renewal(self.name(), started.elapsed());
        telemetry::store_result(self.name(), "renew", &renewed);
        renewed
    }

    fn renewal_span(&self, fencing_token: u64) -> Span {
        debug_span!(
            "renew",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            fencing_token,
        )
    }

    fn holds(&self, grant: &Grant, confirmed: Reading) -> bool {
        Instant::now() + confirmed.offset.suspended_since() < self.deadline_of(grant)
    }

    /// Starts the term `grant` describes, unless a resign() withdrew the campaign meanwhile
    /// (then the caller's withdrawal deletes it from the store).
    fn start_term(
        self: &Arc<Self>,
        grant: Grant,
        confirmed: Reading,
        withdrawn: &CancellationToken,
    ) -> Result<Arc<TermState>> {
        let term = {
            let mut st = self.shared.state();
            if withdrawn.is_cancelled() {
                return Err(Error::Withdrawn);
            }
            st.started += 1;
            let term = Arc::new(TermState::new(
                grant.fencing_token,
                st.started,
                self.deadline_of(&grant),
                confirmed,
                self.settings.on_deadline.clone(),
            ));
            // The driver's campaign replaced whatever this candidate had in the store.
            st.leftover = None;
            st.term = Some(Arc::clone(&term));
            st.emit(Event::Elected {
                fencing_token: grant.fencing_token,
            });
            term
        };
        Span::current().record("fencing_token", grant.fencing_token);
        info!(election = %self.name(), fencing_token = grant.fencing_token, "elected");
        tokio::spawn(Arc::clone(self).hold(Arc::clone(&term), grant));
        Ok(term)
    }

    /// Ends `term` for `reason` if it is still current, and withdraws its key in the
    /// background. Returns whether it was current.
    fn lose(self: &Arc<Self>, term: &Arc<TermState>, reason: LossReason) -> bool {
        let event = Event::Lost {
            fencing_token: term.fencing_token,
            reason,
        };
        if !self.shared.state().end(term, event) {
            return false;
        }
        warn!(
            election = %self.name(),
            fencing_token = term.fencing_token,
            %reason,
            "term lost; stepped down"
        );
        self.ensure_withdrawer();
        true
    }

    /// Starts the background withdrawer unless it runs already or nothing is left.
    fn ensure_withdrawer(self: &Arc<Self>) {
        let mut st = self.shared.state();
        if st.withdrawer || st.leftover.is_none() {
            return;
        }
        // Without a runtime it stays a leftover: the next campaign or resign() takes it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            st.withdrawer = true;
            runtime.spawn(withdrawer(Arc::clone(self)));
        }
    }

    /// Renews `term` every third of its TTL, each attempt capped at a quarter of it, until
    /// the term ends; ends it at its deadline.
    async fn hold(self: Arc<Self>, term: Arc<TermState>, mut grant: Grant) {
        let ttl = grant.ttl;
        let retry = (ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let cap = (ttl / 4).max(Duration::from_millis(1));
        let mut next_renewal = grant.confirmed_at + ttl / 3;
        let mut failures = 0u32;
        let mut gone = self.driver.term_gone(&self.candidate, term.fencing_token);
        loop {
            if !term.is_valid() {
                // Ended elsewhere, or the machine was suspended past the deadline (the
                // monotonic timers below do not count that time).
                self.lose(&term, LossReason::Expired);
                return;
            }
            // Wait for the renewal time, then renew; the term's end, the store saying it is
            // gone and the deadline (counting a suspension) win over both.
            let renewal = async {
                sleep_until(next_renewal).await;
                let reading = Reading::now();
                let renewed = self
                    .renew(&grant, cap)
                    .instrument(self.renewal_span(term.fencing_token))
                    .await;
                (reading, renewed)
            };
            let (reading, renewed) = tokio::select! {
                biased;
                () = term.ended.cancelled() => return,
                () = &mut gone => {
                    self.lose(&term, LossReason::Gone);
                    return;
                }
                () = term.expired(None) => {
                    self.lose(&term, LossReason::Expired);
                    return;
                }
                renewed = renewal => renewed,
            };
            match renewed {
                Ok(renewed) if renewed.fencing_token == grant.fencing_token => {
                    if !term.extend(self.deadline_of(&renewed), renewed.confirmed_at, reading) {
                        // The answer came after the deadline passed: too late to count.
                        self.lose(&term, LossReason::Expired);
                        return;
                    }
                    failures = 0;
                    grant = renewed;
                    next_renewal = (grant.confirmed_at + ttl / 3).max(Instant::now() + retry);
                }
                Ok(_) | Err(Error::TermGone) => {
                    self.lose(&term, LossReason::Gone);
                    return;
                }
                Err(err) => {
                    if failures.is_multiple_of(5) {
                        warn!(
                            election = %self.name(),
                            fencing_token = term.fencing_token,
                            error = %ErrorChain(&err),
                            failures = failures + 1,
                            "renewal failed; retrying until the deadline"
                        );
                    }
                    failures = failures.saturating_add(1);
                    next_renewal = Instant::now() + retry;
                }
            }
        }
    }

    /// Steps down (from `only`, or from whatever term is current) and deletes the key.
    pub(crate) async fn resign(self: &Arc<Self>, only: Option<&Arc<TermState>>) -> Result<()> {
        let span = info_span!(
            "resign",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            fencing_token = field::Empty,
        );
        if let Some(term) = only {
            span.record("fencing_token", term.fencing_token);
        }
        self.resign_in_span(only).instrument(span).await
    }

    async fn resign_in_span(self: &Arc<Self>, only: Option<&Arc<TermState>>) -> Result<()> {
        self.end_term(only, Ending::Resign).await
    }

    /// Hands the term over to `nominee` (from `only`, or from whatever term is current).
    pub(crate) async fn hand_over(
        self: &Arc<Self>,
        only: Option<&Arc<TermState>>,
        nominee: &str,
    ) -> Result<()> {
        let span = info_span!(
            "hand_over",
            election = %self.candidate.election,
            candidate = %self.candidate.id,
            nominee,
            fencing_token = field::Empty,
        );
        async {
            // Nothing changes when the nominee does not wait: ask before stepping down. (If
            // it leaves between this look and the store call, the driver refuses the
            // handover and the term is resigned instead.)
            if self.current_term(only).is_none() {
                return Err(Error::NotALeader);
            }
            match self.driver.candidates(self.name()).await {
                Ok(line) => {
                    if !line.iter().any(|c| c.id == nominee && !c.is_leader) {
                        return Err(Error::NotWaiting {
                            id: nominee.to_owned(),
                        });
                    }
                }
                Err(Error::Unsupported { .. }) => {}
                Err(err) => return Err(err),
            }
            self.end_term(only, Ending::HandOver(nominee.to_owned()))
                .await
        }
        .instrument(span)
        .await
    }

    /// The current term (`only`, if it is current), if any.
    fn current_term(&self, only: Option<&Arc<TermState>>) -> Option<Arc<TermState>> {
        let st = self.shared.state();
        let current = st.term.clone()?;
        match only {
            Some(only) if !Arc::ptr_eq(&current, only) => None,
            _ => Some(current),
        }
    }

    /// Steps down from the current term (`only`, if it is current) and ends it in the
    /// store as `ending` says. Without a term: deletes what an ended term left, and
    /// answers [`Error::NotALeader`]; a campaign waiting in line is left alone (the seed's
    /// contract: `NotALeader` means nothing was done).
    async fn end_term(
        self: &Arc<Self>,
        only: Option<&Arc<TermState>>,
        ending: Ending,
    ) -> Result<()> {
        let started = {
            let st = self.shared.state();
            let nothing_to_do = match only {
                Some(term) => !st.term.as_ref().is_some_and(|t| Arc::ptr_eq(t, term)),
                // A leftover with a campaign in flight is that campaign's to clear (it
                // holds the lock while it waits in line): nothing to do here either.
                None => st.term.is_none() && (st.leftover.is_none() || !st.campaigns.is_empty()),
            };
            if nothing_to_do || (st.term.is_none() && matches!(ending, Ending::HandOver(_))) {
                return Err(Error::NotALeader);
            }
            st.started
        };
        let guard = Arc::clone(&self.campaign_lock).lock_owned().await;
        let (term, leftover) = {
            let mut st = self.shared.state();
            // A term started after this call (a campaign that took the lock first) is not
            // this call's to end.
            let current = st.term.clone().filter(|term| term.seq <= started);
            let term = match (current, only) {
                (Some(current), Some(only)) if !Arc::ptr_eq(&current, only) => {
                    return Err(Error::NotALeader);
                }
                (None, Some(_)) => return Err(Error::NotALeader),
                (None, None) if matches!(ending, Ending::HandOver(_)) => {
                    return Err(Error::NotALeader);
                }
                (current, _) => current,
            };
            // Step down before the store is asked, so that this candidate never believes it
            // leads once someone else could be elected.
            if let Some(term) = &term {
                Span::current().record("fencing_token", term.fencing_token);
                st.term = None;
                term.end();
                st.leftover = Some(Leftover::and(
                    st.leftover,
                    Leftover::Term(term.fencing_token),
                ));
            }
            let Some(leftover) = st.leftover else {
                return Err(Error::NotALeader);
            };
            (term, leftover)
        };
        // The store call and the end event run in a task of their own, so that cancelling
        // this future cannot lose the event: every Elected gets exactly one end.
        let core = Arc::clone(self);
        let finish = async move {
            let result = match (&term, ending) {
                (Some(term), Ending::HandOver(nominee)) => {
                    core.hand_over_in_store(term.fencing_token, leftover, &nominee)
                        .await
                }
                _ => core.withdraw(leftover).await,
            };
            if let Some(term) = &term {
                let event = match &result {
                    Ok(()) | Err(Error::NotWaiting { .. }) => {
                        info!(election = %core.name(), fencing_token = term.fencing_token, "resigned");
                        Event::Resigned {
                            fencing_token: term.fencing_token,
                        }
                    }
                    Err(Error::TermGone) => Event::Lost {
                        fencing_token: term.fencing_token,
                        reason: LossReason::Gone,
                    },
                    Err(_) => Event::Lost {
                        fencing_token: term.fencing_token,
                        reason: LossReason::ResignFailed,
                    },
                };
                // Emitted before the lock is released: no newer term's Elected can come
                // first.
                core.shared.state().emit(event);
            }
            drop(guard);
            if result.is_err() {
                core.ensure_withdrawer();
            }
            result
        };
        let finish = finish.instrument(Span::current());
        let result = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn(finish)
                .await
                .unwrap_or_else(|err| Err(Error::store(err))),
            Err(_) => finish.await,
        };
        match result {
            Err(Error::TermGone) => Err(Error::NotALeader),
            // Without a term, what an ended term left was deleted: the retry of a failed
            // resignation, which succeeded.
            result => result,
        }
    }

    /// Ends the term `fencing_token` in the store with a nomination of `nominee`. If the
    /// driver refuses (the nominee left meanwhile), the term is resigned instead and
    /// [`Error::NotWaiting`] returned; if the term was gone already, [`Error::TermGone`].
    async fn hand_over_in_store(
        &self,
        fencing_token: u64,
        leftover: Leftover,
        nominee: &str,
    ) -> Result<()> {
        let limit = self.resign_limit();
        let result = timeout(
            limit,
            self.driver
                .hand_over(&self.candidate, fencing_token, nominee),
        )
        .await
        .unwrap_or(Err(Error::Timeout(limit)));
        telemetry::store_result(self.name(), "hand_over", &result);
        match result {
            Ok(()) | Err(Error::TermGone) => {
                let mut st = self.shared.state();
                if st.leftover == Some(leftover) {
                    st.leftover = None;
                }
                drop(st);
                result
            }
            Err(Error::NotWaiting { id }) => {
                self.withdraw(leftover).await?;
                Err(Error::NotWaiting { id })
            }
            Err(err) => Err(err),
        }
    }

    /// Sets the value observers see while `term` lasts.
    pub(crate) async fn proclaim(
        self: &Arc<Self>,
        term: &Arc<TermState>,
        value: &[u8],
    ) -> Result<()> {
        if !term.is_valid() {
            return Err(Error::NotALeader);
        }
        let limit = self.resign_limit();
        let result = timeout(
            limit,
            self.driver
                .proclaim(&self.candidate, term.fencing_token, value),
        )
        .await
        .unwrap_or(Err(Error::Timeout(limit)));
        telemetry::store_result(self.name(), "proclaim", &result);
        match result {
            Err(Error::TermGone) => {
                self.lose(term, LossReason::Gone);
                Err(Error::NotALeader)
            }
            result => result,
        }
    }

    /// Withdraws this candidate's campaigns in flight and waits until their places in line
    /// are gone from the store. A term held already is left alone.
    pub(crate) async fn withdraw_campaigns(self: &Arc<Self>) -> Result<()> {
        let started = {
            let st = self.shared.state();
            for (_, campaign) in &st.campaigns {
                campaign.cancel();
            }
            st.started
        };
        let result = {
            let _guard = self.campaign_lock.lock().await;
            // A campaign elected while this was called took its term: it was withdrawn
            // first (start_term checks), so only a term that began before the call can be
            // current.
            debug_assert!(
                self.shared
                    .state()
                    .term
                    .as_ref()
                    .is_none_or(|term| term.seq <= started)
            );
            self.withdraw_leftover().await
        };
        if result.is_err() {
            self.ensure_withdrawer();
        }
        result
    }

    /// Asks the driver to delete what this candidate left in the store, if anything. Call
    /// it holding the campaign lock.
    async fn withdraw_leftover(&self) -> Result<()> {
        let Some(leftover) = self.shared.state().leftover else {
            return Ok(());
        };
        self.withdraw(leftover).await
    }

    async fn withdraw(&self, leftover: Leftover) -> Result<()> {
        let limit = self.resign_limit();
        let token = leftover.fencing_token();
        let result = match timeout(limit, self.driver.resign(&self.candidate, token)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(limit)),
        };
        telemetry::store_result(self.name(), "resign", &result);
        if result.is_ok() {
            let mut st = self.shared.state();
            if st.leftover == Some(leftover) {
                st.leftover = None;
            }
        }
        result
    }

    /// The last handle is gone: withdraw the candidacy, resign any term, end the streams.
    /// If the store cannot be reached, the background withdrawer keeps trying (holding the
    /// driver) until it can, so nothing is left behind.
    pub(crate) async fn close(self: Arc<Self>) {
        if let Err(err) = self.withdraw_campaigns().await {
            warn!(
                election = %self.name(),
                error = %ErrorChain(&err),
                "could not withdraw the dropped election's campaign; retrying in the background"
            );
        }
        match self.resign(None).await {
            Ok(()) | Err(Error::NotALeader) => {}
            Err(err) => warn!(
                election = %self.name(),
                error = %ErrorChain(&err),
                "could not withdraw the dropped election's key; retrying in the background"
            ),
        }
        self.shared.state().subscribers.clear();
    }

    /// Dropped outside a runtime: nothing can reach the store; step down at least.
    pub(crate) fn step_down_locally(&self) {
        let mut st = self.shared.state();
        if let Some(term) = st.term.clone() {
            let event = Event::Lost {
                fencing_token: term.fencing_token,
                reason: LossReason::ResignFailed,
            };
            st.end(&term, event);
        }
        st.subscribers.clear();
    }
}

/// The one background withdrawer of a candidate: deletes its leftover, retrying with
/// backoff until it is gone (or a campaign took care of it), or the store refuses for good.
async fn withdrawer(core: Arc<Core>) {
    let mut backoff = Backoff::new(core.settings.retry_min, core.settings.retry_max);
    let mut failures = 0u32;
    loop {
        let result = {
            let _guard = core.campaign_lock.lock().await;
            core.withdraw_leftover().await
        };
        let failed = match result {
            Ok(()) => false,
            Err(err) if !err.is_transient() => {
                warn!(
                    election = %core.name(),
                    error = %ErrorChain(&err),
                    "cannot withdraw this candidate's key; giving up"
                );
                core.shared.state().withdrawer = false;
                return;
            }
            Err(err) => {
                if failures.is_multiple_of(10) {
                    warn!(
                        election = %core.name(),
                        error = %ErrorChain(&err),
                        failures = failures + 1,
                        "could not withdraw this candidate's key; retrying"
                    );
                }
                failures = failures.saturating_add(1);
                true
            }
        };
        {
            let mut st = core.shared.state();
            if st.leftover.is_none() {
                st.withdrawer = false;
                return;
            }
        }
        if failed {
            sleep(backoff.next_delay()).await;
        }
    }
}

/// A campaign in flight, listed in the state until it returns or is dropped.
struct Registered {
    core: Arc<Core>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.core
            .shared
            .state()
            .campaigns
            .retain(|(id, _)| *id != self.id);
    }
}

/// Withdraws a campaign that did not finish (its future was dropped, it failed, or a
/// resign() withdrew it): marks what it may have left, releases the lock, and lets the
/// background withdrawer (or the next holder of the lock) delete it.
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
        {
            // Set before the lock is released: whoever takes it next withdraws first, and
            // resign() waits for it rather than answering "not a leader" while the store
            // may still hold this candidate's key.
            let mut st = core.shared.state();
            st.leftover = Some(Leftover::and(st.leftover, Leftover::Unknown));
        }
        drop(guard);
        core.ensure_withdrawer();
    }
}

#[cfg(all(test, feature = "testing"))]
#[path = "term_tests.rs"]
mod term_tests;

/// Displays an error with its chain of sources (`outer: cause: root cause`), for logs and
/// one-line messages: `tracing::warn!(error = %ErrorChain(&err), "…")`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}
