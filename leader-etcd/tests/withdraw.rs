//! Nothing a withdrawn candidate sent outlives its withdrawal (#20): a create whose answer
//! never came, a resignation that keeps failing; and names that would nest are refused.

mod common;

use std::time::Duration;

use common::{TTL, harness};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Permission, PutOptions,
    RoleRevokePermissionOptions, Txn, TxnOp,
};
use leader_core::testing::conformance::within;
use leader_core::{Candidate, Driver, Election, Error};
use leader_etcd::EtcdDriver;
use tokio::time::{Instant, sleep};

fn unique(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

/// Every key of election `name` and its side keys (`name/…`, `name\0…`).
async fn keys_of(admin: &mut Client, name: &str) -> Vec<String> {
    admin
        .get(name, Some(GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// What the attempt lease rests on: etcd 3.4 checks the lease of every put of a
/// transaction before it applies any, so a create that also puts a key on a revoked lease
/// writes nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_with_a_put_on_a_revoked_lease_applies_nothing() {
    let h = harness().await;
    let mut admin = Client::connect([h.server.endpoints()[0].as_str()], None)
        .await
        .expect("connect");
    let name = unique("revoked");
    let live = admin.lease_grant(30, None).await.expect("grant").id();
    let attempt = admin.lease_grant(30, None).await.expect("grant").id();
    admin.lease_revoke(attempt).await.expect("revoke");
    let key = format!("{name}/{live:x}");
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(key.as_str(), "v", Some(PutOptions::new().with_lease(live))),
            TxnOp::put(
                format!("{name}\0try\0{live:x}"),
                "",
                Some(PutOptions::new().with_lease(attempt)),
            ),
        ]);
    let err = admin.txn(txn).await.expect_err("a put on a revoked lease");
    assert!(err.to_string().contains("lease not found"), "{err}");
    assert!(
        keys_of(&mut admin, &name).await.is_empty(),
        "nothing applied"
    );
}

/// The orphan of #20: a campaign withdrawn while its create is in flight. etcd is stopped
/// (SIGSTOP) while the create is sent, the campaign dropped and the withdrawal sent, then
/// resumed: etcd may serve the withdrawal's read before it applies the create. Without the
/// attempt lease the read found nothing, the create landed afterwards, and the key stayed on
/// the driver's lease for as long as the driver lived, every later candidate waiting behind
/// it. Repeated, since the race is not hit every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_in_flight_when_its_campaign_is_withdrawn_leaves_nothing_behind() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let driver = h.driver_at(endpoint.clone()).await;
    let other = h.driver_at(endpoint.clone()).await;
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    let pid = h.server.pid(0).expect("etcd runs");
    let name = unique("orphan");
    let c = Candidate::new(&name, "orphan-1", "withdrawn", TTL);
    // The lease and the attempt lease exist: the next campaign's first request is its create.
    let grant = driver.campaign(&c).await.expect("elected");
    let ours = keys_of(&mut admin, &name).await;
    let suffix = ours
        .iter()
        .find_map(|key| key.strip_prefix(&format!("{name}/")))
        .expect("the candidate's key")
        .to_owned();
    driver
        .resign(&c, Some(grant.fencing_token))
        .await
        .expect("resign");
    for attempt in 0..8 {
        leader_testkit::signal(pid, "STOP").expect("SIGSTOP etcd");
        let campaign = {
            let driver = driver.clone();
            let c = c.clone();
            tokio::spawn(async move { driver.campaign(&c).await })
        };
        sleep(Duration::from_millis(20)).await;
        campaign.abort();
        let _ = campaign.await;
        let withdrawal = {
            let driver = driver.clone();
            let c = c.clone();
            tokio::spawn(async move { driver.resign(&c, None).await })
        };
        sleep(Duration::from_millis(30)).await;
        leader_testkit::signal(pid, "CONT").expect("SIGCONT etcd");
        let withdrawn = within("the withdrawal", Duration::from_secs(5), withdrawal)
            .await
            .expect("no panic");
        withdrawn.unwrap_or_else(|err| panic!("try {attempt}: withdrawal failed: {err}"));
        // Nothing of the candidate is left, and another candidate is elected within 2 × TTL.
        let started = Instant::now();
        let waiter = Candidate::new(&name, format!("next-{attempt}"), "next", TTL);
        let elected = tokio::time::timeout(TTL * 2, other.campaign(&waiter)).await;
        let left = keys_of(&mut admin, &name).await;
        let grant = elected.unwrap_or_else(|_| {
            panic!(
                "try {attempt}: no one elected within 2 × TTL after the withdrawal; \
                 left in etcd: {left:?}"
            )
        });
        let grant = grant.expect("elected");
        assert!(started.elapsed() <= TTL * 2);
        // Nothing of the withdrawn candidate (key, id or guard) is left.
        let theirs: Vec<String> = keys_of(&mut admin, &name)
            .await
            .into_iter()
            .filter(|key| key.ends_with(&suffix))
            .collect();
        assert!(theirs.is_empty(), "try {attempt}: left behind: {theirs:?}");
        other
            .resign(&waiter, Some(grant.fencing_token))
            .await
            .expect("resign");
    }
}

/// Election `svc` would hold `svc/x`'s keys: names with `/` are refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_would_nest_are_refused() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let err = Election::builder(driver.clone(), "svc/x")
        .ttl(TTL)
        .build()
        .expect_err("a name with a slash");
    match &err {
        Error::InvalidConfig { name, reason } => {
            assert_eq!(*name, "name");
            assert!(reason.contains('/') && reason.contains("svc"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let leader = driver.leader("svc/x").await;
    assert!(
        matches!(leader, Err(Error::InvalidConfig { .. })),
        "{leader:?}"
    );
    let c = Candidate::new("svc/x", "nested-1", "v", TTL);
    let campaign = driver.campaign(&c).await;
    assert!(
        matches!(campaign, Err(Error::InvalidConfig { .. })),
        "{campaign:?}"
    );
    Election::builder(driver, unique("svc"))
        .ttl(TTL)
        .build()
        .expect("a name without a slash");
}

/// A resignation that keeps failing (here etcd refuses every write of the candidate's user,
/// while keep-alives, which need no permission, go on) still leaves no key behind for more
/// than 2 × TTL: the driver stops keeping the lease alive after a TTL of failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_that_keeps_failing_leaves_no_key_after_two_ttls() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    admin.role_add("root").await.expect("role root");
    admin
        .user_add("root", "root-pw", None)
        .await
        .expect("user root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("root's role");
    admin.role_add("elections").await.expect("role");
    admin
        .role_grant_permission("elections", Permission::read_write("svc/").with_prefix())
        .await
        .expect("permission");
    admin
        .user_add("candidate", "candidate-pw", None)
        .await
        .expect("user");
    admin
        .user_grant_role("candidate", "elections")
        .await
        .expect("candidate's role");
    admin.auth_enable().await.expect("auth enabled");
    let mut root = Client::connect(
        [endpoint.as_str()],
        Some(ConnectOptions::new().with_user("root", "root-pw")),
    )
    .await
    .expect("connect as root");
    let client = Client::connect(
        [endpoint.as_str()],
        Some(ConnectOptions::new().with_user("candidate", "candidate-pw")),
    )
    .await
    .expect("connect as candidate");
    let name = unique("stuck");
    let driver = EtcdDriver::builder(client).prefix("svc/").build();
    let election = Election::builder(driver, &name)
        .ttl(TTL)
        .build()
        .expect("valid settings");
    let _term = election.campaign().await.expect("elected");
    let prefix = format!("svc/{name}");
    assert!(!keys_of(&mut root, &prefix).await.is_empty());

    // From now on the candidate may read but not write.
    root.role_revoke_permission(
        "elections",
        "svc/",
        Some(RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .expect("revoke");
    root.role_grant_permission("elections", Permission::read("svc/").with_prefix())
        .await
        .expect("read only");
    let started = Instant::now();
    let resigned = election.resign().await;
    assert!(resigned.is_err(), "{resigned:?}");
    let mut left = Vec::new();
    // Twice the lease's TTL (a second more than the election's), and etcd's sweep.
    let bound = (TTL + Duration::from_secs(1)) * 2 + Duration::from_millis(700);
    while started.elapsed() < bound + Duration::from_secs(2) {
        left = keys_of(&mut root, &prefix).await;
        if left.is_empty() {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    assert!(left.is_empty(), "still in etcd: {left:?}");
    assert!(
        started.elapsed() <= bound,
        "the key outlived its failing resignation by {:?}",
        started.elapsed()
    );
}

/// A create that fails because its attempt lease is gone (revoked by another withdrawal,
/// here by hand) is not taken for the loss of the candidate's lease: the driver asks etcd
/// which lease is gone and sends the create again on a new attempt lease; the term held on
/// the shared lease goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_attempt_lease_is_not_mistaken_for_the_candidates_lease() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let driver = h.driver_at(endpoint.clone()).await;
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    let name = unique("attempt");
    let a = Candidate::new(&name, "attempt-a", "a", TTL);
    let held = driver.campaign(&a).await.expect("a elected");
    let guard = admin
        .get(
            format!("{name}\0try\0"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("get")
        .kvs()
        .first()
        .map(|kv| kv.lease())
        .expect("a guard key on the attempt lease");
    admin
        .lease_revoke(guard)
        .await
        .expect("revoke the attempt lease");
    let b = Candidate::new(&name, "attempt-b", "b", TTL);
    let waiting = {
        let driver = driver.clone();
        let b = b.clone();
        tokio::spawn(async move { driver.campaign(&b).await })
    };
    within("b in line", Duration::from_secs(5), async {
        while driver.candidates(&name).await.expect("candidates()").len() < 2 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    driver
        .renew(&a, &held)
        .await
        .expect("a's term on the shared lease goes on");
    driver
        .resign(&a, Some(held.fencing_token))
        .await
        .expect("resign");
    let grant = within("b's election", Duration::from_secs(5), waiting)
        .await
        .expect("task")
        .expect("b elected");
    driver
        .resign(&b, Some(grant.fencing_token))
        .await
        .expect("resign");
}
