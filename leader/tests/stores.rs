//! `leader::connect` and `leader::Config` against real etcd and redis-server processes.

use std::time::Duration;

use leader::{Config, Error};
use leader_testkit::{etcd, redis, unique};

/// The service's election code, the same whatever the store: only the config differs.
async fn elect_and_resign(config: &Config) -> u64 {
    let election = config.election().await.expect("election from config");
    let term = tokio::time::timeout(Duration::from_secs(10), election.campaign())
        .await
        .expect("elected in time")
        .expect("elected");
    assert!(election.status().is_leader());
    let leader = election
        .leader()
        .await
        .expect("leader()")
        .expect("a leader");
    assert_eq!(leader.fencing_token, term.fencing_token());
    assert_eq!(leader.value_lossy(), "10.0.0.7:8080");
    election.resign().await.expect("resign");
    term.fencing_token()
}

fn config(json: &str) -> Config {
    serde_json::from_str(json).expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_config_line_moves_the_service_from_etcd_to_redis() {
    let (etcd, redis) = (etcd().await, redis().await);
    let name = unique("moved");
    let on_etcd = config(&format!(
        r#"{{"store":"etcd://{}","name":"{name}","ttl":"2s","value":"10.0.0.7:8080"}}"#,
        etcd.client_addr(0)
    ));
    let on_redis = config(&format!(
        r#"{{"store":"{}","name":"{name}","ttl":"2s","value":"10.0.0.7:8080"}}"#,
        redis.url()
    ));
    assert!(elect_and_resign(&on_etcd).await > 0);
    assert!(elect_and_resign(&on_redis).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_path_is_the_key_prefix_and_no_path_is_no_prefix() {
    use leader::etcd::etcd_client::{Client, GetOptions};
    let server = etcd().await;
    let addr = server.client_addr(0);
    let name = unique("prefixed");
    let mut client = Client::connect([addr.to_string()], None)
        .await
        .expect("etcd client");
    for (url, prefix) in [
        (format!("etcd://{addr}/svc/jobs/"), "svc/jobs/"),
        (format!("etcd://{addr}"), ""),
    ] {
        let driver = leader::connect(&url).await.expect("connect");
        let election = leader::Election::builder(driver, name.clone())
            .ttl(Duration::from_secs(2))
            .build()
            .expect("valid");
        election.campaign().await.expect("elected");
        let keys = client
            .get(
                format!("{prefix}{name}/"),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .expect("get");
        assert_eq!(
            keys.kvs().len(),
            1,
            "{url}: one key under `{prefix}{name}/`"
        );
        election.resign().await.expect("resign");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_path_is_the_database() {
    use leader::redis::redis as redis_crate;
    let server = redis().await;
    let name = unique("db");
    let driver = leader::connect(&format!("{}/3", server.url()))
        .await
        .expect("connect");
    let election = leader::Election::builder(driver, name.clone())
        .ttl(Duration::from_secs(2))
        .build()
        .expect("valid");
    election.campaign().await.expect("elected");
    let client = redis_crate::Client::open(format!("{}/3", server.url())).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let exists: bool = redis_crate::cmd("EXISTS")
        .arg(format!("leader:{{{name}}}:leader"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert!(exists, "the key is in database 3");
    election.resign().await.expect("resign");
    let err = match leader::connect(&format!("{}/jobs", server.url())).await {
        Err(err) => err,
        Ok(_) => panic!("a non-numeric database was accepted"),
    };
    assert!(
        matches!(err, Error::InvalidConfig { name: "store", .. }),
        "{err:?}"
    );
}

#[test]
fn config_is_camel_case_rejects_unknown_keys_and_hides_the_password() {
    let config = config(
        r#"{"store":"redis://app:hunter2@127.0.0.1:6379","name":"jobs","ttl":"5s","safetyMargin":"1s","retryMin":"1s","retryMax":"1m"}"#,
    );
    assert_eq!(config.ttl, Duration::from_secs(5));
    assert_eq!(config.safety_margin, Some(Duration::from_secs(1)));
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("app:***@127.0.0.1:6379"), "{shown}");
    let err = serde_json::from_str::<Config>(r#"{"stor":"etcd://x:1"}"#).expect_err("typo");
    assert!(err.to_string().contains("unknown field `stor`"), "{err}");
    let defaults: Config = serde_json::from_str("{}").expect("all keys have defaults");
    assert_eq!(defaults.store, "etcd://127.0.0.1:2379");
}

#[tokio::test]
async fn an_unknown_store_is_named() {
    let config = config(r#"{"store":"zookeeper://127.0.0.1:2181","name":"jobs"}"#);
    let err = config.election().await.expect_err("unknown scheme");
    assert!(
        matches!(err, Error::InvalidConfig { name: "store", .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_and_sentinel_urls_elect() {
    use leader_testkit::{RedisCluster, RedisSentinel};
    let (cluster, sentinel) = tokio::task::spawn_blocking(|| {
        (
            RedisCluster::start(3).expect("a Redis Cluster starts"),
            RedisSentinel::start_with(vec![format!(
                "user app on >app-pw resetkeys resetchannels ~leader:* ~svc:* &leader:* -@all {}",
                leader::redis::ACL_COMMANDS
            )])
            .expect("Sentinel starts"),
        )
    })
    .await
    .expect("start task");
    let name = unique("topology");
    for url in [
        cluster.url(),
        format!("{}?prefix=svc:", cluster.url()),
        sentinel.url(),
        // The documented least-privilege user, through Sentinel's master lookup (ROLE).
        sentinel.url().replace("://", "://app:app-pw@"),
        format!("{}?replicas=1&replicasTimeout=1s", sentinel.url()),
    ] {
        let on = config(&format!(
            r#"{{"store":"{url}","name":"{name}","ttl":"2s","value":"10.0.0.7:8080"}}"#
        ));
        assert!(elect_and_resign(&on).await > 0, "{url}");
    }
    for bad in [
        format!("{}?replicas=1", cluster.url()),
        format!("{}/3", cluster.url()),
        sentinel.url().replace("/mymaster", ""),
        format!("{}?replicas=x", sentinel.url()),
        format!("{}?ca=/x.pem", sentinel.url()),
    ] {
        let err = leader::connect(&bad).await.err().expect(&bad);
        assert!(
            matches!(err, Error::InvalidConfig { name: "store", .. }),
            "{bad}: {err:?}"
        );
    }
}
