//! The term's clock rules, each observed through the accessor it protects and before any
//! other accessor could hide it (`is_valid()` records a passed deadline as a side effect).

use std::time::Duration;

use tokio::time::{Instant, advance};

use super::{Reading, TermState};
use crate::testing::simulate_suspension;

const TTL: Duration = Duration::from_secs(3);
/// More than the jitter between the two clock readings of a real boot-clock offset.
const JITTER: Duration = Duration::from_millis(1);

fn term(deadline: Instant) -> TermState {
    TermState::new(7, 1, deadline, Reading::now(), None)
}

#[tokio::test(start_paused = true)]
async fn a_passed_deadline_is_never_extended_even_unobserved() {
    let start = Instant::now();
    let term = term(start + TTL);
    advance(TTL + Duration::from_millis(1)).await;
    // A renewal sent before the deadline answers after it; nobody looked meanwhile.
    let confirmed_at = start + TTL / 2;
    let moved = term.extend(confirmed_at + TTL, confirmed_at, Reading::now());
    assert_eq!(term.deadline(), start + TTL, "deadline() must not move");
    assert!(!moved, "extend() reports that it refused");
    assert!(!term.is_valid());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_holds_moves_forward_only() {
    let start = Instant::now();
    let term = term(start + TTL);
    advance(TTL / 3).await;
    let confirmed_at = Instant::now();
    assert!(term.extend(confirmed_at + TTL, confirmed_at, Reading::now()));
    assert_eq!(term.deadline(), confirmed_at + TTL);
    // An older confirmation answering late never moves it back.
    assert!(term.extend(start + TTL, start, Reading::now()));
    assert_eq!(term.deadline(), confirmed_at + TTL);
    assert!(term.is_valid());
}

#[tokio::test(start_paused = true)]
async fn once_invalid_never_valid_again() {
    let start = Instant::now();
    let term = term(start + TTL);
    advance(TTL).await;
    assert!(!term.is_valid(), "invalid at the deadline itself");
    assert!(!term.extend(Instant::now() + TTL, Instant::now(), Reading::now()));
    assert!(!term.is_valid());
    assert_eq!(term.deadline(), start + TTL);
}

#[tokio::test(start_paused = true)]
async fn a_suspension_counts_against_the_deadline() {
    let start = Instant::now();
    let term = term(start + TTL);
    advance(TTL / 2).await;
    assert!(term.is_valid());
    simulate_suspension(TTL / 2 + JITTER);
    assert!(
        !term.is_valid(),
        "half a TTL run, half a TTL asleep: expired"
    );
    assert!(!term.extend(Instant::now() + TTL, Instant::now(), Reading::now()));
}

#[tokio::test(start_paused = true)]
async fn a_short_suspension_leaves_the_rest_of_the_term() {
    let start = Instant::now();
    let term = term(start + TTL);
    simulate_suspension(TTL / 2);
    assert!(term.is_valid(), "half the TTL is left");
    advance(TTL / 2 - JITTER).await;
    assert!(term.is_valid());
    advance(2 * JITTER).await;
    assert!(!term.is_valid(), "the suspension counted");
}

#[tokio::test(start_paused = true)]
async fn a_shared_older_confirmation_keeps_the_older_suspension_reference() {
    let start = Instant::now();
    let term = term(start + TTL);
    advance(Duration::from_millis(100)).await;
    // Confirmed now (a keep-alive shared between elections)...
    let shared = Instant::now();
    // ...then the machine sleeps half a TTL before the renewal's reading is taken.
    simulate_suspension(TTL / 2);
    advance(Duration::from_millis(1)).await;
    let reading = Reading::now();
    assert!(term.extend(shared + TTL, shared, reading));
    assert_eq!(term.deadline(), shared + TTL);
    assert!(term.is_valid(), "half a TTL is left");
    advance(TTL / 2).await;
    assert!(
        !term.is_valid(),
        "the suspension after the shared confirmation still counts"
    );
}

#[tokio::test(start_paused = true)]
async fn a_confirmation_after_the_reading_moves_the_suspension_reference() {
    let start = Instant::now();
    let term = term(start + 2 * TTL);
    simulate_suspension(TTL / 2);
    assert!(term.is_valid(), "one and a half TTLs left");
    // A renewal asked for after the suspension, confirmed after its reading: the store's
    // lease runs from the confirmation, whatever happened before.
    let reading = Reading::now();
    advance(Duration::from_millis(1)).await;
    let confirmed_at = Instant::now();
    advance(Duration::from_millis(1)).await;
    assert!(term.extend(confirmed_at + 2 * TTL, confirmed_at, reading));
    advance(2 * TTL - TTL / 4).await;
    assert!(
        term.is_valid(),
        "the suspension before the new reference no longer counts"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_hook_sees_an_extension_only_when_it_happens() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    let hook = crate::settings::DeadlineHook(std::sync::Arc::new(move |token, deadline| {
        log.lock().expect("not poisoned").push((token, deadline));
    }));
    let start = Instant::now();
    let term = TermState::new(7, 1, start + TTL, Reading::now(), Some(hook));
    advance(TTL + Duration::from_millis(1)).await;
    assert!(!term.extend(Instant::now() + TTL, Instant::now(), Reading::now()));
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        vec![(7, (start + TTL).into_std())],
        "a refused extension is not reported"
    );
}

#[tokio::test(start_paused = true)]
async fn ending_a_term_that_is_not_current_changes_nothing() {
    let shared = crate::machinery::Shared::new();
    let old = std::sync::Arc::new(term(Instant::now() + TTL));
    let current = std::sync::Arc::new(term(Instant::now() + TTL));
    shared.state().term = Some(std::sync::Arc::clone(&current));
    let event = crate::Event::Lost {
        fencing_token: 7,
        reason: crate::LossReason::Expired,
    };
    assert!(
        !shared.state().end("e", &old, event.clone()),
        "not the current term"
    );
    assert!(current.is_valid(), "the current term is untouched");
    assert!(shared.state().term.is_some());
    assert!(shared.state().end("e", &current, event));
    assert!(!current.is_valid());
    assert!(
        current.ended_at().is_some(),
        "ended_at() records the step down"
    );
}

#[tokio::test(start_paused = true)]
async fn the_token_is_cancelled_at_the_end_whether_made_before_or_after_it() {
    let term = term(Instant::now() + TTL);
    let before = term.token();
    assert!(!before.is_cancelled());
    assert!(term.is_valid());
    term.end();
    assert!(before.is_cancelled(), "a token made before the end");
    assert!(term.token().is_cancelled(), "a token made after the end");
    assert!(!term.is_valid());
    assert!(term.ended_at().is_some());
    // Resolves at once, however late it is asked.
    tokio::time::timeout(Duration::ZERO, term.ended())
        .await
        .expect("the term ended");
}

#[tokio::test(start_paused = true)]
async fn the_end_wakes_the_resting_holder() {
    let term = std::sync::Arc::new(term(Instant::now() + TTL));
    let holder = tokio::spawn({
        let term = std::sync::Arc::clone(&term);
        async move {
            let mut gone: futures::future::BoxFuture<'static, ()> =
                Box::pin(std::future::pending());
            term.rest_until(Instant::now() + TTL / 3, &mut gone).await
        }
    });
    tokio::task::yield_now().await;
    term.end();
    // Woken by the end itself, not by a timer: no time passes.
    let started = Instant::now();
    assert_eq!(holder.await.expect("the holder"), super::Wake::Ended);
    assert_eq!(Instant::now(), started);
}
