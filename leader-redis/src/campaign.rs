//! Taking the lead, or waiting in line for it: a candidate stands in line once subscribed
//! to its own wake channel; a resignation wakes the head of the line only; the driver
//! refreshes its waiters' places per election and tells the head when the lease it waits
//! behind ends (only the head keeps that timer, so waiters do not poll).

use std::sync::Arc;
use std::time::Duration;

use leader_core::{Candidate, Error, Grant, Result};
use tokio::time::{Instant, sleep};
use tracing::debug;

use crate::driver::{Inner, RedisDriver};
use crate::io::{Acquire, AcquireReply, Refresh};
use crate::keys::{ElectionKeys, keep, millis, period, place};
use crate::line::{self, News};

/// What an acquisition attempt did.
enum Acquired {
    /// Elected.
    Won(Grant),
    /// In line (or looked only); when the lease it waits behind ends, if asked.
    Waiting(Option<Instant>),
}

impl RedisDriver {
    /// [`Driver::campaign`](leader_core::Driver::campaign).
    pub(crate) async fn campaign_in_line(&self, candidate: &Candidate) -> Result<Grant> {
        self.check(&candidate.election)?;
        let keys = self.keys(&candidate.election);
        // This candidate's own channel: a resignation wakes the head of the line only, not
        // every waiter. A candidate stands in line only once subscribed, so that no wakeup
        // meant for it is missed: at once if the channel still is (a candidate that waited
        // and campaigns again costs no SUBSCRIBE), else after a first try that only
        // peeks, so a candidate elected at once subscribes to nothing.
        let wake = keys.wake(&candidate.id);
        let mut notices = self.inner.subscriber.existing(&wake);
        // Whether this candidate's place may still be in line (not popped by a wakeup).
        let mut in_line = false;
        let mut waiting: Option<line::Waiting> = None;
        // The head's timer fired: the next try asks when the lease ends now.
        let mut timer_fired = false;
        loop {
            if let Some(notices) = &mut notices {
                notices.mark_seen();
            }
            let stand = notices.is_some();
            let lease_end = match self
                .inner
                .try_acquire(&keys, candidate, in_line, stand, timer_fired)
                .await?
            {
                Acquired::Won(grant) => return Ok(grant),
                Acquired::Waiting(lease_end) => lease_end,
            };
            let Some(notices) = &mut notices else {
                notices = Some(self.inner.subscriber.subscribe(&wake).await);
                continue;
            };
            in_line = true;
            let waiting = match &mut waiting {
                Some(waiting) => waiting,
                None => {
                    let (joined, new_line) = self.inner.lines.join(
                        &keys.line,
                        &candidate.id,
                        place(candidate),
                        candidate.ttl,
                    );
                    if let Some(line) = new_line {
                        tokio::spawn(refresher(self.clone(), keys.clone(), line));
                    }
                    waiting.insert(joined)
                }
            };
            waiting.rejoined();
            // Only the head of the line keeps a timer (at the lease it waits behind);
            // the others wait for a wakeup or for their driver's refresh.
            // A lease end already passed is not waited for again (the lease was renewed
            // since that refresh): the next refresh says when it ends now.
            let upcoming = |at: Option<Instant>| at.filter(|at| *at > Instant::now());
            let mut expiry = match *waiting.news.borrow_and_update() {
                News::Head(at) => upcoming(at),
                _ => None,
            };
            if timer_fired {
                // Still the head (as far as this driver knows): wait for the lease as it is
                // now, not for the next refresh.
                expiry = upcoming(lease_end).or(expiry);
                timer_fired = false;
            }
            debug!(election = %candidate.election, "waiting in line");
            loop {
                let timer = async {
                    match expiry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = notices.changed() => {
                        // Popped from the line by the wakeup (or pub/sub reconnected).
                        in_line = false;
                        break;
                    }
                    changed = waiting.news.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        match *waiting.news.borrow_and_update() {
                            News::Missing => {
                                in_line = false;
                                break;
                            }
                            News::Head(at) => expiry = upcoming(at),
                            News::Behind | News::None => expiry = None,
                        }
                    }
                    () = timer => {
                        timer_fired = true;
                        break;
                    }
                }
            }
        }
    }
}

impl Inner {
    /// Takes the lead or stands in line. `in_line`: this candidate's place may still be
    /// in line (it was not popped by a wakeup), so an election removes it. `stand`: stand
    /// in line if the key is held (else only look). `ask`: report when the lease it waits
    /// behind ends.
    async fn try_acquire(
        &self,
        keys: &ElectionKeys,
        candidate: &Candidate,
        in_line: bool,
        stand: bool,
        ask: bool,
    ) -> Result<Acquired> {
        let sent_at = Instant::now();
        let request = Acquire {
            leader: keys.leader.clone(),
            fence: keys.fence.clone(),
            line: keys.line.clone(),
            channel: keys.channel.clone(),
            owner: candidate.id.clone(),
            value: candidate.value.clone(),
            ttl_ms: millis(candidate.ttl),
            place: place(candidate),
            in_line,
            stand,
            ask_pttl: ask,
        };
        let in_flight = self.in_flight(&keys.line, &candidate.id);
        let reply = self.io.acquire(&request).await;
        if reply.is_ok() {
            in_flight.answered();
        }
        match reply? {
            AcquireReply::Elected(token) => {
                let token = u64::try_from(token).map_err(|_| {
                    Error::store(std::io::Error::other(format!("fence counter at {token}")))
                })?;
                self.renewals
                    .hold(&keys.leader, &candidate.id, token, candidate.ttl, sent_at);
                Ok(Acquired::Won(Grant::new(token, sent_at, candidate.ttl)))
            }
            AcquireReply::Held(pttl) => Ok(Acquired::Waiting(
                pttl.and_then(|pttl| u64::try_from(pttl).ok()).map(|ms| {
                    sent_at + Duration::from_millis(ms) + self.expiry_jitter(candidate.ttl)
                }),
            )),
        }
    }
}

/// Refreshes the places of this driver's candidates waiting in one election, every two
/// thirds of their shortest TTL, until none waits; tells each its news.
async fn refresher(driver: RedisDriver, keys: ElectionKeys, line: Arc<line::Line>) {
    loop {
        let Some((places, owners, ttl)) = line.snapshot() else {
            if driver.inner.lines.leave_if_empty(&keys.line, &line) {
                return;
            }
            continue;
        };
        let keep = keep(ttl);
        let sent_at = Instant::now();
        let mut head = None;
        let mut failed = false;
        for (chunk, chunk_owners) in places.chunks(500).zip(owners.chunks(500)) {
            let request = Refresh {
                leader: keys.leader.clone(),
                line: keys.line.clone(),
                line_until: keys.line_until.clone(),
                line_maintained: keys.line_maintained.clone(),
                keep_ms: millis(keep),
                period_ms: millis(period(ttl)),
                wake_prefix: keys.wake_prefix.clone(),
                places: chunk.to_vec(),
            };
            match driver.inner.io.refresh(&request).await {
                Ok(reply) => {
                    for i in reply.missing {
                        if let Some(owner) = chunk_owners.get(i) {
                            line.tell(owner, News::Missing);
                        }
                    }
                    let first = reply
                        .head
                        .split(|b| *b == b'\n')
                        .next()
                        .map(|owner| String::from_utf8_lossy(owner).into_owned());
                    let expiry = u64::try_from(reply.pttl).ok().map(|ms| {
                        sent_at + Duration::from_millis(ms) + driver.inner.expiry_jitter(ttl)
                    });
                    head = first.filter(|f| !f.is_empty()).map(|f| (f, expiry));
                }
                Err(err) => {
                    debug!(error = %leader_core::ErrorChain(&err), "refreshing places in line failed");
                    failed = true;
                }
            }
        }
        if !failed {
            line.behind_except(head.as_ref().map(|(owner, _)| owner.as_str()));
            if let Some((owner, expiry)) = &head {
                line.tell(owner, News::Head(*expiry));
            }
        }
        let pause = if failed {
            (ttl / 10).max(Duration::from_millis(50))
        } else {
            period(ttl)
        };
        sleep(pause).await;
    }
}
