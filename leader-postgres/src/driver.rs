//! [`PostgresDriver`] and its [`Driver`] implementation: the protocol's waits, wake-ups and
//! watches on top of the statement-level steps of [`Inner`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use leader_core::notices::{self, Look, Notices, Observed};
use leader_core::{Candidate, CandidateInfo, Driver, Error, Grant, LeaderInfo, Result};
use tokio::time::sleep;
use tracing::{debug, warn};

use crate::inner::{Attempt, HandedOver, Inner};
use crate::io::{Holder, PostgresIo};
use crate::sql::Table;

/// A [`Driver`] for PostgreSQL.
///
/// Each election is one row of a table (default [`DEFAULT_TABLE`](crate::DEFAULT_TABLE)):
/// `name`, `holder` (the candidate's unique id, `NULL` when nobody leads), `value`,
/// `fencing_token`, `expires_at` (computed by the server with `clock_timestamp()`), the
/// holder's driver's channel and a handover's nomination. Its waiting candidates stand in
/// a line, rows of `<table>_waiters` with a server-side expiry. Taking the lead, renewing,
/// resigning, handing over and proclaiming are single statements that compare the holder
/// **and** the fencing token; the token is incremented by the statement that takes the
/// lead, and a resignation keeps the row (and so the counter). A resignation grants the
/// term to the next waiter alone, in the same transaction, and `NOTIFY`s it on its
/// driver's channel; a trigger `NOTIFY`s a holder whose term anyone else ends. One
/// statement renews every term a driver holds, one refreshes every place in line it has.
/// See the crate's README for the SQL and the grants.
///
/// Cheap to clone: clones share one connection for the statements (reopened when it
/// breaks) and one connection for `LISTEN`; each election built on it is a distinct
/// candidate.
#[derive(Clone)]
pub struct PostgresDriver {
    pub(crate) inner: Arc<Inner>,
}

impl PostgresDriver {
    /// The driver's protocol over any I/O layer: the seam a simulation uses (the
    /// crate's `tests/sim` runs it on a model of PostgreSQL). Services use
    /// [`new`](Self::new), [`builder`](Self::builder) or
    /// [`connect_url`](Self::connect_url), which run it on tokio-postgres. `table` names
    /// the elections' table as [`PostgresDriverBuilder::table`](crate::PostgresDriverBuilder::table)
    /// takes it (its channels derive from it).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`table`) for a table name that is not `table` or
    /// `schema.table` of lower-case identifiers.
    pub fn with_io(io: Arc<dyn PostgresIo>, table: &str) -> Result<Self> {
        Ok(Self::on(io, Table::parse(table)?))
    }

    /// The driver on `io` and a checked table.
    pub(crate) fn on(io: Arc<dyn PostgresIo>, table: Table) -> Self {
        PostgresDriver {
            inner: Arc::new(Inner::new(io, table)),
        }
    }

    /// The I/O layer this driver's protocol runs on (tokio-postgres, unless built with
    /// [`with_io`](Self::with_io)): to send the protocol's statements one by one, as the
    /// crate's differential test does against its model.
    pub fn io(&self) -> &Arc<dyn PostgresIo> {
        &self.inner.io
    }

    /// The table, as configured (`leader_elections`, `schema.table`).
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// The `LISTEN` channel of `election`: `leader_` and 16 hex digits, a hash of the
    /// table and the election name.
    pub fn channel(&self, election: &str) -> String {
        self.inner.channel(election)
    }

    /// The schema the driver creates when it is missing or incomplete (idempotent): the
    /// elections table, its waiters' table (`<table>_waiters`), the trigger that tells a
    /// leader at once when someone else ends its term, and the resignation's function
    /// (`<table>_resign`). As in the README.
    pub fn create_table_sql(&self) -> String {
        self.inner.table.create()
    }

    /// How many statements this driver has sent to PostgreSQL (not counting `LISTEN`s,
    /// health checks and connection set-up): a diagnostic for load and for tests.
    pub fn statements_sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for PostgresDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The real layer's Debug shows the password as `_`.
        f.debug_struct("PostgresDriver")
            .field("io", &self.inner.io)
            .field("table", &self.inner.table.name)
            .finish_non_exhaustive()
    }
}

pub(crate) fn check_name(election: &str) -> Result<()> {
    if election.contains('\0') {
        return Err(Error::invalid_config(
            "name",
            "must not contain NUL bytes with PostgreSQL (text cannot hold them)",
        ));
    }
    Ok(())
}

#[async_trait]
impl Driver for PostgresDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        check_name(&candidate.election)?;
        // Listen first, so that a wake-up between our attempt and our wait is not missed;
        // the registration keeps a wake-up that comes before the wait.
        self.inner.listener.ensure().await;
        let (place, start_keeper) =
            self.inner
                .listener
                .wait(&candidate.id, &candidate.election, candidate.ttl);
        if start_keeper {
            self.inner.start_keeper(candidate.ttl / 3);
        }
        loop {
            // A resignation may have granted this waiter the term (heard while it waited,
            // or while its last attempt ran and found the term not free: that attempt ran
            // before the grant, or after the granted lease ended, which `granted` then
            // refuses; one that ran after the grant within the lease took the row anew and
            // returned, and this grant is dropped with the place).
            let elected = match self.inner.granted(candidate, &place.waiter) {
                Some(grant) => {
                    debug!(election = %candidate.election, token = grant.fencing_token, "granted by a resignation");
                    Attempt::Elected(grant)
                }
                None => self.inner.try_acquire(candidate, &place.waiter).await?,
            };
            match elected {
                Attempt::Elected(grant) => {
                    self.inner.renewals.hold(
                        &candidate.election,
                        &candidate.id,
                        grant.fencing_token,
                        candidate.ttl,
                        grant.confirmed_at,
                    );
                    return Ok(grant);
                }
                Attempt::Wait { first, remaining } => {
                    place.waiter.armed.store(first, Ordering::SeqCst);
                    if first {
                        // First in line: a timer at the end of the holder's lease (or of a
                        // nomination) in case nobody says it ended.
                        // (A resignation running beside this attempt waits for its lock on
                        // the election's row, then reads the line anew: it wakes this
                        // candidate. See `Table::resign`.)
                        let wait = self.inner.expiry_wait(remaining, candidate.ttl);
                        debug!(election = %candidate.election, ?wait, "first in line");
                        tokio::select! {
                            () = place.waiter.wake.notified() => {}
                            () = sleep(wait) => {}
                        }
                    } else {
                        // Behind others: woken by a notice, or by the keeper.
                        debug!(election = %candidate.election, "waiting in line");
                        place.waiter.wake.notified().await;
                    }
                }
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        if i64::try_from(grant.fencing_token).is_err() {
            return Err(Error::TermGone);
        }
        self.inner.renew(candidate, grant).await
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        // Releases by exact token only: this request may land late, after this
        // candidate's next term began, and must not end that one.
        if let Some(token) = fencing_token {
            self.inner.renewals.release(&candidate.id, Some(token));
            return self.inner.resign_exactly(candidate, Some(token)).await;
        }
        // Without a token (a campaign whose answer never came): leave the line (and a
        // nomination) first, then read the row and end the term it shows as this
        // candidate's, if any. In that order, a resignation that granted this candidate
        // the term is seen: it took the place under a lock and committed before the place
        // could be deleted, and none can come after, as the place is gone.
        self.inner.resign_exactly(candidate, None).await?;
        match self.inner.leader(&candidate.election).await? {
            Some(Holder { info, .. }) if info.id == candidate.id => {
                let token = Some(info.fencing_token);
                self.inner.renewals.release(&candidate.id, token);
                self.inner.resign_exactly(candidate, token).await
            }
            _ => {
                self.inner.renewals.release(&candidate.id, None);
                Ok(())
            }
        }
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        check_name(election)?;
        Ok(self.inner.leader(election).await?.map(|holder| holder.info))
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        check_name(election)?;
        self.inner.candidates(election).await
    }

    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        match self
            .inner
            .hand_over(candidate, fencing_token, nominee)
            .await?
        {
            HandedOver::Done => {
                self.inner
                    .renewals
                    .release(&candidate.id, Some(fencing_token));
                Ok(())
            }
            HandedOver::TermGone => Err(Error::TermGone),
            HandedOver::NotWaiting => Err(Error::NotWaiting {
                id: nominee.to_owned(),
            }),
        }
    }

    async fn proclaim(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        value: &[u8],
    ) -> Result<()> {
        if self.inner.proclaim(candidate, fencing_token, value).await? {
            Ok(())
        } else {
            Err(Error::TermGone)
        }
    }

    /// Clones share their state: they are one driver.
    fn instance_id(&self) -> usize {
        Arc::as_ptr(&self.inner).cast::<()>() as usize
    }

    fn check_name(&self, election: &str) -> Result<()> {
        check_name(election)
    }

    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        // The table's trigger tells this driver's channel when anyone but the holder ends
        // the term (a DELETE, another holder or token, an earlier expiry). A LISTEN lost on
        // a reconnection may have lost that notice: after each reconnection, look at the
        // row once.
        // Kept small while it waits (it lives as long as the term, one per election): the
        // look at the row is boxed, not part of this future's state.
        let term = self.inner.listener.hold(&candidate.id, fencing_token);
        let inner = Arc::clone(&self.inner);
        let election: Arc<str> = candidate.election.as_str().into();
        Box::pin(async move {
            loop {
                term.watch.wake.notified().await;
                if term.watch.gone.load(Ordering::SeqCst) {
                    warn!(%election, fencing_token, "the row no longer holds this term (ended by someone else)");
                    return;
                }
                let look: BoxFuture<'_, _> = Box::pin(inner.leader(&election));
                match look.await {
                    Ok(Some(Holder { info, .. }))
                        if info.id == term.id() && info.fencing_token == fencing_token => {}
                    Ok(_) => {
                        warn!(%election, fencing_token, "the row no longer holds this term");
                        return;
                    }
                    // The renewal loop deals with store errors.
                    Err(_) => {}
                }
            }
        })
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        notices::observe(Observing {
            driver: self.clone(),
            election: election.to_owned(),
        })
    }
}

/// An election observed through the driver's `LISTEN` connection.
struct Observing {
    driver: PostgresDriver,
    election: String,
}

#[async_trait]
impl Observed for Observing {
    async fn notices(&self) -> Notices {
        let channel = self.driver.channel(&self.election);
        self.driver.inner.listener.listen(&channel).await
    }

    async fn look(&self) -> Look {
        match check_name(&self.election) {
            Err(err) => (Err(err), Duration::from_secs(3600)),
            Ok(()) => match self.driver.inner.leader(&self.election).await {
                Ok(Some(Holder { info, remaining_ms })) => (
                    Ok(Some(info)),
                    self.driver
                        .inner
                        .expiry_wait(Some(remaining_ms), Duration::from_secs(1)),
                ),
                // No leader: wait for an announcement (or a LISTEN reconnection).
                Ok(None) => (Ok(None), Duration::from_secs(3600)),
                Err(err) => (Err(err), Duration::from_millis(500)),
            },
        }
    }
}
