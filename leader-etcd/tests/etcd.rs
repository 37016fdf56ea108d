//! etcd-specific behaviour against real etcd processes: interop with `etcdctl elect`, lease
//! loss, server restarts, and member failures in a 3-member cluster.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TTL, harness};
use etcd_client::{Client, ConnectOptions, Permission};
use leader_core::testing::conformance::{
    next_event, spawn_campaign, spawn_run, wait_until, within,
};
use leader_core::{CancellationToken, Candidate, Driver, Election, Error, Event, LossReason};
use leader_etcd::EtcdDriver;
use leader_testkit::FaultProxy;
use leader_testkit::{EtcdServer, LineProcess};
use tokio::process::Command;
use tokio::time::Instant;

fn unique(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

fn election(driver: EtcdDriver, name: &str, value: &str) -> Election {
    Election::builder(driver, name)
        .ttl(TTL)
        .value(value)
        .retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("valid settings")
}

/// Every key under `prefix`.
async fn keys_under(kv: &mut etcd_client::Client, prefix: String) -> etcd_client::GetResponse {
    kv.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get")
}

/// An `etcdctl` process.
struct Etcdctl(LineProcess);

impl Etcdctl {
    fn spawn(endpoint: &str, args: &[&str]) -> Self {
        leader_testkit::require_binary("etcdctl", "etcd-client").expect("etcdctl installed");
        let process = LineProcess::spawn(
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(args)
                .stderr(Stdio::null()),
        )
        .expect("etcdctl starts");
        Etcdctl(process)
    }

    /// Waits for a stdout line equal to `expected`.
    async fn wait_line(&mut self, expected: &str, limit: Duration) {
        self.0
            .wait_for_line(limit, |line| line == expected)
            .await
            .unwrap_or_else(|err| panic!("etcdctl did not print {expected:?}: {err}"));
    }

    fn interrupt(&self) {
        self.0.signal("INT").expect("SIGINT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_etcdctl_share_one_election_both_ways() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("interop");
    let rust = election(h.driver_at(endpoint.clone()).await, &name, "rust-leader");

    // 1. Rust leads; etcdctl elect -l sees its value; etcdctl elect waits behind it.
    let rust_term = rust.campaign().await.expect("rust elected");
    let mut listener = Etcdctl::spawn(&endpoint, &["elect", "-l", &name]);
    listener
        .wait_line("rust-leader", Duration::from_secs(10))
        .await;
    let mut contender = Etcdctl::spawn(&endpoint, &["elect", &name, "etcdctl-leader"]);
    let waited = tokio::time::timeout(
        Duration::from_millis(1500),
        contender.wait_line("etcdctl-leader", Duration::from_secs(10)),
    )
    .await;
    assert!(
        waited.is_err(),
        "etcdctl must wait while the Rust candidate leads"
    );

    // 2. Rust resigns: etcdctl leads, and everyone sees its value.
    rust.resign().await.expect("resign");
    contender
        .wait_line("etcdctl-leader", Duration::from_secs(5))
        .await;
    listener
        .wait_line("etcdctl-leader", Duration::from_secs(5))
        .await;
    let info = rust.leader().await.expect("leader()").expect("a leader");
    assert_eq!(info.value, b"etcdctl-leader");
    assert!(info.fencing_token > rust_term.fencing_token());

    // 3. Rust campaigns and waits behind etcdctl; etcdctl resigns on SIGINT; Rust leads.
    let waiter = spawn_campaign(&rust);
    let mut kv = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    within(
        "the Rust candidate's key behind etcdctl's",
        Duration::from_secs(5),
        async {
            while keys_under(&mut kv, format!("{name}/")).await.kvs().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
    assert!(!waiter.is_finished(), "Rust waits while etcdctl leads");
    contender.interrupt();
    let term = within(
        "the Rust candidate's takeover",
        Duration::from_secs(5),
        waiter,
    )
    .await
    .expect("campaign task")
    .expect("elected");
    assert!(term.fencing_token() > info.fencing_token);
    listener
        .wait_line("rust-leader", Duration::from_secs(5))
        .await;
    rust.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_without_prefix_uses_etcdctls_keys_and_prefix_is_applied() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("keys");
    let plain = h.driver_at(endpoint.clone()).await;
    let client = plain.client().expect("a driver on a client").clone();
    let e = election(plain, &name, "v");
    e.campaign().await.expect("elected");
    let mut kv = client.clone();
    let keys = keys_under(&mut kv, format!("{name}/")).await;
    let kv0 = keys.kvs().first().expect("the candidate key exists");
    assert_eq!(
        kv0.key_str().expect("utf-8"),
        format!("{name}/{:x}", kv0.lease()),
        "the key is <name>/<lease hex>, as etcdctl elect makes it"
    );
    e.resign().await.expect("resign");

    let prefixed = EtcdDriver::builder(client.clone()).prefix("svc/").build();
    let p = election(prefixed, &name, "v");
    p.campaign().await.expect("elected");
    let keys = keys_under(&mut kv, format!("svc/{name}/")).await;
    assert_eq!(keys.kvs().len(), 1, "the prefix is applied");
    p.resign().await.expect("resign");
    let left = keys_under(&mut kv, format!("svc/{name}/")).await;
    assert!(left.kvs().is_empty(), "resign leaves nothing behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_behind_the_drivers_back_ends_the_term_and_run_recovers() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("revoked");
    let driver = h.driver_at(endpoint.clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let e = election(driver, &name, "v");
    let mut events = e.subscribe();
    let stop = CancellationToken::new();
    let run = spawn_run(&e, &stop);
    let first = next_event("elected", Duration::from_secs(5), &mut events).await;
    assert!(first.is_leader());
    let info = e.leader().await.expect("leader()").expect("a leader");
    let lease = i64::from_str_radix(&info.id, 16).expect("the id is the lease in hex");
    admin.lease_revoke(lease).await.expect("revoke");

    let lost = next_event("the loss", TTL * 2, &mut events).await;
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
    assert!(!e.status().is_leader());
    let again = next_event(
        "elected again on a new lease",
        Duration::from_secs(10),
        &mut events,
    )
    .await;
    assert!(again.is_leader());
    assert!(again.fencing_token() > first.fencing_token());
    let info = e.leader().await.expect("leader()").expect("a leader");
    assert_ne!(
        i64::from_str_radix(&info.id, 16).ok(),
        Some(lease),
        "a new lease"
    );
    stop.cancel();
    run.await.expect("no panic").expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_ends_the_term_by_its_deadline_and_leadership_returns_with_etcd() {
    let mut h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("restart");
    let e = election(h.driver_at(endpoint).await, &name, "v");
    let mut events = e.subscribe();
    let stop = CancellationToken::new();
    let run = spawn_run(&e, &stop);
    let first = next_event("elected", Duration::from_secs(5), &mut events).await;
    assert!(first.is_leader());

    h.server.kill(0);
    let killed_at = Instant::now();
    // The deadline comes from a keep-alive sent before the kill: by a TTL later, the
    // candidate must not believe it leads, whether or not its tasks have run.
    tokio::time::sleep_until(killed_at + TTL).await;
    assert!(
        !e.status().is_leader(),
        "still leading a TTL after etcd died"
    );
    let lost = next_event("the loss", TTL, &mut events).await;
    assert!(matches!(lost, Event::Lost { .. }), "{lost:?}");

    tokio::task::block_in_place(|| h.server.restart(0).expect("etcd restarts"));
    let again = next_event("elected again", Duration::from_secs(20), &mut events).await;
    assert!(again.is_leader());
    assert!(again.fencing_token() > first.fencing_token());
    stop.cancel();
    within("run to return", Duration::from_secs(10), run)
        .await
        .expect("no panic")
        .expect("clean shutdown: etcd is back, the resignation succeeds");
    drop(h);
}
/// Samples two statuses every millisecond; records whether both ever claimed to lead.
fn watch_overlap(a: &Election, b: &Election, stop: CancellationToken) -> Arc<AtomicBool> {
    let overlap = Arc::new(AtomicBool::new(false));
    let (a, b, seen) = (a.status(), b.status(), Arc::clone(&overlap));
    std::thread::spawn(move || {
        while !stop.is_cancelled() {
            if a.is_leader() && b.is_leader() {
                seen.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    overlap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_member_failures_never_make_two_leaders() {
    let mut server = tokio::task::spawn_blocking(|| EtcdServer::start_cluster(3))
        .await
        .expect("start task")
        .expect("a 3-member etcd cluster starts");
    let endpoints = server.endpoints();
    let name = unique("cluster");
    // a talks to member 0 only; b to members 1 and 2.
    let a_driver = EtcdDriver::connect([endpoints[0].clone()])
        .await
        .expect("connect");
    let b_driver = EtcdDriver::connect([endpoints[1].clone(), endpoints[2].clone()])
        .await
        .expect("connect");
    let a = election(a_driver, &name, "a");
    let b = election(b_driver.clone(), &name, "b");
    let stop = CancellationToken::new();
    let overlap = watch_overlap(&a, &b, stop.clone());
    let a_run = spawn_run(&a, &stop);
    wait_until("a leads", Duration::from_secs(10), || {
        a.status().is_leader()
    })
    .await;
    let b_run = spawn_run(&b, &stop);

    // Kill the member a is connected to: a steps down, b takes over within TTL + a few s.
    server.kill(0);
    let killed_at = Instant::now();
    wait_until("b takes over", TTL + Duration::from_secs(5), || {
        b.status().is_leader()
    })
    .await;
    assert!(!a.status().is_leader());
    let takeover = killed_at.elapsed();

    // Kill the raft leader among the survivors while b holds the term.
    let mut client = b_driver.client().expect("a driver on a client").clone();
    let status = client.status().await.expect("status");
    let members = client.member_list().await.expect("member list");
    let raft_leader = members
        .members()
        .iter()
        .find(|m| m.id() == status.leader())
        .and_then(|m| m.name().strip_prefix('m'))
        .and_then(|i| i.parse::<usize>().ok())
        .expect("the raft leader is a member");
    tokio::task::block_in_place(|| {
        server.restart(0).expect("member 0 rejoins");
        server.kill(raft_leader);
    });
    wait_until(
        "a leader again after the raft leader died",
        TTL + Duration::from_secs(10),
        || a.status().is_leader() || b.status().is_leader(),
    )
    .await;

    stop.cancel();
    assert!(
        !overlap.load(Ordering::SeqCst),
        "two candidates believed they led at the same instant"
    );
    let _ = within("a's run to return", Duration::from_secs(10), a_run).await;
    let _ = within("b's run to return", Duration::from_secs(10), b_run).await;
    drop(server);
    eprintln!("takeover after killing the leader's member: {takeover:?}");
}

/// How soon a deletion in etcd must reach the driver: a round trip and the watch's own
/// latency, with room for a loaded machine, and far below the renewal period of the TTLs
/// used with it.
const PUSH: Duration = Duration::from_millis(500);

/// A renewal that needs no store request (its term is known gone) takes no longer.
const AT_ONCE: Duration = Duration::from_millis(100);

/// The only key under `prefix`.
async fn only_key(admin: &mut Client, prefix: String) -> etcd_client::KeyValue {
    let keys = keys_under(admin, prefix.clone()).await;
    assert_eq!(keys.kvs().len(), 1, "one key under {prefix}");
    keys.kvs()[0].clone()
}

/// Asserts that `driver.renew` for `grant` fails with `TermGone` without a store request.
async fn assert_renew_fails_at_once(
    driver: &EtcdDriver,
    candidate: &Candidate,
    grant: &leader_core::Grant,
) {
    let started = Instant::now();
    let renewed = driver.renew(candidate, grant).await;
    assert!(matches!(renewed, Err(Error::TermGone)), "{renewed:?}");
    assert!(
        started.elapsed() < AT_ONCE,
        "renew took {:?} to report a term the watch saw gone",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_leader_key_is_noticed_within_a_round_trip() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let name = unique("deleted");
    // A long TTL: neither a renewal nor the lease can be what tells the driver below.
    let c = Candidate::new(&name, "deleted-1", "v", Duration::from_secs(10));
    let grant = driver.campaign(&c).await.expect("elected");
    let gone = tokio::spawn(driver.term_gone(&c, grant.fencing_token));
    let key = only_key(&mut admin, format!("{name}/")).await;
    assert_eq!(key.create_revision(), grant.fencing_token as i64);
    driver
        .renew(&c, &grant)
        .await
        .expect("renewed while the key exists");
    assert!(!gone.is_finished(), "term_gone waits while the key exists");

    // `etcdctl del` of the leader's key, while its lease lives on.
    admin.delete(key.key(), None).await.expect("delete");
    within("term_gone after the key's deletion", PUSH, gone)
        .await
        .expect("no panic");
    assert_renew_fails_at_once(&driver, &c, &grant).await;
    driver
        .resign(&c, Some(grant.fencing_token))
        .await
        .expect("resigning a gone term succeeds");

    // The candidate campaigns again: a new term, watched in turn.
    let again = driver.campaign(&c).await.expect("elected again");
    assert!(again.fencing_token > grant.fencing_token);
    let gone = tokio::spawn(driver.term_gone(&c, again.fencing_token));
    driver.renew(&c, &again).await.expect("the new term renews");
    let key = only_key(&mut admin, format!("{name}/")).await;
    admin.delete(key.key(), None).await.expect("delete");
    within("term_gone of the new term", PUSH, gone)
        .await
        .expect("no panic");
    assert_renew_fails_at_once(&driver, &c, &again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_noticed_within_a_round_trip() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let name = unique("revoke");
    let c = Candidate::new(&name, "revoke-1", "v", Duration::from_secs(10));
    let grant = driver.campaign(&c).await.expect("elected");
    let gone = tokio::spawn(driver.term_gone(&c, grant.fencing_token));
    let key = only_key(&mut admin, format!("{name}/")).await;

    // `etcdctl lease revoke`: etcd deletes the key with the lease.
    admin.lease_revoke(key.lease()).await.expect("revoke");
    within("term_gone after the lease's revocation", PUSH, gone)
        .await
        .expect("no panic");
    assert_renew_fails_at_once(&driver, &c, &grant).await;
}

/// What happens to the leader's key behind the driver's back.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// `etcdctl del`.
    Delete,
    /// `etcdctl put` without `--lease`: the key stays, detached from the lease.
    OverwriteWithoutLease,
}

impl Change {
    async fn apply(self, admin: &mut Client, key: &etcd_client::KeyValue) {
        match self {
            Change::Delete => {
                admin.delete(key.key(), None).await.expect("delete");
            }
            Change::OverwriteWithoutLease => {
                admin.put(key.key(), "operator", None).await.expect("put");
            }
        }
    }
}

/// `change` happens to the leader's key while nothing reaches the driver, and the
/// connection then breaks: the watch starts again after the change and never reports it.
/// The next renewal must still end the term.
async fn a_change_the_watch_missed_is_caught_by_the_next_renewal(change: Change) {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let proxy = FaultProxy::start(h.server.client_addr(0))
        .await
        .expect("proxy starts");
    let driver = h.driver_at(proxy.addr().to_string()).await;
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    let name = unique("missed");
    let c = Candidate::new(&name, "missed-1", "v", Duration::from_secs(10));
    let grant = driver.campaign(&c).await.expect("elected");
    let grant = driver.renew(&c, &grant).await.expect("renewed");
    let key = only_key(&mut admin, format!("{name}/")).await;

    proxy.hold();
    change.apply(&mut admin, &key).await;
    proxy.cut();
    proxy.pass();

    // The next renewal must not confirm the term: it reads the key (retrying while the
    // client reconnects) and reports it gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match driver.renew(&c, &grant).await {
            Err(Error::TermGone) => break,
            Ok(renewed) => panic!("renewed a term whose key is gone: {renewed:?}"),
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "renewals still fail with {err:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    within(
        "term_gone after the renewal found the key gone",
        AT_ONCE,
        driver.term_gone(&c, grant.fencing_token),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_the_watch_missed_is_caught_by_the_next_renewal() {
    a_change_the_watch_missed_is_caught_by_the_next_renewal(Change::Delete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_the_watch_missed_is_caught_by_the_next_renewal() {
    a_change_the_watch_missed_is_caught_by_the_next_renewal(Change::OverwriteWithoutLease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_key_overwritten_without_its_lease_steps_down_within_a_second() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let name = unique("overwritten");
    // Renewals every 3.3 s: a loss within a second can only come from the watch.
    let e = Election::builder(driver, &name)
        .ttl(Duration::from_secs(10))
        .value("v")
        .build()
        .expect("valid settings");
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    assert!(matches!(
        next_event("elected", Duration::from_secs(1), &mut events).await,
        Event::Elected { .. }
    ));
    let key = only_key(&mut admin, format!("{name}/")).await;
    assert_ne!(key.lease(), 0, "the key is on the driver's lease");

    // `etcdctl put <key> operator`: the same key (and create revision), on no lease.
    Change::OverwriteWithoutLease.apply(&mut admin, &key).await;
    let lost = next_event("the loss", Duration::from_secs(1), &mut events).await;
    assert_eq!(
        lost,
        Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        }
    );
    assert!(!e.status().is_leader());
    assert!(!term.is_valid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_keeps_the_lease_ends_the_term_too() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let name = unique("put-same-lease");
    let c = Candidate::new(&name, "put-1", "v", Duration::from_secs(10));
    let grant = driver.campaign(&c).await.expect("elected");
    let gone = tokio::spawn(driver.term_gone(&c, grant.fencing_token));
    let key = only_key(&mut admin, format!("{name}/")).await;

    // `etcdctl put --lease=<the driver's lease>`: the key is not what the term put there.
    admin
        .put(
            key.key(),
            "operator",
            Some(etcd_client::PutOptions::new().with_lease(key.lease())),
        )
        .await
        .expect("put");
    within("term_gone after the key was overwritten", PUSH, gone)
        .await
        .expect("no panic");
    assert_renew_fails_at_once(&driver, &c, &grant).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_keep_alive_gives_up_within_a_sixth_of_the_lease() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.server.client_addr(0))
        .await
        .expect("proxy starts");
    let driver = h.driver_at(proxy.addr().to_string()).await;
    let name = unique("stalled");
    // A 6 s lease: keep-alives every 2 s, each attempt given up after 1 s (not after the
    // 5 s request timeout, twice).
    let ttl = Duration::from_secs(6);
    let c = Candidate::new(&name, "stalled-1", "v", ttl);
    let grant = driver.campaign(&c).await.expect("elected");

    // Nothing flows: the background keep-alive (due 2 s after the grant) stalls while it
    // holds the lease; a renewal after that must send its own and waits behind it.
    proxy.hold();
    let held_at = Instant::now();
    tokio::time::sleep(ttl / 3 + Duration::from_millis(300)).await;
    let started = Instant::now();
    let renewed = driver.renew(&c, &grant).await;
    let took = started.elapsed();
    assert!(matches!(renewed, Err(Error::Timeout(_))), "{renewed:?}");
    assert!(
        took < Duration::from_millis(3500),
        "a renewal behind a stalled keep-alive took {took:?}"
    );

    // Traffic flows again before the lease expires: the keep-alive stream (abandoned with
    // its request in flight) is replaced, and renewals work.
    proxy.pass();
    let expires = held_at + ttl;
    loop {
        match driver.renew(&c, &grant).await {
            Ok(renewed) => {
                assert!(renewed.confirmed_at > grant.confirmed_at);
                break;
            }
            Err(err) => {
                assert!(
                    Instant::now() + Duration::from_millis(500) < expires,
                    "renewals still fail with {err:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_whose_key_is_deleted_by_hand_steps_down_within_a_round_trip() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let name = unique("by-hand");
    // Renewals every 3.3 s: a loss within `PUSH` can only come from the watch.
    let ttl = Duration::from_secs(10);
    let e = Election::builder(driver, &name)
        .ttl(ttl)
        .build()
        .expect("valid settings");
    let mut events = e.subscribe();
    let term = e.campaign().await.expect("elected");
    assert!(matches!(
        next_event("elected", Duration::from_secs(1), &mut events).await,
        Event::Elected { .. }
    ));
    let key = only_key(&mut admin, format!("{name}/")).await;
    admin.delete(key.key(), None).await.expect("delete");

    let lost = next_event("the loss", PUSH, &mut events).await;
    assert_eq!(
        lost,
        Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        }
    );
    assert!(!e.status().is_leader());
    assert!(!term.is_valid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_resign_of_an_earlier_term_leaves_the_newer_term_alone() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let name = unique("late-resign");
    let c = Candidate::new(&name, "late-1", "v", Duration::from_secs(5));
    let first = driver.campaign(&c).await.expect("first term");
    // The same candidate starts a new term before the first one's key was deleted.
    let second = driver.campaign(&c).await.expect("second term");
    assert!(second.fencing_token > first.fencing_token);
    let key = only_key(&mut admin, format!("{name}/")).await;
    assert_eq!(key.create_revision(), second.fencing_token as i64);

    // The resignation of the first term lands now: it must not touch the second.
    driver
        .resign(&c, Some(first.fencing_token))
        .await
        .expect("resign of the earlier term");
    let key = only_key(&mut admin, format!("{name}/")).await;
    assert_eq!(
        key.create_revision(),
        second.fencing_token as i64,
        "the newer term's key survives a late resignation of the earlier one"
    );
    driver
        .renew(&c, &second)
        .await
        .expect("the newer term still renews");
    let info = driver
        .leader(&name)
        .await
        .expect("leader()")
        .expect("a leader");
    assert_eq!(info.fencing_token, second.fencing_token);

    // Its own resignation deletes it.
    driver
        .resign(&c, Some(second.fencing_token))
        .await
        .expect("resign of the newer term");
    assert!(
        keys_under(&mut admin, format!("{name}/"))
            .await
            .kvs()
            .is_empty(),
        "nothing left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_with_different_ttls_campaign_on_leases_of_their_own_ttl() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    let elect = |driver: EtcdDriver, ttl: Duration| {
        Election::builder(driver, unique("ttl"))
            .ttl(ttl)
            .build()
            .expect("valid settings")
    };
    async fn granted_ttl(admin: &mut Client, e: &Election) -> i64 {
        let info = e.leader().await.expect("leader()").expect("a leader");
        let lease = i64::from_str_radix(&info.id, 16).expect("the id is the lease in hex");
        admin
            .lease_time_to_live(lease, None)
            .await
            .expect("lease time to live")
            .granted_ttl()
    }

    let slow = elect(driver.clone(), Duration::from_secs(10));
    let fast = elect(driver.clone(), Duration::from_secs(2));
    let odd = elect(driver.clone(), Duration::from_millis(2500));
    slow.campaign().await.expect("elected");
    fast.campaign().await.expect("elected");
    odd.campaign().await.expect("elected");
    // A second more than the TTL (see src/expiry.rs).
    assert_eq!(granted_ttl(&mut admin, &slow).await, 11);
    assert_eq!(
        granted_ttl(&mut admin, &fast).await,
        3,
        "not the 10 s election's lease"
    );
    assert_eq!(
        granted_ttl(&mut admin, &odd).await,
        4,
        "rounded up to whole seconds"
    );

    // The builder's lease_ttl fixes one lease for every election.
    let fixed = EtcdDriver::builder(driver.client().expect("a driver on a client").clone())
        .lease_ttl(Duration::from_secs(4))
        .build();
    let fixed_slow = elect(fixed.clone(), Duration::from_secs(10));
    let fixed_fast = elect(fixed, Duration::from_secs(2));
    fixed_slow.campaign().await.expect("elected");
    fixed_fast.campaign().await.expect("elected");
    assert_eq!(granted_ttl(&mut admin, &fixed_slow).await, 4);
    assert_eq!(granted_ttl(&mut admin, &fixed_fast).await, 4);
    assert_eq!(
        fixed_slow.leader().await.expect("leader()").map(|l| l.id),
        fixed_fast.leader().await.expect("leader()").map(|l| l.id),
        "one lease"
    );

    for e in [slow, fast, odd, fixed_slow, fixed_fast] {
        e.resign().await.expect("resign");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_etcd_auth_are_denied_and_run_returns_them() {
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
    let name = unique("auth");

    // Bad credentials.
    let wrong = EtcdDriver::connect_with(
        [endpoint.as_str()],
        ConnectOptions::new().with_user("candidate", "wrong"),
    )
    .await;
    assert!(matches!(wrong, Err(Error::Denied(_))), "{wrong:?}");

    let client = Client::connect(
        [endpoint.as_str()],
        Some(ConnectOptions::new().with_user("candidate", "candidate-pw")),
    )
    .await
    .expect("connect as candidate");

    // Least privilege: readwrite on the prefix is all an election needs.
    let allowed = Election::builder(
        EtcdDriver::builder(client.clone()).prefix("svc/").build(),
        &name,
    )
    .ttl(TTL)
    .build()
    .expect("valid settings");
    let term = allowed
        .campaign()
        .await
        .expect("elected with readwrite on svc/");
    let first_deadline = term.deadline();
    wait_until("a renewal with readwrite on svc/", TTL * 2, || {
        term.deadline() > first_deadline
    })
    .await;
    assert!(allowed.status().is_leader());
    allowed.resign().await.expect("resign");

    // Outside the prefix: denied, and run() returns the error instead of retrying.
    let denied = election(EtcdDriver::new(client), &name, "v");
    let err = denied
        .campaign()
        .await
        .expect_err("no permission on the key");
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    let stop = CancellationToken::new();
    let run = spawn_run(&denied, &stop);
    let ran = within("run to give up", Duration::from_secs(5), run)
        .await
        .expect("no panic");
    assert!(matches!(ran, Err(Error::Denied(_))), "{ran:?}");
}

/// A waiter whose own key is deleted, or overwritten without its lease, while it waits
/// behind the only key below it never leads on that key when the predecessor goes: the
/// watch that proves the handoff without a read sees its own key's change first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiters_own_key_changed_while_it_waits_is_never_led_on() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let waiting_driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut admin = driver.client().expect("a driver on a client").clone();
    for overwrite in [false, true] {
        let name = unique("own-key");
        let ttl = Duration::from_secs(10);
        let leader = Candidate::new(&name, format!("leader-{overwrite}"), "v", ttl);
        let waiter = Candidate::new(&name, format!("waiter-{overwrite}"), "v", ttl);
        let grant = driver.campaign(&leader).await.expect("elected");
        let waiting = {
            let driver = waiting_driver.clone();
            let waiter = waiter.clone();
            tokio::spawn(async move { driver.campaign(&waiter).await })
        };
        let prefix = format!("{name}/");
        let deadline = Instant::now() + Duration::from_secs(5);
        let own = loop {
            let keys = keys_under(&mut admin, prefix.clone()).await;
            if let Some(kv) = keys
                .kvs()
                .iter()
                .find(|kv| kv.create_revision() > grant.fencing_token as i64)
            {
                break kv.key().to_vec();
            }
            assert!(Instant::now() < deadline, "the waiter's key never appeared");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if overwrite {
            admin.put(own.clone(), "by hand", None).await.expect("put");
        } else {
            admin.delete(own.clone(), None).await.expect("delete");
        }
        driver
            .resign(&leader, Some(grant.fencing_token))
            .await
            .expect("resign");
        let outcome = within("the waiter's campaign", Duration::from_secs(5), waiting)
            .await
            .expect("no panic");
        match outcome {
            Err(Error::TermGone) => {}
            Ok(won) => {
                // Only on a key of its own, made after the change, on its lease.
                let keys = keys_under(&mut admin, prefix.clone()).await;
                let kv = keys
                    .kvs()
                    .iter()
                    .find(|kv| kv.create_revision() == won.fencing_token as i64)
                    .expect("the won term's key exists");
                assert_ne!(kv.value(), b"by hand", "led on a key it does not own");
                assert!(kv.lease() != 0, "led on a key without its lease");
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
        let _ = admin
            .delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
}

/// The sum of etcd's `metric` samples, from its `/metrics` page.
async fn etcd_metric(addr: std::net::SocketAddr, metric: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body.lines()
        .filter(|line| line.starts_with(metric))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One process holding many elections renews them with a keep-alive and a few batched
/// reads per third of a TTL, not a read per election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_read_per_process_not_per_election() {
    let h = harness().await;
    let driver = h.driver_at(h.server.endpoints()[0].clone()).await;
    let mut held = Vec::new();
    for i in 0..50 {
        let election = election(driver.clone(), &unique(&format!("many{i}")), "v");
        let term = election.campaign().await.expect("elected");
        held.push((election, term));
    }
    let metric = "grpc_server_msg_received_total";
    let before = etcd_metric(h.server.client_addr(0), metric).await;
    let started = Instant::now();
    let window = TTL * 3;
    // Terms renew every third of the TTL: a read each would be 450 requests.
    tokio::time::sleep(window).await;
    let requests = etcd_metric(h.server.client_addr(0), metric).await - before;
    println!("{requests} requests to renew 50 elections over {window:?}");
    for (_, term) in &held {
        assert!(term.is_valid(), "every term renewed");
        assert!(term.deadline() > (started + window / 2).into_std());
    }
    assert!(
        requests <= 60.0,
        "{requests} requests to renew 50 elections over {window:?}"
    );
}

/// Why a waiter does not revoke its predecessor's lease when `LeaseTimeToLive` reports 0
/// (#24): etcd 3.4 truncates the remaining time to whole seconds, so 0 means "less than a
/// second left", not "expired". The lease is still alive then: a keep-alive renews it, and
/// a waiter that had revoked it would have ended a leader whose deadline had not passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_time_to_live_zero_is_not_expiry() {
    let h = harness().await;
    let mut admin = Client::connect([h.server.endpoints()[0].as_str()], None)
        .await
        .expect("connect");
    let id = admin.lease_grant(3, None).await.expect("grant").id();
    let granted = Instant::now();
    within(
        "LeaseTimeToLive to report 0",
        Duration::from_secs(5),
        async {
            while admin
                .lease_time_to_live(id, None)
                .await
                .expect("time to live")
                .ttl()
                > 0
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert!(
        granted.elapsed() < Duration::from_millis(2500),
        "0 reported {:?} into a 3 s lease",
        granted.elapsed()
    );
    admin
        .lease_keep_alive(id)
        .await
        .expect("a lease reported at 0 s left is still alive: the keep-alive renews it");
    let renewed = admin
        .lease_time_to_live(id, None)
        .await
        .expect("time to live")
        .ttl();
    assert!(renewed >= 1, "renewed: {renewed}");
    admin.lease_revoke(id).await.expect("revoke");
}

/// The watches of all waiters of one driver share one etcd watch stream (#24): 30
/// elections, each led through one driver and waited in through another, add two watch
/// streams to etcd (the leaders' held keys, the waiters' line), not one per waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_one_driver_share_one_watch_stream() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let addr = h.server.client_addr(0);
    let streams = || etcd_metric(addr, "etcd_debugging_mvcc_watch_stream_total");
    let leaders = h.driver_at(endpoint.clone()).await;
    let waiters = h.driver_at(endpoint.clone()).await;
    let before = streams().await;
    let base = unique("shared");
    let mut held = Vec::new();
    let mut waiting = Vec::new();
    for i in 0..30 {
        let name = format!("{base}-{i}");
        let leader = election(leaders.clone(), &name, "leader");
        held.push(leader.campaign().await.expect("elected"));
        let waiter = election(waiters.clone(), &name, "waiter");
        waiting.push((spawn_campaign(&waiter), waiter, leader));
    }
    let mut admin = leaders.client().expect("a driver on a client").clone();
    within("every waiter in line", Duration::from_secs(10), async {
        loop {
            let mut all = true;
            for i in 0..30 {
                if keys_under(&mut admin, format!("{base}-{i}/"))
                    .await
                    .kvs()
                    .len()
                    < 2
                {
                    all = false;
                }
            }
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Each waiter's watch is requested right after its read: let them all be in place.
    let mut added = streams().await - before;
    for _ in 0..50 {
        if added >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        added = streams().await - before;
    }
    assert!(
        added <= 2.0,
        "30 waiters and 30 leaders on two drivers added {added} watch streams"
    );
    // And the waiters still take over, each on its leader's resignation.
    for (waits, waiter, leader) in waiting {
        leader.resign().await.expect("resign");
        within("the waiter's election", Duration::from_secs(5), waits)
            .await
            .expect("task")
            .expect("elected");
        waiter.resign().await.expect("resign");
    }
    drop(held);
}

/// 100 candidates of one election wait on one driver (one shared watch stream); each leads
/// in turn when the one before it resigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_waiters_on_one_stream_lead_in_turn() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let leaders = h.driver_at(endpoint.clone()).await;
    let waiters = h.driver_at(endpoint.clone()).await;
    let name = unique("hundred");
    let first = election(leaders, &name, "first");
    first.campaign().await.expect("elected");
    let mut line = Vec::new();
    for _ in 0..100 {
        let e = election(waiters.clone(), &name, "waiter");
        line.push((spawn_campaign(&e), e));
    }
    within("every waiter in line", Duration::from_secs(20), async {
        while first.candidates().await.expect("candidates()").len() < 101 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    first.resign().await.expect("resign");
    let mut elected = 0;
    let started = Instant::now();
    while !line.is_empty() {
        let (index, term) = within("the next election", Duration::from_secs(5), async {
            loop {
                if let Some(index) = line.iter().position(|(task, _)| task.is_finished()) {
                    let (task, e) = line.swap_remove(index);
                    let term = task.await.expect("task").expect("elected");
                    return (e, term);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        assert!(index.status().is_leader());
        assert_eq!(
            line.iter().filter(|(task, _)| task.is_finished()).count(),
            0,
            "one leader at a time"
        );
        drop(term);
        index.resign().await.expect("resign");
        elected += 1;
    }
    assert_eq!(elected, 100, "in {:?}", started.elapsed());
}

/// Crash failover at the TTL on a real etcd (`src/expiry.rs`): with a 2 s TTL the waiter
/// next in line reads its leader's lease and revokes it once it has certainly expired,
/// rather than waiting for etcd's sweep. The leader is cut off (nothing reaches etcd, so
/// its renewals fail and its lease runs out); the waiter must lead only after the old
/// leader's own deadline, and soon after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leaders_lease_is_revoked_only_after_its_deadline() {
    let h = harness().await;
    let proxy = FaultProxy::start(h.server.client_addr(0))
        .await
        .expect("proxy starts");
    let ttl = Duration::from_secs(2);
    let name = unique("expiry");
    let a = Election::builder(h.driver_at(proxy.addr().to_string()).await, name.clone())
        .ttl(ttl)
        .build()
        .expect("a");
    let b = Election::builder(h.driver_at(h.server.endpoints()[0].clone()).await, name)
        .ttl(ttl)
        .build()
        .expect("b");
    let a_term = within("a to lead", Duration::from_secs(10), a.campaign())
        .await
        .expect("a leads");
    let waiting = tokio::spawn(async move { (b.campaign().await, b) });
    // Let a renew twice while b waits, then cut a off.
    let first_deadline = a_term.deadline();
    wait_until("a renews twice", 3 * ttl, || {
        a_term.deadline() >= first_deadline + ttl / 2
    })
    .await;
    assert!(!waiting.is_finished(), "b waits while a renews");
    proxy.hold();
    let (b_term, _b) = within("b to lead after a is cut off", 3 * ttl, waiting)
        .await
        .expect("waiter task");
    let b_term = b_term.expect("b leads");
    assert!(
        b_term.elected_at() > a_term.deadline(),
        "b led {:?} before a's deadline",
        a_term.deadline() - b_term.elected_at()
    );
    assert!(!a_term.is_valid(), "a's term ended");
    assert!(b_term.fencing_token() > a_term.fencing_token());
    proxy.pass();
}
