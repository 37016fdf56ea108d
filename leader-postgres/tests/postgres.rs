//! PostgreSQL-specific behaviour against real postgres processes: the row, NOTIFY handoff,
//! rows changed behind the leader's back, a server restart, a killed LISTEN connection,
//! least-privilege grants.

mod common;

use std::time::Duration;

use common::{TTL, harness};
use futures::StreamExt;
use leader_core::testing::conformance::{next_event, spawn_campaign, wait_until, within};
use leader_core::{Election, Error, Event, LossReason};
use leader_postgres::PostgresDriver;
use leader_postgres::tokio_postgres::{self, Client};
use leader_testkit::unique;
use tokio::time::{Instant, sleep};

fn election(driver: PostgresDriver, name: &str, ttl: Duration) -> Election {
    Election::builder(driver, name)
        .ttl(ttl)
        .retry(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("valid settings")
}

/// A driver whose connections carry `application_name` `app` (and `app-listen`).
async fn named_driver(url: &str, app: &str) -> PostgresDriver {
    let mut config: tokio_postgres::Config = url.parse().expect("valid url");
    config.application_name(app);
    let driver = PostgresDriver::new(config);
    // Connect now, so that failures show here.
    leader_core::Driver::leader(&driver, "warm-up")
        .await
        .expect("connects");
    driver
}

/// The pid of the backend of `app`'s LISTEN connection once it has run a LISTEN.
async fn listen_backend(admin: &Client, app: &str, other_than: Option<i32>) -> i32 {
    let listen_app = format!("{app}-listen");
    let start = Instant::now();
    loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
                 AND query LIKE 'LISTEN%'",
                &[&listen_app],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(pid) = rows
            .iter()
            .map(|row| row.get::<_, i32>(0))
            .find(|pid| Some(*pid) != other_than)
        {
            return pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{listen_app} never ran LISTEN"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

async fn row(admin: &Client, name: &str) -> Option<(Option<String>, i64, f64)> {
    admin
        .query_opt(
            "SELECT holder, fencing_token, CASE WHEN isfinite(expires_at) \
             THEN extract(epoch FROM expires_at - clock_timestamp())::float8 * 1000 \
             ELSE -1 END FROM leader_elections WHERE name = $1",
            &[&name],
        )
        .await
        .expect("select the row")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_holds_holder_value_token_and_a_server_side_expiry() {
    let h = harness().await;
    let admin = h.admin().await;
    let driver = h.driver_at(&h.server.url()).await;
    let name = unique("row");
    let e = Election::builder(driver.clone(), &name)
        .ttl(TTL)
        .value("10.0.0.7:8080")
        .build()
        .expect("valid");
    let term = e.campaign().await.expect("elected");
    let r = admin
        .query_one(
            "SELECT holder, value, fencing_token, \
             extract(epoch FROM expires_at - clock_timestamp())::float8 * 1000 \
             FROM leader_elections WHERE name = $1",
            &[&name],
        )
        .await
        .expect("the row");
    let (holder, value, token, remaining): (String, Vec<u8>, i64, f64) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!(
        holder,
        e.id(),
        "the holder is the candidate id, not a hostname"
    );
    assert_eq!(value, b"10.0.0.7:8080");
    assert_eq!(
        u64::try_from(token).expect("positive"),
        term.fencing_token()
    );
    assert!(
        remaining > 0.0 && remaining <= 1000.0,
        "the lease is the TTL: {remaining} ms"
    );
    e.resign().await.expect("resign");
    let (holder, kept, _) = row(&admin, &name).await.expect("resign keeps the row");
    assert_eq!(holder, None, "resign clears the holder");
    assert_eq!(kept, token, "resign keeps the counter");
    let again = e.campaign().await.expect("elected again");
    assert_eq!(again.fencing_token(), term.fencing_token() + 1);
    e.resign().await.expect("resign");
    assert!(driver.channel(&name).starts_with("leader_"));
}

/// A resignation wakes the waiter through NOTIFY: with a 10 s TTL it is elected in a small
/// fraction of it, which the expiry timer could not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_wakes_the_waiter_by_notify_long_before_the_ttl() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(10);
    let name = unique("notify");
    let a = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let app = unique("waiter");
    let b = election(named_driver(&h.server.url(), &app).await, &name, ttl);
    let a_term = within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    let waiter = spawn_campaign(&b);
    listen_backend(&admin, &app, None).await;
    // b has listened; its first attempt may still be in flight, which is fine: a
    // resignation before it lets that attempt win at once.
    assert!(!waiter.is_finished(), "b waits while a leads");
    let resigned_at = Instant::now();
    a.resign().await.expect("resign");
    let b_term = within("b's campaign", ttl, waiter)
        .await
        .expect("campaign task")
        .expect("b elected");
    let handover = resigned_at.elapsed();
    assert!(
        handover < ttl / 20,
        "handover took {handover:?} with a TTL of {ttl:?}: NOTIFY did not wake b"
    );
    assert!(b_term.fencing_token() > a_term.fencing_token());
    b.resign().await.expect("resign");
}

/// An operator deletes the leader's row: the leader notices at its next renewal, and the
/// fencing tokens of the row made anew are still higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_behind_the_leaders_back_ends_the_term() {
    let h = harness().await;
    let admin = h.admin().await;
    let name = unique("deleted");
    let a = election(h.driver_at(&h.server.url()).await, &name, TTL);
    let mut events = a.subscribe();
    let term = a.campaign().await.expect("elected");
    next_event("Elected", TTL, &mut events).await;
    admin
        .execute("DELETE FROM leader_elections WHERE name = $1", &[&name])
        .await
        .expect("delete");
    let lost = next_event("the loss", TTL, &mut events).await;
    assert_eq!(
        lost,
        Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        }
    );
    assert!(!a.status().is_leader());
    // The next term, on a new row, still has a higher token: tokens never go back.
    let next = within("the next campaign", TTL * 3, a.campaign())
        .await
        .expect("elected again");
    assert!(
        next.fencing_token() > term.fencing_token(),
        "the token went back after a DELETE: {} then {}",
        term.fencing_token(),
        next.fencing_token()
    );
    a.resign().await.expect("resign");
}

/// Another holder takes the row behind the leader's back: the old leader steps down and
/// never extends or releases the new holder's term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_taken_behind_the_leaders_back_is_never_touched_by_the_old_leader() {
    let h = harness().await;
    let admin = h.admin().await;
    let name = unique("taken");
    let old = election(h.driver_at(&h.server.url()).await, &name, TTL);
    let mut events = old.subscribe();
    let term = old.campaign().await.expect("elected");
    next_event("Elected", TTL, &mut events).await;
    admin
        .execute(
            "UPDATE leader_elections SET holder = 'intruder', value = 'x', \
             fencing_token = fencing_token + 1, \
             expires_at = clock_timestamp() + interval '5 seconds' WHERE name = $1",
            &[&name],
        )
        .await
        .expect("take the row");
    let (_, intruder_token, before) = row(&admin, &name).await.expect("the row");
    let lost = next_event("the old leader's loss", TTL, &mut events).await;
    assert_eq!(
        lost,
        Event::Lost {
            fencing_token: term.fencing_token(),
            reason: LossReason::Gone
        }
    );
    // The loss ended the term locally, and the withdrawal that follows a loss must leave
    // the intruder's term alone: wait until the old leader is campaigning again (its
    // status says not leading) and check the row over more than a renewal period.
    wait_until("the old leader steps down", TTL, || {
        !old.status().is_leader()
    })
    .await;
    let checked_at = Instant::now();
    while checked_at.elapsed() < TTL / 2 {
        let (holder, token, remaining) = row(&admin, &name).await.expect("the row");
        assert_eq!(holder.as_deref(), Some("intruder"));
        assert_eq!(token, intruder_token);
        assert!(remaining <= before, "the intruder's lease was extended");
        sleep(Duration::from_millis(20)).await;
    }
    assert!(!old.status().is_leader());
}

/// PostgreSQL is killed and restarted while a candidate leads: committed rows survive,
/// fencing tokens never go back, and someone leads again (never two at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_while_leading_keeps_the_counter_and_recovers() {
    let mut h = harness().await;
    let ttl = Duration::from_secs(2);
    let name = unique("restart");
    let a = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let b = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let shutdown = leader_core::CancellationToken::new();
    let runs = [
        leader_core::testing::conformance::spawn_run(&a, &shutdown),
        leader_core::testing::conformance::spawn_run(&b, &shutdown),
    ];
    wait_until("one leads", ttl * 3, || {
        a.status().is_leader() || b.status().is_leader()
    })
    .await;
    let before = a
        .status()
        .fencing_token()
        .or(b.status().fencing_token())
        .expect("a token");
    let (a_status, b_status) = (a.status(), b.status());
    let watching = leader_core::CancellationToken::new();
    let overlaps = tokio::spawn({
        let watching = watching.clone();
        async move {
            let mut both = 0u32;
            while !watching.is_cancelled() {
                if a_status.is_leader() && b_status.is_leader() {
                    both += 1;
                }
                sleep(Duration::from_millis(1)).await;
            }
            both
        }
    });
    h.restart();
    // Someone leads after the restart, in a term at least as new as before.
    wait_until("a leader after the restart", ttl * 10, || {
        a.status().is_leader() || b.status().is_leader()
    })
    .await;
    let after = a
        .status()
        .fencing_token()
        .or(b.status().fencing_token())
        .expect("a token");
    assert!(after >= before, "fencing went back: {before} then {after}");
    let admin = h.admin().await;
    let (_, counter, _) = row(&admin, &name).await.expect("the row survived");
    assert!(u64::try_from(counter).expect("positive") >= before);
    watching.cancel();
    assert_eq!(overlaps.await.expect("poller"), 0, "two leaders at once");
    shutdown.cancel();
    for run in runs {
        run.await
            .expect("run task did not panic")
            .expect("run ends cleanly");
    }
}

/// The LISTEN connection is killed (pg_terminate_backend): watchers are woken to look
/// again, the connection comes back, and a resignation still wakes the waiter at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_connection_wakes_everyone_and_comes_back() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(10);
    let name = unique("listen-killed");
    let a = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let app = unique("waiter");
    let driver = named_driver(&h.server.url(), &app).await;
    let b = election(driver.clone(), &name, ttl);
    within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    // An observer on b's driver: with a leader, it looks again only at the lease's expiry
    // (seconds away) or when woken.
    let mut changes = leader_core::Driver::observe(&driver, &name);
    let first = within("the first observation", ttl, changes.next())
        .await
        .expect("stream open")
        .expect("no error");
    assert!(first.is_some());
    let waiter = spawn_campaign(&b);
    let pid = listen_backend(&admin, &app, None).await;
    let killed_at = Instant::now();
    let terminated: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(terminated);
    let woken = within("the observer's wake-up", ttl / 2, changes.next())
        .await
        .expect("stream open")
        .expect("no error");
    assert!(
        killed_at.elapsed() < ttl / 5,
        "the observer looked again only after {:?}",
        killed_at.elapsed()
    );
    assert_eq!(woken, first, "the same leader, looked at again");
    listen_backend(&admin, &app, Some(pid)).await;
    assert!(!waiter.is_finished(), "b still waits while a leads");
    let resigned_at = Instant::now();
    a.resign().await.expect("resign");
    within("b's campaign", ttl, waiter)
        .await
        .expect("campaign task")
        .expect("b elected");
    assert!(
        resigned_at.elapsed() < ttl / 20,
        "handover took {:?} after the LISTEN connection came back",
        resigned_at.elapsed()
    );
    b.resign().await.expect("resign");
}

/// A role with exactly the README's grants (SELECT, INSERT, UPDATE on the table; no
/// CREATE) elects; a role without them gets `Error::Denied` naming the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_works_and_missing_grants_are_denied() {
    let h = harness().await;
    let admin = h.admin().await;
    admin
        .batch_execute(
            "CREATE SCHEMA ops;
             CREATE TABLE ops.leases (
                 name text PRIMARY KEY, holder text, value bytea NOT NULL DEFAULT '',
                 fencing_token bigint NOT NULL DEFAULT 0,
                 expires_at timestamptz NOT NULL DEFAULT '-infinity');
             CREATE ROLE elector LOGIN;
             GRANT USAGE ON SCHEMA ops TO elector;
             GRANT SELECT, INSERT, UPDATE ON ops.leases TO elector;
             CREATE ROLE nobody LOGIN;
             GRANT USAGE ON SCHEMA ops TO nobody;",
        )
        .await
        .expect("roles and table");
    let url = |user: &str| format!("postgres://{user}@{}/postgres", h.server.addr());
    let name = unique("grants");
    let builder = PostgresDriver::parse_url(&url("elector"))
        .expect("url")
        .table("ops.leases")
        .create_table(false);
    let driver = PostgresDriver::connect_builder(builder)
        .await
        .expect("connects with the grants");
    let e = election(driver, &name, TTL);
    let term = e.campaign().await.expect("elected with the grants");
    e.resign().await.expect("resigns with the grants");
    assert!(term.fencing_token() > 0);

    let builder = PostgresDriver::parse_url(&url("nobody"))
        .expect("url")
        .table("ops.leases");
    let driver = PostgresDriver::connect_builder(builder)
        .await
        .expect("connects: the table exists");
    let err = leader_core::Driver::leader(&driver, &name)
        .await
        .expect_err("no SELECT");
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    assert!(!err.is_transient());
    let said = leader_core::ErrorChain(&err).to_string();
    assert!(said.contains("ops.leases"), "{said}");
    assert!(said.contains("SELECT, INSERT and UPDATE"), "{said}");

    // A missing table and no right to create it: Denied, saying what to do.
    let builder = PostgresDriver::parse_url(&url("nobody"))
        .expect("url")
        .table("ops.missing");
    let err = PostgresDriver::connect_builder(builder)
        .await
        .expect_err("may not create");
    assert!(matches!(err, Error::Denied(_)), "{err:?}");
    assert!(
        leader_core::ErrorChain(&err).to_string().contains("README"),
        "{err}"
    );
}
