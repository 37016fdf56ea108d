//! `leader::connect` and `leader::Config` choosing PostgreSQL by configuration.

use std::time::Duration;

use leader::{Config, Error};
use leader_testkit::{postgres, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_a_postgres_url_elects_on_postgres() {
    let server = postgres().await;
    let name = unique("by-config");
    for scheme in ["postgres", "postgresql"] {
        let store = server.url().replacen("postgres", scheme, 1);
        let config: Config = serde_json::from_str(&format!(
            r#"{{"store":"{store}","name":"{name}","ttl":"2s","value":"10.0.0.7:8080"}}"#
        ))
        .expect("valid config");
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
    }
    // The driver behind the URL is the PostgreSQL one, on its default table.
    let driver = leader::postgres::PostgresDriver::connect(&server.url())
        .await
        .expect("connect");
    assert_eq!(driver.table(), "leader_elections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_are_denied_and_never_show_the_password() {
    let server = postgres().await;
    // The test server trusts every local login, so make one that needs a password: a
    // user that does not exist is refused with 28000 (invalid authorization).
    let url = server.url_as("nobody_here", "hunter2");
    let err = match leader::connect(&url).await {
        Err(err) => err,
        Ok(_) => panic!("a user that does not exist logged in"),
    };
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    let shown = format!("{err} {err:?} {}", leader::ErrorChain(&err));
    assert!(!shown.contains("hunter2"), "{shown}");
}
