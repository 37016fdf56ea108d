//! `Fence` against a real PostgreSQL: stale tokens fail, equal ones pass, and concurrent
//! transactions of a newer and a stale leader are serialised on the fence's row.

mod common;

use std::time::Duration;

use common::harness;
use leader_core::Error;
use leader_core::testing::conformance::within;
use leader_postgres::Fence;
use leader_postgres::tokio_postgres::{Client, NoTls};
use leader_testkit::unique;
use tokio::time::{Instant, sleep};

async fn connect(url: &str) -> Client {
    let (client, connection) = leader_postgres::tokio_postgres::connect(url, NoTls)
        .await
        .expect("connects");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Waits until a backend of `app` waits for a lock.
async fn waits_for_a_lock(admin: &Client, app: &str) {
    let start = Instant::now();
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{app} never waited for the fence's row"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

fn fenced(err: &Error) -> (u64, Option<u64>) {
    match err {
        Error::Fenced { token, newer, .. } => (*token, *newer),
        other => panic!("expected Fenced, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tokens_fail_and_equal_or_higher_ones_pass() {
    let h = harness().await;
    let mut client = connect(&h.server.url()).await;
    let fence = Fence::new(unique("reports"));
    fence.create_table(&client).await.expect("create");
    fence.create_table(&client).await.expect("idempotent");
    fence.check(&client, 10).await.expect("first token");
    fence.check(&client, 10).await.expect("the same term again");
    let err = fence.check(&client, 9).await.expect_err("stale");
    assert_eq!(fenced(&err), (9, Some(10)));
    assert!(err.to_string().contains(fence.resource()), "{err}");
    // In a transaction too; a rolled-back check records nothing.
    let tx = client.transaction().await.expect("tx");
    fence.check(&tx, 12).await.expect("newer");
    tx.rollback().await.expect("rollback");
    fence.check(&client, 11).await.expect("12 was rolled back");
    let tx = client.transaction().await.expect("tx");
    fence.check(&tx, 12).await.expect("newer");
    tx.commit().await.expect("commit");
    assert_eq!(
        fenced(&fence.check(&client, 11).await.expect_err("stale")),
        (11, Some(12))
    );
    // Resources are independent; another table is another set of fences.
    let other = Fence::new(unique("other"));
    other.check(&client, 1).await.expect("another resource");
    let elsewhere = Fence::new(fence.resource()).table("public.fences_2");
    elsewhere.create_table(&client).await.expect("create");
    elsewhere.check(&client, 1).await.expect("another table");
    let bad = Fence::new("x").table("Bad Name");
    assert!(matches!(
        bad.check(&client, 1).await,
        Err(Error::InvalidConfig { name: "table", .. })
    ));
}

/// A newer leader's transaction holds the fence; the stale leader's check waits for it and
/// fails once it commits; nothing of the stale one lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_transaction_waits_for_the_newer_one_and_fails() {
    let h = harness().await;
    let admin = connect(&h.server.url()).await;
    let resource = unique("orders");
    let fence = Fence::new(&resource);
    fence.create_table(&admin).await.expect("create");
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS writes (resource text, writer text)")
        .await
        .expect("writes table");
    fence
        .check(&admin, 4)
        .await
        .expect("the old leader's token");
    let stale_app = unique("stale");
    let mut newer = connect(&h.server.url()).await;
    let mut stale = connect(&format!("{}?application_name={stale_app}", h.server.url())).await;

    let newer_tx = newer.transaction().await.expect("tx");
    fence
        .check(&newer_tx, 5)
        .await
        .expect("the new leader passes");
    let stale_write = {
        let fence = fence.clone();
        let resource = resource.clone();
        tokio::spawn(async move {
            let tx = stale.transaction().await.expect("tx");
            fence.check(&tx, 4).await?;
            tx.execute("INSERT INTO writes VALUES ($1, 'stale')", &[&resource])
                .await
                .map_err(Error::store)?;
            tx.commit().await.map_err(Error::store)
        })
    };
    waits_for_a_lock(&admin, &stale_app).await;
    newer_tx
        .execute("INSERT INTO writes VALUES ($1, 'newer')", &[&resource])
        .await
        .expect("write");
    newer_tx.commit().await.expect("commit");
    let err = within("the stale write", Duration::from_secs(10), stale_write)
        .await
        .expect("task")
        .expect_err("the stale leader is fenced");
    assert_eq!(fenced(&err), (4, Some(5)));
    let writers: Vec<String> = admin
        .query(
            "SELECT writer FROM writes WHERE resource = $1",
            &[&resource],
        )
        .await
        .expect("writes")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(writers, ["newer"]);
}

/// The other order: the old leader's transaction got the fence first (its token was still
/// the highest); the new leader's waits for it, then passes; the old one is fenced from
/// then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_transaction_waits_for_an_older_one_then_passes() {
    let h = harness().await;
    let admin = connect(&h.server.url()).await;
    let fence = Fence::new(unique("jobs"));
    fence.create_table(&admin).await.expect("create");
    let newer_app = unique("newer");
    let mut old = connect(&h.server.url()).await;
    let mut newer = connect(&format!("{}?application_name={newer_app}", h.server.url())).await;
    let old_tx = old.transaction().await.expect("tx");
    fence
        .check(&old_tx, 7)
        .await
        .expect("the old leader, first");
    let newer_check = {
        let fence = fence.clone();
        tokio::spawn(async move {
            let tx = newer.transaction().await.expect("tx");
            fence.check(&tx, 8).await?;
            tx.commit().await.map_err(Error::store)?;
            Ok::<_, Error>(newer)
        })
    };
    waits_for_a_lock(&admin, &newer_app).await;
    old_tx.commit().await.expect("the old leader commits first");
    within("the newer check", Duration::from_secs(10), newer_check)
        .await
        .expect("task")
        .expect("the newer leader passes after the old one committed");
    assert_eq!(
        fenced(&fence.check(&old, 7).await.expect_err("stale now")),
        (7, Some(8))
    );
}
