//! State-machine tests on `MemoryDriver`, on Tokio's paused clock unless said otherwise.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::{Instant, sleep};

use crate::testing::conformance::spawn_run;
use crate::testing::{MemoryDriver, MemoryStore};
use crate::{Config, Driver, Election, Error, Event, LossReason, Status};

const TTL: Duration = Duration::from_secs(3);

fn election(driver: &MemoryDriver, name: &str) -> Election {
    Election::builder(driver.clone(), name)
        .ttl(TTL)
        .build()
        .expect("valid settings")
}

#[test]
fn driver_and_handles_are_send_sync_and_dyn_compatible() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<dyn Driver>>();
    assert_send_sync::<Election>();
    assert_send_sync::<Status>();
    assert_send_sync::<crate::Term>();
    let _: Arc<dyn Driver> = Arc::new(MemoryDriver::new());
}

/// A process paused past its deadline sees `false` before any of its tasks runs again: the
/// runtime is not driven at all while the thread "pauses", so only the check inside
/// `is_leader()` can notice. The wall-clock sleep here is the fault being simulated.
#[test]
fn is_leader_checks_the_deadline_itself_after_a_pause() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let driver = MemoryDriver::new();
    let ttl = Duration::from_millis(100);
    let (status, term) = runtime.block_on(async {
        let e = Election::builder(driver.clone(), "paused")
            .ttl(ttl)
            .build()
            .expect("valid");
        let term = e.campaign().await.expect("elected");
        std::mem::forget(e); // keep the candidacy; nothing resigns it
        (term.clone(), term)
    });
    let _ = status;
    assert!(term.is_valid());
    // No task of `runtime` runs from here on.
    std::thread::sleep(ttl + Duration::from_millis(20));
    assert!(
        !term.is_valid(),
        "the deadline check must not depend on a task"
    );
    assert!(std::time::Instant::now() > term.deadline());
}

#[tokio::test(start_paused = true)]
async fn status_is_false_by_the_deadline_when_renewals_fail() {
    let driver = MemoryDriver::new();
    let e = election(&driver, "outage");
    let mut events = e.subscribe();
    let elected_at = Instant::now();
    let term = e.campaign().await.expect("elected");
    assert_eq!(
        events.next().await,
        Some(Event::Elected { fencing_token: 1 })
    );
    let deadline = term.deadline();
    assert!(deadline <= (elected_at + TTL).into_std());
    assert!(
        deadline >= (elected_at + TTL - TTL / 20).into_std(),
        "margin is small"
    );

    driver.set_connected(false);
    sleep(TTL).await;
    assert!(!e.status().is_leader());
    assert!(term.cancellation_token().is_cancelled());
    assert_eq!(
        events.next().await,
        Some(Event::Lost {
            fencing_token: 1,
            reason: LossReason::Expired
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_deleted_behind_the_leaders_back_ends_the_term_at_the_next_renewal() {
    let store = MemoryStore::new();
    let driver = store.driver();
    let e = election(&driver, "revoked");
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    events.next().await;
    store.revoke("revoked");
    tokio::time::timeout(TTL / 2, term.ended())
        .await
        .expect("the term ends at the next renewal, a third of the TTL later");
    assert_eq!(
        events.next().await,
        Some(Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        })
    );
}

#[tokio::test(start_paused = true)]
async fn renewals_happen_every_third_of_the_ttl() {
    let driver = MemoryDriver::new();
    let e = election(&driver, "cadence");
    let term = e.campaign().await.expect("elected");
    let first = term.deadline();
    sleep(TTL / 3 + Duration::from_millis(10)).await;
    let second = term.deadline();
    assert!(second > first, "renewed after a third of the TTL");
    let moved = second - first;
    assert!(moved >= TTL / 3 && moved < TTL / 3 + Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn a_failed_resign_is_reported_steps_down_and_can_be_retried() {
    let driver = MemoryDriver::new();
    let e = election(&driver, "failed-resign");
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    events.next().await;
    driver.set_connected(false);
    let err = e.resign().await.expect_err("the store is unreachable");
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(
        !e.status().is_leader(),
        "stepped down although the call failed"
    );
    assert_eq!(
        events.next().await,
        Some(Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::ResignFailed
        })
    );
    driver.set_connected(true);
    assert!(
        driver
            .leader("failed-resign")
            .await
            .expect("reachable")
            .is_some(),
        "the store still holds the key"
    );
    e.resign().await.expect("the retry deletes it");
    assert_eq!(
        driver.leader("failed-resign").await.expect("reachable"),
        None
    );
    assert!(matches!(e.resign().await, Err(Error::NotALeader)));
}

#[tokio::test(start_paused = true)]
async fn campaign_while_leading_returns_the_held_term() {
    let driver = MemoryDriver::new();
    let e = election(&driver, "twice");
    let first = e.campaign().await.expect("elected");
    let second = e.campaign().await.expect("still elected");
    assert_eq!(first.fencing_token(), second.fencing_token());
    assert_eq!(
        e.term().map(|t| t.fencing_token()),
        Some(first.fencing_token())
    );
}

#[tokio::test(start_paused = true)]
async fn run_campaigns_again_with_backoff_after_an_outage() {
    let store = MemoryStore::new();
    let driver = store.driver();
    let e = Election::builder(driver.clone(), "outage-run")
        .ttl(TTL)
        .retry(Duration::from_millis(100), Duration::from_secs(2))
        .build()
        .expect("valid");
    let mut events = e.subscribe();
    let stop = crate::CancellationToken::new();
    let run = spawn_run(&e, &stop);
    assert!(matches!(events.next().await, Some(Event::Elected { .. })));
    store.set_available(false);
    assert!(matches!(
        events.next().await,
        Some(Event::Lost {
            reason: LossReason::Expired,
            ..
        })
    ));
    // Many campaign attempts fail meanwhile; the backoff keeps them few.
    sleep(Duration::from_secs(10)).await;
    store.set_available(true);
    let back = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("elected again once the store is back");
    assert!(matches!(back, Some(Event::Elected { fencing_token: 2 })));
    stop.cancel();
    run.await.expect("no panic").expect("clean shutdown");
    assert!(matches!(
        events.next().await,
        Some(Event::Resigned { fencing_token: 2 })
    ));
}

#[tokio::test(start_paused = true)]
async fn builder_takes_everything_from_config() {
    let config: Config = serde_json::from_str(
        r#"{"name":"from-config","value":"10.0.0.7:8080","ttl":"4s","retryMin":"1s","retryMax":"3s"}"#,
    )
    .expect("valid config");
    let driver = MemoryDriver::new();
    let e = Election::builder(driver.clone(), "ignored")
        .config(&config)
        .build()
        .expect("valid");
    assert_eq!(e.name(), "from-config");
    assert_eq!(e.value(), b"10.0.0.7:8080");
    assert_eq!(e.ttl(), Duration::from_secs(4));
    e.campaign().await.expect("elected");
    let info = driver
        .leader("from-config")
        .await
        .expect("reachable")
        .expect("leader");
    assert_eq!(info.value_lossy(), "10.0.0.7:8080");
}

#[test]
fn candidate_ids_are_unique_and_carry_host_and_pid() {
    let driver = MemoryDriver::new();
    let a = election(&driver, "ids");
    let b = election(&driver, "ids");
    assert_ne!(a.id(), b.id());
    assert!(a.id().contains(&format!("-{}-", std::process::id())));
    assert_eq!(a.value(), a.id().as_bytes(), "the value defaults to the id");
}

#[test]
fn dropping_outside_a_runtime_steps_down_locally() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let driver = MemoryDriver::new();
    let e = election(&driver, "no-runtime");
    let status = e.status();
    runtime.block_on(async {
        e.campaign().await.expect("elected");
    });
    assert!(status.is_leader());
    drop(e);
    assert!(!status.is_leader());
}

#[tokio::test(start_paused = true)]
async fn a_follower_resigning_while_its_run_loop_waits_gets_not_a_leader_at_once() {
    let store = MemoryStore::new();
    let leader = election(&store.driver(), "busy");
    leader.campaign().await.expect("elected");
    let follower = election(&store.driver(), "busy");
    let stop = crate::CancellationToken::new();
    let run = spawn_run(&follower, &stop);
    sleep(Duration::from_millis(100)).await;
    let answer = tokio::time::timeout(Duration::from_millis(10), follower.resign())
        .await
        .expect("answered without waiting for the campaign");
    assert!(matches!(answer, Err(Error::NotALeader)));
    stop.cancel();
    run.await.expect("no panic").expect("clean shutdown");
    assert_eq!(
        store
            .driver()
            .leader("busy")
            .await
            .expect("reachable")
            .map(|l| l.id),
        Some(leader.id().to_owned()),
        "the follower's shutdown left the leader alone"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_hook_sees_every_deadline_before_it_is_used() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let e = Election::builder(MemoryDriver::new(), "hooked")
        .ttl(TTL)
        .on_deadline(move |token, deadline| {
            log.lock().expect("not poisoned").push((token, deadline));
        })
        .build()
        .expect("valid settings");
    let term = e.campaign().await.expect("elected");
    let first = term.deadline();
    assert_eq!(*seen.lock().expect("not poisoned"), vec![(1, first)]);
    sleep(TTL / 3 + Duration::from_millis(10)).await;
    let second = term.deadline();
    assert!(second > first, "renewed");
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        vec![(1, first), (1, second)],
        "each deadline the term used, in order"
    );
}

/// The `leader` command's "withdraw and exit": dropping a waiting campaign, then resign(),
/// returns only once the dropped campaign's place in line is gone (resign() leaves a
/// campaign still in line alone, but not one that is being withdrawn).
#[tokio::test(start_paused = true)]
async fn resign_after_dropping_a_waiting_campaign_waits_for_its_withdrawal() {
    let store = MemoryStore::new();
    let a = election(&store.driver(), "dropped-then-resign");
    let b = election(&store.driver(), "dropped-then-resign");
    a.campaign().await.expect("a leads");
    let waiting = b.campaign();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), waiting)
            .await
            .is_err(),
        "b waits in line"
    );
    // The timeout dropped b's campaign; resign at once, before its task could run.
    let resigned = b.resign().await;
    assert!(
        matches!(resigned, Ok(()) | Err(Error::NotALeader)),
        "{resigned:?}"
    );
    let line = a.candidates().await.expect("candidates()");
    assert_eq!(line.len(), 1, "b's place is gone: {line:?}");
}

/// The retry of a failed resignation deletes that term by its token (never "whatever the
/// candidate has", which needs a read first), and `ended_at()` records the step down.
#[tokio::test(start_paused = true)]
async fn a_retried_resignation_deletes_by_token_and_ended_at_is_set() {
    #[derive(Clone)]
    struct Recording(MemoryDriver, Arc<std::sync::Mutex<Vec<Option<u64>>>>);
    #[async_trait::async_trait]
    impl Driver for Recording {
        async fn campaign(&self, c: &crate::Candidate) -> crate::Result<crate::Grant> {
            self.0.campaign(c).await
        }
        async fn renew(
            &self,
            c: &crate::Candidate,
            g: &crate::Grant,
        ) -> crate::Result<crate::Grant> {
            self.0.renew(c, g).await
        }
        async fn resign(&self, c: &crate::Candidate, token: Option<u64>) -> crate::Result<()> {
            self.1.lock().expect("not poisoned").push(token);
            self.0.resign(c, token).await
        }
        async fn leader(&self, e: &str) -> crate::Result<Option<crate::LeaderInfo>> {
            self.0.leader(e).await
        }
        fn observe(
            &self,
            e: &str,
        ) -> futures::stream::BoxStream<'static, crate::Result<Option<crate::LeaderInfo>>> {
            self.0.observe(e)
        }
    }
    let memory = MemoryDriver::new();
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let e = Election::builder(Recording(memory.clone(), Arc::clone(&calls)), "by-token")
        .ttl(TTL)
        .build()
        .expect("valid");
    let term = e.campaign().await.expect("elected");
    assert_eq!(term.ended_at(), None);
    memory.set_connected(false);
    assert!(e.resign().await.is_err(), "unreachable");
    assert!(term.ended_at().is_some(), "stepped down");
    memory.set_connected(true);
    e.resign().await.expect("the retry deletes it");
    let token = Some(term.fencing_token());
    // The call that failed, the retry, and maybe the background withdrawer's: all by token.
    let calls = calls.lock().expect("not poisoned").clone();
    assert!(calls.len() >= 2, "{calls:?}");
    assert!(calls.iter().all(|call| *call == token), "{calls:?}");
}
