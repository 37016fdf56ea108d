//! Checks of what the handles report and accept: events in order, `leader()` and
//! `observe()`, independent elections and candidates on one driver, `build()` refusing
//! nonsense.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::{sleep, timeout};

use super::{campaign, election, election_with_value, next_event, spawn_campaign, unique, within};
use crate::testing::Harness;
use crate::{Election, Error, Event, LeaderInfo};

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
