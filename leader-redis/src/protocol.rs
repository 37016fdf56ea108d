//! The [`Driver`] contract on Redis: campaigns (in [`campaign`](crate::campaign)), batched
//! renewals, resignations and withdrawals by token, the look at the leader and the line,
//! handover, proclaim, and observation.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use leader_core::notices::{self, Look, Notices, Observed};
use leader_core::{Candidate, CandidateInfo, Driver, Error, Grant, LeaderInfo, Result};
use tokio::time::{Instant, sleep};
use tracing::debug;

use crate::driver::{Inner, RedisDriver};
use crate::io::{Candidates, HandOver, HandOverReply, Proclaim, Renewal, Resign};
use crate::keys::{ElectionKeys, keep, millis, place};
use crate::renewals::{self, Cached};

impl Inner {
    /// The resignation script for `candidate` with `token` (`None`: leave the line only).
    async fn resign_call(
        &self,
        keys: &ElectionKeys,
        candidate: &Candidate,
        token: Option<u64>,
    ) -> Result<()> {
        let request = Resign {
            leader: keys.leader.clone(),
            line: keys.line.clone(),
            line_until: keys.line_until.clone(),
            owner: candidate.id.clone(),
            place: place(candidate),
            token,
            channel: keys.channel.clone(),
            wake_prefix: keys.wake_prefix.clone(),
            keep_ms: millis(keep(candidate.ttl)),
        };
        let _removed = self.io.resign(&request).await?;
        Ok(())
    }
}

#[async_trait]
impl Driver for RedisDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        self.campaign_in_line(candidate).await
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        // The leader key only: a renewal is the most frequent request, and most are
        // answered from the cache (10,000 elections ask about 3,000 times a second).
        let leader = ElectionKeys::leader_only(&self.inner.prefix, &candidate.election);
        let inner = &self.inner;
        let token = grant.fencing_token;
        let renewed = |at: Instant| Grant::new(token, at, candidate.ttl);
        let per_slot = inner.io.per_slot();
        // A Cluster keeps elections in different slots, which one script cannot touch
        // together: one call per renewal there.
        let mut _batch = None;
        if !per_slot {
            let ask = || {
                inner.renewals.ask(
                    &leader,
                    &candidate.id,
                    token,
                    candidate.ttl,
                    grant.confirmed_at,
                )
            };
            match ask() {
                Cached::Renewed(at) => return Ok(renewed(at)),
                Cached::Gone => return Err(Error::TermGone),
                Cached::Miss => {}
            }
            // Held until this renewal's batch is recorded: renewals asking meanwhile then
            // find theirs in it.
            _batch = Some(inner.renewals.batch.lock().await);
            match ask() {
                Cached::Renewed(at) => return Ok(renewed(at)),
                Cached::Gone => return Err(Error::TermGone),
                Cached::Miss => {}
            }
        }
        // This renewal's own term first, from its own arguments; then (one server or
        // Sentinel) the other held terms due, up to one call's worth: the rest renew in
        // their own terms' calls.
        let own = renewals::Due {
            key: leader.clone(),
            owner: candidate.id.clone(),
            token,
            ttl: candidate.ttl,
        };
        let mut batch = vec![own];
        if !per_slot {
            batch.extend(inner.renewals.due(&leader, renewals::BATCH - 1));
        }
        let terms: Vec<Renewal> = batch
            .iter()
            .map(|due| Renewal {
                leader: due.key.clone(),
                owner: due.owner.clone(),
                token: due.token,
                ttl_ms: millis(due.ttl),
            })
            .collect();
        let sent_at = Instant::now();
        let flags = inner.io.renew(&terms).await?;
        inner.renewals.record(&batch, &flags, sent_at);
        if flags.first().copied().unwrap_or(false) {
            Ok(renewed(sent_at))
        } else {
            Err(Error::TermGone)
        }
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        let keys = self.keys(&candidate.election);
        // Deletes by exact token only: this request may land late, after this candidate's
        // next term began, and must not delete that one. Without a token (a campaign whose
        // answer never came), read it first; if another leads, only leave the line.
        let token = match fencing_token {
            Some(token) => Some(token),
            None => match self.inner.leader_with_pttl(&keys).await? {
                Some((leader, _)) if leader.id == candidate.id => Some(leader.fencing_token),
                _ => None,
            },
        };
        self.inner.resign_call(&keys, candidate, token).await?;
        self.inner
            .renewals
            .release(&keys.leader, &candidate.id, fencing_token);
        if fencing_token.is_none() && self.inner.take_unanswered(&keys.line, &candidate.id) {
            // A withdrawal after a campaign request that is unanswered (on its way, dropped,
            // timed out): it may land after this one (a stalled server, a connection replaced
            // after a timeout). Leave the line again three times over the next 1.5 TTL: what
            // such a request left is gone within 2 TTLs. If the candidate waits again
            // meanwhile, its next withdrawal does this instead. Every other withdrawal is
            // this look and this resignation (two requests): no request of the campaign can
            // land after them.
            let driver = self.clone();
            let candidate = candidate.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    sleep(candidate.ttl / 2).await;
                    if driver.inner.lines.waits(&keys.line, &candidate.id) {
                        driver.inner.unanswered_again(&keys.line, &candidate.id);
                        return;
                    }
                    if let Err(err) = driver.inner.resign_call(&keys, &candidate, None).await {
                        debug!(error = %leader_core::ErrorChain(&err), "leaving the line again failed");
                    }
                }
            });
        }
        Ok(())
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        self.check(election)?;
        let keys = self.keys(election);
        Ok(self
            .inner
            .leader_with_pttl(&keys)
            .await?
            .map(|(info, _)| info))
    }

    /// Clones share their state: they are one driver.
    fn instance_id(&self) -> usize {
        std::sync::Arc::as_ptr(&self.inner).cast::<()>() as usize
    }

    fn check_name(&self, election: &str) -> Result<()> {
        self.check(election)
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        self.check(election)?;
        let keys = self.keys(election);
        // Places not yet refreshed count as live here: the refresh prunes them if stale.
        let request = Candidates {
            leader: keys.leader.clone(),
            line: keys.line.clone(),
            line_until: keys.line_until.clone(),
            keep_ms: 1_000_000_000_000_000,
        };
        let pairs = self.inner.io.candidates(&request).await?;
        let mut out = Vec::with_capacity(pairs.len());
        for (i, (id, value)) in pairs.into_iter().enumerate() {
            if i == 0 && id == "-" {
                continue;
            }
            out.push(CandidateInfo::new(id, value, i == 0));
        }
        Ok(out)
    }

    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        let keys = self.keys(&candidate.election);
        let request = HandOver {
            leader: keys.leader.clone(),
            line: keys.line.clone(),
            line_until: keys.line_until.clone(),
            owner: candidate.id.clone(),
            token: fencing_token,
            nominee: nominee.to_owned(),
            ttl_ms: millis(candidate.ttl),
            wake_prefix: keys.wake_prefix.clone(),
            channel: keys.channel.clone(),
        };
        match self.inner.io.hand_over(&request).await? {
            HandOverReply::Done => {
                self.inner
                    .renewals
                    .release(&keys.leader, &candidate.id, Some(fencing_token));
                Ok(())
            }
            HandOverReply::Gone => Err(Error::TermGone),
            HandOverReply::Absent => Err(Error::NotWaiting {
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
        let keys = self.keys(&candidate.election);
        let request = Proclaim {
            leader: keys.leader.clone(),
            owner: candidate.id.clone(),
            token: fencing_token,
            value: value.to_vec(),
            channel: keys.channel.clone(),
        };
        if self.inner.io.proclaim(&request).await? {
            Ok(())
        } else {
            Err(Error::TermGone)
        }
    }

    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        if self.inner.io.keyspace().is_none() {
            // Nothing to hold per term: the renewals notice.
            return Box::pin(std::future::pending());
        }
        Box::pin(RedisDriver::term_gone(self, candidate, fencing_token))
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        notices::observe(Observing {
            driver: self.clone(),
            election: election.to_owned(),
        })
    }
}

/// An election observed through the driver's pub/sub connection.
struct Observing {
    driver: RedisDriver,
    election: String,
}

#[async_trait]
impl Observed for Observing {
    async fn notices(&self) -> Notices {
        let keys = self.driver.keys(&self.election);
        self.driver.inner.subscriber.subscribe(&keys.channel).await
    }

    async fn look(&self) -> Look {
        let keys = self.driver.keys(&self.election);
        match self.driver.check(&self.election) {
            Err(err) => (Err(err), Duration::from_secs(3600)),
            Ok(()) => match self.driver.inner.leader_with_pttl(&keys).await {
                Ok(Some((info, pttl))) => (
                    Ok(Some(info)),
                    self.driver
                        .inner
                        .expiry_wait(pttl, Duration::from_millis(100)),
                ),
                // No leader: wait for an announcement (or a pub/sub reconnection).
                Ok(None) => (Ok(None), Duration::from_secs(3600)),
                Err(err) => (Err(err), Duration::from_millis(500)),
            },
        }
    }
}
