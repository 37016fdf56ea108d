//! `Election::lead` on `MemoryDriver` and Tokio's paused clock: the work stops before the
//! next leader is elected, at shutdown and after a loss; panics, early returns, and work
//! that ignores its token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::testing::conformance::{next_event, wait_until, within};
use crate::testing::{MemoryDriver, MemoryStore};
use crate::{Election, Event, LossReason, Status, Term};

const TTL: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(30);

fn election(driver: &MemoryDriver, name: &str) -> Election {
    Election::builder(driver.clone(), name)
        .ttl(TTL)
        .safety_margin(MARGIN)
        .build()
        .expect("valid settings")
}

/// What happened, in order, with the (paused) clock's time.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, Instant)>>>);

impl Log {
    fn push(&self, what: impl Into<String>) {
        self.0
            .lock()
            .expect("log lock")
            .push((what.into(), Instant::now()));
    }

    fn entries(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("log lock")
            .iter()
            .map(|(what, _)| what.clone())
            .collect()
    }

    fn at(&self, what: &str) -> Option<Instant> {
        self.0
            .lock()
            .expect("log lock")
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, at)| *at)
    }
}

/// Runs `election.lead` in a task until `stop` is cancelled.
fn spawn_lead<W, Fut>(
    election: &Election,
    stop: &CancellationToken,
    work: W,
) -> JoinHandle<crate::Result<()>>
where
    W: FnMut(Term) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (election, stop) = (election.clone(), stop.clone());
    tokio::spawn(async move { election.lead(stop.cancelled_owned(), work).await })
}

/// A work that logs when it starts, when it returns (`takes` after its token is cancelled),
/// and when it is gone (returned or aborted); at each step it checks that `other` does not
/// lead.
fn polite_work(
    who: &'static str,
    log: &Log,
    takes: Duration,
    other: Option<Status>,
) -> impl FnMut(Term) -> futures::future::BoxFuture<'static, ()> + Send + use<> {
    let log = log.clone();
    move |term: Term| {
        let log = log.clone();
        let other = other.clone();
        Box::pin(async move {
            let _gone = DropClock(log.clone(), format!("{who} gone"));
            log.push(format!("{who} started {}", term.fencing_token()));
            let stop = term.cancellation_token();
            loop {
                if other.as_ref().is_some_and(Status::is_leader) {
                    log.push(format!("{who} overlapped"));
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = sleep(Duration::from_millis(10)) => {}
                }
            }
            sleep(takes).await;
            if other.as_ref().is_some_and(Status::is_leader) {
                log.push(format!("{who} overlapped"));
            }
            log.push(format!("{who} stopped {}", term.fencing_token()));
        })
    }
}

/// Logs when `election`'s events say it was elected.
fn log_elections(who: &'static str, election: &Election, log: &Log) -> JoinHandle<()> {
    let mut events = election.subscribe();
    let log = log.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Event::Elected { fencing_token } = event {
                log.push(format!("{who} elected {fencing_token}"));
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_the_work_stops_before_the_resignation_and_the_next_leader() {
    let store = MemoryStore::new();
    let (a, b) = (
        election(&store.driver(), "lead-shutdown"),
        election(&store.driver(), "lead-shutdown"),
    );
    let log = Log::default();
    let mut a_events = a.subscribe();
    let a_stop = CancellationToken::new();
    // A takes a second to stop, well within its deadline.
    let a_lead = spawn_lead(
        &a,
        &a_stop,
        polite_work("a", &log, Duration::from_secs(1), Some(b.status())),
    );
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    let b_elected = log_elections("b", &b, &log);
    let b_stop = CancellationToken::new();
    let b_lead = spawn_lead(&b, &b_stop, polite_work("b", &log, Duration::ZERO, None));
    sleep(TTL * 2).await;
    assert!(!b.status().is_leader(), "b waits in line");

    a_stop.cancel();
    // A still leads while its work stops: nobody else can be elected meanwhile.
    sleep(Duration::from_millis(500)).await;
    assert!(a.status().is_leader(), "a leads until its work has stopped");
    within("a's lead returns", WAIT, a_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    assert_eq!(
        next_event("a elected", WAIT, &mut a_events).await,
        Event::Elected { fencing_token: 1 }
    );
    assert_eq!(
        next_event("a resigned", WAIT, &mut a_events).await,
        Event::Resigned { fencing_token: 1 }
    );
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    wait_until("b's work started", WAIT, || log.at("b started 2").is_some()).await;
    let entries = log.entries();
    assert_eq!(
        entries,
        [
            "a started 1",
            "a stopped 1",
            "a gone",
            "b elected 2",
            "b started 2"
        ],
        "the whole log"
    );
    b_stop.cancel();
    within("b's lead returns", WAIT, b_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    drop((a, b));
    within("b's events end", WAIT, b_elected)
        .await
        .expect("task");
}

#[tokio::test(start_paused = true)]
async fn after_a_loss_the_work_stops_before_the_store_elects_another() {
    let store = MemoryStore::new();
    let a_driver = store.driver();
    let (a, b) = (
        election(&a_driver, "lead-loss"),
        election(&store.driver(), "lead-loss"),
    );
    let log = Log::default();
    let mut a_events = a.subscribe();
    let a_stop = CancellationToken::new();
    // A's term ends at its deadline, where its work is cancelled and aborted at once (it
    // would take a while to return): it is gone before the store can elect B.
    let a_lead = spawn_lead(
        &a,
        &a_stop,
        polite_work("a", &log, MARGIN / 3, Some(b.status())),
    );
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    let _b_elected = log_elections("b", &b, &log);
    let b_stop = CancellationToken::new();
    let b_lead = spawn_lead(&b, &b_stop, polite_work("b", &log, Duration::ZERO, None));

    // A is cut off from the store: its term ends at its deadline, and the store elects B
    // when A's lease expires, a safety margin later.
    a_driver.set_connected(false);
    assert_eq!(
        next_event("a elected", WAIT, &mut a_events).await,
        Event::Elected { fencing_token: 1 }
    );
    assert_eq!(
        next_event("a lost", WAIT, &mut a_events).await,
        Event::Lost {
            fencing_token: 1,
            reason: LossReason::Expired
        }
    );
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    let entries = log.entries();
    assert_eq!(
        entries[..3],
        ["a started 1", "a gone", "b elected 2"],
        "the log: {entries:?}"
    );
    assert!(!entries.contains(&"a overlapped".to_owned()), "{entries:?}");
    a_driver.set_connected(true);
    a_stop.cancel();
    b_stop.cancel();
    within("a's lead returns", WAIT, a_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    within("b's lead returns", WAIT, b_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

#[tokio::test(start_paused = true)]
async fn after_a_loss_lead_waits_for_the_work_before_campaigning_again() {
    let store = MemoryStore::new();
    let a = election(&store.driver(), "lead-waits");
    let log = Log::default();
    let _elected = log_elections("a", &a, &log);
    let stop = CancellationToken::new();
    // Slower to stop than the backoff delay, faster than the deadline.
    let lead = spawn_lead(
        &a,
        &stop,
        polite_work("a", &log, Duration::from_millis(900), None),
    );
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    store.revoke("lead-waits");
    wait_until("a leads again", WAIT, || log.at("a started 2").is_some()).await;
    assert_eq!(
        log.entries(),
        [
            "a elected 1",
            "a started 1",
            "a stopped 1",
            "a gone",
            "a elected 2",
            "a started 2"
        ]
    );
    stop.cancel();
    within("lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

/// Records when it is dropped: the instant a task holding it was aborted.
struct DropClock(Log, String);

impl Drop for DropClock {
    fn drop(&mut self) {
        self.0.push(std::mem::take(&mut self.1));
    }
}

/// A work that never looks at its token.
fn stubborn_work(
    log: &Log,
) -> impl FnMut(Term) -> futures::future::BoxFuture<'static, ()> + Send + use<> {
    let log = log.clone();
    move |term: Term| {
        let log = log.clone();
        Box::pin(async move {
            let _clock = DropClock(log.clone(), "dropped".to_owned());
            log.push(format!("started {}", term.fencing_token()));
            std::future::pending::<()>().await;
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_work_that_ignores_its_token_is_aborted_at_the_deadline_at_shutdown() {
    let store = MemoryStore::new();
    let (a, b) = (
        election(&store.driver(), "lead-stubborn"),
        election(&store.driver(), "lead-stubborn"),
    );
    let log = Log::default();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, stubborn_work(&log));
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    let _b_elected = log_elections("b", &b, &log);
    let b_stop = CancellationToken::new();
    let _b_run = crate::testing::conformance::spawn_run(&b, &b_stop);
    sleep(TTL / 2).await;
    let deadline = a.term().expect("a leads").deadline();
    stop.cancel();
    within("a's lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    let dropped = log.at("dropped").expect("the work was dropped");
    assert_eq!(
        dropped.into_std(),
        deadline,
        "aborted at the deadline, not later"
    );
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    assert_eq!(log.entries(), ["started 1", "dropped", "b elected 2"]);
    b_stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_work_that_ignores_its_token_is_aborted_at_the_deadline_after_a_loss() {
    let store = MemoryStore::new();
    let a_driver = store.driver();
    let (a, b) = (
        election(&a_driver, "lead-stubborn-loss"),
        election(&store.driver(), "lead-stubborn-loss"),
    );
    let log = Log::default();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, stubborn_work(&log));
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    let term = a.term().expect("a leads");
    let _b_elected = log_elections("b", &b, &log);
    let b_stop = CancellationToken::new();
    let _b_run = crate::testing::conformance::spawn_run(&b, &b_stop);
    a_driver.set_connected(false);
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    let dropped = log.at("dropped").expect("the work was dropped");
    assert_eq!(
        dropped.into_std(),
        term.deadline(),
        "aborted at the deadline, not later"
    );
    assert_eq!(log.entries(), ["started 1", "dropped", "b elected 2"]);
    a_driver.set_connected(true);
    stop.cancel();
    b_stop.cancel();
    within("a's lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_work_ends_the_term_and_lead_campaigns_again() {
    let store = MemoryStore::new();
    let a = election(&store.driver(), "lead-panic");
    let mut events = a.subscribe();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let lead = spawn_lead(&a, &stop, |term: Term| async move {
        if term.fencing_token() == 1 {
            panic!("the work fails");
        }
        term.cancellation_token().cancelled().await;
    });
    assert_eq!(
        next_event("elected", WAIT, &mut events).await,
        Event::Elected { fencing_token: 1 }
    );
    assert_eq!(
        next_event("resigned", WAIT, &mut events).await,
        Event::Resigned { fencing_token: 1 }
    );
    let resigned = Instant::now();
    assert_eq!(
        next_event("elected again", WAIT, &mut events).await,
        Event::Elected { fencing_token: 2 }
    );
    // After the backoff delay (at least half the shortest retry delay), not at once.
    assert!(Instant::now() - resigned >= Duration::from_millis(100));
    assert!(resigned - started < Duration::from_millis(100));
    assert!(!lead.is_finished(), "lead goes on");
    stop.cancel();
    within("lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    assert_eq!(
        next_event("resigned", WAIT, &mut events).await,
        Event::Resigned { fencing_token: 2 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_work_that_returns_resigns_its_term_and_lead_campaigns_again() {
    let store = MemoryStore::new();
    let a = election(&store.driver(), "lead-returns");
    let b = election(&store.driver(), "lead-returns");
    let mut events = a.subscribe();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, |_term: Term| async move {
        sleep(Duration::from_secs(1)).await;
    });
    assert_eq!(
        next_event("elected", WAIT, &mut events).await,
        Event::Elected { fencing_token: 1 }
    );
    // B queues behind A, and gets the next term once A's work returned.
    let b_stop = CancellationToken::new();
    let b_run = crate::testing::conformance::spawn_run(&b, &b_stop);
    assert_eq!(
        next_event("resigned", WAIT, &mut events).await,
        Event::Resigned { fencing_token: 1 }
    );
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    assert_eq!(b.status().fencing_token(), Some(2));
    b_stop.cancel();
    within("b's run returns", WAIT, b_run)
        .await
        .expect("task")
        .expect("clean shutdown");
    // Then A leads again.
    assert_eq!(
        next_event("elected again", WAIT, &mut events).await,
        Event::Elected { fencing_token: 3 }
    );
    stop.cancel();
    within("lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

#[tokio::test(start_paused = true)]
async fn dropping_lead_aborts_the_work() {
    let store = MemoryStore::new();
    let a = election(&store.driver(), "lead-dropped");
    let log = Log::default();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, stubborn_work(&log));
    wait_until("the work runs", WAIT, || log.at("started 1").is_some()).await;
    lead.abort();
    wait_until("the work is dropped", WAIT, || log.at("dropped").is_some()).await;
}

/// Issue 20: after the machine was suspended past the deadline (the monotonic clock, and
/// Tokio's timers with it, stood still meanwhile), the term ends and the work is cancelled
/// and aborted as soon as the process runs again, not at the next timer.
#[tokio::test(start_paused = true)]
async fn after_a_suspension_past_the_deadline_the_work_is_aborted_at_once() {
    let store = MemoryStore::new();
    let a = election(&store.driver(), "lead-suspended");
    let mut events = a.subscribe();
    let log = Log::default();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, stubborn_work(&log));
    let elected = next_event("a's election", WAIT, &mut events).await;
    let fencing_token = match elected {
        Event::Elected { fencing_token } => fencing_token,
        other => panic!("{other:?}"),
    };
    wait_until("the work runs", WAIT, || log.at("started 1").is_some()).await;
    let term = a.term().expect("a leads");
    let resumed_at = Instant::now();
    crate::testing::simulate_suspension(TTL);
    assert!(!a.status().is_leader(), "is_leader() counts the suspension");
    assert_eq!(
        next_event("a's loss", Duration::from_millis(5), &mut events).await,
        Event::Lost {
            fencing_token,
            reason: LossReason::Expired
        }
    );
    assert!(term.cancellation_token().is_cancelled());
    wait_until("the work is gone", Duration::from_millis(20), || {
        log.at("dropped").is_some()
    })
    .await;
    let dropped = log.at("dropped").expect("dropped");
    assert!(
        dropped - resumed_at < Duration::from_millis(20),
        "aborted {:?} after the resume",
        dropped - resumed_at
    );
    stop.cancel();
    within("lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

/// A resign() or hand_over() of the term lead() holds (a rolling deploy's handover) stops
/// the work before the store is asked: the nominee starts after the old work is gone.
#[tokio::test(start_paused = true)]
async fn a_handover_stops_the_work_before_the_nominee_is_elected() {
    for handover in [true, false] {
        let store = MemoryStore::new();
        let name = if handover {
            "lead-hand-over"
        } else {
            "lead-resign"
        };
        let (a, b) = (
            election(&store.driver(), name),
            election(&store.driver(), name),
        );
        let log = Log::default();
        let mut a_events = a.subscribe();
        let a_stop = CancellationToken::new();
        let a_lead = spawn_lead(
            &a,
            &a_stop,
            polite_work("a", &log, Duration::from_secs(1), Some(b.status())),
        );
        wait_until("a leads", WAIT, || a.status().is_leader()).await;
        let _b_elected = log_elections("b", &b, &log);
        let b_waits = crate::testing::conformance::spawn_campaign(&b);
        wait_until("b waits", WAIT, || {
            futures::FutureExt::now_or_never(a.candidates())
                .and_then(Result::ok)
                .is_some_and(|line| line.len() == 2)
        })
        .await;
        if handover {
            within("hand_over", WAIT, a.hand_over(b.id()))
                .await
                .expect("hand over to b");
        } else {
            within("resign", WAIT, a.resign()).await.expect("resign");
        }
        within("b's campaign", WAIT, b_waits)
            .await
            .expect("task")
            .expect("b is elected");
        assert_eq!(
            log.entries(),
            ["a started 1", "a stopped 1", "a gone", "b elected 2"],
            "a's work stopped before b was elected (handover: {handover})"
        );
        assert_eq!(
            next_event("a elected", WAIT, &mut a_events).await,
            Event::Elected { fencing_token: 1 }
        );
        assert_eq!(
            next_event("a's end", WAIT, &mut a_events).await,
            Event::Resigned { fencing_token: 1 }
        );
        // lead() goes on: it campaigns again, behind b.
        assert!(!a_lead.is_finished());
        a_stop.cancel();
        within("a's lead returns", WAIT, a_lead)
            .await
            .expect("task")
            .expect("clean shutdown");
        b.resign().await.expect("resign b");
    }
}

/// At shutdown the work is aborted by the deadline it had when asked to stop, counting a
/// suspension that came before: a machine asleep for a while before the shutdown leaves
/// the work that much less time (renewals failing, so the deadline does not move).
#[tokio::test(start_paused = true)]
async fn at_shutdown_a_suspension_before_it_shortens_the_works_time() {
    let driver = MemoryDriver::new();
    let a = election(&driver, "lead-suspended-before");
    let log = Log::default();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, stubborn_work(&log));
    wait_until("the work runs", WAIT, || log.at("started 1").is_some()).await;
    let deadline = Instant::from_std(a.term().expect("a leads").deadline());
    driver.set_connected(false);
    let suspension = TTL / 3;
    crate::testing::simulate_suspension(suspension);
    stop.cancel();
    // The store is unreachable: the final resignation fails, which lead() returns.
    let _ = within("lead returns", WAIT, lead).await.expect("task");
    let dropped = log.at("dropped").expect("the work was dropped");
    let due = deadline - suspension;
    assert!(
        dropped <= due + Duration::from_millis(5),
        "aborted {:?} after its deadline (counting the suspension)",
        dropped - due
    );
}

/// At shutdown, a suspension that carries the machine past the deadline the work was given
/// (while renewals moved the term's own deadline further) aborts the work at once.
#[tokio::test(start_paused = true)]
async fn at_shutdown_a_suspension_past_the_works_deadline_aborts_it_at_once() {
    let driver = MemoryDriver::new();
    let a = election(&driver, "lead-suspended-during");
    let log = Log::default();
    let stop = CancellationToken::new();
    let lead = spawn_lead(&a, &stop, stubborn_work(&log));
    wait_until("the work runs", WAIT, || log.at("started 1").is_some()).await;
    let given = Instant::from_std(a.term().expect("a leads").deadline());
    stop.cancel();
    // A renewal moves the term's deadline past the one the work was given.
    sleep(TTL / 3 + Duration::from_millis(100)).await;
    let moved = Instant::from_std(a.term().expect("a still leads").deadline());
    assert!(moved > given, "renewed");
    let now = Instant::now();
    // Asleep long enough to pass the work's deadline, not the term's.
    let suspension = (given - now) + (moved - given) / 2;
    crate::testing::simulate_suspension(suspension);
    let resumed = Instant::now();
    within("lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    let dropped = log.at("dropped").expect("the work was dropped");
    assert!(
        dropped - resumed < Duration::from_millis(20),
        "aborted {:?} after the resume",
        dropped - resumed
    );
}
