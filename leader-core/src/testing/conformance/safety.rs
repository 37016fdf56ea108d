//! Checks of the safety rules: one leader at a time, a waiting campaign does not finish,
//! fencing tokens increase, renewals keep the term, a partitioned leader steps down before
//! anyone else is elected.

use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::{
    campaign, election, election_with_value, next_event, spawn_campaign, spawn_run, unique,
    wait_until, within,
};
use crate::testing::Harness;
use crate::{Event, LossReason};

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
