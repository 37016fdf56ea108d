//! Checks of how terms and campaigns end: resignation hands over promptly and only to the
//! next candidate, touches only its own term, changes nothing for a follower; dropped
//! campaigns and elections, and withdrawals, leave nothing behind.

use tokio::time::{Instant, sleep, timeout};

use super::{campaign, election, spawn_campaign, unique, wait_for_waiters, within};
use crate::Error;
use crate::testing::Harness;

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
