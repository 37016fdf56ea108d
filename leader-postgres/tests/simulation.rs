//! The deterministic simulation of leader-postgres's protocol against a model of
//! PostgreSQL (no server needed). `SIM_SEED=N` replays one seed, `SIM_TRACE=1` prints its
//! schedule, `SIM_SEEDS` sets how many seeds run (default 2,000). See SIMULATION.md.
//!
//! Besides the harness's random schedules, a few scripted scenarios on the same model
//! (paused clock, no faults) check what the harness's safety checks cannot see: how fast a
//! holder hears that someone else ended its term, that a resignation grants the term to
//! the next waiter alone, and what a waiter does with a grant it cannot trust or no longer
//! wants.

mod sim;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leader_core::{Candidate, CandidateInfo, Driver, Error, Result};
use leader_postgres::io::{
    AcquireRequest, Acquired, HandOver, HandOverRequest, Holder, Kept, ListenConnection, Place,
    PostgresIo, Renewal, Resigned,
};
use leader_postgres::{DEFAULT_TABLE, PostgresDriver};
use leader_testkit::sim::{ClientId, Model, Net};
use tokio::time::{sleep, timeout};

#[test]
fn simulated_schedules_keep_every_safety_property() {
    leader_testkit::sim::run_seeds("leader-postgres", sim::PostgresModel::new);
}

/// A model on a quiet network and `n` drivers on it (clients 0..n).
fn drivers(n: usize) -> (Net, sim::PostgresModel, Vec<PostgresDriver>) {
    let net = Net::quiet();
    let model = sim::PostgresModel::new(&net);
    let drivers = (0..n).map(|i| model.driver(&net, ClientId(i))).collect();
    (net, model, drivers)
}

fn candidate(id: &str, ttl: Duration) -> Candidate {
    Candidate::new("sim-0", id, id.as_bytes().to_vec(), ttl)
}

/// The trigger's notice reaches the holder within a round trip of an operator's DELETE.
#[tokio::test(start_paused = true)]
async fn a_deleted_row_ends_the_term_at_once() {
    let (_net, model, drivers) = drivers(1);
    let a = candidate("a", Duration::from_secs(10));
    let grant = drivers[0].campaign(&a).await.expect("elected");
    let gone = tokio::spawn(drivers[0].term_gone(&a, grant.fencing_token));
    sleep(Duration::from_millis(10)).await;
    assert!(!gone.is_finished(), "the term is still held");
    model
        .server()
        .statement(|t, _, notices| t.delete_row("sim-0", notices));
    timeout(Duration::from_millis(100), gone)
        .await
        .expect("term_gone resolves within a round trip of the DELETE")
        .expect("term_gone task");
}

/// A notice lost while the LISTEN connection was down: the holder looks at its row once
/// the connection is back.
#[tokio::test(start_paused = true)]
async fn a_notice_lost_with_the_listen_connection_is_made_up_for() {
    lost_notice_is_made_up_for(|t, notices| t.delete_row("sim-0", notices)).await;
}

/// The holder's `term_gone` after its LISTEN session ended (as after
/// pg_terminate_backend) and `edit` changed the row before the driver listened again, so
/// the trigger's notice reached nobody: it must resolve once the connection is back.
async fn lost_notice_is_made_up_for<R>(
    edit: impl FnOnce(&mut sim::store::Tables, &mut Vec<sim::store::Notice>) -> R,
) {
    let (_net, model, drivers) = drivers(1);
    let a = candidate("a", Duration::from_secs(10));
    let grant = drivers[0].campaign(&a).await.expect("elected");
    let gone = tokio::spawn(drivers[0].term_gone(&a, grant.fencing_token));
    sleep(Duration::from_millis(10)).await;
    model.server().drop_sessions();
    sleep(Duration::from_millis(1)).await;
    assert!(!gone.is_finished(), "the row is still there");
    model.server().statement(|t, _, notices| edit(t, notices));
    timeout(Duration::from_secs(3), gone)
        .await
        .expect("term_gone resolves once the LISTEN connection is back")
        .expect("term_gone task");
}

/// A renewal compares the token too: after an operator gave the row a new token (same
/// holder), the old term's renewal fails.
#[tokio::test(start_paused = true)]
async fn a_renewal_of_a_term_whose_token_changed_fails() {
    let (_net, model, drivers) = drivers(1);
    let a = candidate("a", Duration::from_secs(10));
    let grant = drivers[0].campaign(&a).await.expect("elected");
    model
        .server()
        .statement(|t, _, notices| t.bump_token("sim-0", notices));
    sleep(Duration::from_secs(1)).await;
    let renewed = drivers[0].renew(&a, &grant).await;
    assert!(
        matches!(renewed, Err(Error::TermGone)),
        "renewed a term the row no longer has: {renewed:?}"
    );
}

/// A resignation that took its snapshot before a waiter joined the line (it then waited for
/// the row lock that waiter's attempt held, as READ COMMITTED lets it) still wakes that
/// waiter: the resignation function reads the line in a statement of its own, after its
/// update. Read from the resignation's own snapshot, the line would be empty and the
/// waiter would wait for the TTL.
#[tokio::test(start_paused = true)]
async fn a_resignation_wakes_a_waiter_that_joined_after_its_snapshot() {
    let ttl = Duration::from_secs(30);
    let (_net, model, drivers) = drivers(2);
    let leader = candidate("leader", ttl);
    let grant = drivers[0].campaign(&leader).await.expect("elected");
    let before_the_waiter = model.server().snapshot().0;
    let driver: PostgresDriver = drivers[1].clone();
    let campaign = tokio::spawn(async move { driver.campaign(&candidate("w", ttl)).await });
    leader_testkit::sim::scripted::wait_in_line(&drivers[0], "sim-0", "w", Duration::from_secs(1))
        .await;
    model.server().snapshot_next(before_the_waiter);
    drivers[0]
        .resign(&leader, Some(grant.fencing_token))
        .await
        .expect("resigned");
    timeout(Duration::from_millis(100), campaign)
        .await
        .expect("the waiter is elected within a round trip of the resignation")
        .expect("campaign task")
        .expect("elected");
}

/// A resignation grants the term to the next waiter only, in its own statement: the
/// waiter leads without sending one (no attempt after the grant), and neither the other
/// waiter its driver carries nor the waiter on another driver is woken.
#[tokio::test(start_paused = true)]
async fn a_resignation_wakes_only_the_next_waiter() {
    let ttl = Duration::from_secs(30);
    let (_net, _model, drivers) = drivers(3);
    let leader = candidate("leader", ttl);
    let grant = drivers[0].campaign(&leader).await.expect("elected");
    // w1 and w2 on driver 1, w3 on driver 2, joining in that order.
    let mut campaigns = Vec::new();
    for (name, on) in [("w1", 1), ("w2", 1), ("w3", 2)] {
        let waiter = candidate(name, ttl);
        let driver: PostgresDriver = drivers[on].clone();
        campaigns.push(tokio::spawn(async move { driver.campaign(&waiter).await }));
        sleep(Duration::from_millis(10)).await;
    }
    let sent = |i: usize| drivers[i].statements_sent();
    let before: Vec<u64> = (0..3).map(sent).collect();
    drivers[0]
        .resign(&leader, Some(grant.fencing_token))
        .await
        .expect("resigned");
    let first = campaigns.remove(0);
    timeout(Duration::from_millis(100), first)
        .await
        .expect("the next waiter is elected within a round trip")
        .expect("campaign task")
        .expect("elected");
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        (sent(1) - before[1], sent(2) - before[2]),
        (0, 0),
        "statements of (w1 and w2's driver, w3's driver) after the resignation: the \
         resignation's grant should have elected w1 with none"
    );
    for campaign in campaigns {
        assert!(!campaign.is_finished());
        campaign.abort();
    }
}

/// A grant notice is trusted only when it quotes a statement this waiter sent (and so
/// knows when its place's lease began): one with a stamp the waiter never sent, as a
/// stale notice or another process with the same id could bring, is taken as a mere
/// wake-up. Here the notice is forged while the leader still holds: the waiter looks,
/// finds the term held, and keeps waiting; when the row is then given to it by hand
/// (again with a stamp it never sent), its own attempt takes the term anew, with the next
/// token, rather than trusting the forged one; and at once, though another waiter now
/// stands before it in line (the grant took its place), not when the lease ends.
#[tokio::test(start_paused = true)]
async fn a_grant_quoting_a_statement_the_waiter_never_sent_is_not_trusted() {
    let ttl = Duration::from_secs(30);
    let (_net, model, drivers) = drivers(3);
    let leader = candidate("leader", ttl);
    let grant = drivers[0].campaign(&leader).await.expect("elected");
    let driver: PostgresDriver = drivers[1].clone();
    let campaign = tokio::spawn(async move { driver.campaign(&candidate("w", ttl)).await });
    leader_testkit::sim::scripted::wait_in_line(&drivers[0], "sim-0", "w", Duration::from_secs(1))
        .await;
    let behind: PostgresDriver = drivers[2].clone();
    let second = tokio::spawn(async move { behind.campaign(&candidate("w2", ttl)).await });
    leader_testkit::sim::scripted::wait_in_line(&drivers[0], "sim-0", "w2", Duration::from_secs(1))
        .await;
    let key = ("sim-0".to_owned(), "w".to_owned());
    let forged = grant.fencing_token + 1;
    model.server().statement(|t, _, notices| {
        let place = t.waiters.get(&key).expect("w waits");
        let bogus = place.stamp.expect("stamped").wrapping_add(1);
        notices.push((place.channel.clone(), format!("G{forged}:{bogus}:w")));
    });
    sleep(Duration::from_millis(100)).await;
    assert!(!campaign.is_finished(), "a forged grant elected the waiter");
    let leader_now = drivers[0].leader("sim-0").await.expect("leader");
    assert_eq!(
        leader_now.map(|info| info.fencing_token),
        Some(grant.fencing_token),
        "the leader's term changed"
    );
    // The row handed to w by hand, as a grant would, but quoting a stamp w never sent.
    model.server().statement(|t, _, notices| {
        let place = t.waiters.remove(&key).expect("w waits");
        let row = t.elections.get_mut("sim-0").expect("the row");
        row.holder = Some("w".to_owned());
        row.token = i64::try_from(forged).expect("small");
        row.expires_at = place.expires_at;
        row.channel = Some(place.channel.clone());
        let bogus = place.stamp.expect("stamped").wrapping_add(1);
        notices.push((place.channel, format!("G{forged}:{bogus}:w")));
    });
    let elected = timeout(Duration::from_millis(100), campaign)
        .await
        .expect("w takes its own row within a round trip")
        .expect("campaign task")
        .expect("elected");
    assert_eq!(
        elected.fencing_token,
        forged + 1,
        "w led on the forged grant's token instead of taking the term anew"
    );
    assert!(!second.is_finished(), "w2 was elected while w led");
    second.abort();
}

/// Gives the row to `id` by hand, as a resignation's grant would (the place gone, the next
/// token `token`, the place's expiry as the lease) and sends it `G<token>:<stamp>:<id>`.
fn grant_by_hand(model: &sim::PostgresModel, id: &str, token: u64, stamp: i64) {
    model.server().statement(|t, _, notices| {
        let place = t
            .waiters
            .remove(&("sim-0".to_owned(), id.to_owned()))
            .expect("waits");
        let row = t.elections.get_mut("sim-0").expect("the row");
        row.holder = Some(id.to_owned());
        row.token = i64::try_from(token).expect("small");
        row.expires_at = place.expires_at;
        row.channel = Some(place.channel.clone());
        notices.push((place.channel, format!("G{token}:{stamp}:{id}")));
    });
}

/// The stamp of `id`'s place in line now.
fn stamp_of(model: &sim::PostgresModel, id: &str) -> i64 {
    model.server().statement(|t, _, _| {
        t.waiters
            .get(&("sim-0".to_owned(), id.to_owned()))
            .and_then(|place| place.stamp)
            .expect("a stamped place")
    })
}

/// A grant quoting one of the waiter's recent statements, not only its newest, is
/// trusted (the grant may have read the place before the newest one landed): the waiter
/// leads on the granted token, with no attempt. One quoting a statement sent more than
/// half a TTL ago is not: the waiter attempts and takes its own row anew (next token), so
/// that a term it can bound only briefly does not start with a renewal race.
#[tokio::test(start_paused = true)]
async fn a_grant_is_trusted_for_a_recent_statement_and_not_for_an_old_one() {
    let ttl = Duration::from_secs(30);
    for (rest, trusted) in [
        (ttl / 3 + Duration::from_secs(1), true),
        (ttl * 11 / 20, false),
    ] {
        let (_net, model, drivers) = drivers(2);
        let leader = candidate("leader", ttl);
        let grant = drivers[0].campaign(&leader).await.expect("elected");
        let driver: PostgresDriver = drivers[1].clone();
        let campaign = tokio::spawn(async move { driver.campaign(&candidate("w", ttl)).await });
        leader_testkit::sim::scripted::wait_in_line(
            &drivers[0],
            "sim-0",
            "w",
            Duration::from_secs(1),
        )
        .await;
        let joined = stamp_of(&model, "w");
        sleep(rest).await;
        assert_ne!(
            stamp_of(&model, "w"),
            joined,
            "the keeper refreshed the place"
        );
        let token = grant.fencing_token + 1;
        grant_by_hand(&model, "w", token, joined);
        let elected = timeout(Duration::from_millis(100), campaign)
            .await
            .expect("w leads within a round trip")
            .expect("campaign task")
            .expect("elected");
        let expected = if trusted { token } else { token + 1 };
        assert_eq!(
            elected.fencing_token, expected,
            "after {rest:?}: a grant quoting the joining statement (trusted: {trusted})"
        );
    }
}

/// A waiter that stopped campaigning (its future dropped) but was granted the term before
/// it left the line: its tokenless resignation, which a dropped campaign leads to, ends
/// that term at once rather than leaving it to expire.
#[tokio::test(start_paused = true)]
async fn a_term_granted_to_a_waiter_that_gave_up_is_released_by_its_leaving() {
    let ttl = Duration::from_secs(30);
    let (_net, _model, drivers) = drivers(2);
    let leader = candidate("leader", ttl);
    let grant = drivers[0].campaign(&leader).await.expect("elected");
    let w = candidate("w", ttl);
    let driver: PostgresDriver = drivers[1].clone();
    let waiter = w.clone();
    let campaign = tokio::spawn(async move { driver.campaign(&waiter).await });
    leader_testkit::sim::scripted::wait_in_line(&drivers[0], "sim-0", "w", Duration::from_secs(1))
        .await;
    campaign.abort();
    let _ = campaign.await;
    drivers[0]
        .resign(&leader, Some(grant.fencing_token))
        .await
        .expect("resigned");
    let granted = drivers[0].leader("sim-0").await.expect("leader");
    assert_eq!(
        granted.map(|info| (info.id, info.fencing_token)),
        Some(("w".to_owned(), grant.fencing_token + 1)),
        "the resignation granted the term to w, still in line"
    );
    drivers[1].resign(&w, None).await.expect("w left");
    let leader_now = drivers[0].leader("sim-0").await.expect("leader");
    assert!(
        leader_now.is_none(),
        "the term granted to w outlived its leaving: {leader_now:?}"
    );
}

/// An I/O layer that runs `hook` once, right after it answered its first `leader` read:
/// to put another client's statement exactly between two of a driver's.
struct AfterLeaderRead {
    inner: Arc<dyn PostgresIo>,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for AfterLeaderRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterLeaderRead").finish_non_exhaustive()
    }
}

#[leader_core::async_trait]
impl PostgresIo for AfterLeaderRead {
    async fn connect(&self) -> Result<()> {
        self.inner.connect().await
    }
    async fn acquire(&self, request: &AcquireRequest) -> Result<Acquired> {
        self.inner.acquire(request).await
    }
    async fn renew(&self, batch: &[Renewal]) -> Result<Vec<String>> {
        self.inner.renew(batch).await
    }
    async fn keep(&self, places: &[Place]) -> Result<Vec<Kept>> {
        self.inner.keep(places).await
    }
    async fn resign(
        &self,
        election: &str,
        candidate: &str,
        token: Option<u64>,
        election_channel: &str,
    ) -> Result<Resigned> {
        self.inner
            .resign(election, candidate, token, election_channel)
            .await
    }
    async fn hand_over(&self, request: &HandOverRequest) -> Result<HandOver> {
        self.inner.hand_over(request).await
    }
    async fn proclaim(
        &self,
        election: &str,
        holder: &str,
        token: u64,
        value: &[u8],
        election_channel: &str,
    ) -> Result<bool> {
        self.inner
            .proclaim(election, holder, token, value, election_channel)
            .await
    }
    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        self.inner.candidates(election).await
    }
    async fn leader(&self, election: &str) -> Result<Option<Holder>> {
        let answer = self.inner.leader(election).await;
        let hook = self
            .hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(hook) = hook {
            hook();
        }
        answer
    }
    async fn listen_connection(&self) -> Result<ListenConnection> {
        self.inner.listen_connection().await
    }
    fn random(&self) -> u64 {
        self.inner.random()
    }
}

/// A waiter gives up (its campaign dropped) and leaves without a token; the leader
/// resigns just after the leaving driver's first statement, granting the waiter the term
/// if its place is still there. Leaving first and reading the row after, the leaving
/// either removed the place before the grant (nothing is granted) or sees the grant and
/// ends it; reading first, it would miss a grant that landed after its read and leave the
/// term held by nobody until the lease ends.
#[tokio::test(start_paused = true)]
async fn a_grant_landing_while_a_waiter_leaves_does_not_outlive_the_leaving() {
    let ttl = Duration::from_secs(30);
    let (_net, model, drivers) = drivers(1);
    let leader = candidate("leader", ttl);
    let grant = drivers[0].campaign(&leader).await.expect("elected");
    let server = Arc::clone(model.server());
    let channel = drivers[0].channel("sim-0");
    let token = i64::try_from(grant.fencing_token).expect("small");
    let resign_now: Box<dyn FnOnce() + Send> = Box::new(move || {
        server.statement(|t, now, notices| {
            t.resign(now, "sim-0", "leader", Some(token), &channel, notices)
        });
    });
    let io = AfterLeaderRead {
        inner: Arc::new(sim::SimIo::new(Arc::clone(model.server()), ClientId(1))),
        hook: Mutex::new(Some(resign_now)),
    };
    let leaving = PostgresDriver::with_io(Arc::new(io), DEFAULT_TABLE).expect("valid table");
    let w = candidate("w", ttl);
    let driver = leaving.clone();
    let waiter = w.clone();
    let campaign = tokio::spawn(async move { driver.campaign(&waiter).await });
    leader_testkit::sim::scripted::wait_in_line(&drivers[0], "sim-0", "w", Duration::from_secs(1))
        .await;
    campaign.abort();
    let _ = campaign.await;
    leaving.resign(&w, None).await.expect("w left");
    let after = drivers[0].leader("sim-0").await.expect("leader");
    assert!(
        after.is_none(),
        "a term granted to w while it left outlived its leaving: {after:?}"
    );
}

/// A handover's nomination passes over the head of the line (see
/// `leader_testkit::sim::scripted`).
#[tokio::test(start_paused = true)]
async fn a_nomination_passes_over_the_head_of_the_line() {
    let net = Net::quiet();
    let model = sim::PostgresModel::new(&net);
    leader_testkit::sim::scripted::a_nomination_passes_over_the_head_of_the_line(
        &net,
        &model,
        std::time::Duration::from_secs(6),
    )
    .await;
}

/// A notice lost while the LISTEN connection was down, when the row still has a holder
/// (an operator gave it a new token): the look once the connection is back compares the
/// holder and the token, not only whether someone holds the row.
#[tokio::test(start_paused = true)]
async fn a_lost_notice_of_a_new_token_is_made_up_for() {
    lost_notice_is_made_up_for(|t, notices| t.bump_token("sim-0", notices)).await;
}

/// A resignation without a token (a campaign whose answer never came) reads who holds
/// the row and ends this candidate's own term at once, not at its expiry; another
/// candidate's tokenless resignation leaves the term alone.
#[tokio::test(start_paused = true)]
async fn a_tokenless_resignation_ends_only_this_candidates_own_term() {
    let (_net, _model, drivers) = drivers(2);
    let ttl = Duration::from_secs(10);
    let a = candidate("a", ttl);
    let b = candidate("b", ttl);
    let grant = drivers[0].campaign(&a).await.expect("elected");
    drivers[1].resign(&b, None).await.expect("b resigned");
    let leader = drivers[1].leader("sim-0").await.expect("leader");
    assert_eq!(
        leader.map(|info| info.fencing_token),
        Some(grant.fencing_token),
        "b's tokenless resignation ended a's term"
    );
    drivers[0].resign(&a, None).await.expect("a resigned");
    let leader = drivers[1].leader("sim-0").await.expect("leader");
    assert!(
        leader.is_none(),
        "a's tokenless resignation left its own term to expire: {leader:?}"
    );
}

/// A waiter's withdrawal during a handover leaves the nominee's nomination (see
/// `leader_testkit::sim::scripted`).
#[tokio::test(start_paused = true)]
async fn a_withdrawal_leaves_another_candidates_nomination() {
    let net = Net::quiet();
    let model = sim::PostgresModel::new(&net);
    leader_testkit::sim::scripted::a_withdrawal_leaves_another_candidates_nomination(
        &net,
        &model,
        std::time::Duration::from_secs(6),
    )
    .await;
}

/// Many elections on one driver are renewed in batches, several per round (PostgreSQL renews 5,000 terms per statement, so 5,100 elections take two statements; see
/// `leader_testkit::sim::scripted`).
#[tokio::test(start_paused = true)]
async fn many_elections_on_one_driver_are_renewed_in_batches() {
    let net = Net::quiet();
    let model = sim::PostgresModel::new(&net);
    leader_testkit::sim::scripted::many_elections_on_one_driver_are_renewed_in_batches(
        &net,
        &model,
        5_100,
        std::time::Duration::from_secs(30),
    )
    .await;
}
