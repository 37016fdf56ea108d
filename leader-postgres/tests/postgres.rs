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

/// A resignation grants the term to the first in line in its own commit: the waiter leads
/// with the next token without sending a statement of its own (no attempt after a
/// wake-up), and its place in line is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_grants_the_next_waiter_its_term_in_the_same_commit() {
    let h = harness().await;
    let admin = h.admin().await;
    // Long enough that no keeper round (every third of it) falls inside the handoff.
    let ttl = Duration::from_secs(60);
    let name = unique("grant");
    let a = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let waiter_driver = h.driver_at(&h.server.url()).await;
    let b = election(waiter_driver.clone(), &name, ttl);
    let a_term = within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    let waiter = spawn_campaign(&b);
    wait_for_line(&admin, &name, 1).await;
    // The place is in the table: b's attempt has answered (the line is read after it).
    let before = waiter_driver.statements_sent();
    a.resign().await.expect("resign");
    let b_term = within("b's campaign", ttl / 10, waiter)
        .await
        .expect("campaign task")
        .expect("b elected");
    assert_eq!(
        waiter_driver.statements_sent(),
        before,
        "b sent a statement to take the term: the resignation did not grant it"
    );
    assert_eq!(b_term.fencing_token(), a_term.fencing_token() + 1);
    let (holder, token, remaining) = row(&admin, &name).await.expect("the row stays");
    assert_eq!(holder.as_deref(), Some(b.id()));
    assert_eq!(
        u64::try_from(token).expect("positive"),
        b_term.fencing_token()
    );
    assert!(remaining > 0.0, "the granted lease has {remaining} ms left");
    wait_for_line(&admin, &name, 0).await;
    b.resign().await.expect("resign");
}

/// The schedule behind a lost wake-up, forced: an attempt to take the lead holds the
/// election row's lock (its `INSERT .. ON CONFLICT` locks the row even when it cannot take
/// it) while it joins the line; the resignation that starts meanwhile waits for that lock.
/// Once the attempt commits, the resignation must wake it: it reads the line after the
/// wait. (A resignation reading the line from its statement's snapshot, taken before the
/// attempt joined, woke nobody, and the new first in line waited for its keeper.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_waiting_for_an_attempts_row_lock_wakes_that_attempt() {
    let h = harness().await;
    let admin = h.admin().await;
    let name = unique("locked");
    let app = unique("resigner");
    let driver = named_driver(&h.server.url(), &app).await;
    let a = election(driver.clone(), &name, Duration::from_secs(30));
    let term = within("a's campaign", TTL * 10, a.campaign())
        .await
        .expect("a elected");
    // The attempt, played by a session of its own: it locks the row and stays open.
    let attempt = h.admin().await;
    attempt.batch_execute("BEGIN").await.expect("begin");
    attempt
        .execute(
            "SELECT 1 FROM leader_elections WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await
        .expect("lock the row");
    let io = std::sync::Arc::clone(driver.io());
    let (resign_name, id, channel) = (name.clone(), a.id().to_owned(), driver.channel(&name));
    let token = term.fencing_token();
    let resigning =
        tokio::spawn(async move { io.resign(&resign_name, &id, Some(token), &channel).await });
    // Until the resignation waits for the row's lock.
    let start = Instant::now();
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity                  WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the resignation never waited for the row's lock"
        );
        sleep(Duration::from_millis(5)).await;
    }
    assert!(!resigning.is_finished(), "the lock held the resignation");
    // The attempt joins the line and commits.
    attempt
        .execute(
            "INSERT INTO leader_elections_waiters \
             (name, candidate, value, channel, position, expires_at) \
             VALUES ($1, 'late', '', 'leader_late', 0, clock_timestamp() + interval '30 s')",
            &[&name],
        )
        .await
        .expect("join the line");
    attempt.batch_execute("COMMIT").await.expect("commit");
    let resigned = within("the resignation", Duration::from_secs(10), resigning)
        .await
        .expect("resign task")
        .expect("resigned");
    assert_eq!(resigned.released, 1, "{resigned:?}");
    assert_eq!(
        resigned.woken, 1,
        "the resignation woke nobody: it did not see the attempt that joined the line \
         while it waited for the row's lock"
    );
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
    let schema = PostgresDriver::builder("host=localhost".parse().expect("config"))
        .table("ops.leases")
        .build()
        .expect("valid")
        .create_table_sql();
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA ops;
             {schema};
             CREATE ROLE elector LOGIN;
             GRANT USAGE ON SCHEMA ops TO elector;
             GRANT SELECT, INSERT, UPDATE ON ops.leases TO elector;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ops.leases_waiters TO elector;
             CREATE ROLE nobody LOGIN;
             GRANT USAGE ON SCHEMA ops TO nobody;"
        ))
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

    // The resignation's function, where EXECUTE was revoked from PUBLIC: found at start,
    // not at the first resignation.
    admin
        .batch_execute(
            "REVOKE EXECUTE ON FUNCTION ops.leases_resign(text, text, bigint, text) FROM PUBLIC",
        )
        .await
        .expect("revoke EXECUTE");
    let builder = PostgresDriver::parse_url(&url("elector"))
        .expect("url")
        .table("ops.leases")
        .create_table(false);
    let err = PostgresDriver::connect_builder(builder)
        .await
        .expect_err("may not run the resignation");
    assert!(
        leader_core::ErrorChain(&err)
            .to_string()
            .contains("EXECUTE"),
        "{err}"
    );
    admin
        .batch_execute(
            "GRANT EXECUTE ON FUNCTION ops.leases_resign(text, text, bigint, text) TO elector",
        )
        .await
        .expect("grant EXECUTE");
    let builder = PostgresDriver::parse_url(&url("elector"))
        .expect("url")
        .table("ops.leases")
        .create_table(false);
    PostgresDriver::connect_builder(builder)
        .await
        .expect("connects with EXECUTE granted");

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

/// Waits until `election`'s line (the waiters' table) has `n` live waiters.
async fn wait_for_line(admin: &Client, election: &str, n: i64) {
    let start = Instant::now();
    loop {
        let count: i64 = admin
            .query_one(
                "SELECT count(*) FROM leader_elections_waiters \
                 WHERE name = $1 AND expires_at > clock_timestamp()",
                &[&election],
            )
            .await
            .expect("count the line")
            .get(0);
        if count == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{election}: {count} waiting, not {n}"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

/// The table's trigger tells the holder at once when anyone else ends its term: a DELETE,
/// another holder, another token, an earlier expiry. With a TTL of 30 s (renewals 10 s
/// apart) and no other candidate around, each ends the term within a round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_by_hand_ends_the_term_within_a_round_trip() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(30);
    let name = unique("tampered");
    let e = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let mut events = e.subscribe();
    for tamper in [
        "DELETE FROM leader_elections WHERE name = $1",
        "UPDATE leader_elections SET holder = 'intruder' WHERE name = $1",
        "UPDATE leader_elections SET fencing_token = fencing_token + 10 WHERE name = $1",
        "UPDATE leader_elections SET expires_at = clock_timestamp() + interval '1 second' \
         WHERE name = $1",
        "UPDATE leader_elections SET holder = NULL, expires_at = '-infinity' WHERE name = $1",
    ] {
        let term = within("the campaign", ttl * 2, e.campaign())
            .await
            .expect("elected");
        next_event("Elected", ttl, &mut events).await;
        let tampered_at = Instant::now();
        admin.execute(tamper, &[&name]).await.expect(tamper);
        within(tamper, Duration::from_secs(2), term.ended()).await;
        assert!(
            tampered_at.elapsed() < ttl / 15,
            "{tamper}: the term ended {:?} later",
            tampered_at.elapsed()
        );
        let lost = next_event("the loss", ttl, &mut events).await;
        assert_eq!(
            lost,
            Event::Lost {
                fencing_token: term.fencing_token(),
                reason: LossReason::Gone
            },
            "{tamper}"
        );
        // Free the row for the next round (the intruder and the shortened lease).
        admin
            .execute(
                "UPDATE leader_elections SET holder = NULL, expires_at = '-infinity' \
                 WHERE name = $1",
                &[&name],
            )
            .await
            .expect("free the row");
    }
    // The holder's own renewals, proclamations and resignation are no loss.
    let term = within("the campaign", ttl * 2, e.campaign())
        .await
        .expect("elected");
    e.resign().await.expect("resign");
    assert!(matches!(
        next_event("Elected", ttl, &mut events).await,
        Event::Elected { .. }
    ));
    assert_eq!(
        next_event("Resigned", ttl, &mut events).await,
        Event::Resigned {
            fencing_token: term.fencing_token()
        }
    );
}

/// The notice of a DELETE is lost with the LISTEN connection (killed at the same moment):
/// the leader looks at its row once the connection is back, and its term still ends long
/// before the next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listen_connection_does_not_lose_the_notice_of_a_lost_term() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(30);
    let name = unique("tampered-unheard");
    let app = unique("leader");
    let e = election(named_driver(&h.server.url(), &app).await, &name, ttl);
    let term = within("the campaign", ttl, e.campaign())
        .await
        .expect("elected");
    let pid = listen_backend(&admin, &app, None).await;
    let tampered_at = Instant::now();
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend({pid}); \
             DELETE FROM leader_elections WHERE name = '{name}'"
        ))
        .await
        .expect("kill and delete");
    within("the term's end", Duration::from_secs(5), term.ended()).await;
    assert!(
        tampered_at.elapsed() < ttl / 6,
        "the term ended {:?} after the DELETE",
        tampered_at.elapsed()
    );
}

/// Election names are the rows' exact keys: names that differ only in case, past the 63
/// bytes of an identifier, or by separators (`/`, `.`, `:`) are distinct elections, each
/// with its own leader; a NUL byte is refused when the election is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_never_collide_nor_nest() {
    let h = harness().await;
    let driver = h.driver_at(&h.server.url()).await;
    let base = unique("names");
    let long = format!("{base}-{}", "x".repeat(70));
    let names = [
        base.clone(),
        base.to_uppercase(),
        format!("{base}/x"),
        format!("{base}/"),
        format!("{base}.x"),
        format!("{base}:x"),
        format!("{long}a"),
        format!("{long}b"),
        format!("\"{base}\""),
        format!("{base} "),
    ];
    let mut terms = Vec::new();
    for name in &names {
        let e = election(driver.clone(), name, TTL * 5);
        let term = within(name, TTL * 5, e.campaign())
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        terms.push((e, term));
    }
    for (name, (e, term)) in names.iter().zip(&terms) {
        assert!(
            e.status().is_leader(),
            "{name} lost its lead to a look-alike"
        );
        let leader = leader_core::Driver::leader(&driver, name)
            .await
            .expect("leader")
            .expect("a leader");
        assert_eq!(leader.id, e.id(), "{name}");
        assert_eq!(leader.fencing_token, term.fencing_token(), "{name}");
    }
    for (e, _) in &terms {
        e.resign().await.expect("resign");
    }
    let err = Election::builder(driver, format!("{base}\0x"))
        .build()
        .expect_err("a NUL byte");
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
}

/// Waiters stand in a line: a resignation wakes only the first of them, which is elected;
/// the handoff costs a bounded number of statements however many wait, and the line is
/// kept in join order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_wakes_only_the_next_waiter_in_a_few_statements() {
    const WAITING: usize = 30;
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(30);
    let name = unique("line");
    let leader_driver = h.driver_at(&h.server.url()).await;
    let a = election(leader_driver.clone(), &name, ttl);
    within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    // The waiters on three drivers, joining one after the other.
    let drivers = [
        h.driver_at(&h.server.url()).await,
        h.driver_at(&h.server.url()).await,
        h.driver_at(&h.server.url()).await,
    ];
    let mut waiters = Vec::new();
    for i in 0..WAITING {
        let e = election(drivers[i % drivers.len()].clone(), &name, ttl);
        let campaign = spawn_campaign(&e);
        wait_for_line(&admin, &name, i64::try_from(i + 1).expect("small")).await;
        waiters.push((e, campaign));
    }
    let sent = || {
        drivers
            .iter()
            .chain([&leader_driver])
            .map(PostgresDriver::statements_sent)
            .sum::<u64>()
    };
    let before = sent();
    let resigned_at = Instant::now();
    a.resign().await.expect("resign");
    let (first, campaign) = waiters.remove(0);
    within("the first waiter's campaign", ttl / 3, campaign)
        .await
        .expect("campaign task")
        .expect("the first in line is elected");
    let handoff = resigned_at.elapsed();
    assert!(first.status().is_leader());
    assert!(handoff < ttl / 20, "the handoff took {handoff:?}");
    wait_for_line(&admin, &name, i64::try_from(WAITING - 1).expect("small")).await;
    let statements = sent() - before;
    assert!(
        statements <= 4,
        "a handoff with {WAITING} waiting took {statements} statements (a herd?)"
    );
    for (e, campaign) in &waiters {
        assert!(!campaign.is_finished());
        assert!(!e.status().is_leader());
    }
    // The next resignation goes to the next in join order.
    first.resign().await.expect("resign");
    let (second, campaign) = waiters.remove(0);
    within("the second waiter's campaign", ttl / 3, campaign)
        .await
        .expect("campaign task")
        .expect("the second in line is elected");
    second.resign().await.expect("resign");
    let (third, campaign) = waiters.remove(0);
    within("the third waiter's campaign", ttl / 3, campaign)
        .await
        .expect("campaign task")
        .expect("the third in line is elected");
    third.resign().await.expect("resign");
    for (_, campaign) in waiters {
        campaign.abort();
    }
}

/// 50 elections held by one driver renew in about one statement per third of a TTL, not
/// one per election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_elections_on_one_driver_renew_in_a_few_statements() {
    const ELECTIONS: usize = 50;
    let h = harness().await;
    let ttl = Duration::from_secs(3);
    let driver = h.driver_at(&h.server.url()).await;
    let base = unique("many");
    let mut elections = Vec::new();
    for i in 0..ELECTIONS {
        let e = election(driver.clone(), &format!("{base}-{i}"), ttl);
        within("a campaign", ttl, e.campaign())
            .await
            .expect("elected");
        elections.push(e);
    }
    let before = driver.statements_sent();
    let window = ttl * 2;
    let start = Instant::now();
    while start.elapsed() < window {
        assert!(
            elections.iter().all(|e| e.status().is_leader()),
            "a term was lost"
        );
        sleep(Duration::from_millis(50)).await;
    }
    let statements = driver.statements_sent() - before;
    // Six renewal periods of a third of a TTL: 50 x 6 = 300 statements one by one.
    assert!(
        statements <= 30,
        "{ELECTIONS} elections renewed in {statements} statements over {window:?}"
    );
    for e in &elections {
        e.resign().await.expect("resign");
    }
}

/// A waiter whose campaign is dropped leaves the line at once (its withdrawal), and a
/// place nobody refreshes (its driver died) stops counting at its expiry and is swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_and_dead_waiters_leave_the_line() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(2);
    let name = unique("withdrawn");
    let a = election(h.driver_at(&h.server.url()).await, &name, ttl);
    within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    let b = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let campaign = spawn_campaign(&b);
    wait_for_line(&admin, &name, 1).await;
    let dropped_at = Instant::now();
    campaign.abort();
    let _ = campaign.await;
    // Dropping the campaign withdraws it: its place is deleted, not left to expire.
    let places = |id: String| {
        let (admin, name) = (&admin, name.clone());
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM leader_elections_waiters \
                     WHERE name = $1 AND candidate = $2",
                    &[&name, &id],
                )
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    let start = Instant::now();
    while places(b.id().to_owned()).await > 0 {
        assert!(start.elapsed() < ttl, "b's place outlived its withdrawal");
        sleep(Duration::from_millis(10)).await;
    }
    assert!(dropped_at.elapsed() < ttl);
    // A place left by a driver that died (written as it would have): it stops counting at
    // its expiry, and a statement on the election sweeps it soon after.
    admin
        .execute(
            "INSERT INTO leader_elections_waiters (name, candidate, value, channel, position, \
             expires_at) VALUES ($1, 'dead', '', 'leader_d_0', 0, clock_timestamp() + \
             interval '1 second')",
            &[&name],
        )
        .await
        .expect("a dead waiter's place");
    let line = leader_core::Driver::leader(&h.driver_at(&h.server.url()).await, &name)
        .await
        .expect("leader");
    assert!(line.is_some());
    let start = Instant::now();
    loop {
        a.resign().await.expect("resign");
        within("a's campaign", ttl * 2, a.campaign())
            .await
            .expect("a elected again (the dead waiter's place expired)");
        if places("dead".to_owned()).await == 0 {
            break;
        }
        assert!(
            start.elapsed() < ttl * 2,
            "the dead waiter's place was not swept"
        );
        sleep(Duration::from_millis(100)).await;
    }
    a.resign().await.expect("resign");
}

/// A nominee that withdraws ends its nomination at once: the first in line is woken and
/// elected long before the nomination (one TTL of 30 s) would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nominee_that_withdraws_lets_the_line_resume_at_once() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(30);
    let name = unique("nominee-withdraws");
    let driver = h.driver_at(&h.server.url()).await;
    let a = election(driver.clone(), &name, ttl);
    let b = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let term = within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    // The nominee: a waiter that takes its time (its place written as its driver would,
    // first in line), so that it withdraws before its turn.
    admin
        .execute(
            "INSERT INTO leader_elections_waiters (name, candidate, value, channel, position, \
             expires_at) VALUES ($1, 'slow', '', 'leader_d_0', 0, clock_timestamp() + \
             interval '1 minute')",
            &[&name],
        )
        .await
        .expect("the nominee's place");
    let b_waits = spawn_campaign(&b);
    wait_for_line(&admin, &name, 2).await;
    term.hand_over("slow").await.expect("hand over");
    let candidates = b.candidates().await.expect("candidates");
    let line: Vec<&str> = candidates.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(line, ["slow", b.id()], "the nominee first, no leader");
    assert!(!b_waits.is_finished(), "the nomination keeps b out");
    // The nominee withdraws, through the driver as its election would.
    let slow = leader_core::Candidate::new(name.as_str(), "slow", "", ttl);
    let withdrawn_at = Instant::now();
    leader_core::Driver::resign(&driver, &slow, None)
        .await
        .expect("the nominee withdraws");
    within("b's campaign", ttl / 3, b_waits)
        .await
        .expect("campaign task")
        .expect("b is elected once the nominee withdrew");
    assert!(
        withdrawn_at.elapsed() < ttl / 20,
        "b was elected {:?} after the nominee withdrew",
        withdrawn_at.elapsed()
    );
    b.resign().await.expect("resign");
}

/// A nominee that never takes its turn (its process is gone): nobody else is elected while
/// the nomination lasts (one TTL, by the server's clock), and the line resumes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nominee_holds_the_election_for_one_ttl_then_the_line_resumes() {
    let h = harness().await;
    let admin = h.admin().await;
    let ttl = Duration::from_secs(2);
    let name = unique("nominee-dead");
    let a = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let b = election(h.driver_at(&h.server.url()).await, &name, ttl);
    let term = within("a's campaign", ttl, a.campaign())
        .await
        .expect("a elected");
    // The place of a waiter whose process is gone (nobody listens on its channel), as its
    // driver wrote it before dying: it expires within a TTL.
    admin
        .execute(
            "INSERT INTO leader_elections_waiters (name, candidate, value, channel, position, \
             expires_at) VALUES ($1, 'ghost', '', 'leader_d_0', 0, clock_timestamp() + \
             interval '1 second')",
            &[&name],
        )
        .await
        .expect("the ghost's place");
    let b_waits = spawn_campaign(&b);
    wait_for_line(&admin, &name, 2).await;
    let handed_at = Instant::now();
    term.hand_over("ghost")
        .await
        .expect("hand over to the ghost");
    let b_term = within("b's campaign", ttl * 3, b_waits)
        .await
        .expect("campaign task")
        .expect("the line resumes after the nomination");
    let after = handed_at.elapsed();
    assert!(
        after >= ttl - Duration::from_millis(100),
        "b was elected {after:?} after a nomination of {ttl:?}"
    );
    assert!(b_term.fencing_token() > term.fencing_token());
    b.resign().await.expect("resign");
}

/// `hand_over` and `proclaim` act on exactly the given term: with an ended term's token
/// they are `TermGone` and write nothing; `hand_over` to a candidate that is not in line
/// is `NotWaiting`, the term kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_and_proclaim_compare_holder_and_token() {
    use leader_core::{Candidate, Driver};
    let h = harness().await;
    let admin = h.admin().await;
    let driver = h.driver_at(&h.server.url()).await;
    let name = unique("exact");
    let ttl = Duration::from_secs(5);
    let a = Candidate::new(name.as_str(), "a", "a-value", ttl);
    let b = Candidate::new(name.as_str(), "b", "b-value", ttl);
    let old = driver.campaign(&a).await.expect("a elected");
    driver
        .resign(&a, Some(old.fencing_token))
        .await
        .expect("resign");
    let current = driver.campaign(&a).await.expect("a elected again");
    assert!(current.fencing_token > old.fencing_token);
    let waiting = tokio::spawn({
        let (driver, b) = (driver.clone(), b.clone());
        async move { driver.campaign(&b).await }
    });
    wait_for_line(&admin, &name, 1).await;
    let stale = old.fencing_token;
    assert!(matches!(
        driver.proclaim(&a, stale, b"stale").await,
        Err(Error::TermGone)
    ));
    assert!(matches!(
        driver.hand_over(&a, stale, "b").await,
        Err(Error::TermGone)
    ));
    assert!(matches!(
        driver.hand_over(&a, current.fencing_token, "nobody").await,
        Err(Error::NotWaiting { id }) if id == "nobody"
    ));
    let leader = driver
        .leader(&name)
        .await
        .expect("leader")
        .expect("a leads");
    assert_eq!(
        (
            leader.id.as_str(),
            leader.value.as_slice(),
            leader.fencing_token
        ),
        ("a", &b"a-value"[..], current.fencing_token),
        "nothing was written"
    );
    driver
        .proclaim(&a, current.fencing_token, b"a-new")
        .await
        .expect("proclaim");
    let line = driver.candidates(&name).await.expect("candidates");
    let seen: Vec<(&str, &[u8], bool)> = line
        .iter()
        .map(|c| (c.id.as_str(), c.value.as_slice(), c.is_leader))
        .collect();
    assert_eq!(
        seen,
        [("a", &b"a-new"[..], true), ("b", &b"b-value"[..], false)]
    );
    driver
        .hand_over(&a, current.fencing_token, "b")
        .await
        .expect("hand over");
    let b_term = within("b's campaign", ttl, waiting)
        .await
        .expect("task")
        .expect("b elected");
    assert!(b_term.fencing_token > current.fencing_token);
    assert!(matches!(
        driver.proclaim(&a, current.fencing_token, b"late").await,
        Err(Error::TermGone)
    ));
    driver
        .resign(&b, Some(b_term.fencing_token))
        .await
        .expect("resign");
}

/// Connecting runs a handoff in a transaction it rolls back (so that the backend has
/// planned the handoff's statements before a real one needs them): nothing of it is left
/// in the tables, and the connection's next statements are outside that transaction
/// (another session sees the term they committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_warm_up_leaves_nothing_and_no_transaction_open() {
    let h = harness().await;
    let admin = h.admin().await;
    let name = unique("warm");
    let e = election(h.driver_at(&h.server.url()).await, &name, TTL);
    let term = within("the campaign", TTL, e.campaign())
        .await
        .expect("elected");
    let (holder, token, _) = row(&admin, &name).await.expect("the term's row, committed");
    assert!(holder.is_some(), "the row names its holder");
    assert_eq!(u64::try_from(token).ok(), Some(term.fencing_token()));
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM leader_elections WHERE name LIKE 'leader warm-up %') \
             + (SELECT count(*) FROM leader_elections_waiters WHERE name LIKE 'leader warm-up %')",
            &[],
        )
        .await
        .expect("count the warm-up's rows")
        .get(0);
    assert_eq!(left, 0, "rows of the warm-up were committed");
    term.resign().await.expect("resign");
}
