//! The handles users hold: [`Election`] and [`Status`]; [`Term`] is in `term.rs`. The
//! machinery behind them is in `machinery/`; the builder in `builder.rs`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::time::sleep;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::driver::{Driver, LeaderInfo};
use crate::error::ErrorChain;
use crate::event::EventStream;
use crate::lead::Held;
use crate::machinery::{Core, Shared};
use crate::term::Term;
use crate::{Error, Result};

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
pub(crate) struct Handle {
    pub(crate) core: Arc<Core>,
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
                     the store keeps this candidate's key until its lease runs out"
                );
                core.step_down_locally();
            }
        }
    }
}

impl Election {
    pub(crate) fn from_handle(handle: Handle) -> Self {
        Election {
            handle: Arc::new(handle),
        }
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
        core.shared
            .valid_term()
            .map(|state| Term::new(state, Arc::clone(core)))
    }

    /// Every change of this candidate's leadership from now on, in order, never coalesced.
    pub fn subscribe(&self) -> EventStream {
        EventStream {
            rx: self.core().shared.subscribe(),
        }
    }

    /// Campaigns and waits until this candidate leads; returns the new term (or the one it
    /// already holds).
    ///
    /// A term of this candidate that has expired but was not yet reported ends first (with
    /// [`Event::Lost`](crate::Event::Lost)), and whatever an ended term left in the store is
    /// withdrawn before the driver is asked for a new one.
    ///
    /// # Errors
    ///
    /// A store error ends the campaign ([`Error::Store`], [`Error::Timeout`], or
    /// [`Error::Denied`] when the store refuses this client); [`Error::Withdrawn`] if a
    /// concurrent [`withdraw`](Self::withdraw) withdrew it; [`Error::TermGone`] if the term
    /// the store granted ended before it could be taken up (the store says so, or the grant
    /// came stale and the machine was suspended meanwhile, so that it could not be safely
    /// renewed). All but `Denied` are transient: [`run`](Self::run) is the loop that keeps
    /// trying.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future withdraws the candidacy in the background (holding the
    /// candidate's campaign lock, so the withdrawal can never delete a newer term), so a
    /// candidate that gave up never blocks the others.
    pub async fn campaign(&self) -> Result<Term> {
        let (state, core) = Arc::clone(self.core()).campaign().await?;
        Ok(Term::new(state, core))
    }

    /// Steps down and deletes this candidate's term from the store, so that a waiting
    /// candidate takes over in about one store round trip.
    ///
    /// `is_leader()` is false before the store is asked.
    ///
    /// # Errors
    ///
    /// [`Error::NotALeader`] if this candidate holds no term; then nothing changes: a
    /// campaign of this candidate waiting in line stays in line and is elected in its turn
    /// (the Go original's contract; use [`withdraw`](Self::withdraw), or drop the campaign's
    /// future, to leave the line). What an earlier, ended term may have left in the store
    /// is deleted first. If the store call fails, the error is returned, the term is
    /// reported [lost](crate::LossReason::ResignFailed), and the deletion is retried in the
    /// background (calling `resign` again retries it at once).
    ///
    /// # Cancel safety
    ///
    /// Once the candidate stepped down, the store call and the end event run in a task of
    /// their own: dropping this future cannot lose the
    /// [`Resigned`](crate::Event::Resigned) or [`Lost`](crate::Event::Lost) event.
    pub async fn resign(&self) -> Result<()> {
        self.core().resign(None).await
    }

    /// Withdraws this candidate's campaigns in flight: each returns [`Error::Withdrawn`],
    /// and this returns once their places in line are gone from the store. A term this
    /// candidate already holds is left alone (see [`resign`](Self::resign)); with nothing in
    /// flight this does nothing and succeeds.
    ///
    /// # Errors
    ///
    /// The store error if the place in line could not be deleted; it is then retried in
    /// the background until it is gone.
    pub async fn withdraw(&self) -> Result<()> {
        self.core().withdraw_campaigns().await
    }

    /// Every candidate standing in this election, as the store says: the leader first,
    /// then the waiters in the order they would lead (where the store keeps an order).
    /// Each [`id`](crate::CandidateInfo::id) is that candidate's [`Election::id`].
    ///
    /// # Errors
    ///
    /// A store error, or [`Error::Unsupported`] from a driver that cannot list candidates.
    pub async fn candidates(&self) -> Result<Vec<crate::CandidateInfo>> {
        let line = self.core().driver.candidates(self.name()).await;
        crate::telemetry::store_result(self.name(), "candidates", &line);
        line
    }

    /// Ends this candidate's term and makes the candidate `id` (waiting in this election)
    /// the next leader: no other candidate can be elected for one TTL after this returns,
    /// unless the nominee withdraws or dies (then the line resumes, at once or at the
    /// nominee's expiry). A planned handover, for rolling deploys.
    ///
    /// As with [`resign`](Self::resign), `is_leader()` is false before the store is asked,
    /// and the term ends with [`Event::Resigned`](crate::Event::Resigned).
    ///
    /// # Errors
    ///
    /// [`Error::NotALeader`] when this candidate does not lead; [`Error::NotWaiting`] when
    /// `id` is not waiting in this election, and then nothing changed (if the nominee
    /// leaves in the instant between the check and the handover, the term is resigned
    /// instead and `NotWaiting` returned). Store errors as [`resign`](Self::resign).
    pub async fn hand_over(&self, id: &str) -> Result<()> {
        self.core().hand_over(None, id).await
    }

    /// Campaigns, holds the term while it lasts, and campaigns again after a loss or a store
    /// error (with jittered exponential backoff), until `shutdown` resolves; then resigns.
    ///
    /// A term that ends for any reason, including a `resign()` called elsewhere, is
    /// followed by a new campaign after a backoff delay (this candidate then queues behind
    /// the others).
    ///
    /// `run` resigns the moment `shutdown` resolves, whatever leader-only work of yours
    /// still runs: if your work must stop before the next leader starts, hand it to
    /// [`lead`](Self::lead) instead, or stop it yourself before resolving `shutdown`.
    ///
    /// # Examples
    ///
    /// A loop of your own that checks [`Status::is_leader`] beside `run`:
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use leader_core::{CancellationToken, Election, testing::MemoryDriver};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> leader_core::Result<()> {
    /// let election = Election::builder(MemoryDriver::new(), "reports-cron").build()?;
    /// let status = election.status();
    /// let shutdown = CancellationToken::new();
    /// let ticker = tokio::spawn(async move {
    ///     loop {
    ///         tokio::time::sleep(Duration::from_secs(1)).await;
    ///         if status.is_leader() {
    ///             // the leader's work, one tick of it
    ///         }
    ///     }
    /// });
    /// # let stop = shutdown.clone();
    /// # tokio::spawn(async move { tokio::time::sleep(Duration::from_secs(5)).await; stop.cancel() });
    /// election.run(shutdown.cancelled()).await?;
    /// ticker.abort();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns `Ok(())` after a clean shutdown, the error of the final resignation, or at
    /// once an error that retrying cannot fix ([`Error::is_transient`] is false: the store
    /// refused this client's credentials or permissions).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future withdraws a waiting campaign as [`campaign`](Self::campaign)
    /// does; a held term is not resigned (it ends at its deadline, or when the last
    /// handle is dropped). Resolve `shutdown` to resign.
    pub async fn run<F>(&self, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()>,
    {
        self.campaign_loop(shutdown, None::<fn(Term) -> std::future::Ready<()>>)
            .await
    }

    /// [`run`](Self::run) with the leader's work inside: on each term, starts `work(term)`
    /// as a task, and stops it before anyone else can be elected.
    ///
    /// * When the term ends (lost, or resigned elsewhere), the term's
    ///   [`cancellation_token`](Term::cancellation_token) is cancelled and `lead` waits for
    ///   the work to return before it campaigns again (after the backoff delay).
    /// * When `shutdown` resolves, `lead` cancels the token, waits for the work to return,
    ///   and only then resigns: the next leader is elected after this one's work stopped.
    /// * `lead` never waits for the work past the term's [deadline](Term::deadline) (as it
    ///   was when the work was asked to stop): then it aborts the task, and waits until the
    ///   task is gone.
    /// * A work that returns while the term holds ends the term with a resignation; a work
    ///   that panics too (the panic is caught and logged). Either way `lead` campaigns
    ///   again after the backoff delay.
    ///
    /// # The safety margin is the work's time to stop
    ///
    /// A term ends at its deadline when it cannot be renewed: the
    /// [safety margin](crate::ElectionBuilder::safety_margin) before the store could elect
    /// anyone else. That is the time the work has to be gone once its token is cancelled
    /// or its task aborted at the deadline. With a 10 s TTL and a 2 s margin, a leader cut
    /// off from the store ends its term 8 s after its last confirmed renewal; the work is
    /// cancelled then and aborted at once, and it has 2 s to reach an `.await` (where the
    /// abort takes effect) and drop what it holds, before another candidate can be
    /// elected. Choose the margin above the longest stretch your work runs without an
    /// `.await`; the default (2% of the TTL) suits work that awaits often. A task that
    /// blocks its thread cannot be aborted: keep blocking calls in
    /// `tokio::task::spawn_blocking` and stop them yourself on the token. At shutdown the
    /// work has until the deadline (at least about two thirds of the TTL, minus the
    /// margin, while renewals succeed).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use leader_core::{CancellationToken, Election, testing::MemoryDriver};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> leader_core::Result<()> {
    /// let election = Election::builder(MemoryDriver::new(), "reports-cron")
    ///     .ttl(Duration::from_secs(10))
    ///     .safety_margin(Duration::from_secs(2))   // the work's time to stop
    ///     .build()?;
    /// let shutdown = CancellationToken::new();
    /// # let stop = shutdown.clone();
    /// # tokio::spawn(async move { tokio::time::sleep(Duration::from_secs(5)).await; stop.cancel() });
    /// election
    ///     .lead(shutdown.cancelled(), |term| async move {
    ///         let stop = term.cancellation_token();
    ///         let mut tick = tokio::time::interval(Duration::from_secs(1));
    ///         loop {
    ///             tokio::select! {
    ///                 () = stop.cancelled() => return,
    ///                 _ = tick.tick() => {
    ///                     // one step of the leader's work, fenced with term.fencing_token()
    ///                 }
    ///             }
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run): `Ok(())` after a clean shutdown, the error of the final
    /// resignation, or an error that retrying cannot fix.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels the work's token and aborts its task; otherwise as
    /// [`run`](Self::run): a held term is not resigned. Resolve `shutdown` to stop the work
    /// and resign in order.
    pub async fn lead<F, W, Fut>(&self, shutdown: F, work: W) -> Result<()>
    where
        F: Future<Output = ()>,
        W: FnMut(Term) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.campaign_loop(shutdown, Some(work)).await
    }

    /// The one loop behind [`run`](Self::run) (no work) and [`lead`](Self::lead).
    async fn campaign_loop<F, W, Fut>(&self, shutdown: F, mut work: Option<W>) -> Result<()>
    where
        F: Future<Output = ()>,
        W: FnMut(Term) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let core = self.core();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::new(core.settings.retry_min, core.settings.retry_max);
        loop {
            let campaigned = tokio::select! {
                biased;
                () = &mut shutdown => break,
                result = self.campaign() => result,
            };
            match campaigned {
                Ok(term) => {
                    let held = match work.as_mut() {
                        None => tokio::select! {
                            biased;
                            () = &mut shutdown => Held::Shutdown,
                            () = term.ended() => Held::Ended,
                        },
                        Some(work) => crate::lead::hold(&term, work, shutdown.as_mut()).await,
                    };
                    if held == Held::Shutdown {
                        break;
                    }
                    if term.state.elected_at.elapsed() >= self.ttl() {
                        backoff.reset();
                    }
                }
                Err(err) if !err.is_transient() => {
                    warn!(election = %self.name(), error = %ErrorChain(&err), "campaign failed; not retrying");
                    return Err(err);
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
        // The campaign future was dropped above; wait until its place in line is gone.
        let withdrawn = self.withdraw().await;
        match self.resign().await {
            Ok(()) | Err(Error::NotALeader) => withdrawn,
            Err(err) => Err(err),
        }
    }

    /// Who leads this election now, as the store says.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        let leader = self.core().driver.leader(self.name()).await;
        crate::telemetry::store_result(self.name(), "leader", &leader);
        leader
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

    #[cfg(test)]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.core().shared.subscriber_count()
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

/// Answers "does this candidate lead?" without awaiting. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Status {
    shared: Arc<Shared>,
}

impl Status {
    /// Whether this candidate holds a term whose deadline has not passed.
    ///
    /// The deadline is checked here, not only by a background task: a process that wakes
    /// from a long pause sees `false` before anything else runs. On Linux the check also
    /// counts time the machine spent suspended (`CLOCK_BOOTTIME`), which the monotonic
    /// clock does not. Within one term, once `false`, never `true` again.
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
