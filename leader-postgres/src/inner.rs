//! The driver's protocol state and its statement-level steps: taking the lead, batched
//! renewals, the keeper of the waiters' places, resignations, handovers. It talks to the
//! store only through [`PostgresIo`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use leader_core::{Candidate, CandidateInfo, Error, Grant, Result};
use tokio::time::{Instant, sleep};
use tracing::{debug, warn};

use crate::io::{AcquireRequest, HandOverRequest, Holder, Place, PostgresIo, Renewal};
use crate::listener::Listener;
use crate::own_channel::Waiter;
use crate::renewals::{self, Cached, Renewals};
use crate::sql::{self, Table};

/// What every clone of a driver shares.
pub(crate) struct Inner {
    pub(crate) io: Arc<dyn PostgresIo>,
    pub(crate) table: Table,
    pub(crate) listener: Listener,
    pub(crate) renewals: Renewals,
    /// Statements sent, for [`PostgresDriver::statements_sent`](crate::PostgresDriver::statements_sent).
    pub(crate) sent: AtomicU64,
}

/// The outcome of a handover.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandedOver {
    Done,
    TermGone,
    NotWaiting,
}

/// The outcome of one attempt to take the lead.
pub(crate) enum Attempt {
    Elected(Grant),
    /// Not elected; in line. `first`: first in line or nominated (then `remaining` is the
    /// time in ms until the holder's lease, or a nomination, ends).
    Wait {
        first: bool,
        remaining: Option<f64>,
    },
}

/// How long a waiter sleeps on a holder's remaining lease (server time, as a duration):
/// that plus a little jitter (`draw`, a random number), so waiters that saw the same
/// expiry do not all ask at the same millisecond.
pub(crate) fn expiry_wait(remaining_ms: Option<f64>, ttl: Duration, draw: u64) -> Duration {
    let base = match remaining_ms {
        Some(ms) if ms.is_finite() => Duration::from_secs_f64((ms.max(0.0) / 1000.0).min(3600.0)),
        // A row set by hand to never expire: look again a TTL later.
        Some(ms) if ms > 0.0 => ttl,
        Some(_) => Duration::ZERO,
        // The row was not visible to the statement's snapshot (inserted concurrently):
        // look again soon.
        _ => ttl / 20,
    };
    let spread = u64::try_from((ttl / 20).as_millis())
        .unwrap_or(50)
        .clamp(1, 50);
    base + Duration::from_millis(1 + draw % spread)
}

impl Inner {
    /// The protocol on `io`, for the elections of `table`, with a fresh driver channel.
    pub(crate) fn new(io: Arc<dyn PostgresIo>, table: Table) -> Self {
        // The driver's own channel: PostgreSQL wakes this driver's waiters and tells its
        // leaders about lost terms on it.
        let channel = format!("leader_d_{:016x}", io.random());
        Inner {
            listener: Listener::new(Arc::clone(&io), channel),
            renewals: Renewals::default(),
            sent: AtomicU64::new(0),
            io,
            table,
        }
    }

    /// The `LISTEN` channel of `election`.
    pub(crate) fn channel(&self, election: &str) -> String {
        sql::channel(&self.table, election)
    }

    /// Counts one statement sent.
    fn count(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A wait until a remaining lease ends, with jitter.
    pub(crate) fn expiry_wait(&self, remaining_ms: Option<f64>, ttl: Duration) -> Duration {
        expiry_wait(remaining_ms, ttl, self.io.random())
    }

    /// A fresh stamp for a statement that sets waiters' places (a bigint's range).
    fn stamp(&self) -> u64 {
        self.io.random() & (i64::MAX as u64)
    }

    /// The term a resignation granted `waiter` (heard on the driver's channel), if it
    /// holds for at least half its TTL more: its lease started when the waiter's
    /// statement that set its place was sent, no later (that statement's server time
    /// plus the TTL is the lease's end, as for an attempt). A grant this waiter cannot
    /// bound (its statement is not one this registration remembers) or one with less
    /// left is passed over: the waiter then attempts, which takes the term anew if it is
    /// still this candidate's (a row held by the candidate itself is free for it).
    pub(crate) fn granted(&self, candidate: &Candidate, waiter: &Waiter) -> Option<Grant> {
        let (token, sent_at) = waiter.take_grant()?;
        let Some(sent_at) = sent_at else {
            debug!(election = %candidate.election, token, "a grant quotes a statement this waiter does not remember; attempting");
            return None;
        };
        if sent_at + candidate.ttl / 2 <= Instant::now() {
            debug!(election = %candidate.election, token, "a grant with less than half a TTL left; attempting");
            return None;
        }
        Some(Grant::new(token, sent_at, candidate.ttl))
    }

    /// One attempt to take the lead; joins the line (or refreshes this candidate's place)
    /// otherwise. `waiter` remembers the statement's stamp.
    pub(crate) async fn try_acquire(
        &self,
        candidate: &Candidate,
        waiter: &Waiter,
    ) -> Result<Attempt> {
        let stamp = self.stamp();
        let request = AcquireRequest {
            election: candidate.election.clone(),
            candidate: candidate.id.clone(),
            value: candidate.value.clone(),
            ttl: candidate.ttl,
            election_channel: self.channel(&candidate.election),
            driver_channel: self.listener.shared().channel.clone(),
            stamp,
        };
        // Taken before the statement is sent: the server's expiry (of a term, or of the
        // place a grant may turn into one) is later than this plus the TTL.
        let sent_at = Instant::now();
        waiter.stamped(stamp, sent_at);
        self.count();
        let answer = self.io.acquire(&request).await?;
        Ok(match answer.token {
            Some(token) => Attempt::Elected(Grant::new(token, sent_at, candidate.ttl)),
            None => Attempt::Wait {
                first: answer.first,
                remaining: answer.remaining_ms,
            },
        })
    }

    /// The leader and its remaining lease.
    pub(crate) async fn leader(&self, election: &str) -> Result<Option<Holder>> {
        self.count();
        self.io.leader(election).await
    }

    /// Ends the term `token` (if any) of `candidate`, removes a nomination naming it and
    /// its place in line, and wakes the one waiter whose turn it now is.
    pub(crate) async fn resign_exactly(
        &self,
        candidate: &Candidate,
        token: Option<u64>,
    ) -> Result<()> {
        let channel = self.channel(&candidate.election);
        self.count();
        let answer = self
            .io
            .resign(&candidate.election, &candidate.id, token, &channel)
            .await?;
        debug!(election = %candidate.election, released = answer.released, woken = answer.woken, "resigned");
        Ok(())
    }

    /// Renews the term of `grant`, in a batch with every other term of this driver that is
    /// due, or answers from a batch that just renewed it.
    pub(crate) async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        let (id, token, ttl) = (&candidate.id, grant.fencing_token, candidate.ttl);
        let cached =
            || match self
                .renewals
                .ask(&candidate.election, id, token, ttl, grant.confirmed_at)
            {
                Cached::Renewed(at) => Some(Ok(Grant::new(token, at, ttl))),
                Cached::Gone => Some(Err(Error::TermGone)),
                Cached::Miss => None,
            };
        if let Some(answer) = cached() {
            return answer;
        }
        let _batch = self.renewals.batch.lock().await;
        // A batch that ran while this one waited may have renewed it.
        if let Some(answer) = cached() {
            return answer;
        }
        let mut batch = vec![Renewal {
            election: candidate.election.clone(),
            holder: id.clone(),
            token,
            ttl,
        }];
        batch.extend(self.renewals.due(id, renewals::BATCH - 1));
        let sent_at = Instant::now();
        self.count();
        let renewed = self.io.renew(&batch).await?;
        debug!(
            terms = batch.len(),
            renewed = renewed.len(),
            "renewed a batch"
        );
        self.renewals.record(&batch, &renewed, sent_at);
        if renewed.contains(id) {
            Ok(Grant::new(token, sent_at, ttl))
        } else {
            Err(Error::TermGone)
        }
    }

    /// Ends the term `token` of `candidate` and nominates `nominee` for one TTL, in one
    /// statement.
    pub(crate) async fn hand_over(
        &self,
        candidate: &Candidate,
        token: u64,
        nominee: &str,
    ) -> Result<HandedOver> {
        let request = HandOverRequest {
            election: candidate.election.clone(),
            holder: candidate.id.clone(),
            token,
            nominee: nominee.to_owned(),
            ttl: candidate.ttl,
            election_channel: self.channel(&candidate.election),
        };
        self.count();
        let answer = self.io.hand_over(&request).await?;
        Ok(if answer.handed {
            HandedOver::Done
        } else if !answer.held {
            HandedOver::TermGone
        } else if !answer.waiting {
            HandedOver::NotWaiting
        } else {
            // Both held in the statement's snapshot, yet the update found neither: the
            // term ended meanwhile.
            HandedOver::TermGone
        })
    }

    /// Sets the value of the term `token` of `candidate`; whether it was still held.
    pub(crate) async fn proclaim(
        &self,
        candidate: &Candidate,
        token: u64,
        value: &[u8],
    ) -> Result<bool> {
        let channel = self.channel(&candidate.election);
        self.count();
        self.io
            .proclaim(&candidate.election, &candidate.id, token, value, &channel)
            .await
    }

    /// The leader (`true`), then the waiters in the order they would lead.
    pub(crate) async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        self.count();
        self.io.candidates(election).await
    }

    /// Starts the keeper task: while this driver has waiters, it refreshes their places in
    /// line every third of their TTL (one statement for all of them) and wakes those whose
    /// turn came without a notice (a holder, waiter or nominee that died).
    pub(crate) fn start_keeper(self: &Arc<Self>, first_round: Duration) {
        let inner = Arc::downgrade(self);
        tokio::spawn(keeper(inner, first_round));
    }

    /// One round of the keeper. Returns the period until the next, or `None` when no
    /// waiter is left.
    async fn keep(&self) -> Option<Duration> {
        let waiters = self.listener.shared().waiters_for_keeper();
        let period = waiters.iter().map(|(_, w)| w.ttl).min()? / 3;
        let stamp = self.stamp();
        let places: Vec<Place> = waiters
            .iter()
            .map(|(id, w)| Place {
                election: w.election.clone(),
                candidate: id.clone(),
                ttl: w.ttl,
                stamp,
            })
            .collect();
        let sent_at = Instant::now();
        for (_, waiter) in &waiters {
            waiter.stamped(stamp, sent_at);
        }
        self.count();
        match self.io.keep(&places).await {
            Ok(kept) => {
                let mut refreshed = std::collections::BTreeSet::new();
                for place in kept {
                    if let Some(waiter) = self.listener.shared().waiter(&place.candidate)
                        && place.first
                        && (place.free || !waiter.armed.load(Ordering::SeqCst))
                    {
                        waiter.wake.notify_one();
                    }
                    refreshed.insert(place.candidate);
                }
                // A place that is gone (swept, deleted by hand): its waiter joins again.
                for (id, waiter) in &waiters {
                    if !refreshed.contains(id.as_str()) {
                        waiter.wake.notify_one();
                    }
                }
            }
            Err(err) => {
                warn!(error = %leader_core::ErrorChain(&err), "refreshing the waiters' places failed; retrying");
                return Some(period.min(Duration::from_secs(1)));
            }
        }
        Some(period)
    }
}

/// The keeper task of a driver (see [`Inner::start_keeper`]).
async fn keeper(inner: Weak<Inner>, first_round: Duration) {
    let mut period = first_round;
    loop {
        sleep(period).await;
        let Some(driver) = inner.upgrade() else {
            return;
        };
        match driver.keep().await {
            Some(next) => period = next.max(Duration::from_millis(10)),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_follow_the_servers_remaining_lease() {
        let ttl = Duration::from_secs(1);
        for draw in [0, 7, 49, u64::MAX] {
            let wait = expiry_wait(Some(400.0), ttl, draw);
            assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(450));
            assert!(expiry_wait(Some(-5.0), ttl, draw) <= Duration::from_millis(50));
            assert!(expiry_wait(None, ttl, draw) <= Duration::from_millis(100));
            assert!(expiry_wait(Some(f64::INFINITY), ttl, draw) > ttl);
            assert!(expiry_wait(Some(f64::NEG_INFINITY), ttl, draw) <= Duration::from_millis(50));
        }
    }
}
