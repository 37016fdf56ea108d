//! Beyond election on etcd (#22): candidates (with etcdctl's keys), proclaim as etcd's own
//! Proclaim (seen by `etcdctl elect -l`), handover (the nominee leads out of line; the
//! nomination ends on the nominee's withdrawal or expiry; fencing tokens keep increasing),
//! and `txn_if_leader`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TTL, harness};
use etcd_client::{Client, GetOptions, TxnOp};
use leader_core::testing::conformance::{spawn_campaign, wait_until, within};
use leader_core::{Candidate, Driver, Election, Error};
use leader_etcd::EtcdDriver;
use leader_testkit::LineProcess;
use tokio::process::Command;
use tokio::time::{Instant, sleep};

fn unique(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

fn election(driver: EtcdDriver, name: &str, value: &str, ttl: Duration) -> Election {
    Election::builder(driver, name)
        .ttl(ttl)
        .value(value)
        .retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("valid settings")
}

fn etcdctl(endpoint: &str, args: &[&str]) -> LineProcess {
    leader_testkit::require_binary("etcdctl", "etcd-client").expect("etcdctl installed");
    LineProcess::spawn(
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stderr(Stdio::null()),
    )
    .expect("etcdctl starts")
}

async fn count_keys(admin: &mut Client, prefix: &str) -> usize {
    admin
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .kvs()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proclaim_is_etcds_own_and_candidates_include_etcdctls() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("proclaim");
    let rust = election(h.driver_at(endpoint.clone()).await, &name, "before", TTL);
    let term = rust.campaign().await.expect("elected");
    let mut listener = etcdctl(&endpoint, &["elect", "-l", &name]);
    listener
        .wait_for_line(Duration::from_secs(10), |line| line == "before")
        .await
        .expect("etcdctl elect -l sees the leader");
    term.proclaim("after").await.expect("proclaim");
    listener
        .wait_for_line(Duration::from_secs(5), |line| line == "after")
        .await
        .expect("etcdctl elect -l sees the proclaimed value");
    // Same term: the watch of held keys took the put for the driver's own, and renewals go on.
    let deadline = term.deadline();
    wait_until("a renewal after the proclamation", TTL * 2, || {
        term.deadline() > deadline
    })
    .await;
    assert!(term.is_valid() && rust.status().is_leader());
    assert_eq!(rust.status().fencing_token(), Some(term.fencing_token()));

    // An etcdctl candidate waits in line: listed under its lease in hex, with its value.
    let mut contender = etcdctl(&endpoint, &["elect", &name, "from-etcdctl"]);
    let line = within("etcdctl in line", Duration::from_secs(10), async {
        loop {
            let line = rust.candidates().await.expect("candidates()");
            if line.len() == 2 {
                return line;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(line[0].id, rust.id());
    assert!(line[0].is_leader);
    assert_eq!(line[0].value, b"after");
    assert!(!line[1].is_leader);
    assert_eq!(line[1].value, b"from-etcdctl");
    assert!(
        i64::from_str_radix(&line[1].id, 16).is_ok(),
        "a foreign key's id is its lease in hex: {}",
        line[1].id
    );
    // A handover past the etcdctl candidate (ahead of the nominee) is refused: it would not
    // know of the nomination and would lead beside the nominee.
    let behind = election(h.driver_at(endpoint.clone()).await, &name, "behind", TTL);
    let behind_waits = spawn_campaign(&behind);
    within("the Rust waiter in line", Duration::from_secs(5), async {
        while rust.candidates().await.expect("candidates()").len() < 3 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let err = rust
        .hand_over(behind.id())
        .await
        .expect_err("past an etcdctl candidate");
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    contender
        .wait_for_line(Duration::from_secs(5), |line| line == "from-etcdctl")
        .await
        .expect("etcdctl leads");
    let err = term.proclaim("late").await.expect_err("the term ended");
    assert!(matches!(err, Error::NotALeader), "{err:?}");
    contender.signal("INT").expect("SIGINT");
    within(
        "the Rust waiter's election",
        Duration::from_secs(5),
        behind_waits,
    )
    .await
    .expect("task")
    .expect("elected after etcdctl");
    behind.resign().await.expect("resign");
}

/// The nominee leads out of line; the waiter it passed creates its key again before it
/// leads, so fencing tokens keep increasing; `leader()` and `candidates()` agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_passes_the_line_and_tokens_keep_increasing() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let name = unique("handover");
    let a = election(h.driver_at(endpoint.clone()).await, &name, "a", TTL);
    let b = election(h.driver_at(endpoint.clone()).await, &name, "b", TTL);
    let c = election(h.driver_at(endpoint.clone()).await, &name, "c", TTL);
    let a_term = a.campaign().await.expect("a elected");
    let b_waits = spawn_campaign(&b);
    wait_until_waiting(&a, 1).await;
    let c_waits = spawn_campaign(&c);
    wait_until_waiting(&a, 2).await;
    a_term.hand_over(c.id()).await.expect("hand over");
    let c_term = within("c's election", TTL * 2, c_waits)
        .await
        .expect("task")
        .expect("c elected");
    assert!(c_term.fencing_token() > a_term.fencing_token());
    let info = a.leader().await.expect("leader()").expect("c leads");
    assert_eq!(
        (info.value.as_slice(), info.fencing_token),
        (&b"c"[..], c_term.fencing_token())
    );
    // b, passed over, creates its key again (behind c) before it could lead: the line is c
    // (leading), then b, once b's new key is there.
    let expected = vec![(c.id().to_owned(), true), (b.id().to_owned(), false)];
    let mut seen = Vec::new();
    let started = Instant::now();
    while seen != expected && started.elapsed() < Duration::from_secs(5) {
        seen = a
            .candidates()
            .await
            .expect("candidates()")
            .into_iter()
            .map(|x| (x.id, x.is_leader))
            .collect();
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, expected);
    assert!(!b_waits.is_finished() && !b.status().is_leader());
    c.resign().await.expect("resign");
    let b_term = within("b's election", TTL * 2, b_waits)
        .await
        .expect("task")
        .expect("b elected");
    assert!(
        b_term.fencing_token() > c_term.fencing_token(),
        "b ({}) was passed over by c ({}): its term must have a higher token",
        b_term.fencing_token(),
        c_term.fencing_token()
    );
    b.resign().await.expect("resign");
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    wait_until_empty(&mut admin, &name).await;
}

async fn wait_until_waiting(leader: &Election, waiters: usize) {
    within("waiters in line", Duration::from_secs(5), async {
        loop {
            let line = leader.candidates().await.expect("candidates()");
            if line.iter().filter(|c| !c.is_leader).count() >= waiters {
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Nothing of the election is left once everyone resigned: no marker, no nomination.
async fn wait_until_empty(admin: &mut Client, name: &str) {
    within("an empty election", TTL * 3, async {
        while count_keys(admin, name).await > 0 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A nominee that never takes the lead (its campaign stopped, its key still in line): the
/// head of the line waits while the nomination lasts, then leads at its expiry; a nominee
/// that withdraws ends the nomination at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nomination_ends_on_the_nominees_withdrawal_or_at_its_expiry() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let ttl = Duration::from_secs(3);
    let name = unique("nominee");
    let leader = h.driver_at(endpoint.clone()).await;
    let nominee = h.driver_at(endpoint.clone()).await;
    let head = election(h.driver_at(endpoint.clone()).await, &name, "head", ttl);
    for withdraws in [true, false] {
        let a = Candidate::new(&name, format!("a-{withdraws}"), "a", ttl);
        let c = Candidate::new(&name, format!("c-{withdraws}"), "c", ttl);
        let grant = leader.campaign(&a).await.expect("a elected");
        let head_waits = spawn_campaign(&head);
        wait_until_listed(&leader, &name, 2).await;
        // c's campaign stops after its key is in line: it never reads the nomination.
        let c_waits = {
            let nominee = nominee.clone();
            let c = c.clone();
            tokio::spawn(async move { nominee.campaign(&c).await })
        };
        wait_until_listed(&leader, &name, 3).await;
        c_waits.abort();
        let _ = c_waits.await;
        leader
            .hand_over(&a, grant.fencing_token, &c.id)
            .await
            .expect("hand over to c");
        let handed = Instant::now();
        sleep(ttl / 3).await;
        assert!(
            !head_waits.is_finished(),
            "nobody but the nominee leads while the nomination lasts"
        );
        if withdraws {
            nominee.resign(&c, None).await.expect("c withdraws");
            let term = within("the head's election", ttl / 2, head_waits)
                .await
                .expect("task")
                .expect("elected");
            assert!(handed.elapsed() < ttl, "at once, not at the expiry");
            head.resign().await.expect("resign");
            assert!(term.fencing_token() > grant.fencing_token);
        } else {
            let term = within("the head's election", ttl * 2, head_waits)
                .await
                .expect("task")
                .expect("elected");
            assert!(
                handed.elapsed() >= ttl - Duration::from_millis(200),
                "the line resumes at the nomination's expiry, not before: {:?}",
                handed.elapsed()
            );
            head.resign().await.expect("resign");
            assert!(term.fencing_token() > grant.fencing_token);
            nominee.resign(&c, None).await.expect("c withdraws");
        }
    }
}

async fn wait_until_listed(driver: &EtcdDriver, name: &str, count: usize) {
    within("candidates in line", Duration::from_secs(5), async {
        while driver.candidates(name).await.expect("candidates()").len() < count {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_if_leader_writes_only_while_the_term_stands() {
    let h = harness().await;
    let endpoint = h.server.endpoints()[0].clone();
    let driver = h.driver_at(endpoint.clone()).await;
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    let name = unique("fenced");
    let data = format!("data/{name}");
    let e = election(driver.clone(), &name, "v", TTL);
    let term = e.campaign().await.expect("elected");
    driver
        .txn_if_leader(&term, vec![TxnOp::put(data.as_str(), "1", None)])
        .await
        .expect("written while leading");
    let read = |admin: &mut Client| {
        let mut admin = admin.clone();
        let data = data.clone();
        async move {
            admin
                .get(data, None)
                .await
                .expect("get")
                .kvs()
                .first()
                .map(|kv| kv.value().to_vec())
        }
    };
    assert_eq!(read(&mut admin).await.as_deref(), Some(&b"1"[..]));

    // An operator deletes the leader's key: the write is fenced and nothing is written.
    let key = admin
        .get(format!("{name}/"), Some(GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .kvs()[0]
        .key()
        .to_vec();
    admin.delete(key, None).await.expect("delete");
    let err = driver
        .txn_if_leader(&term, vec![TxnOp::put(data.as_str(), "2", None)])
        .await
        .expect_err("fenced");
    match &err {
        Error::Fenced { token, .. } => assert_eq!(*token, term.fencing_token()),
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&mut admin).await.as_deref(), Some(&b"1"[..]));

    // A new term writes; the old one stays fenced.
    let _ = e.resign().await;
    let again = e.campaign().await.expect("elected again");
    driver
        .txn_if_leader(&again, vec![TxnOp::put(data.as_str(), "3", None)])
        .await
        .expect("the new term writes");
    let err = driver
        .txn_if_leader(&term, vec![TxnOp::put(data.as_str(), "4", None)])
        .await
        .expect_err("the old term is fenced");
    assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
    assert_eq!(read(&mut admin).await.as_deref(), Some(&b"3"[..]));
    e.resign().await.expect("resign");
    let err = driver
        .txn_if_leader(&again, vec![TxnOp::put(data.as_str(), "5", None)])
        .await
        .expect_err("resigned");
    assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
    assert_eq!(read(&mut admin).await.as_deref(), Some(&b"3"[..]));
}
