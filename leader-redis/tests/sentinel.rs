//! leader-redis through Sentinel (a master, a replica, three sentinels, started by each
//! test): elections go on after the master is killed, and what `replicas=1` changes.

use std::time::{Duration, Instant};

use leader_core::Election;
use leader_redis::RedisDriver;
use leader_redis::redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use leader_redis::redis::{Client, ConnectionAddr};
use leader_testkit::{MASTER_NAME, RedisSentinel, unique};

async fn sentinel() -> RedisSentinel {
    tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .expect("start task")
        .expect("Sentinel starts (needs redis-server and redis-tools)")
}

fn driver(setup: &RedisSentinel, replicas: usize) -> RedisDriver {
    // Generous timeouts: a loaded machine must not turn a slow answer into a failure.
    let addrs = setup
        .sentinels
        .iter()
        .map(|s| ConnectionAddr::Tcp("127.0.0.1".to_owned(), s.addr().port()));
    let client = SentinelClientBuilder::new(addrs, MASTER_NAME, SentinelServerType::Master)
        .expect("sentinel addresses")
        .build()
        .expect("sentinel client");
    RedisDriver::sentinel_builder(client)
        .request_timeout(Duration::from_secs(2))
        .replicas(replicas, Duration::from_secs(2))
        .build()
}

/// The owner field of `key` on server `i`, read there (a replica answers reads).
async fn owner_on(setup: &RedisSentinel, i: usize, key: &str) -> Option<String> {
    let client = Client::open(format!("redis://{}", setup.servers[i].addr())).expect("URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    // The leader key: `L\n<token>\n<owner>\n<value>`.
    let raw: Option<String> = leader_redis::redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .expect("GET");
    raw.and_then(|raw| raw.split('\n').nth(2).map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_go_on_after_the_master_is_killed() {
    let mut setup = sentinel().await;
    let driver = driver(&setup, 0);
    let name = unique("failover");
    let ttl = Duration::from_secs(2);
    let first = Election::builder(driver.clone(), name.clone())
        .ttl(ttl)
        .build()
        .expect("valid");
    first.campaign().await.expect("elected on the first master");
    let old = setup.master().expect("a master");
    tokio::task::block_in_place(|| setup.servers[old].kill());
    let new = tokio::task::block_in_place(|| setup.wait_for_failover(old)).expect("failover");
    // Whatever the failover kept, the election must have a leader again on the new
    // master within a few TTLs, through the same driver: either the first term survived
    // (its write had reached the replica) or a new one began.
    let second = Election::builder(driver.clone(), name.clone())
        .ttl(ttl)
        .build()
        .expect("valid");
    // Right after the failover requests may fail (a refused connection, READONLY from
    // the demoted master): campaign again on those, as `run` would.
    let campaign = tokio::spawn(async move {
        loop {
            match second.campaign().await {
                Ok(term) => return (second, term),
                Err(err) if err.is_transient() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("campaign: {err:?}"),
            }
        }
    });
    let deadline = Instant::now() + ttl * 5;
    let key = driver.keys(&name).leader;
    loop {
        if owner_on(&setup, new, &key).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no leader on the new master within 5 TTLs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // If the first term lives on, hand over on the new master (it may end meanwhile).
    // A transient failure leaves the key to expire, which the second's wait covers.
    match first.resign().await {
        Ok(()) | Err(leader_core::Error::NotALeader) => {}
        Err(err) if err.is_transient() => {}
        Err(err) => panic!("resign on the new master: {err:?}"),
    }
    let (second, _elected) = tokio::time::timeout(ttl * 5, campaign)
        .await
        .expect("the second candidate is elected on the new master")
        .expect("campaign task");
    // No fencing-token comparison: without `replicas`, the failover may have lost the
    // counter's last increment (leader-redis's README, "Sentinel").
    second.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replicas_1_a_grant_is_on_the_replica_before_it_is_returned() {
    let setup = sentinel().await;
    let master = setup.master().expect("a master");
    let replica = 1 - master;
    let drivers = [driver(&setup, 0), driver(&setup, 1)];
    let name = unique("replicated");
    let key = drivers[0].keys(&name).leader;
    let mut plain_ms = Vec::new();
    let mut waited_ms = Vec::new();
    for round in 0..20 {
        for (replicas, times) in [(0, &mut plain_ms), (1, &mut waited_ms)] {
            let election = Election::builder(drivers[replicas].clone(), name.clone())
                .ttl(Duration::from_secs(5))
                .build()
                .expect("valid");
            let started = Instant::now();
            let term = election.campaign().await.expect("elected");
            times.push(started.elapsed().as_secs_f64() * 1e3);
            if replicas == 1 {
                // WAIT 1 returned before the grant: the replica has this very term.
                assert_eq!(
                    owner_on(&setup, replica, &key).await.as_deref(),
                    Some(election.id()),
                    "round {round}: the replica has the grant"
                );
            }
            assert!(term.is_valid());
            election.resign().await.expect("resign");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, waited) = (median(&mut plain_ms), median(&mut waited_ms));
    println!(
        "campaign median: {plain:.2} ms without WAIT, {waited:.2} ms with replicas=1 \
         ({:.2}x), 20 rounds each, interleaved, warm connections",
        waited / plain
    );
}
