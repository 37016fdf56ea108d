//! The conformance suite: the behaviour every [`Driver`](crate::Driver) must show, checked
//! through the public [`Election`] API against a [`Harness`](super::Harness).
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

use crate::{Election, Event, Term};

mod ending;
mod handles;
mod line;
mod safety;

pub use ending::{
    dropped_campaign_leaves_nothing_behind, dropping_the_election_resigns,
    followers_get_not_a_leader, resign_deletes_only_the_given_term, resign_hands_over_promptly,
    resign_while_waiting_changes_nothing, withdraw_leaves_the_line,
};
pub use handles::{
    build_rejects_nonsense, candidates_sharing_a_driver_are_distinct,
    elections_on_one_driver_are_independent, events_arrive_in_order,
    leader_and_observe_report_value_and_no_leader,
};
pub use line::{
    candidates_lists_the_leader_then_the_line, hand_over_elects_the_nominee,
    hand_over_to_a_stranger_changes_nothing, proclaim_changes_the_value_not_the_term,
};
pub use safety::{
    campaign_waits_while_another_leads, fencing_tokens_strictly_increase, one_leader_among_many,
    partitioned_leader_steps_down_before_takeover, renewal_keeps_the_term,
};

/// Generates one `async fn` test per conformance check. Pass the path of an `async fn`
/// that returns a fresh [`Harness`](super::Harness), then the test attribute(s) to put on
/// each test, as in the [module example](crate::testing).
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
