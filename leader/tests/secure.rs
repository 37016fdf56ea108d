//! Stores with their security switched on, reached through store URLs: etcd with TLS,
//! client certificates and authentication; Redis with TLS only, the default user off, and
//! the least-privilege ACL user that leader-redis's README documents.

use std::time::{Duration, Instant};

use leader::{Election, Error, ErrorChain};
use leader_testkit::{Certificates, RedisOptions, RedisServer, secure_etcd, unique};

/// The ACL of leader-redis's README ("Production"), for the default prefix `leader:`.
fn redis_acl() -> String {
    format!(
        "user app on >app-pw resetkeys resetchannels ~leader:* &leader:* -@all {}",
        leader::redis::ACL_COMMANDS
    )
}

async fn election(url: &str, name: &str, ttl: Duration) -> Election {
    let driver = leader::connect(url).await.expect("connect");
    Election::builder(driver, name)
        .ttl(ttl)
        .build()
        .expect("valid election")
}

/// `what` within `limit`, or the test fails saying what did not happen.
async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
}

/// The second of two candidates, waiting in line.
type Waiting = tokio::task::JoinHandle<(Election, leader::Result<leader::Term>)>;

/// Two candidates of election `name` on `url`: the first elected, the second waiting.
async fn two_in_line(url: &str, name: &str, ttl: Duration) -> (Election, leader::Term, Waiting) {
    let first = election(url, name, ttl).await;
    let second = election(url, name, ttl).await;
    let term = within(
        "the first election",
        Duration::from_secs(10),
        first.campaign(),
    )
    .await
    .expect("elected");
    let waiting = tokio::spawn(async move {
        let term = second.campaign().await;
        (second, term)
    });
    (first, term, waiting)
}

/// `first` resigns `term`; the waiting candidate is elected in a fraction of the TTL (woken,
/// not by the key's expiry), with a greater fencing token, and resigns.
async fn hand_over(first: Election, term: &leader::Term, waiting: Waiting, ttl: Duration) {
    let resigned_at = Instant::now();
    first.resign().await.expect("resign");
    let (second, elected) = within("the handover", ttl / 2, waiting)
        .await
        .expect("campaign task");
    let elected = elected.expect("the second candidate is elected");
    assert!(elected.fencing_token() > term.fencing_token());
    assert!(
        resigned_at.elapsed() < ttl / 4,
        "woken by the resignation, not by the key's expiry: {:?}",
        resigned_at.elapsed()
    );
    second.resign().await.expect("resign");
}

/// `run` on a refused client returns a non-transient error at once (no campaigning
/// again), and it says what is missing.
async fn refused_run(url: &str, name: &str) -> Error {
    let election = election(url, name, Duration::from_secs(2)).await;
    let err = within(
        "run() returning the refusal",
        Duration::from_secs(5),
        election.run(std::future::pending::<()>()),
    )
    .await
    .expect_err("a refused client cannot lead");
    assert!(!err.is_transient(), "{err:?}");
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_tls_and_auth_elects_hands_over_and_renews_past_the_token_ttl() {
    // Auth tokens expire after 1 s of disuse; terms renew every 2 s (TTL 6 s), so every
    // renewal finds its token expired and must authenticate again.
    let etcd = secure_etcd(1).await;
    let url = etcd.url("app", "app-pw", "app/");
    let name = unique("secure");
    let ttl = Duration::from_secs(6);
    let (first, term, waiting) = two_in_line(&url, &name, ttl).await;

    // Hold past several token expiries: the term must stay valid all along.
    let hold_until = Instant::now() + ttl + Duration::from_secs(2);
    while Instant::now() < hold_until {
        assert!(term.is_valid(), "the term ended while its token expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        term.deadline() > term.elected_at() + ttl,
        "the term was renewed"
    );
    let listed = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", &format!("app/{name}/")])
        .expect("etcdctl get");
    assert_eq!(
        listed.lines().filter(|l| !l.is_empty()).count(),
        2,
        "{listed}"
    );

    hand_over(first, &term, waiting, ttl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refuses_another_prefix_and_a_wrong_password_at_once() {
    let etcd = secure_etcd(300).await;
    // The user may only use `app/`; this election's keys are under `other/`.
    let err = refused_run(&etcd.url("app", "app-pw", "other/"), &unique("elsewhere")).await;
    let said = ErrorChain(&err).to_string();
    assert!(said.contains("permission denied"), "{said}");
    assert!(
        said.contains("readwrite other/"),
        "the message names the grant: {said}"
    );

    let err = match leader::connect(&etcd.url("app", "wrong-pw", "app/")).await {
        Err(err) => err,
        Ok(_) => panic!("a wrong password connected"),
    };
    let said = ErrorChain(&err).to_string();
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    assert!(said.contains("credentials"), "{said}");
    assert!(!said.contains("wrong-pw"), "{said}");
    assert!(!format!("{err:?}").contains("wrong-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_the_ca() {
    let etcd = secure_etcd(300).await;
    let addr = etcd.server.client_addr(0);
    // No `ca=`: the system roots do not know the test CA.
    let err = match tokio::time::timeout(
        Duration::from_secs(20),
        leader::connect(&format!("etcds://app:app-pw@{addr}/app/")),
    )
    .await
    {
        Ok(Err(err)) => err,
        Ok(Ok(_)) => panic!("connected without trusting the CA"),
        Err(_) => panic!("connect hung"),
    };
    assert!(!matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    let missing = format!("etcds://app:app-pw@{addr}/app/?ca=/nonexistent/ca.pem");
    let err = leader::connect(&missing).await.err().expect("no such file");
    let said = err.to_string();
    assert!(
        matches!(err, Error::InvalidConfig { name: "store", .. }),
        "{err:?}"
    );
    assert!(!said.contains("app-pw"), "{said}");
}

/// redis-server with TLS only, the default user off, an admin, the documented `app` user
/// and a user `other` limited to other keys.
fn secure_redis() -> (RedisServer, Certificates) {
    let certs = Certificates::generate().expect("certificates");
    let server = RedisServer::start_with(RedisOptions {
        tls: Some(certs.clone()),
        config: vec![
            "user default off".to_owned(),
            "user admin on >admin-pw ~* &* +@all".to_owned(),
            redis_acl(),
            "user other on >other-pw ~other:* &other:* +@all".to_owned(),
        ],
        ..RedisOptions::default()
    })
    .expect("redis-server with TLS starts");
    (server, certs)
}

fn redis_url(server: &RedisServer, certs: &Certificates, user: &str, password: &str) -> String {
    format!(
        "rediss://{user}:{password}@{}?{}",
        server.addr(),
        certs.query()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_tls_and_the_documented_acl_elects_and_hands_over() {
    let (server, certs) = tokio::task::spawn_blocking(secure_redis)
        .await
        .expect("start task");
    let url = redis_url(&server, &certs, "app", "app-pw");
    let name = unique("acl");
    let ttl = Duration::from_secs(10);
    let (first, term, waiting) = two_in_line(&url, &name, ttl).await;
    // The waiter is subscribed when its first attempt has failed: wait for the second
    // attempt's absence to be certain is impossible, so look at the server's clients.
    within("the waiter's subscription", Duration::from_secs(5), async {
        loop {
            let clients = admin(&server, &certs, &["CLIENT", "LIST"]).await;
            if clients.contains("cmd=subscribe") || clients.contains("sub=1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    hand_over(first, &term, waiting, ttl).await;

    // A user limited to other keys: refused at once, saying what is missing.
    let err = refused_run(&redis_url(&server, &certs, "other", "other-pw"), &name).await;
    let said = ErrorChain(&err).to_string();
    assert!(
        said.contains("leader:"),
        "the message names the keys: {said}"
    );
    // A wrong password: refused when connecting, the password nowhere.
    let err = leader::connect(&redis_url(&server, &certs, "app", "bad-pw"))
        .await
        .err()
        .expect("a wrong password connected");
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    let said = format!("{} {err:?}", ErrorChain(&err));
    assert!(!said.contains("bad-pw"), "{said}");
    // Plain TCP to a TLS-only server: no connection (not a hang).
    let plain = format!("redis://app:app-pw@{}", server.addr());
    let refused = tokio::time::timeout(Duration::from_secs(10), leader::connect(&plain)).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "plain TCP to a TLS-only server must fail"
    );
}

/// A command as `admin`, over TLS; its reply as text.
async fn admin(server: &RedisServer, certs: &Certificates, args: &[&str]) -> String {
    use leader::redis::redis;
    let read = |path: std::path::PathBuf| std::fs::read(path).expect("certificate file");
    let client = redis::Client::build_with_tls(
        format!("rediss://admin:admin-pw@{}", server.addr()),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(certs.client_cert()),
                client_key: read(certs.client_key()),
            }),
            root_cert: Some(read(certs.ca())),
        },
    )
    .expect("admin client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let value: redis::Value = cmd
        .query_async(&mut connection)
        .await
        .expect("admin command");
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => format!("{other:?}"),
    }
}
