//! Regression tests for the defects of the safety review (issue "Safety: close the
//! interleavings"), each failing without its fix. Most run on the paused clock; the ones
//! about a late answer need real time, since only a blocked thread lets an answer arrive
//! after a deadline whose timer has not fired yet.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::time::{sleep, timeout};

use crate::testing::conformance::next_event;
use crate::testing::{MemoryDriver, MemoryStore};
use crate::{
    Candidate, Driver, Election, Error, Event, EventStream, Grant, LeaderInfo, LossReason, Result,
};

/// What a [`Scripted`] driver does besides passing calls to its [`MemoryDriver`].
#[derive(Default)]
struct Script {
    /// Called at the start of every renew, with its number (from 1).
    on_renew: Option<Box<dyn Fn(u32) + Send + Sync>>,
    /// Renewals with these numbers never answer.
    hang_renewals: Vec<u32>,
    /// Each resign takes this long before it reaches the store.
    resign_delay: Duration,
    /// The store keeps each lease this many times the TTL the grant reports.
    lease_factor: u32,
    /// Campaigns fail with this (a permission error).
    deny: bool,
    /// Names the driver refuses.
    refuse_name: Option<&'static str>,
    /// Called at the start of every campaign.
    on_campaign: Option<Box<dyn Fn() + Send + Sync>>,
}

struct Scripted {
    inner: MemoryDriver,
    script: Script,
    renewals: AtomicU32,
}

fn scripted(inner: &MemoryDriver, script: Script) -> Scripted {
    Scripted {
        inner: inner.clone(),
        script,
        renewals: AtomicU32::new(0),
    }
}

impl Scripted {
    fn stretch(&self, candidate: &Candidate) -> Candidate {
        let factor = self.script.lease_factor.max(1);
        let mut stretched = candidate.clone();
        stretched.ttl = candidate.ttl * factor;
        stretched
    }

    fn shrink(&self, grant: Grant, candidate: &Candidate) -> Grant {
        Grant::new(grant.fencing_token, grant.confirmed_at, candidate.ttl)
    }
}

#[async_trait]
impl Driver for Scripted {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        if let Some(hook) = &self.script.on_campaign {
            hook();
        }
        if self.script.deny {
            return Err(Error::denied(std::io::Error::other("permission denied")));
        }
        let grant = self.inner.campaign(&self.stretch(candidate)).await?;
        Ok(self.shrink(grant, candidate))
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        let n = self.renewals.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(hook) = &self.script.on_renew {
            hook(n);
        }
        if self.script.hang_renewals.contains(&n) {
            std::future::pending::<()>().await;
        }
        let renewed = self.inner.renew(&self.stretch(candidate), grant).await?;
        Ok(self.shrink(renewed, candidate))
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        sleep(self.script.resign_delay).await;
        self.inner.resign(candidate, fencing_token).await
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        self.inner.leader(election).await
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        self.inner.observe(election)
    }

    fn check_name(&self, election: &str) -> Result<()> {
        match self.script.refuse_name {
            Some(refused) if election.contains(refused) => Err(Error::invalid_config(
                "name",
                format!("must not contain {refused:?} on this store"),
            )),
            _ => Ok(()),
        }
    }
}

const TTL: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(30);

fn build(driver: impl Driver, name: &str, ttl: Duration) -> Election {
    Election::builder(driver, name)
        .ttl(ttl)
        .retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("valid settings")
}

/// Events already delivered, without waiting.
fn delivered(events: &mut EventStream) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(Some(event)) = events.next().now_or_never() {
        out.push(event);
    }
    out
}

/// Defect 3: a renewal answer that arrives after the deadline passed (the thread was busy,
/// so the deadline's timer had not fired) must not extend the term: `is_leader()` was
/// already false and must stay so.
#[test]
fn a_renewal_answered_after_the_deadline_does_not_revive_the_term() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ttl = Duration::from_millis(300);
    let status_seen_in_renew: Arc<Mutex<Option<bool>>> = Arc::default();
    let deadline: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
    let status_slot: Arc<Mutex<Option<crate::Status>>> = Arc::default();
    let script = Script {
        on_renew: Some(Box::new({
            let seen = Arc::clone(&status_seen_in_renew);
            let deadline = Arc::clone(&deadline);
            let status = Arc::clone(&status_slot);
            move |n| {
                if n == 1 {
                    // Blocks the runtime's only thread past the deadline, as a long GC-like
                    // pause or a busy executor would, then lets the renewal succeed.
                    let until = deadline.lock().expect("lock").expect("deadline set");
                    std::thread::sleep(
                        until.saturating_duration_since(std::time::Instant::now())
                            + Duration::from_millis(20),
                    );
                    let leading = status.lock().expect("lock").as_ref().map(|s| s.is_leader());
                    *seen.lock().expect("lock") = leading;
                }
            }
        })),
        // The store still holds the lease: the renewal itself succeeds, only late.
        lease_factor: 10,
        ..Script::default()
    };
    let driver = MemoryDriver::new();
    runtime.block_on(async {
        let e = build(scripted(&driver, script), "late-renewal", ttl);
        let mut events = e.subscribe();
        let term = e.campaign().await.expect("elected");
        *deadline.lock().expect("lock") = Some(term.deadline());
        *status_slot.lock().expect("lock") = Some(e.status());
        timeout(Duration::from_secs(5), term.ended())
            .await
            .expect("the term ends");
        assert_eq!(
            *status_seen_in_renew.lock().expect("lock"),
            Some(false),
            "is_leader() was false once the deadline passed"
        );
        assert!(!term.is_valid(), "the late renewal revived the term");
        assert!(!e.status().is_leader());
        assert_eq!(
            next_event("elected", WAIT, &mut events).await,
            Event::Elected { fencing_token: 1 }
        );
        assert_eq!(
            next_event("lost", WAIT, &mut events).await,
            Event::Lost {
                fencing_token: 1,
                reason: LossReason::Expired
            }
        );
    });
}

/// Defect 3: a campaign that finds its own term expired but not yet ended (its holder task
/// has not run) ends it, with `Lost { Expired }`, before it asks the driver for a new one.
#[test]
fn campaign_ends_an_expired_term_before_asking_the_driver() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ttl = Duration::from_millis(100);
    let events_slot: Arc<Mutex<Option<EventStream>>> = Arc::default();
    let at_second_campaign: Arc<Mutex<Option<Vec<Event>>>> = Arc::default();
    let campaigns = Arc::new(AtomicU32::new(0));
    let script = Script {
        on_campaign: Some(Box::new({
            let events = Arc::clone(&events_slot);
            let seen = Arc::clone(&at_second_campaign);
            let campaigns = Arc::clone(&campaigns);
            move || {
                if campaigns.fetch_add(1, Ordering::SeqCst) == 1
                    && let Some(events) = events.lock().expect("lock").as_mut()
                {
                    *seen.lock().expect("lock") = Some(delivered(events));
                }
            }
        })),
        ..Script::default()
    };
    let driver = MemoryDriver::new();
    let e = build(scripted(&driver, script), "expired-campaign", ttl);
    *events_slot.lock().expect("lock") = Some(e.subscribe());
    let first = runtime.block_on(e.campaign()).expect("elected");
    // Nothing runs on the runtime while the thread sleeps past the deadline.
    std::thread::sleep(ttl + Duration::from_millis(20));
    let second = runtime.block_on(e.campaign()).expect("elected again");
    assert!(second.fencing_token() > first.fencing_token());
    let seen = at_second_campaign
        .lock()
        .expect("lock")
        .clone()
        .expect("the driver was asked again");
    assert_eq!(
        seen,
        vec![
            Event::Elected { fencing_token: 1 },
            Event::Lost {
                fencing_token: 1,
                reason: LossReason::Expired
            }
        ],
        "the expired term ended before the driver was asked for a new one"
    );
}

/// Defect 5: a resign() cancelled after it stepped down still ends the term with exactly
/// one event.
#[tokio::test(start_paused = true)]
async fn a_cancelled_resign_still_reports_the_end_of_the_term() {
    let driver = MemoryDriver::new();
    let script = Script {
        resign_delay: Duration::from_millis(500),
        ..Script::default()
    };
    let e = build(scripted(&driver, script), "cancelled-resign", TTL);
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    assert!(
        timeout(Duration::from_millis(10), e.resign())
            .await
            .is_err(),
        "cancelled midway"
    );
    assert!(
        !e.status().is_leader(),
        "stepped down before the store call"
    );
    assert_eq!(
        next_event("elected", WAIT, &mut events).await,
        Event::Elected {
            fencing_token: term.fencing_token()
        }
    );
    assert_eq!(
        next_event("the end of the term", WAIT, &mut events).await,
        Event::Resigned {
            fencing_token: term.fencing_token()
        }
    );
    sleep(TTL).await;
    assert_eq!(delivered(&mut events), vec![], "exactly one end event");
    assert_eq!(
        driver.leader("cancelled-resign").await.expect("reachable"),
        None
    );
}

/// Defect 8: withdraw() while this candidate's campaign holds the campaign lock withdraws
/// that campaign; it never waits for it to be elected and then resigns the new term.
#[tokio::test(start_paused = true)]
async fn withdraw_withdraws_a_waiting_campaign_instead_of_letting_it_be_elected() {
    let store = MemoryStore::new();
    let driver = store.driver();
    let script = Script {
        resign_delay: Duration::from_millis(200),
        ..Script::default()
    };
    // Slow background retries, so that the leftover below waits for the next campaign.
    let b = Election::builder(scripted(&driver, script), "queued-resign")
        .ttl(TTL)
        .retry(Duration::from_secs(5), Duration::from_secs(10))
        .build()
        .expect("valid");
    let mut events = b.subscribe();
    b.campaign().await.expect("elected");
    let other = build(store.driver(), "queued-resign", TTL);
    let other_campaign = tokio::spawn({
        let other = other.clone();
        async move { other.campaign().await.map(|_| ()) }
    });
    // B steps down but cannot delete its key: something is left to withdraw.
    driver.set_connected(false);
    assert!(b.resign().await.is_err(), "the store is unreachable");
    driver.set_connected(true);
    let campaign = tokio::spawn({
        let b = b.clone();
        async move { b.campaign().await.map(|_| ()) }
    });
    // The campaign holds the lock, withdrawing the leftover before it waits in line.
    sleep(Duration::from_millis(50)).await;
    let resign = tokio::spawn({
        let b = b.clone();
        async move { b.withdraw().await }
    });
    sleep(Duration::from_secs(1)).await;
    timeout(WAIT, other_campaign)
        .await
        .expect("the other candidate is elected once B's key is gone")
        .expect("no panic")
        .expect("elected");
    other.resign().await.expect("resign");
    let campaigned = timeout(WAIT, campaign)
        .await
        .expect("B's campaign returns")
        .expect("no panic");
    assert!(
        matches!(campaigned, Err(Error::Withdrawn)),
        "withdrawn by withdraw(), not elected: {campaigned:?}"
    );
    let _ = timeout(WAIT, resign).await.expect("resign returns");
    let seen = delivered(&mut events);
    assert_eq!(
        seen.iter().filter(|e| e.is_leader()).count(),
        1,
        "only B's first term was elected: {seen:?}"
    );
}

/// Defect 4: a term that ends locally (here: renewals fail until the deadline, while the
/// store's lease is longer than the election's TTL) is withdrawn from the store, so the
/// others need not wait for that lease.
#[tokio::test(start_paused = true)]
async fn a_term_lost_locally_is_withdrawn_from_the_store() {
    let store = MemoryStore::new();
    let driver = store.driver();
    let script = Script {
        lease_factor: 20,
        ..Script::default()
    };
    let a = build(scripted(&driver, script), "withdrawn-on-loss", TTL);
    let mut events = a.subscribe();
    a.campaign().await.expect("elected");
    driver.set_connected(false);
    next_event("elected", WAIT, &mut events).await;
    assert!(matches!(
        next_event("lost", WAIT, &mut events).await,
        Event::Lost {
            reason: LossReason::Expired,
            ..
        }
    ));
    driver.set_connected(true);
    let b = build(store.driver(), "withdrawn-on-loss", TTL);
    let elected = timeout(2 * TTL, b.campaign())
        .await
        .expect("elected well before A's 60 s lease would have run out");
    elected.expect("elected");
}

/// Defect 6: one renewal that never answers is abandoned after a quarter of the TTL and
/// retried; the term survives.
#[tokio::test(start_paused = true)]
async fn a_hung_renewal_is_abandoned_and_retried_within_the_term() {
    let driver = MemoryDriver::new();
    let script = Script {
        hang_renewals: vec![1],
        ..Script::default()
    };
    let e = build(scripted(&driver, script), "hung-renewal", TTL);
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    sleep(3 * TTL).await;
    assert!(term.is_valid(), "the term survived a hung renewal");
    assert_eq!(
        delivered(&mut events),
        vec![Event::Elected {
            fencing_token: term.fencing_token()
        }]
    );
}

/// Defect 9: a name the store cannot hold fails at build(), not at every campaign.
#[test]
fn build_asks_the_driver_about_the_name() {
    let script = Script {
        refuse_name: Some("{"),
        ..Script::default()
    };
    let err = Election::builder(scripted(&MemoryDriver::new(), script), "a{b")
        .build()
        .expect_err("refused");
    assert!(
        matches!(err, Error::InvalidConfig { name: "name", .. }),
        "{err:?}"
    );
}

/// Defect 9: a refusal that retrying cannot fix ends run() at once.
#[tokio::test(start_paused = true)]
async fn run_returns_a_permission_error_instead_of_retrying() {
    let script = Script {
        deny: true,
        ..Script::default()
    };
    let e = build(scripted(&MemoryDriver::new(), script), "denied", TTL);
    let result = timeout(WAIT, e.run(std::future::pending()))
        .await
        .expect("run returned");
    assert!(matches!(result, Err(Error::Denied(_))), "{result:?}");
}

/// Defect 10: streams dropped by their readers are pruned without waiting for an event.
#[tokio::test(start_paused = true)]
async fn dropped_event_streams_are_pruned_at_once() {
    let e = build(MemoryDriver::new(), "pruned", TTL);
    for _ in 0..1000 {
        drop(e.subscribe());
    }
    let _kept = e.subscribe();
    assert_eq!(e.subscriber_count(), 1);
}

/// A driver elected after a long wait, whose renewal then answers with an earlier,
/// shared confirmation; the machine was suspended between that confirmation and the
/// moment the core read its clock again.
struct StaleThenShared {
    suspension: Duration,
}

#[async_trait]
impl Driver for StaleThenShared {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        let sent_at = tokio::time::Instant::now();
        // Waited in line a whole TTL: the grant's confirmation is stale. The machine is
        // suspended just as the answer arrives (the monotonic clock stands still).
        sleep(candidate.ttl).await;
        crate::testing::simulate_suspension(self.suspension);
        Ok(Grant::new(1, sent_at, candidate.ttl))
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        // The store confirmed the lease a moment ago (a keep-alive shared with other
        // terms), and then the machine slept before this answer was read.
        let shared = tokio::time::Instant::now() - Duration::from_millis(1);
        assert!(shared >= grant.confirmed_at);
        let _ = candidate;
        Ok(Grant::new(grant.fencing_token, shared, grant.ttl))
    }

    async fn resign(&self, _candidate: &Candidate, _fencing_token: Option<u64>) -> Result<()> {
        Ok(())
    }

    async fn leader(&self, _election: &str) -> Result<Option<LeaderInfo>> {
        Ok(None)
    }

    fn observe(&self, _election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        Box::pin(futures::stream::empty())
    }
}

/// Issue 20: `elect()` keeps `extend()`'s guard. Its second confirmation may be a shared
/// one older than the clock reading taken before it was asked for; a suspension between the
/// two must still count, so the reference is the reading taken before the campaign.
#[tokio::test(start_paused = true)]
async fn elect_counts_a_suspension_before_a_shared_older_confirmation() {
    let suspension = TTL;
    let driver = StaleThenShared { suspension };
    let e = build(driver, "elect-suspension", TTL);
    let elected = timeout(WAIT, e.campaign()).await.expect("returns");
    assert!(
        elected.as_ref().is_err() || !e.status().is_leader(),
        "a term confirmed before a suspension of a whole TTL must not be valid: {elected:?}, \
         is_leader {}",
        e.status().is_leader()
    );
}

/// A driver whose campaign is granted on a fresh confirmation (on Tokio's clock) while the
/// machine sleeps, optionally before its answer (`during_campaign`) or during the
/// renewal that follows (`during_renewal`), and whose renewals always succeed with a
/// confirmation taken as they are answered: as etcd's would if its read came before the
/// next in line's delete of a key whose term it had seen end.
struct RenewsAfterSleep {
    during_campaign: Duration,
    during_renewal: Duration,
    renewals: Arc<AtomicU32>,
}

#[async_trait]
impl Driver for RenewsAfterSleep {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        let sent_at = tokio::time::Instant::now();
        if self.during_campaign.is_zero() {
            // Stale on Tokio's clock too: a long wait in line.
            sleep(candidate.ttl).await;
        } else {
            crate::testing::simulate_suspension(self.during_campaign);
        }
        Ok(Grant::new(1, sent_at, candidate.ttl))
    }

    async fn renew(&self, _candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        crate::testing::simulate_suspension(self.during_renewal);
        let now = tokio::time::Instant::now();
        Ok(Grant::new(grant.fencing_token, now, grant.ttl))
    }

    async fn resign(&self, _candidate: &Candidate, _fencing_token: Option<u64>) -> Result<()> {
        Ok(())
    }

    async fn leader(&self, _election: &str) -> Result<Option<LeaderInfo>> {
        Ok(None)
    }

    fn observe(&self, _election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        Box::pin(futures::stream::empty())
    }
}

/// A grant made stale by a suspension during the campaign is given up, not renewed: the
/// driver's own check of the grant's deadline runs on Tokio's clock, blind to the sleep,
/// and its renewal could confirm a term the next in line has seen end.
#[tokio::test(start_paused = true)]
async fn elect_gives_up_a_grant_made_stale_by_a_suspension() {
    crate::clock::isolate_suspensions();
    let renewals = Arc::new(AtomicU32::new(0));
    let driver = RenewsAfterSleep {
        during_campaign: TTL,
        during_renewal: Duration::ZERO,
        renewals: Arc::clone(&renewals),
    };
    let e = build(driver, "elect-slept-in-campaign", TTL);
    let elected = timeout(WAIT, e.campaign()).await.expect("returns");
    assert!(
        matches!(elected, Err(Error::TermGone)),
        "a grant whose deadline passed while the machine slept must be given up: {elected:?}"
    );
    assert!(!e.status().is_leader());
    assert_eq!(renewals.load(Ordering::SeqCst), 0, "and not renewed");
}

/// A stale grant's renewal during which the machine slept is not taken either: its
/// confirmation may have been sent after the old deadline really passed.
#[tokio::test(start_paused = true)]
async fn elect_refuses_a_renewal_the_machine_slept_through() {
    crate::clock::isolate_suspensions();
    let renewals = Arc::new(AtomicU32::new(0));
    let driver = RenewsAfterSleep {
        during_campaign: Duration::ZERO,
        during_renewal: TTL / 2,
        renewals: Arc::clone(&renewals),
    };
    let e = build(driver, "elect-slept-in-renewal", TTL);
    let elected = timeout(WAIT, e.campaign()).await.expect("returns");
    assert_eq!(
        renewals.load(Ordering::SeqCst),
        1,
        "the stale grant was renewed"
    );
    assert!(
        matches!(elected, Err(Error::TermGone)),
        "a renewal answered after a suspension must not elect: {elected:?}"
    );
    assert!(!e.status().is_leader());
}
