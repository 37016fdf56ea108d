//! Checks of the line of candidates and of planned handover: `candidates()`,
//! `hand_over(id)`, `proclaim`.

use futures::StreamExt;
use tokio::time::Instant;

use super::{
    campaign, election, election_with_value, next_event, spawn_campaign, unique, wait_for_waiters,
    within,
};
use crate::testing::Harness;
use crate::{Error, Event};

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
