//! The driver's own protocol code in the deterministic simulation (leader-testkit's
//! harness), against a model of Redis (`tests/sim/`): no server needed. `SIM_SEEDS`
//! seeds (default 2,000) spread over the cores, or the one seed `SIM_SEED` (`SIM_TRACE=1`
//! prints its schedule). See SIMULATION.md.
//!
//! Besides the harness's random schedules, scripted scenarios on the same model (paused
//! clock, a quiet network) pin down interleavings the random schedules reach rarely.

mod sim;

use std::time::Duration;

use leader_core::{Candidate, Driver, Error};
use leader_redis::RedisDriver;
use leader_testkit::sim::{ClientId, Model, Net};
use tokio::time::sleep;

#[test]
fn simulated_schedules_keep_every_safety_property() {
    leader_testkit::sim::run_seeds("leader-redis", sim::RedisModel::new);
}

/// A model on a quiet network (one server, no keyspace notifications) and two drivers on
/// it (clients 0 and 1).
fn two_drivers() -> (Net, sim::RedisModel, RedisDriver, RedisDriver) {
    let net = Net::quiet();
    let model = sim::RedisModel::with(&net, false, false);
    let (d0, d1) = (
        model.driver(&net, ClientId(0)),
        model.driver(&net, ClientId(1)),
    );
    (net, model, d0, d1)
}

/// Polls `in_line` (a look at the model's line) until it holds.
///
/// # Panics
///
/// If it does not within `within`.
async fn until_in_line(in_line: impl Fn() -> bool, who: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while !in_line() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{who} never stood in line"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// `candidate`'s campaign is dropped while the answer to its first ACQUIRE is on its way
/// (the request landed).
async fn drop_with_its_answer_on_the_way(
    model: &sim::RedisModel,
    driver: &RedisDriver,
    candidate: &Candidate,
) {
    model.withhold_answers(true);
    let dropped = tokio::spawn({
        let (driver, candidate) = (driver.clone(), candidate.clone());
        async move { driver.campaign(&candidate).await }
    });
    sleep(Duration::from_millis(10)).await;
    dropped.abort();
    let _ = dropped.await;
    model.withhold_answers(false);
}

fn candidate(id: &str, ttl: Duration) -> Candidate {
    Candidate::new("sim-0", id, id.as_bytes().to_vec(), ttl)
}

/// The batch race: two candidates of one election on one driver. The first one's term is
/// deleted behind its back (it has not noticed yet) and the second one is elected; a
/// renewal of the first term must not be answered by the second term's fresh
/// confirmation, which the driver's renewal cache holds under the same key. (Without the
/// cache's owner-and-token check the first candidate renews and two lead at once; random
/// seeds find it in about 2 of 1,000.)
#[tokio::test(start_paused = true)]
async fn a_renewal_is_not_answered_by_another_candidates_term_of_the_same_key() {
    let net = Net::quiet();
    // One server, no keyspace notifications (the first leader must not hear of the
    // deletion), renewals batched across the driver's terms.
    let model = sim::RedisModel::with(&net, false, false);
    let driver: RedisDriver = model.driver(&net, ClientId(0));
    let ttl = Duration::from_secs(6);
    let (a, b) = (candidate("a", ttl), candidate("b", ttl));
    let first = driver.campaign(&a).await.expect("a is elected");
    sleep(Duration::from_millis(100)).await;
    let key = format!("{}{{sim-0}}:leader", sim::PREFIX);
    assert!(
        model.with_store(|s| s.del(&key)),
        "the operator deletes {key}"
    );
    let second = driver
        .campaign(&b)
        .await
        .expect("b is elected on the free key");
    assert!(second.fencing_token > first.fencing_token);
    sleep(Duration::from_millis(100)).await;
    let renewed = driver.renew(&a, &first).await;
    assert!(
        matches!(renewed, Err(Error::TermGone)),
        "a's term was renewed while b holds the key: {renewed:?}"
    );
    // b's own renewal still works.
    let renewed = driver.renew(&b, &second).await;
    assert!(renewed.is_ok(), "b renews its term: {renewed:?}");
    model.assert_no_faults();
}

/// A withdrawal is one request when every request of the withdrawn campaign was answered
/// (nothing of it can land later); after a campaign whose `ACQUIRE` went unanswered (the
/// campaign dropped while it was on its way), the driver leaves the line again over the
/// next 1.5 TTL, in case that request lands after the withdrawal.
#[tokio::test(start_paused = true)]
async fn a_withdrawal_leaves_the_line_again_only_after_an_unanswered_campaign_request() {
    let net = Net::quiet();
    let model = sim::RedisModel::with(&net, false, false);
    let driver: RedisDriver = model.driver(&net, ClientId(0));
    let ttl = Duration::from_secs(6);
    // a leads throughout (a lease longer than the scenario).
    let (a, b, c) = (
        candidate("a", ttl * 100),
        candidate("b", ttl),
        candidate("c", ttl),
    );
    let _term = driver.campaign(&a).await.expect("a is elected");
    let line = format!("{}{{sim-0}}:line", sim::PREFIX);
    let in_line = |who: &'static str| {
        model.with_store(|s| {
            s.zrangebyscore(&line, f64::NEG_INFINITY, f64::INFINITY, 100)
                .iter()
                .any(|place| place.starts_with(format!("{who}\n").as_bytes()))
        })
    };
    let resigns = |who: &str| model.with_store(|s| s.resigns.get(who).copied().unwrap_or(0));

    // b waits in line (its requests all answered), then is withdrawn.
    let waiting = tokio::spawn({
        let (driver, b) = (driver.clone(), b.clone());
        async move { driver.campaign(&b).await }
    });
    until_in_line(|| in_line("b"), "b", ttl).await;
    sleep(Duration::from_millis(10)).await;
    waiting.abort();
    let _ = waiting.await;
    driver.resign(&b, None).await.expect("b withdraws");
    assert!(!in_line("b"), "b's place is gone");
    sleep(ttl * 2).await;
    assert_eq!(resigns("b"), 1, "b left the line once");

    // c's campaign is dropped while the answer to its first ACQUIRE is on its way.
    drop_with_its_answer_on_the_way(&model, &driver, &c).await;
    driver.resign(&c, None).await.expect("c withdraws");
    sleep(ttl * 2).await;
    assert_eq!(
        resigns("c"),
        4,
        "c left the line again three times after its withdrawal"
    );

    // Again, but c waits in line before the first repeat: the repeats stop, and c's next
    // withdrawal (its campaign's requests all answered) repeats in their place.
    drop_with_its_answer_on_the_way(&model, &driver, &c).await;
    driver.resign(&c, None).await.expect("c withdraws");
    let waiting = tokio::spawn({
        let (driver, c) = (driver.clone(), c.clone());
        async move { driver.campaign(&c).await }
    });
    until_in_line(|| in_line("c"), "c", ttl).await;
    sleep(ttl).await;
    assert_eq!(resigns("c"), 5, "c waits: no repeat");
    waiting.abort();
    let _ = waiting.await;
    driver.resign(&c, None).await.expect("c withdraws");
    sleep(ttl * 2).await;
    assert_eq!(
        resigns("c"),
        9,
        "c's next withdrawal left the line again three times"
    );
    model.assert_no_faults();
}

/// A handover's nomination elects only the nominee for its TTL: `a` hands over to `b`,
/// whose campaign is gone (its place still in line, nobody listening for its wakeup);
/// `c`, campaigning right then, is not elected while the nomination stands, and is once
/// it expires (the line resumes). (With ACQUIRE taking a nominated key as free, `c` leads
/// at once.)
#[tokio::test(start_paused = true)]
async fn a_nomination_elects_only_the_nominee_until_it_expires() {
    let (_net, model, d0, d1) = two_drivers();
    let ttl = Duration::from_secs(6);
    let (a, b, c) = (
        candidate("a", ttl),
        candidate("b", ttl),
        candidate("c", ttl),
    );
    let term = d0.campaign(&a).await.expect("a is elected");
    let waiting = tokio::spawn({
        let (d1, b) = (d1.clone(), b.clone());
        async move { d1.campaign(&b).await }
    });
    leader_testkit::sim::scripted::wait_in_line(&d0, "sim-0", "b", ttl).await;
    // b's campaign is gone; its place stays in line.
    waiting.abort();
    let _ = waiting.await;
    d0.hand_over(&a, term.fencing_token, "b")
        .await
        .expect("a hands over to b");
    let handed = tokio::time::Instant::now();
    let contender = tokio::spawn({
        let (d0, c) = (d0.clone(), c.clone());
        async move { d0.campaign(&c).await }
    });
    sleep(ttl * 9 / 10).await;
    assert!(
        !contender.is_finished(),
        "c was elected during b's nomination (seen {:?} after the handover)",
        handed.elapsed()
    );
    let leader = d0.leader("sim-0").await.expect("leader");
    assert!(
        leader.is_none(),
        "nobody leads while b is nominated: {leader:?}"
    );
    // The nomination expires: the line resumes, and c is elected.
    let elected = tokio::time::timeout(ttl * 2, contender)
        .await
        .expect("c is elected once the nomination expired")
        .expect("task");
    assert!(elected.is_ok(), "c's campaign: {elected:?}");
    model.assert_no_faults();
}

/// A place nobody refreshes, left long ago at the head of a line (a campaign request that
/// landed after its candidate's withdrawal, with no waiter in that election for a long
/// while), is pruned by the next waiter's first refresh: a resignation then wakes that
/// waiter at once, not the orphan. (With the pruning limited to places two refresh
/// periods past their keep, the orphan takes the wakeup and the waiter waits for its next
/// refresh.)
#[tokio::test(start_paused = true)]
async fn an_orphan_place_at_the_head_of_the_line_is_pruned_however_old() {
    let (_net, model, d0, d1) = two_drivers();
    let ttl = Duration::from_secs(6);
    let (a, b) = (candidate("a", ttl), candidate("b", ttl));
    let term = d0.campaign(&a).await.expect("a is elected");
    let line = format!("{}{{sim-0}}:line", sim::PREFIX);
    model.with_store(|s| {
        let Ok(sim::store::Reply::Array(now)) = s.command(&[b"TIME".to_vec()]) else {
            panic!("TIME answers an array");
        };
        let [
            sim::store::Reply::Bulk(secs),
            sim::store::Reply::Bulk(micros),
        ] = now.as_slice()
        else {
            panic!("TIME answers two numbers");
        };
        let parse = |b: &[u8]| String::from_utf8_lossy(b).parse::<u64>().expect("a number");
        let now_us = parse(secs) * 1_000_000 + parse(micros);
        let long_ago = now_us - 20 * u64::try_from(ttl.as_micros()).expect("small");
        s.command(&[
            b"ZADD".to_vec(),
            line.clone().into_bytes(),
            long_ago.to_string().into_bytes(),
            b"gone\ngone".to_vec(),
        ])
        .expect("the orphan place");
    });
    let waiting = tokio::spawn({
        let (d1, b) = (d1.clone(), b.clone());
        async move { d1.campaign(&b).await }
    });
    leader_testkit::sim::scripted::wait_in_line(&d0, "sim-0", "b", ttl).await;
    sleep(Duration::from_millis(100)).await;
    d0.resign(&a, Some(term.fencing_token))
        .await
        .expect("a resigns");
    let resigned = tokio::time::Instant::now();
    let elected = tokio::time::timeout(ttl / 10, waiting).await;
    assert!(
        matches!(elected, Ok(Ok(Ok(_)))),
        "b was not elected within {:?} of the resignation (the orphan took the wakeup?): {elected:?}",
        resigned.elapsed()
    );
    model.assert_no_faults();
}

/// A handover's nomination passes over the head of the line (see
/// `leader_testkit::sim::scripted`).
#[tokio::test(start_paused = true)]
async fn a_nomination_passes_over_the_head_of_the_line() {
    let net = Net::quiet();
    let model = sim::RedisModel::with(&net, false, false);
    leader_testkit::sim::scripted::a_nomination_passes_over_the_head_of_the_line(
        &net,
        &model,
        std::time::Duration::from_secs(6),
    )
    .await;
    model.assert_no_faults();
}

/// A waiter's withdrawal during a handover leaves the nominee's nomination (see
/// `leader_testkit::sim::scripted`).
#[tokio::test(start_paused = true)]
async fn a_withdrawal_leaves_another_candidates_nomination() {
    let net = Net::quiet();
    let model = sim::RedisModel::with(&net, false, false);
    leader_testkit::sim::scripted::a_withdrawal_leaves_another_candidates_nomination(
        &net,
        &model,
        std::time::Duration::from_secs(6),
    )
    .await;
    model.assert_no_faults();
}

/// Many elections on one driver are renewed in batches, several per round (Redis renews 1,000 terms per script call, so 1,100 elections take two calls; see
/// `leader_testkit::sim::scripted`).
#[tokio::test(start_paused = true)]
async fn many_elections_on_one_driver_are_renewed_in_batches() {
    let net = Net::quiet();
    let model = sim::RedisModel::with(&net, false, false);
    leader_testkit::sim::scripted::many_elections_on_one_driver_are_renewed_in_batches(
        &net,
        &model,
        1_100,
        std::time::Duration::from_secs(30),
    )
    .await;
    model.assert_no_faults();
}
