//! Beyond election on Redis (#22): the fence, and the nomination a handover leaves.

mod common;

use std::time::Duration;

use common::harness;
use leader_core::testing::conformance::{spawn_campaign, within};
use leader_core::{Candidate, Driver, Election, Error};
use leader_redis::{Fence, RedisDriver};
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

/// The server's time in microseconds (a place's arrival).
async fn server_us(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(admin).await.expect("TIME");
    secs * 1_000_000 + micros
}

/// A stale token is refused and its command not run; the same token may write again; a
/// newer one writes and is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_is_fenced_and_its_command_not_run() {
    let h = harness().await;
    let mut admin = h.admin().await;
    let resource = unique("reports");
    let fence = Fence::new(&resource);
    assert_eq!(fence.key(), format!("leader:fence:{{{resource}}}"));
    let target = format!("{}:latest", fence.hash_tag());
    let write = |value: &str| {
        let mut cmd = redis::cmd("SET");
        cmd.arg(&target).arg(value);
        cmd
    };
    let _: () = fence
        .run(&mut admin, 7, &write("seven"))
        .await
        .expect("first");
    let _: () = fence
        .run(&mut admin, 7, &write("seven again"))
        .await
        .expect("same term");
    let err = fence
        .run::<(), _>(&mut admin, 6, &write("stale"))
        .await
        .expect_err("older token");
    assert!(
        matches!(&err, Error::Fenced { resource: r, token: 6, newer: Some(7) } if *r == resource),
        "{err:?}"
    );
    let value: String = admin.get(&target).await.expect("GET");
    assert_eq!(value, "seven again", "the stale command did not run");
    let _: () = fence
        .run(&mut admin, 9, &write("nine"))
        .await
        .expect("newer");
    let seen: u64 = admin.get(fence.key()).await.expect("GET fence");
    assert_eq!(seen, 9);
    // The command's reply comes back, its errors too.
    let n: i64 = fence
        .run(
            &mut admin,
            9,
            redis::cmd("INCR").arg(format!("{}:n", fence.hash_tag())),
        )
        .await
        .expect("INCR");
    assert_eq!(n, 1);
    assert!(matches!(
        Fence::new("a{b")
            .run::<(), _>(&mut admin, 1, &write("x"))
            .await,
        Err(Error::InvalidConfig { .. })
    ));
}

/// Writers with tokens 1..=40 race on one key: the newest always ends up written, and
/// every refusal names a newer token than the refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_of_concurrent_writers_wins() {
    let h = harness().await;
    let resource = unique("race");
    let target = format!("{{{resource}}}:v");
    let mut tasks = Vec::new();
    let mut tokens: Vec<u64> = (1..=40).collect();
    // Not in order: a fixed shuffle.
    tokens.sort_by_key(|t| (t * 7919) % 41);
    for token in tokens {
        let (url, resource, target) = (h.server.url(), resource.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = redis::Client::open(url)
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let mut cmd = redis::cmd("SET");
            cmd.arg(&target).arg(token);
            (
                token,
                Fence::new(resource)
                    .run::<(), _>(&mut conn, token, &cmd)
                    .await,
            )
        }));
    }
    let mut refused = 0;
    for task in tasks {
        let (token, result) = task.await.expect("writer");
        match result {
            Ok(()) => {}
            Err(Error::Fenced {
                token: t, newer, ..
            }) => {
                assert_eq!(t, token);
                assert!(newer.is_some_and(|n| n > token), "{newer:?} > {token}");
                refused += 1;
            }
            Err(other) => panic!("writer {token}: {other:?}"),
        }
    }
    let mut admin = h.admin().await;
    let value: u64 = admin.get(&target).await.expect("GET");
    assert_eq!(value, 40, "the newest token's write is the last one");
    println!("{refused} of 40 writers refused");
}

/// A nomination lets only its nominee in for one TTL; a nominee that never takes it (gone)
/// leaves the line blocked only until the nomination expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nomination_blocks_others_until_it_expires() {
    let h = harness().await;
    let ttl = Duration::from_secs(1);
    let name = unique("nominee-gone");
    let driver = h.driver_at(&h.server.url()).await;
    let keys = driver.keys(&name);
    let mut admin = h.admin().await;
    let a = election(driver.clone(), &name, ttl);
    let term = a.campaign().await.expect("a elected");
    let b = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let b_waits = spawn_campaign(&b);
    // A nominee in line that will never campaign (its process is gone).
    let arrived = server_us(&mut admin).await;
    let _: () = admin
        .zadd(&keys.line, "ghost\nv", arrived)
        .await
        .expect("ZADD");
    within("b in line", ttl * 3, async {
        while a.candidates().await.expect("candidates").len() < 3 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let handed = Instant::now();
    term.hand_over("ghost")
        .await
        .expect("hand over to the ghost");
    sleep(ttl / 2).await;
    assert!(
        !b_waits.is_finished(),
        "b is not elected while the nomination lasts"
    );
    within("b elected at the nomination's expiry", ttl * 2, b_waits)
        .await
        .expect("task")
        .expect("b elected");
    let waited = handed.elapsed();
    assert!(
        waited >= ttl - Duration::from_millis(50) && waited < ttl * 2,
        "b elected {waited:?} after the handover"
    );
}

/// A nominee that withdraws ends its nomination, and the head of the line is elected at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nominee_that_withdraws_lets_the_line_resume_at_once() {
    let h = harness().await;
    let ttl = Duration::from_secs(5);
    let name = unique("nominee-withdraws");
    let driver = h.driver_at(&h.server.url()).await;
    let keys = driver.keys(&name);
    let mut admin = h.admin().await;
    let a = election(driver.clone(), &name, ttl);
    let term = a.campaign().await.expect("a elected");
    let b = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let b_waits = spawn_campaign(&b);
    // The nominee: a candidate driven by hand, standing in line.
    let nominee = Candidate::new(&name, "nominee", "v", ttl);
    let arrived = server_us(&mut admin).await;
    let _: () = admin
        .zadd(&keys.line, "nominee\nv", arrived)
        .await
        .expect("ZADD");
    within("b in line", ttl, async {
        while a.candidates().await.expect("candidates").len() < 3 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    term.hand_over("nominee").await.expect("hand over");
    let raw: String = admin.get(&keys.leader).await.expect("GET");
    assert_eq!(raw, "N\nnominee", "the nomination names the nominee");
    let pttl: i64 = admin.pttl(&keys.leader).await.expect("PTTL");
    assert!(pttl > 0 && pttl <= 5000, "it lasts one TTL: {pttl}");
    sleep(Duration::from_millis(200)).await;
    assert!(!b_waits.is_finished());
    let withdrew = Instant::now();
    driver
        .resign(&nominee, None)
        .await
        .expect("the nominee withdraws");
    within("b elected", ttl / 5, b_waits)
        .await
        .expect("task")
        .expect("b elected");
    assert!(withdrew.elapsed() < ttl / 5);
}

/// On the driver, hand_over and proclaim act on exactly the given term: a stale token is
/// TermGone, a nominee not in line NotWaiting, and nothing is written either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_and_proclaim_touch_exactly_the_given_term() {
    let h = harness().await;
    let ttl = Duration::from_secs(5);
    let name = unique("exact-term");
    let driver = h.driver_at(&h.server.url()).await;
    let keys = driver.keys(&name);
    let mut admin = h.admin().await;
    let a = Candidate::new(&name, "a", "a-value", ttl);
    let grant = driver.campaign(&a).await.expect("a elected");
    let token = grant.fencing_token;
    let before: String = admin.get(&keys.leader).await.expect("GET");
    let stale = token - 1;
    assert!(matches!(
        driver.proclaim(&a, stale, b"x").await,
        Err(Error::TermGone)
    ));
    assert!(matches!(
        driver.hand_over(&a, stale, "b").await,
        Err(Error::TermGone)
    ));
    let err = driver
        .hand_over(&a, token, "b")
        .await
        .expect_err("b waits nowhere");
    assert!(
        matches!(&err, Error::NotWaiting { id } if id == "b"),
        "{err:?}"
    );
    let after: String = admin.get(&keys.leader).await.expect("GET");
    assert_eq!(before, after, "nothing written");
    driver.proclaim(&a, token, b"new").await.expect("proclaim");
    let info = driver
        .leader(&name)
        .await
        .expect("leader")
        .expect("a leads");
    assert_eq!(
        (info.value.as_slice(), info.fencing_token),
        (&b"new"[..], token)
    );
    let line = driver.candidates(&name).await.expect("candidates");
    assert_eq!(line.len(), 1);
    assert_eq!((line[0].id.as_str(), line[0].is_leader), ("a", true));
    assert_eq!(line[0].value, b"new");
    driver.resign(&a, Some(token)).await.expect("resign");
}
