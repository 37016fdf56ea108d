//! leader-redis on a 3-master Redis Cluster (`redis-cli --cluster create`), started by each
//! test: the conformance suite, elections spread over the masters, and a master killed
//! while it holds a leader's key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leader_core::testing::{Fault, Harness, conformance_tests};
use leader_core::{Driver, Election};
use leader_redis::RedisDriver;
use leader_redis::redis::Client;
use leader_redis::redis::cluster::{ClusterClient, NodeAddress};
use leader_testkit::FaultProxy;
use leader_testkit::{RedisCluster, unique};

const TTL: Duration = Duration::from_secs(1);

struct ClusterHarness {
    cluster: RedisCluster,
}

async fn harness() -> ClusterHarness {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .expect("start task")
        .expect("a Redis Cluster starts (needs redis-server and redis-tools)");
    ClusterHarness { cluster }
}

fn node_urls(cluster: &RedisCluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .map(|n| format!("redis://{}", n.addr()))
        .collect()
}

/// Every node behind a proxy of its own: partitioning the driver cuts all of them.
struct Proxies(Vec<FaultProxy>);

#[async_trait::async_trait]
impl Fault for Proxies {
    async fn partition(&self) {
        for proxy in &self.0 {
            proxy.hold();
        }
    }

    async fn heal(&self) {
        for proxy in &self.0 {
            proxy.pass();
        }
    }
}

#[async_trait::async_trait]
impl Harness for ClusterHarness {
    async fn driver(&self) -> Arc<dyn Driver> {
        Arc::new(
            RedisDriver::cluster_builder(node_urls(&self.cluster))
                .expect("cluster URLs")
                .connect()
                .await
                .expect("connect to the cluster"),
        )
    }

    async fn faulty_driver(&self) -> (Arc<dyn Driver>, Box<dyn Fault>) {
        let mut proxies = Vec::new();
        let mut map = HashMap::new();
        for node in &self.cluster.nodes {
            let proxy = FaultProxy::start(node.addr()).await.expect("proxy starts");
            map.insert(
                NodeAddress::new("127.0.0.1", node.addr().port()),
                NodeAddress::new("127.0.0.1", proxy.addr().port()),
            );
            proxies.push(proxy);
        }
        let seeds: Vec<String> = proxies
            .iter()
            .map(|p| format!("redis://{}", p.addr()))
            .collect();
        let client = ClusterClient::builder(seeds.clone())
            .node_address_map(map)
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500))
            .build()
            .expect("cluster client");
        let pubsub = seeds
            .iter()
            .map(|url| Client::open(url.as_str()).expect("node URL"))
            .collect();
        let driver = RedisDriver::cluster_builder_from(client, pubsub)
            .expect("pub/sub nodes")
            .connect()
            .await
            .expect("connect through the proxies");
        (Arc::new(driver), Box::new(Proxies(proxies)))
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}

conformance_tests!(harness; #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);

/// Election names whose keys land on each master in turn.
fn names_on_every_master(cluster: &RedisCluster, driver: &RedisDriver) -> Vec<(String, usize)> {
    let mut found: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while found.len() < cluster.nodes.len() {
        let name = unique(&format!("spread{i}"));
        let node = cluster
            .node_of(&driver.keys(&name).leader)
            .expect("CLUSTER KEYSLOT");
        if !found.iter().any(|(_, n)| *n == node) {
            found.push((name, node));
        }
        i += 1;
        assert!(i < 1000, "no election name lands on every master");
    }
    found
}

/// How many clients of any node subscribe to `channel`.
async fn subscribers(cluster: &RedisCluster, channel: &str) -> u64 {
    let mut total = 0;
    for node in &cluster.nodes {
        let client = Client::open(format!("redis://{}", node.addr())).expect("node URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("node connection");
        let (_, count): (String, u64) = leader_redis::redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut connection)
            .await
            .expect("PUBSUB NUMSUB");
        total += count;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_on_every_master_elect_hand_over_and_wake_waiters() {
    let h = harness().await;
    let driver = RedisDriver::cluster_builder(node_urls(&h.cluster))
        .expect("cluster URLs")
        .connect()
        .await
        .expect("connect");
    let ttl = Duration::from_secs(10);
    for (name, node) in names_on_every_master(&h.cluster, &driver) {
        let first = Election::builder(driver.clone(), name.clone())
            .ttl(ttl)
            .build()
            .expect("valid");
        let second = Election::builder(driver.clone(), name.clone())
            .ttl(ttl)
            .build()
            .expect("valid");
        let term = first.campaign().await.expect("elected");
        // The waiter's own channel: a resignation wakes the head of the line there.
        let channel = driver.keys(&name).wake(second.id());
        let waiting = tokio::spawn(async move {
            let term = second.campaign().await;
            (second, term)
        });
        // The waiter subscribes before its first attempt: once its subscription shows on
        // some node, it waits in line (or won already, which the resignation would not).
        let deadline = Instant::now() + Duration::from_secs(5);
        while subscribers(&h.cluster, &channel).await == 0 {
            assert!(
                Instant::now() < deadline,
                "{name}: the waiter never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!waiting.is_finished(), "{name}: the second waits in line");
        let resigned_at = Instant::now();
        first.resign().await.expect("resign");
        let (second, elected) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("handover in time")
            .expect("campaign task");
        let elected = elected.expect("elected");
        assert!(elected.fencing_token() > term.fencing_token());
        assert!(
            resigned_at.elapsed() < ttl / 4,
            "{name} (master {node}): woken by pub/sub across the cluster, not by expiry: {:?}",
            resigned_at.elapsed()
        );
        second.resign().await.expect("resign");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_a_leader_ends_that_term_only() {
    let mut h = harness().await;
    let driver = RedisDriver::cluster_builder(node_urls(&h.cluster))
        .expect("cluster URLs")
        .request_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect");
    let ttl = Duration::from_secs(2);
    let names = names_on_every_master(&h.cluster, &driver);
    let mut elections = Vec::new();
    for (name, node) in &names {
        let election = Election::builder(driver.clone(), name.clone())
            .ttl(ttl)
            .build()
            .expect("valid");
        let term = election.campaign().await.expect("elected");
        elections.push((election, term, *node));
    }
    let (_, victim_term, victim) = &elections[0];
    let killed_at = Instant::now();
    h.cluster.nodes[*victim].kill();
    // The term on the dead master cannot renew: it ends by its deadline, never later.
    tokio::time::timeout(ttl * 2, victim_term.ended())
        .await
        .expect("the term on the dead master ends");
    // `is_valid()` turns false at the deadline itself (the safety property, checked
    // exactly elsewhere); the holder task that records the end runs on a timer at the
    // deadline, a scheduling delay later.
    let ended_at = victim_term.ended_at().expect("ended");
    assert!(!victim_term.is_valid());
    assert!(ended_at <= victim_term.deadline() + Duration::from_secs(1));
    assert!(killed_at.elapsed() < ttl * 2);
    // The other masters' terms renew on: hold them past two TTLs.
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        for (_, term, node) in &elections[1..] {
            assert!(
                term.is_valid(),
                "the term on master {node} ended with another's death"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fence on a Cluster: resources on every master, each command's keys under the
/// resource's hash tag; a stale token is refused there as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_works_on_every_master_with_the_resource_as_hash_tag() {
    use leader_core::Error;
    use leader_redis::Fence;
    let h = harness().await;
    let client = ClusterClient::new(node_urls(&h.cluster)).expect("cluster client");
    let mut conn = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    for i in 0..12 {
        let fence = Fence::new(unique(&format!("res{i}")));
        let target = format!("{}:rows", fence.hash_tag());
        let mut cmd = leader_redis::redis::cmd("SET");
        cmd.arg(&target).arg("new");
        let _: () = fence.run(&mut conn, 5, &cmd).await.expect("a fresh token");
        let mut stale = leader_redis::redis::cmd("SET");
        stale.arg(&target).arg("stale");
        let err = fence
            .run::<(), _>(&mut conn, 4, &stale)
            .await
            .expect_err("stale");
        assert!(
            matches!(
                err,
                Error::Fenced {
                    token: 4,
                    newer: Some(5),
                    ..
                }
            ),
            "{err:?}"
        );
        let value: String = leader_redis::redis::cmd("GET")
            .arg(&target)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(value, "new");
    }
}
