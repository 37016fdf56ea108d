//! Liveness on Redis (#20, #24): a leader whose key is deleted or overwritten by hand
//! steps down within a round trip where the server publishes keyspace notifications (and
//! at its next renewal where it does not); names that could share keys are refused;
//! places in line left behind are pruned within two TTLs; and the work per handoff with
//! 1,000 candidates waiting stays bounded.

mod common;

use std::time::Duration;

use common::{harness, start};
use leader_core::testing::conformance::{next_event, spawn_campaign, within};
use leader_core::{Election, Error, Event, LossReason};
use leader_redis::RedisDriver;
use leader_testkit::{RedisOptions, RedisServer};
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

fn with_notifications() -> std::io::Result<RedisServer> {
    RedisServer::start_with(RedisOptions {
        config: vec!["notify-keyspace-events Kgx$".to_owned()],
        ..RedisOptions::default()
    })
}

/// Keyspace channels subscribed on the server now.
async fn keyspace_channels(admin: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("__keyspace@*")
        .query_async(admin)
        .await
        .expect("PUBSUB CHANNELS")
}

/// With notifications on, a key deleted by hand ends the term within a round trip, long
/// before the next renewal (a third of a 30 s TTL); so does a key overwritten by `SET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keyspace_notifications_a_deleted_or_overwritten_key_ends_the_term_at_once() {
    let h = start(with_notifications).await;
    let ttl = Duration::from_secs(30);
    let driver = h.driver_at(&h.server.url()).await;
    let mut admin = h.admin().await;
    for overwrite in [false, true] {
        let name = unique("pushed");
        let keys = driver.keys(&name);
        let e = election(driver.clone(), &name, ttl);
        let mut events = e.subscribe();
        let term = e.campaign().await.expect("elected");
        next_event("Elected", ttl, &mut events).await;
        // The term's watch is in place once its keyspace channel is subscribed.
        let channel = format!("__keyspace@0__:{}", keys.leader);
        within("the keyspace subscription", ttl / 10, async {
            while !keyspace_channels(&mut admin).await.contains(&channel) {
                sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let tampered = Instant::now();
        if overwrite {
            let _: () = admin.set(&keys.leader, "someone else").await.expect("SET");
        } else {
            let _: () = admin.del(&keys.leader).await.expect("DEL");
        }
        let lost = next_event("the loss", Duration::from_secs(2), &mut events).await;
        assert_eq!(
            lost,
            Event::Lost {
                fencing_token: term.fencing_token(),
                reason: LossReason::Gone
            }
        );
        assert!(
            tampered.elapsed() < Duration::from_secs(1),
            "noticed after {:?}",
            tampered.elapsed()
        );
        assert!(!term.is_valid());
        e.resign().await.ok();
    }
}

/// An event on the key is only a reason to look: the leader's own renewals (their
/// `expire` events) and a proclaim-like rewrite by its own term do not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keyspace_notifications_renewals_do_not_end_the_term() {
    let h = start(with_notifications).await;
    let ttl = Duration::from_millis(600);
    let driver = h.driver_at(&h.server.url()).await;
    let e = election(driver, &unique("steady"), ttl);
    let term = e.campaign().await.expect("elected");
    // Several renewals.
    sleep(ttl * 3).await;
    assert!(term.is_valid(), "renewed, not lost");
    e.resign().await.expect("resign");
}

/// Without notifications (the default), the driver subscribes to no keyspace channel and
/// a deleted key is noticed at the next renewal, within a third of the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keyspace_notifications_the_next_renewal_notices() {
    let h = harness().await;
    let ttl = Duration::from_secs(3);
    let driver = h.driver_at(&h.server.url()).await;
    let mut admin = h.admin().await;
    let name = unique("renewal");
    let keys = driver.keys(&name);
    let e = election(driver, &name, ttl);
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    next_event("Elected", ttl, &mut events).await;
    assert!(keyspace_channels(&mut admin).await.is_empty());
    let _: () = admin.del(&keys.leader).await.expect("DEL");
    let lost = next_event(
        "the loss at the next renewal",
        ttl / 3 + ttl / 4,
        &mut events,
    )
    .await;
    assert_eq!(
        lost,
        Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        }
    );
}

/// Names are the hash tag: `{` and `}` are refused (in names and prefixes), and names that
/// differ only by case or by a `:` suffix are separate elections with separate keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_never_share_keys() {
    let h = harness().await;
    let driver = h.driver_at(&h.server.url()).await;
    for bad in ["a}", "{a", "a}:b{c", "{}"] {
        let built = Election::builder(driver.clone(), bad).build();
        assert!(
            matches!(built, Err(Error::InvalidConfig { .. })),
            "{bad:?}: {built:?}"
        );
    }
    let braced = RedisDriver::builder(redis::Client::open(h.server.url()).expect("url"))
        .prefix("p{x}:")
        .build();
    assert!(matches!(
        Election::builder(braced, "jobs").build(),
        Err(Error::InvalidConfig { .. })
    ));
    let base = unique("Jobs");
    let names = [
        base.clone(),
        base.to_lowercase(),
        format!("{base}:leader"),
        format!("{base}:x"),
        format!("{base}/x"),
    ];
    let mut all_keys = Vec::new();
    let mut terms = Vec::new();
    for name in &names {
        let keys = driver.keys(name);
        all_keys.extend([
            keys.leader,
            keys.fence,
            keys.line,
            keys.line_until,
            keys.channel,
        ]);
        let e = election(driver.clone(), name, Duration::from_secs(5));
        let term = within(name, Duration::from_secs(5), e.campaign())
            .await
            .expect("each name is an election of its own");
        terms.push((e, term));
    }
    let distinct: std::collections::HashSet<&String> = all_keys.iter().collect();
    assert_eq!(distinct.len(), all_keys.len(), "no two names share a key");
    for (name, (e, term)) in names.iter().zip(&terms) {
        let leader = e.leader().await.expect("leader").expect("one");
        assert_eq!(leader.id, e.id(), "{name} is led by its own candidate");
        assert_eq!(leader.fencing_token, term.fencing_token());
    }
}

/// A place in line that nobody refreshes (a campaign that landed after its withdrawal, or
/// a waiter gone without a word) is pruned within two TTLs while any driver waits in that
/// election; the line's keys expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_left_behind_are_pruned_within_two_ttls() {
    let h = harness().await;
    let ttl = Duration::from_secs(1);
    let name = unique("orphan");
    let driver = h.driver_at(&h.server.url()).await;
    let keys = driver.keys(&name);
    let mut admin = h.admin().await;
    let leader = election(driver.clone(), &name, ttl);
    leader.campaign().await.expect("elected");
    let waiter = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let campaign = spawn_campaign(&waiter);
    // A late campaign of a withdrawn candidate: a place with no refresh, arrived now.
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut admin)
        .await
        .expect("TIME");
    let now_us = secs * 1_000_000 + micros;
    let _: () = admin
        .zadd(&keys.line, "withdrawn\nvalue", now_us)
        .await
        .expect("ZADD");
    let left_at = Instant::now();
    within("the orphan pruned", ttl * 2 + ttl / 2, async {
        loop {
            let line: Vec<String> = admin.zrange(&keys.line, 0, -1).await.expect("ZRANGE");
            if !line.iter().any(|p| p.starts_with("withdrawn\n")) {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!("pruned after {:?}", left_at.elapsed());
    // Every key of the line expires.
    for key in [&keys.line, &keys.line_until] {
        let pttl: i64 = admin.pttl(key).await.expect("PTTL");
        assert!(pttl > 0 && pttl <= 2000, "{key}: PTTL {pttl}");
    }
    // The live waiter kept its place, and is elected when the leader resigns.
    leader.resign().await.expect("resign");
    within("the waiter elected", ttl, campaign)
        .await
        .expect("task")
        .expect("elected");
    // Once nobody waits, the line's keys go.
    waiter.resign().await.expect("resign");
    within("the line's keys gone", ttl * 2, async {
        loop {
            let n: u64 = admin
                .exists(&[&keys.line, &keys.line_until])
                .await
                .expect("EXISTS");
            if n == 0 {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Every command the server ran so far, those inside scripts included (`INFO
/// commandstats`), less the `INFO`s themselves.
async fn all_commands(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls: u64 = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            (name != "info").then_some(calls)
        })
        .sum()
}

/// With 1,000 candidates waiting (on 20 drivers), each handing over to the next and
/// queueing again, a handoff costs Redis at most 15 commands in all: the client's and
/// those its scripts run (`INFO commandstats` counts both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_with_1000_waiting_costs_at_most_15_commands() {
    let h = harness().await;
    let ttl = Duration::from_secs(10);
    let name = unique("thousand");
    let mut drivers = Vec::new();
    for _ in 0..20 {
        drivers.push(h.driver_at(&h.server.url()).await);
    }
    let mut admin = h.admin().await;
    let (elected_tx, mut elected_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let stop = leader_core::CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..=1000 {
        let e = election(drivers[i % drivers.len()].clone(), &name, ttl);
        let (elected_tx, stop) = (elected_tx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let term = tokio::select! {
                    () = stop.cancelled() => break,
                    term = e.campaign() => term,
                };
                if term.is_err() {
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let _ = elected_tx.send(());
                sleep(Duration::from_millis(30)).await;
                let _ = e.resign().await;
                sleep(Duration::from_millis(5)).await;
            }
        }));
        if i == 0 {
            sleep(Duration::from_millis(50)).await;
        }
    }
    drop(elected_tx);
    // Everyone in line.
    let keys = drivers[0].keys(&name);
    within("1,000 in line", Duration::from_secs(60), async {
        loop {
            let n: u64 = admin.zcard(&keys.line).await.expect("ZCARD");
            if n >= 990 {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Every waiter subscribed to its wake channel (a first wait subscribes after a first
    // try, then tries again), and that setup settled: the handoffs' own pace remains.
    within("1,000 subscribed", Duration::from_secs(60), async {
        loop {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(format!("{}*", keys.wake_prefix))
                .query_async(&mut admin)
                .await
                .expect("PUBSUB CHANNELS");
            if channels.len() >= 990 {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    within("the setup settled", Duration::from_secs(60), async {
        let mut last = all_commands(&mut admin).await;
        loop {
            sleep(Duration::from_millis(200)).await;
            let now = all_commands(&mut admin).await;
            // Handoffs alone run about 15 × 6 commands in 200 ms.
            if now - last < 200 {
                return;
            }
            last = now;
        }
    })
    .await;
    while elected_rx.try_recv().is_ok() {}
    let handoffs = 300;
    let before = all_commands(&mut admin).await;
    within("300 handoffs", Duration::from_secs(120), async {
        for _ in 0..handoffs {
            elected_rx.recv().await.expect("candidates run");
        }
    })
    .await;
    let spent = all_commands(&mut admin).await - before;
    stop.cancel();
    for task in tasks {
        within("a candidate stops", Duration::from_secs(20), task)
            .await
            .expect("candidate task");
    }
    let per = spent as f64 / f64::from(handoffs);
    println!("{per:.1} commands per handoff with 1,000 waiting ({spent} for {handoffs})");
    assert!(
        per <= 15.0,
        "{per:.1} commands per handoff with 1,000 waiting"
    );
}

/// Notifications on, but an ACL without the keyspace channels: the refused subscription
/// falls back to renewals and leaves the driver's pub/sub connection working (a waiter on
/// the same driver is still woken at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_keyspace_subscription_falls_back_and_breaks_nothing() {
    fn acl_server() -> std::io::Result<RedisServer> {
        RedisServer::start_with(RedisOptions {
            config: vec![
                "notify-keyspace-events Kgx".to_owned(),
                format!(
                    "user app on >secret resetkeys resetchannels ~leader:* &leader:* -@all {}",
                    leader_redis::ACL_COMMANDS
                ),
            ],
            ..RedisOptions::default()
        })
    }
    let h = start(acl_server).await;
    let ttl = Duration::from_secs(30);
    let url = h.server.url().replace("redis://", "redis://app:secret@");
    let driver = h.driver_at(&url).await;
    let name = unique("acl-keyspace");
    let a = election(driver.clone(), &name, ttl);
    let b = election(driver.clone(), &name, ttl);
    a.campaign().await.expect("a elected");
    let mut admin = h.admin().await;
    // Give the term's (refused) keyspace subscription time to be tried: b waits in line.
    let b_waits = spawn_campaign(&b);
    within("b in line", ttl, async {
        while a.candidates().await.expect("candidates").len() < 2 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(keyspace_channels(&mut admin).await.is_empty());
    let resigned = Instant::now();
    a.resign().await.expect("resign");
    within("b woken", Duration::from_secs(2), b_waits)
        .await
        .expect("task")
        .expect("b elected");
    assert!(resigned.elapsed() < Duration::from_secs(2));
    b.resign().await.expect("resign");
}

/// A withdrawal whose campaign's request lands after it (simulated: the campaign is
/// dropped while its request is on its way, and the place appears in an empty line right
/// after the withdrawal, with nobody else waiting to prune it) leaves nothing within two
/// TTLs while the driver lives: the driver leaves the line again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_landing_after_its_withdrawal_leaves_nothing_within_two_ttls() {
    use leader_core::{Candidate, Driver};
    let h = harness().await;
    let ttl = Duration::from_secs(1);
    let name = unique("late-landing");
    let driver = h.driver_at(&h.server.url()).await;
    let keys = driver.keys(&name);
    let mut admin = h.admin().await;
    let leader = election(driver.clone(), &name, ttl);
    leader.campaign().await.expect("a leader");
    let late = Candidate::new(&name, "late", "v", ttl);
    // Polled once: its first request is on its way when it is dropped.
    let dropped = futures::FutureExt::now_or_never(driver.campaign(&late));
    assert!(
        dropped.is_none(),
        "the campaign was dropped midway: {dropped:?}"
    );
    driver.resign(&late, None).await.expect("the withdrawal");
    let withdrawn = Instant::now();
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut admin)
        .await
        .expect("TIME");
    let _: () = admin
        .zadd(&keys.line, "late\nv", secs * 1_000_000 + micros)
        .await
        .expect("the late campaign's place");
    within("the late place gone", ttl * 2, async {
        loop {
            let n: u64 = admin.exists(&keys.line).await.expect("EXISTS");
            if n == 0 {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!("gone {:?} after the withdrawal", withdrawn.elapsed());
    assert!(leader.status().is_leader());
}
