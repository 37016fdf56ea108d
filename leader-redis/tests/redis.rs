//! Redis-specific behaviour against real redis-server processes: ownership checks, restarts
//! with and without persistence, and lost pub/sub connections.

mod common;

use std::time::Duration;

use common::{TTL, harness, start};
use leader_core::testing::Fault;
use leader_core::testing::conformance::{
    next_event, spawn_campaign, spawn_run, wait_until, within,
};
use leader_core::{CancellationToken, Election, Event, LossReason};
use leader_redis::RedisDriver;
use leader_testkit::FaultProxy;
use leader_testkit::RedisServer;
use redis::AsyncCommands;
use tokio::time::{Instant, sleep};

fn unique(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

fn election(driver: RedisDriver, name: &str, ttl: Duration) -> Election {
    Election::builder(driver, name)
        .ttl(ttl)
        .retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("valid settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_share_a_hash_tag_and_hold_owner_value_and_token() {
    let h = harness().await;
    let driver = h.driver_at(&h.server.url()).await;
    let name = unique("keys");
    let keys = driver.keys(&name);
    assert_eq!(keys.leader, format!("leader:{{{name}}}:leader"));
    assert_eq!(keys.fence, format!("leader:{{{name}}}:fence"));
    let e = Election::builder(driver, &name)
        .ttl(TTL)
        .value("10.0.0.7:8080")
        .build()
        .expect("valid");
    let term = e.campaign().await.expect("elected");
    let mut admin = h.admin().await;
    let raw: String = admin.get(&keys.leader).await.expect("GET");
    let mut fields = raw.splitn(4, '\n');
    assert_eq!(fields.next(), Some("L"), "a term: {raw:?}");
    let token: u64 = fields.next().and_then(|t| t.parse().ok()).expect("token");
    assert_eq!(fields.next(), Some(e.id()));
    assert_eq!(fields.next(), Some("10.0.0.7:8080"));
    assert_eq!(token, term.fencing_token());
    let fence: u64 = admin.get(&keys.fence).await.expect("GET fence");
    assert_eq!(fence, token);
    let pttl: i64 = admin.pttl(&keys.leader).await.expect("PTTL");
    assert!(
        pttl > 0 && pttl <= 1000,
        "the lease is the TTL in ms: {pttl}"
    );
    e.resign().await.expect("resign");
    let exists: bool = admin.exists(&keys.leader).await.expect("EXISTS");
    assert!(!exists, "resign deletes the key");

    // Braces would break the hash tag: refused when the election is built, not at every
    // campaign.
    let err = Election::builder(
        RedisDriver::connect(&h.server.url())
            .await
            .expect("connect"),
        "a{b}",
    )
    .ttl(TTL)
    .build()
    .expect_err("braces break the hash tag");
    assert!(
        matches!(err, leader_core::Error::InvalidConfig { name: "name", .. }),
        "{err:?}"
    );
}

/// The leader's key is deleted behind its back and someone else takes it: the old leader's
/// renewal must fail, it must step down, and it must never extend the new owner's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_never_extends_another_candidates_key() {
    let h = harness().await;
    let driver = h.driver_at(&h.server.url()).await;
    let name = unique("ownership");
    let keys = driver.keys(&name);
    let old = election(driver, &name, TTL);
    let mut events = old.subscribe();
    let term = old.campaign().await.expect("elected");
    next_event("the Elected event", TTL, &mut events).await;

    let mut admin = h.admin().await;
    let _: () = admin.del(&keys.leader).await.expect("DEL");
    let _: () = redis::cmd("HSET")
        .arg(&keys.leader)
        .arg(&["owner", "intruder", "value", "x", "token", "999"])
        .query_async(&mut admin)
        .await
        .expect("HSET");
    let _: () = admin.pexpire(&keys.leader, 5000).await.expect("PEXPIRE");
    let taken_at = Instant::now();

    let lost = next_event("the old leader's loss", TTL, &mut events).await;
    assert_eq!(
        lost,
        Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        }
    );
    assert!(!old.status().is_leader());
    // Two more renewal periods: the intruder's key keeps ageing, untouched.
    sleep(TTL).await;
    // Measured before asking: at the query, the key has aged at least this much.
    let aged = i64::try_from(taken_at.elapsed().as_millis()).expect("small");
    let pttl: i64 = admin.pttl(&keys.leader).await.expect("PTTL");
    let expected_max = 5000 - aged;
    assert!(
        pttl <= expected_max + 1,
        "the intruder's key was extended: PTTL {pttl} > {expected_max}"
    );
    let owner: String = admin.hget(&keys.leader, "owner").await.expect("HGET");
    assert_eq!(owner, "intruder");
}

/// Without persistence, a restart forgets the key and the fence counter, as the README
/// says: the leader learns it at its next renewal, and tokens start again from 1. The test
/// asserts that documented behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_forgets_the_term_as_documented() {
    let mut h = harness().await;
    let url = h.server.url();
    let name = unique("volatile");
    let a = election(h.driver_at(&url).await, &name, TTL);
    let mut events = a.subscribe();
    let stop = CancellationToken::new();
    let run = spawn_run(&a, &stop);
    let mut last = 0;
    for _ in 0..3 {
        let elected = next_event("elected", TTL * 3, &mut events).await;
        assert!(elected.is_leader());
        last = elected.fencing_token();
        a.resign().await.expect("resign");
        next_event("resigned", TTL, &mut events).await;
    }
    assert!(last >= 3);
    let elected = next_event("elected", TTL * 3, &mut events).await;
    assert!(elected.is_leader());

    h.restart();
    let lost = next_event("the loss after the restart", TTL * 2, &mut events).await;
    assert!(
        matches!(
            lost,
            Event::Lost {
                reason: LossReason::Gone | LossReason::Expired,
                ..
            }
        ),
        "{lost:?}"
    );
    let again = next_event("elected again", TTL * 5, &mut events).await;
    assert!(again.is_leader());
    assert!(
        again.fencing_token() <= last,
        "documented: without persistence the fence counter restarts ({} after {last})",
        again.fencing_token()
    );
    stop.cancel();
    within("run to return", TTL * 3, run)
        .await
        .expect("no panic")
        .expect("clean shutdown");
}

/// With `appendonly yes` + `appendfsync always`, a restart keeps the key and the fence
/// counter: the term survives a quick restart and tokens keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_persistence_keeps_the_term_and_the_fence() {
    let ttl = Duration::from_secs(3);
    let mut h = start(RedisServer::start_persistent).await;
    let url = h.server.url();
    let name = unique("persistent");
    let a = election(h.driver_at(&url).await, &name, ttl);
    let b = election(h.driver_at(&url).await, &name, ttl);
    let first = a.campaign().await.expect("elected");
    a.resign().await.expect("resign");
    let term = a.campaign().await.expect("elected");
    assert!(term.fencing_token() > first.fencing_token());
    let stop = CancellationToken::new();
    let b_run = spawn_run(&b, &stop);

    h.restart();
    // The key survived: a keeps renewing it through the restart.
    sleep(ttl).await;
    assert!(
        a.status().is_leader(),
        "the term survives a persistent restart"
    );
    assert!(!b.status().is_leader(), "b still waits");
    a.resign().await.expect("resign");
    wait_until("b takes over", ttl * 2, || b.status().is_leader()).await;
    let b_token = b.status().fencing_token().expect("b leads");
    assert!(b_token > term.fencing_token(), "the fence survived");
    stop.cancel();
    within("b's run to return", ttl, b_run)
        .await
        .expect("no panic")
        .expect("clean shutdown");
}

/// Waits until some connection subscribes to `channel`: a waiting candidate listens.
async fn wait_subscribed(admin: &mut redis::aio::MultiplexedConnection, channel: &str) {
    within(&format!("a subscriber on {channel}"), TTL * 5, async {
        loop {
            let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(channel)
                .query_async(admin)
                .await
                .expect("PUBSUB NUMSUB");
            if subscribers > 0 {
                return;
            }
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Pub/sub connections killed (`CLIENT KILL TYPE pubsub`): waiters still take over when
/// the leader's key expires, and handoffs work again once pub/sub reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_pubsub_still_fails_over_at_expiry() {
    let h = harness().await;
    let url = h.server.url();
    let name = unique("pubsub");
    let proxy = FaultProxy::start(h.server.addr()).await.expect("proxy");
    let a = election(
        h.driver_at(&format!("redis://{}", proxy.addr())).await,
        &name,
        TTL,
    );
    let b_driver = h.driver_at(&url).await;
    let b_keys = b_driver.keys(&name);
    let b = election(b_driver, &name, TTL);
    a.campaign().await.expect("a elected");
    let waiter = spawn_campaign(&b);
    let mut admin = h.admin().await;
    // b waits in line on its own channel.
    wait_subscribed(&mut admin, &b_keys.wake(b.id())).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(&mut admin)
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 1, "b's pub/sub connection was killed");
    // a "crashes" from Redis' point of view: nothing reaches Redis from it any more.
    proxy.partition().await;
    let partitioned_at = Instant::now();
    within("b's takeover at expiry", TTL * 3, waiter)
        .await
        .expect("campaign task")
        .expect("b elected");
    assert!(
        !a.status().is_leader(),
        "a stepped down before b was elected"
    );
    let took = partitioned_at.elapsed();
    assert!(
        took >= TTL / 2,
        "b could not have been elected before a's key expired: {took:?}"
    );

    // Pub/sub is back: a resignation hands over promptly again.
    let c = election(h.driver_at(&url).await, &name, TTL);
    let waiter = spawn_campaign(&c);
    wait_subscribed(&mut admin, &b_keys.wake(c.id())).await;
    let resigned_at = Instant::now();
    b.resign().await.expect("resign");
    within("c's campaign", TTL * 2, waiter)
        .await
        .expect("campaign task")
        .expect("c elected");
    assert!(
        resigned_at.elapsed() < TTL / 2,
        "handoff took {:?}",
        resigned_at.elapsed()
    );
    wait_until("a's term ended", TTL, || !a.status().is_leader()).await;
}

/// A resignation of an earlier term, landing after the same candidate's next term began,
/// leaves the new term alone: RESIGN compares owner and token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_resignation_of_an_earlier_term_leaves_the_newer_one() {
    use leader_core::{Candidate, Driver};
    let h = harness().await;
    let driver = h.driver_at(&h.server.url()).await;
    let name = unique("late-resign");
    let candidate = Candidate::new(&name, "candidate-a", "a", Duration::from_secs(5));
    let first = driver.campaign(&candidate).await.expect("first term");
    let second = driver.campaign(&candidate).await.expect("second term");
    assert!(second.fencing_token > first.fencing_token);
    driver
        .resign(&candidate, Some(first.fencing_token))
        .await
        .expect("resign answered");
    let leader = driver.leader(&name).await.expect("reachable");
    assert_eq!(
        leader.map(|l| l.fencing_token),
        Some(second.fencing_token),
        "the newer term survived"
    );
    // Without a token, the driver reads the term first, then deletes exactly that one.
    driver.resign(&candidate, None).await.expect("resign");
    assert_eq!(driver.leader(&name).await.expect("reachable"), None);
}

/// A pub/sub connection that goes silent without closing (half-open: the server or a
/// middlebox vanished) is noticed by the health check and replaced, so an observer still
/// sees the next leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_recovers_from_a_half_open_pubsub_connection() {
    use futures::StreamExt;
    let h = harness().await;
    let name = unique("half-open");
    let proxy = FaultProxy::start(h.server.addr()).await.expect("proxy");
    let watcher = election(
        h.driver_at(&format!("redis://{}", proxy.addr())).await,
        &name,
        TTL,
    );
    let mut leaders = watcher.observe();
    let first = within("the first observation", TTL * 5, leaders.next()).await;
    assert!(matches!(first, Some(Ok(None))), "{first:?}");
    let mut admin = h.admin().await;
    let channel = h.driver_at(&h.server.url()).await.keys(&name).channel;
    wait_subscribed(&mut admin, &channel).await;
    proxy.stall();
    let leader = election(
        h.driver_at(&h.server.url()).await,
        &name,
        Duration::from_secs(30),
    );
    let term = leader.campaign().await.expect("elected");
    let seen = within(
        "the new leader, after the health check",
        Duration::from_secs(20),
        async {
            loop {
                match leaders.next().await {
                    Some(Ok(Some(info))) => return info,
                    // Errors while the stalled connections are replaced.
                    Some(_) => {}
                    None => panic!("the observation ended"),
                }
            }
        },
    )
    .await;
    assert_eq!(seen.fencing_token, term.fencing_token());
}

/// Waits until `id` stands in `election`'s line.
async fn wait_in_line(
    admin: &mut redis::aio::MultiplexedConnection,
    keys: &leader_redis::ElectionKeys,
    id: &str,
) {
    within(&format!("{id} in line"), TTL * 5, async {
        loop {
            let line: Vec<String> = admin.zrange(&keys.line, 0, -1).await.expect("ZRANGE");
            if line
                .iter()
                .any(|place| place.starts_with(&format!("{id}\n")))
            {
                return;
            }
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Commands of `name` the server ran so far (`INFO commandstats`).
async fn calls(admin: &mut redis::aio::MultiplexedConnection, name: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waiters queue in arrival order; a resignation wakes the head of the line only (a few
/// script calls per handoff, not one per waiter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_wakes_the_head_of_the_line_only() {
    let h = harness().await;
    let name = unique("line");
    // Long TTL: no expiry timer fires during the test, so only wakeups elect.
    let ttl = Duration::from_secs(30);
    let driver = h.driver_at(&h.server.url()).await;
    let keys = driver.keys(&name);
    let mut admin = h.admin().await;
    let leader = election(driver.clone(), &name, ttl);
    leader.campaign().await.expect("elected");
    let mut waiters = Vec::new();
    for _ in 0..20 {
        let waiter = election(h.driver_at(&h.server.url()).await, &name, ttl);
        let campaign = spawn_campaign(&waiter);
        wait_in_line(&mut admin, &keys, waiter.id()).await;
        waiters.push((waiter, campaign));
    }
    let mut previous = leader;
    for (i, (waiter, campaign)) in waiters.into_iter().take(3).enumerate() {
        let before = calls(&mut admin, "evalsha").await + calls(&mut admin, "eval").await;
        let resigned_at = Instant::now();
        previous.resign().await.expect("resign");
        within(&format!("waiter {i} elected"), ttl / 10, campaign)
            .await
            .expect("campaign task")
            .expect("elected in arrival order");
        assert!(resigned_at.elapsed() < ttl / 10);
        let after = calls(&mut admin, "evalsha").await + calls(&mut admin, "eval").await;
        // The resignation and the head's acquisition (and a read or two): not 20.
        assert!(
            after - before <= 4,
            "handoff {i} ran {} scripts with 17+ waiting",
            after - before
        );
        previous = waiter;
    }
}

/// One process holding many elections renews them in a few calls per third of a TTL,
/// not one per election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_per_process_not_per_election() {
    let h = harness().await;
    let driver = h.driver_at(&h.server.url()).await;
    let mut admin = h.admin().await;
    let ttl = Duration::from_secs(1);
    let mut held = Vec::new();
    for i in 0..50 {
        let election = election(driver.clone(), &unique(&format!("many{i}")), ttl);
        let term = election.campaign().await.expect("elected");
        held.push((election, term));
    }
    let before = calls(&mut admin, "evalsha").await;
    let started = Instant::now();
    let window = ttl * 3;
    // Terms renew every third of the TTL: per election that would be 9 calls each (450).
    sleep(window).await;
    let scripts = calls(&mut admin, "evalsha").await - before;
    println!("{scripts} renewal calls for 50 elections over {window:?}");
    for (_, term) in &held {
        assert!(term.is_valid(), "every term renewed");
        assert!(term.deadline() > (started + window / 2).into_std());
    }
    assert!(
        scripts <= 20,
        "{scripts} renewal calls for 50 elections over {window:?}"
    );
}
