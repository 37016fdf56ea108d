//! The conformance suite: the behaviour every [`Driver`](crate::Driver) must show, checked
//! through the public [`Election`] API against a [`Harness`].
//!
//! Each check panics with a message on failure. Run them all with
//! [`conformance_tests!`](crate::conformance_tests), which makes one test per check.
//! Every check uses election names of its own, so checks may share a store and run in
//! parallel. Waits are "until a condition holds, or fail at a deadline".

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::Harness;
use crate::{Election, Error, Event, LeaderInfo, LossReason, Term};

/// Generates one `async fn` test per conformance check. Pass the path of an `async fn`
/// that returns a fresh [`Harness`], then the test attribute(s) to put on each test, as in
/// the [module example](crate::testing).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:path; $(#[$attr:meta])*) => {
        $crate::__conformance_test!($harness; one_leader_among_many; $(#[$attr])*);
        $crate::__conformance_test!($harness; campaign_waits_while_another_leads; $(#[$attr])*);
        $crate::__conformance_test!($harness; resign_hands_over_promptly; $(#[$attr])*);
        $crate::__conformance_test!($harness; followers_get_not_a_leader; $(#[$attr])*);
        $crate::__conformance_test!($harness; fencing_tokens_strictly_increase; $(#[$attr])*);
        $crate::__conformance_test!($harness; renewal_keeps_the_term; $(#[$attr])*);
        $crate::__conformance_test!($harness; partitioned_leader_steps_down_before_takeover; $(#[$attr])*);
        $crate::__conformance_test!($harness; events_arrive_in_order; $(#[$attr])*);
        $crate::__conformance_test!($harness; leader_and_observe_report_value_and_no_leader; $(#[$attr])*);
        $crate::__conformance_test!($harness; dropped_campaign_leaves_nothing_behind; $(#[$attr])*);
        $crate::__conformance_test!($harness; dropping_the_election_resigns; $(#[$attr])*);
        $crate::__conformance_test!($harness; elections_on_one_driver_are_independent; $(#[$attr])*);
        $crate::__conformance_test!($harness; candidates_sharing_a_driver_are_distinct; $(#[$attr])*);
        $crate::__conformance_test!($harness; build_rejects_nonsense; $(#[$attr])*);
        $crate::__conformance_test!($harness; resign_deletes_only_the_given_term; $(#[$attr])*);
        $crate::__conformance_test!($harness; resign_while_waiting_changes_nothing; $(#[$attr])*);
        $crate::__conformance_test!($harness; withdraw_leaves_the_line; $(#[$attr])*);
        $crate::__conformance_test!($harness; candidates_lists_the_leader_then_the_line; $(#[$attr])*);
        $crate::__conformance_test!($harness; hand_over_elects_the_nominee; $(#[$attr])*);
        $crate::__conformance_test!($harness; hand_over_to_a_stranger_changes_nothing; $(#[$attr])*);
        $crate::__conformance_test!($harness; proclaim_changes_the_value_not_the_term; $(#[$attr])*);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test {
    ($harness:path; $name:ident; $(#[$attr:meta])*) => {
        $(#[$attr])*
        async fn $name() {
            let harness = $harness().await;
            $crate::testing::conformance::$name(&harness).await;
        }
    };
}

/// A name no other check (or run) uses.
fn unique(check: &str) -> String {
    format!("conformance-{check}-{:08x}", rand::random::<u32>())
}

fn election(driver: std::sync::Arc<dyn crate::Driver>, name: &str, ttl: Duration) -> Election {
    Election::builder(driver, name)
        .ttl(ttl)
        .retry(ttl / 10, ttl)
        .build()
        .expect("valid election settings")
}

fn election_with_value(
    driver: std::sync::Arc<dyn crate::Driver>,
    name: &str,
    ttl: Duration,
    value: &str,
) -> Election {
    Election::builder(driver, name)
        .ttl(ttl)
        .retry(ttl / 10, ttl)
        .value(value)
        .build()
        .expect("valid election settings")
}

/// Runs `election.run` in a task until `stop` is cancelled.
pub fn spawn_run(
    election: &Election,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<crate::Result<()>> {
    let (election, stop) = (election.clone(), stop.clone());
    tokio::spawn(async move { election.run(stop.cancelled_owned()).await })
}

/// Runs `election.campaign` in a task.
pub fn spawn_campaign(election: &Election) -> tokio::task::JoinHandle<crate::Result<Term>> {
    let election = election.clone();
    tokio::spawn(async move { election.campaign().await })
}

/// Polls `condition` every few milliseconds until it holds; panics after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `future`; panics with `what` if it takes longer than `limit`.
pub async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

async fn campaign(election: &Election, limit: Duration) -> Term {
    within("campaign", limit, election.campaign())
        .await
        .expect("campaign succeeds")
}

/// The next event of `events`; panics, naming `what`, if none comes within `limit`.
pub async fn next_event(what: &str, limit: Duration, events: &mut crate::EventStream) -> Event {
    within(what, limit, events.next())
        .await
        .unwrap_or_else(|| panic!("the event stream ended while waiting for {what}"))
}

/// Three candidates run for one election: exactly one leads, never more.
pub async fn one_leader_among_many(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("one-leader");
    let mut elections = Vec::new();
    for i in 0..3 {
        elections.push(election_with_value(
            h.driver().await,
            &name,
            ttl,
            &format!("candidate-{i}"),
        ));
    }
    let shutdown = CancellationToken::new();
    let mut runs = Vec::new();
    for e in &elections {
        runs.push(spawn_run(e, &shutdown));
    }
    let leaders = || elections.iter().filter(|e| e.status().is_leader()).count();
    wait_until("one candidate leads", ttl * 3, || leaders() == 1).await;
    // Hold for two TTLs, through several renewals: never two leaders.
    let start = Instant::now();
    while start.elapsed() < ttl * 2 {
        assert!(leaders() <= 1, "two leaders at the same instant");
        sleep(Duration::from_millis(5)).await;
    }
    wait_until("one candidate leads", ttl * 3, || leaders() == 1).await;
    let leader = elections
        .iter()
        .find(|e| e.status().is_leader())
        .expect("a leader");
    let info = elections[0]
        .leader()
        .await
        .expect("leader() succeeds")
        .expect("the store names a leader");
    assert_eq!(
        info.value,
        leader.value(),
        "leader() reports the leader's value"
    );
    assert_eq!(Some(info.fencing_token), leader.status().fencing_token());
    shutdown.cancel();
    for run in runs {
        run.await
            .expect("run task did not panic")
            .expect("run shuts down cleanly");
    }
    assert_eq!(leaders(), 0, "nobody leads after shutdown");
    let after = elections[0].leader().await.expect("leader() succeeds");
    assert_eq!(after, None, "run resigned on shutdown");
}

/// A second candidate's campaign does not finish while the first leads.
pub async fn campaign_waits_while_another_leads(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("waits");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let term = campaign(&a, ttl * 3).await;
    let waited = timeout(ttl * 2, b.campaign()).await;
    assert!(
        waited.is_err(),
        "b must not be elected while a leads and renews"
    );
    assert!(!b.status().is_leader());
    assert!(term.is_valid() && a.status().is_leader());
    a.resign().await.expect("resign");
}

/// After a resignation, a waiting candidate leads in well under a TTL.
pub async fn resign_hands_over_promptly(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("handover");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let a_term = campaign(&a, ttl * 3).await;
    let waiter = spawn_campaign(&b);
    // Give b time to enter the election, so that the handover is what is measured.
    sleep(ttl / 5).await;
    assert!(!waiter.is_finished(), "b waits while a leads");
    let resigned_at = Instant::now();
    a.resign().await.expect("resign succeeds");
    assert!(!a.status().is_leader(), "a steps down");
    let b_term = within("b's campaign", ttl * 3, waiter)
        .await
        .expect("campaign task")
        .expect("b is elected");
    let handover = resigned_at.elapsed();
    assert!(
        handover < ttl / 2,
        "handover took {handover:?}; it must not wait for the TTL ({ttl:?})"
    );
    assert!(b_term.fencing_token() > a_term.fencing_token());
    b.resign().await.expect("resign");
}

/// `resign` on a candidate that does not lead is `Error::NotALeader`.
pub async fn followers_get_not_a_leader(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("not-a-leader");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let err = b.resign().await.expect_err("never campaigned");
    assert!(matches!(err, Error::NotALeader), "{err:?}");
    assert_eq!(err.to_string(), "not a leader");
    let term = campaign(&a, ttl * 3).await;
    assert!(matches!(b.resign().await, Err(Error::NotALeader)));
    term.resign().await.expect("resign via the term");
    assert!(matches!(term.resign().await, Err(Error::NotALeader)));
    assert!(matches!(a.resign().await, Err(Error::NotALeader)));
}

/// Fencing tokens increase strictly across terms and candidates, including when one
/// candidate is elected twice in a row.
pub async fn fencing_tokens_strictly_increase(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("fencing");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let mut last = 0;
    for candidate in [&a, &b, &a, &a, &b] {
        let term = campaign(candidate, ttl * 3).await;
        assert!(
            term.fencing_token() > last,
            "token {} after {last}",
            term.fencing_token()
        );
        last = term.fencing_token();
        assert_eq!(candidate.status().fencing_token(), Some(last));
        candidate.resign().await.expect("resign");
    }
}

/// A leader that keeps renewing keeps its term, well past the TTL.
pub async fn renewal_keeps_the_term(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("renewal");
    let a = election(h.driver().await, &name, ttl);
    let mut events = a.subscribe();
    let term = campaign(&a, ttl * 3).await;
    let first_deadline = term.deadline();
    // The passing of time is what is tested here: three TTLs of renewals.
    sleep(ttl * 3).await;
    assert!(a.status().is_leader(), "still leads after 3 TTLs");
    assert!(term.is_valid());
    assert!(
        term.deadline() > first_deadline,
        "renewals move the deadline"
    );
    assert_eq!(a.status().fencing_token(), Some(term.fencing_token()));
    assert_eq!(
        next_event("the Elected event", ttl, &mut events).await,
        Event::Elected {
            fencing_token: term.fencing_token()
        }
    );
    a.resign().await.expect("resign");
    assert!(matches!(
        next_event("the Resigned event", ttl, &mut events).await,
        Event::Resigned { .. }
    ));
}

/// A leader cut off from the store stops believing it leads by its deadline, before
/// anyone else is elected; another takes over; `run` makes it campaign again once the
/// store is back.
pub async fn partitioned_leader_steps_down_before_takeover(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("partition");
    let (driver, fault) = h.faulty_driver().await;
    let a = election(driver, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let mut a_events = a.subscribe();
    let shutdown = CancellationToken::new();
    let a_run = spawn_run(&a, &shutdown);
    wait_until("a leads", ttl * 3, || a.status().is_leader()).await;
    let a_token = a.status().fencing_token().expect("a leads");
    assert_eq!(
        next_event("a's Elected event", ttl, &mut a_events).await,
        Event::Elected {
            fencing_token: a_token
        }
    );

    let a_term = a.term().expect("a holds a term");
    // Both statuses, polled every millisecond from the partition to the takeover.
    let (a_status, b_status) = (a.status(), b.status());
    let watching = CancellationToken::new();
    let overlaps = tokio::spawn({
        let watching = watching.clone();
        async move {
            let mut both = 0u32;
            while !watching.is_cancelled() {
                if a_status.is_leader() && b_status.is_leader() {
                    both += 1;
                }
                sleep(Duration::from_millis(1)).await;
            }
            both
        }
    });

    fault.partition().await;
    let b_campaign = spawn_campaign(&b);
    let lost = next_event("a's loss", ttl * 2, &mut a_events).await;
    assert!(
        matches!(lost, Event::Lost { fencing_token, reason: LossReason::Expired | LossReason::Gone } if fencing_token == a_token),
        "{lost:?}"
    );
    let b_term = within("b's takeover", ttl * 4, b_campaign)
        .await
        .expect("campaign task")
        .expect("b is elected");
    watching.cancel();
    let both = overlaps.await.expect("the poller did not panic");
    assert_eq!(both, 0, "a and b both said they led, {both} times");
    // Exactly, on the library's own instants: a's last instant of belief (its end, or its
    // final deadline if that came first) is not after b's first.
    let a_last = a_term
        .ended_at()
        .map_or(a_term.deadline(), |ended| ended.min(a_term.deadline()));
    assert!(
        a_last <= b_term.elected_at(),
        "a believed it led until {:?} after b was elected",
        a_last.duration_since(b_term.elected_at())
    );
    assert!(!a.status().is_leader(), "never two leaders");
    assert!(b_term.fencing_token() > a_token);

    // The store comes back; b hands over; a's run loop campaigns again and wins.
    fault.heal().await;
    b.resign().await.expect("b resigns");
    wait_until("a leads again after the partition heals", ttl * 6, || {
        a.status().is_leader()
    })
    .await;
    let again = a.status().fencing_token().expect("a leads");
    assert!(again > b_term.fencing_token());
    shutdown.cancel();
    a_run
        .await
        .expect("run task did not panic")
        .expect("run shuts down cleanly");
}

/// Events come in order, one per change, never coalesced, even when changes are quick.
pub async fn events_arrive_in_order(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("events");
    let a = election(h.driver().await, &name, ttl);
    let mut events = a.subscribe();
    let mut expected = Vec::new();
    for _ in 0..3 {
        let term = campaign(&a, ttl * 3).await;
        a.resign().await.expect("resign");
        expected.push(Event::Elected {
            fencing_token: term.fencing_token(),
        });
        expected.push(Event::Resigned {
            fencing_token: term.fencing_token(),
        });
    }
    let mut seen = Vec::new();
    for _ in 0..expected.len() {
        seen.push(next_event("the next event", ttl, &mut events).await);
    }
    assert_eq!(seen, expected);
    assert!(seen[0].is_leader() && !seen[1].is_leader());
}

/// `leader()` and `observe()` report the leader's value and token, and "no leader".
pub async fn leader_and_observe_report_value_and_no_leader(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("observe");
    let observer = election(h.driver().await, &name, ttl);
    let a = election_with_value(h.driver().await, &name, ttl, "10.0.0.7:8080");
    assert_eq!(observer.leader().await.expect("leader()"), None);
    let mut changes = observer.observe();
    let first = within("the first observation", ttl * 2, changes.next()).await;
    assert_eq!(first.expect("stream open").expect("no error"), None);

    let term = campaign(&a, ttl * 3).await;
    let expected = |info: &LeaderInfo| {
        info.value == b"10.0.0.7:8080" && info.fencing_token == term.fencing_token()
    };
    let seen = within("the new leader's observation", ttl * 2, changes.next())
        .await
        .expect("stream open")
        .expect("no error")
        .expect("a leader");
    assert!(expected(&seen), "{seen:?}");
    assert_eq!(seen.value_lossy(), "10.0.0.7:8080");
    let now = observer
        .leader()
        .await
        .expect("leader()")
        .expect("a leader");
    assert!(expected(&now), "{now:?}");

    a.resign().await.expect("resign");
    let gone = within("the \"no leader\" observation", ttl * 2, changes.next())
        .await
        .expect("stream open")
        .expect("no error");
    assert_eq!(gone, None);
    assert_eq!(observer.leader().await.expect("leader()"), None);
}

/// A campaign whose future is dropped leaves nothing in the store: the next candidate
/// takes over at once when the leader resigns, not a TTL later.
pub async fn dropped_campaign_leaves_nothing_behind(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("dropped");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let c = election(h.driver().await, &name, ttl);
    campaign(&a, ttl * 3).await;
    let gave_up = timeout(ttl / 4, b.campaign()).await;
    assert!(gave_up.is_err(), "b waits while a leads");
    let waiter = spawn_campaign(&c);
    sleep(ttl / 5).await;
    let resigned_at = Instant::now();
    a.resign().await.expect("resign");
    within("c's campaign", ttl * 3, waiter)
        .await
        .expect("campaign task")
        .expect("c is elected");
    let handover = resigned_at.elapsed();
    assert!(
        handover < ttl / 2,
        "c waited {handover:?}: the dropped campaign was left behind"
    );
    assert!(!b.status().is_leader());
    let info = a.leader().await.expect("leader()").expect("a leader");
    assert_eq!(info.value, c.value());
    c.resign().await.expect("resign");
}

/// `Driver::resign` with an earlier term's token (a resignation landing late, after the
/// same candidate began a new term) leaves the newer term alone; without a token it removes
/// what the candidate holds.
pub async fn resign_deletes_only_the_given_term(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("exact-resign");
    let driver = h.driver().await;
    let candidate = crate::Candidate::new(&name, unique("candidate"), "v", ttl * 5);
    let first = within("the first term", ttl * 3, driver.campaign(&candidate))
        .await
        .expect("first term");
    let second = within("the second term", ttl * 3, driver.campaign(&candidate))
        .await
        .expect("second term");
    assert!(
        second.fencing_token > first.fencing_token,
        "a new campaign of the same candidate is a new term: {} then {}",
        first.fencing_token,
        second.fencing_token
    );
    driver
        .resign(&candidate, Some(first.fencing_token))
        .await
        .expect("resign answered");
    let leader = driver.leader(&name).await.expect("leader()");
    assert_eq!(
        leader.map(|l| l.fencing_token),
        Some(second.fencing_token),
        "the late resignation deleted the newer term"
    );
    driver.resign(&candidate, None).await.expect("resign");
    assert_eq!(driver.leader(&name).await.expect("leader()"), None);
}

/// Dropping the last clone of a leading election resigns it in the background.
pub async fn dropping_the_election_resigns(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("drop");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let status = a.status();
    campaign(&a, ttl * 3).await;
    let waiter = spawn_campaign(&b);
    sleep(ttl / 5).await;
    let dropped_at = Instant::now();
    drop(a);
    within("b's campaign", ttl * 3, waiter)
        .await
        .expect("campaign task")
        .expect("b is elected");
    assert!(
        dropped_at.elapsed() < ttl / 2,
        "b waited {:?} for a dropped leader",
        dropped_at.elapsed()
    );
    assert!(!status.is_leader());
    b.resign().await.expect("resign");
}

/// Two elections on one driver do not affect each other.
pub async fn elections_on_one_driver_are_independent(h: &dyn Harness) {
    let ttl = h.ttl();
    let driver = h.driver().await;
    let (x_name, y_name) = (unique("independent-x"), unique("independent-y"));
    let x = election(driver.clone(), &x_name, ttl);
    let y = election(driver, &y_name, ttl);
    campaign(&x, ttl * 3).await;
    campaign(&y, ttl * 3).await;
    assert!(x.status().is_leader() && y.status().is_leader());
    x.resign().await.expect("resign x");
    assert!(!x.status().is_leader());
    assert!(y.status().is_leader(), "y is not affected by x");
    assert_eq!(x.leader().await.expect("leader()"), None);
    assert!(y.leader().await.expect("leader()").is_some());
    sleep(ttl).await;
    assert!(y.status().is_leader(), "y keeps renewing alone");
    y.resign().await.expect("resign y");
}

/// Two candidates of one election built on clones of one driver are two candidates.
pub async fn candidates_sharing_a_driver_are_distinct(h: &dyn Harness) {
    let ttl = h.ttl();
    let driver = h.driver().await;
    let name = unique("shared-driver");
    let a = election_with_value(driver.clone(), &name, ttl, "a");
    let b = election_with_value(driver, &name, ttl, "b");
    assert_ne!(a.id(), b.id());
    campaign(&a, ttl * 3).await;
    let waited = timeout(ttl / 2, b.campaign()).await;
    assert!(
        waited.is_err(),
        "b must wait for a although they share a driver"
    );
    assert!(matches!(b.resign().await, Err(Error::NotALeader)));
    let waiter = spawn_campaign(&b);
    sleep(ttl / 5).await;
    a.resign().await.expect("resign a");
    within("b's campaign", ttl * 3, waiter)
        .await
        .expect("campaign task")
        .expect("b is elected");
    let info = a.leader().await.expect("leader()").expect("a leader");
    assert_eq!(info.value, b"b");
    assert!(!a.status().is_leader());
    b.resign().await.expect("resign b");
}

/// `build()` turns nonsense into `Error::InvalidConfig` naming the option, never a panic.
pub async fn build_rejects_nonsense(h: &dyn Harness) {
    let driver = h.driver().await;
    let cases: Vec<(&str, crate::ElectionBuilder)> = vec![
        ("name", Election::builder(driver.clone(), "")),
        ("name", Election::builder(driver.clone(), "a\nb")),
        (
            "ttl",
            Election::builder(driver.clone(), "x").ttl(Duration::ZERO),
        ),
        (
            "ttl",
            Election::builder(driver.clone(), "x").ttl(Duration::from_secs(365 * 86_400)),
        ),
        (
            "safetyMargin",
            Election::builder(driver.clone(), "x")
                .ttl(Duration::from_secs(2))
                .safety_margin(Duration::from_secs(1)),
        ),
        (
            "retryMin",
            Election::builder(driver.clone(), "x").retry(Duration::ZERO, Duration::from_secs(1)),
        ),
        (
            "retryMin",
            Election::builder(driver.clone(), "x")
                .retry(Duration::from_secs(2), Duration::from_secs(1)),
        ),
        (
            "value",
            Election::builder(driver.clone(), "x").value(vec![0u8; crate::MAX_VALUE_LEN + 1]),
        ),
    ];
    for (option, builder) in cases {
        match builder.build() {
            Err(Error::InvalidConfig { name, reason }) => {
                assert_eq!(name, option, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected InvalidConfig for {option}, got {other:?}"),
        }
    }
    let ok = Election::builder(driver, unique("valid"))
        .ttl(h.ttl())
        .build()
        .expect("valid settings build");
    assert!(!ok.status().is_leader(), "building does not campaign");
}

/// The Go original's own test: `e2.Campaign` in the background, `e2.Resign` is
/// `ErrNotALeader` and changes nothing, `e1.Resign` elects e2.
pub async fn resign_while_waiting_changes_nothing(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("seed");
    let e1 = election(h.driver().await, &name, ttl);
    let e2 = election(h.driver().await, &name, ttl);
    let t1 = campaign(&e1, ttl * 3).await;
    let waiter = spawn_campaign(&e2);
    wait_for_waiters(&e1, 1, ttl * 3).await;
    let err = e2.resign().await.expect_err("e2 does not lead");
    assert!(matches!(err, Error::NotALeader), "{err:?}");
    assert!(
        !waiter.is_finished(),
        "e2's campaign goes on after NotALeader"
    );
    e1.resign().await.expect("e1 resigns");
    let t2 = within("e2's campaign, after e1 resigned", ttl * 3, waiter)
        .await
        .expect("campaign task")
        .expect("e2 is elected in its turn");
    assert!(t2.fencing_token() > t1.fencing_token());
    assert!(e2.status().is_leader());
    e2.resign().await.expect("resign");
}

/// `withdraw` leaves the line: the withdrawn campaign returns `Withdrawn`, and when the
/// leader resigns the next candidate takes over at once.
pub async fn withdraw_leaves_the_line(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("withdraw");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let c = election(h.driver().await, &name, ttl);
    campaign(&a, ttl * 3).await;
    let b_waits = spawn_campaign(&b);
    wait_for_waiters(&a, 1, ttl * 3).await;
    let c_waits = spawn_campaign(&c);
    wait_for_waiters(&a, 2, ttl * 3).await;
    within("withdraw", ttl * 3, b.withdraw())
        .await
        .expect("withdraw succeeds");
    let withdrawn = within("b's campaign", ttl, b_waits)
        .await
        .expect("campaign task");
    assert!(matches!(withdrawn, Err(Error::Withdrawn)), "{withdrawn:?}");
    let line = a.candidates().await.expect("candidates()");
    assert!(
        !line.iter().any(|c| c.id == b.id()),
        "b is gone from the line once withdraw() returned: {line:?}"
    );
    let resigned_at = Instant::now();
    a.resign().await.expect("resign");
    within("c's campaign", ttl * 3, c_waits)
        .await
        .expect("campaign task")
        .expect("c is elected");
    assert!(
        resigned_at.elapsed() < ttl / 2,
        "c waited {:?} behind a withdrawn candidate",
        resigned_at.elapsed()
    );
    assert!(!b.status().is_leader());
    within("withdraw with nothing in flight", ttl, b.withdraw())
        .await
        .expect("nothing to withdraw is fine");
    c.resign().await.expect("resign");
}

/// Waits until `election` lists `waiters` candidates besides its leader.
async fn wait_for_waiters(election: &Election, waiters: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        let line = election.candidates().await.expect("candidates()");
        if line.iter().filter(|c| !c.is_leader).count() >= waiters {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {waiters} waiters: {line:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// `candidates()` lists the leader first, then the waiters in the order they arrived,
/// each under its `Election::id()` with its value.
pub async fn candidates_lists_the_leader_then_the_line(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("candidates");
    let a = election_with_value(h.driver().await, &name, ttl, "a-value");
    let b = election_with_value(h.driver().await, &name, ttl, "b-value");
    let c = election_with_value(h.driver().await, &name, ttl, "c-value");
    assert_eq!(a.candidates().await.expect("candidates()"), vec![]);
    campaign(&a, ttl * 3).await;
    let b_waits = spawn_campaign(&b);
    wait_for_waiters(&a, 1, ttl * 3).await;
    let c_waits = spawn_campaign(&c);
    wait_for_waiters(&a, 2, ttl * 3).await;
    let line = c.candidates().await.expect("candidates()");
    let seen: Vec<(&str, &[u8], bool)> = line
        .iter()
        .map(|c| (c.id.as_str(), c.value.as_slice(), c.is_leader))
        .collect();
    assert_eq!(
        seen,
        vec![
            (a.id(), &b"a-value"[..], true),
            (b.id(), &b"b-value"[..], false),
            (c.id(), &b"c-value"[..], false),
        ]
    );
    a.resign().await.expect("resign");
    within("b's campaign", ttl * 3, b_waits)
        .await
        .expect("campaign task")
        .expect("b is elected");
    let line = a.candidates().await.expect("candidates()");
    let ids: Vec<(&str, bool)> = line.iter().map(|c| (c.id.as_str(), c.is_leader)).collect();
    assert_eq!(ids, vec![(b.id(), true), (c.id(), false)]);
    b.resign().await.expect("resign");
    within("c's campaign", ttl * 3, c_waits)
        .await
        .expect("campaign task")
        .expect("c is elected");
    c.resign().await.expect("resign");
}

/// `hand_over(id)` elects the nominee, not the head of the line, and nobody else while the
/// nomination lasts.
pub async fn hand_over_elects_the_nominee(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("hand-over");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let c = election(h.driver().await, &name, ttl);
    let mut a_events = a.subscribe();
    let a_term = campaign(&a, ttl * 3).await;
    next_event("a's election", ttl, &mut a_events).await;
    let b_waits = spawn_campaign(&b);
    wait_for_waiters(&a, 1, ttl * 3).await;
    let c_waits = spawn_campaign(&c);
    wait_for_waiters(&a, 2, ttl * 3).await;
    let handed_at = Instant::now();
    a_term.hand_over(c.id()).await.expect("hand over to c");
    assert!(!a.status().is_leader(), "a steps down");
    assert_eq!(
        next_event("a's end", ttl, &mut a_events).await,
        Event::Resigned {
            fencing_token: a_term.fencing_token()
        }
    );
    let c_term = within("c's campaign", ttl * 3, c_waits)
        .await
        .expect("campaign task")
        .expect("c, the nominee, is elected");
    assert!(
        handed_at.elapsed() < ttl / 2,
        "the handover took {:?}",
        handed_at.elapsed()
    );
    assert!(c_term.fencing_token() > a_term.fencing_token());
    assert!(!b_waits.is_finished(), "b, ahead in line, still waits");
    assert!(!b.status().is_leader());
    assert!(matches!(a.hand_over(b.id()).await, Err(Error::NotALeader)));
    c.resign().await.expect("resign");
    within("b's campaign", ttl * 3, b_waits)
        .await
        .expect("campaign task")
        .expect("the line resumes: b is elected");
    b.resign().await.expect("resign");
}

/// `hand_over` to a candidate that is not waiting is `Error::NotWaiting`, and the leader
/// keeps its term.
pub async fn hand_over_to_a_stranger_changes_nothing(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("hand-over-stranger");
    let a = election(h.driver().await, &name, ttl);
    let b = election(h.driver().await, &name, ttl);
    let term = campaign(&a, ttl * 3).await;
    let err = a.hand_over(b.id()).await.expect_err("b does not wait");
    assert!(
        matches!(&err, Error::NotWaiting { id } if id == b.id()),
        "{err:?}"
    );
    assert!(term.is_valid() && a.status().is_leader(), "a still leads");
    let info = b.leader().await.expect("leader()").expect("a leads");
    assert_eq!(info.fencing_token, term.fencing_token());
    let err = b.hand_over(a.id()).await.expect_err("b does not lead");
    assert!(matches!(err, Error::NotALeader), "{err:?}");
    a.resign().await.expect("resign");
}

/// `proclaim` changes the value observers see, in the same term.
pub async fn proclaim_changes_the_value_not_the_term(h: &dyn Harness) {
    let ttl = h.ttl();
    let name = unique("proclaim");
    let a = election_with_value(h.driver().await, &name, ttl, "before");
    let observer = election(h.driver().await, &name, ttl);
    let term = campaign(&a, ttl * 3).await;
    let mut changes = observer.observe();
    let first = within("the first observation", ttl * 2, changes.next())
        .await
        .expect("stream open")
        .expect("no error")
        .expect("a leader");
    assert_eq!(first.value, b"before");
    term.proclaim("after").await.expect("proclaim");
    let seen = within("the proclaimed value", ttl * 2, changes.next())
        .await
        .expect("stream open")
        .expect("no error")
        .expect("a leader");
    assert_eq!(seen.value, b"after");
    assert_eq!(seen.fencing_token, term.fencing_token(), "same term");
    let info = observer.leader().await.expect("leader()").expect("a leads");
    assert_eq!(
        (info.value.as_slice(), info.fencing_token),
        (&b"after"[..], term.fencing_token())
    );
    let line = observer.candidates().await.expect("candidates()");
    assert_eq!(
        line.first().map(|c| c.value.as_slice()),
        Some(&b"after"[..])
    );
    assert!(term.is_valid(), "no re-election");
    term.resign().await.expect("resign");
    let err = term.proclaim("late").await.expect_err("the term ended");
    assert!(matches!(err, Error::NotALeader), "{err:?}");
    assert_eq!(
        observer.leader().await.expect("leader()"),
        None,
        "nothing written"
    );
}
