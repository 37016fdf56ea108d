//! Scripted scenarios that every driver's simulation target runs on its own model (a
//! quiet network and a paused clock): promises the random schedules do not check.

use std::time::Duration;

use leader_core::{Candidate, Driver};
use tokio::time::{Instant, sleep};

use super::{ClientId, Model, Net};

/// Waits (polling the driver's `candidates`) until `id` stands in `election`'s line.
///
/// # Panics
///
/// If it does not within `within`.
pub async fn wait_in_line<D: Driver>(driver: &D, election: &str, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(line) = driver.candidates(election).await
            && line.iter().any(|candidate| candidate.id == id)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never stood in line");
        sleep(Duration::from_millis(10)).await;
    }
}

/// A handover's nomination elects only the nominee, even over the candidate at the head
/// of the line (DESIGN: "only that candidate can be elected for one TTL, unless it
/// withdraws or dies"). `a` leads on driver 0; `c`, then `b` stand in line (drivers 1 and
/// 2); `b`'s campaign is dropped (its place stays: it neither withdrew nor died, it just
/// does not take its turn); `a` hands over to `b`, and `d` campaigns right then (driver
/// 0). Neither `c`, first in line, nor `d` is elected for nine tenths of the TTL.
/// Election `sim-0`, TTL `ttl`.
///
/// # Panics
///
/// If `c` or `d` is elected, or a step fails.
pub async fn a_nomination_passes_over_the_head_of_the_line<M: Model>(
    net: &Net,
    model: &M,
    ttl: Duration,
) {
    nomination(net, model, ttl, false).await;
}

/// As [`a_nomination_passes_over_the_head_of_the_line`], with a fifth candidate `w` in
/// line behind `b` (driver 1) that withdraws (a resignation without a token) right after
/// the handover: its withdrawal ends its own place and any nomination of its own, never
/// `b`'s, so neither `c` nor `d` is elected for nine tenths of the TTL either.
///
/// # Panics
///
/// If `c` or `d` is elected, or a step fails.
pub async fn a_withdrawal_leaves_another_candidates_nomination<M: Model>(
    net: &Net,
    model: &M,
    ttl: Duration,
) {
    nomination(net, model, ttl, true).await;
}

async fn nomination<M: Model>(net: &Net, model: &M, ttl: Duration, withdrawing: bool) {
    let candidate = |id: &str| Candidate::new("sim-0", id, id.as_bytes().to_vec(), ttl);
    let drivers: Vec<M::Driver> = (0..3).map(|i| model.driver(net, ClientId(i))).collect();
    let (a, b, c, d) = (
        candidate("a"),
        candidate("b"),
        candidate("c"),
        candidate("d"),
    );
    let term = drivers[0].campaign(&a).await.expect("a is elected");
    let head = tokio::spawn({
        let (driver, c) = (drivers[1].clone(), c.clone());
        async move { driver.campaign(&c).await }
    });
    wait_in_line(&drivers[0], "sim-0", "c", ttl / 2).await;
    sleep(Duration::from_millis(50)).await;
    let nominee = tokio::spawn({
        let (driver, b) = (drivers[2].clone(), b.clone());
        async move { driver.campaign(&b).await }
    });
    wait_in_line(&drivers[0], "sim-0", "b", ttl / 2).await;
    sleep(Duration::from_millis(50)).await;
    nominee.abort();
    let _ = nominee.await;
    let w = candidate("w");
    let withdrawing = withdrawing.then(|| {
        tokio::spawn({
            let (driver, w) = (drivers[1].clone(), w.clone());
            async move { driver.campaign(&w).await }
        })
    });
    if withdrawing.is_some() {
        wait_in_line(&drivers[0], "sim-0", "w", ttl / 2).await;
        sleep(Duration::from_millis(50)).await;
    }
    drivers[0]
        .hand_over(&a, term.fencing_token, "b")
        .await
        .expect("a hands over to b");
    let handed = Instant::now();
    if let Some(campaign) = withdrawing {
        campaign.abort();
        let _ = campaign.await;
        drivers[1].resign(&w, None).await.expect("w withdraws");
    }
    let newcomer = tokio::spawn({
        let (driver, d) = (drivers[0].clone(), d.clone());
        async move { driver.campaign(&d).await }
    });
    sleep(ttl * 9 / 10).await;
    for (campaign, who) in [
        (&head, "c, first in line,"),
        (&newcomer, "d, campaigning then,"),
    ] {
        assert!(
            !campaign.is_finished(),
            "{who} was elected during b's nomination (seen {:?} after the handover)",
            handed.elapsed()
        );
    }
    head.abort();
    newcomer.abort();
}

/// One driver holds `n` elections (`many-00000` and on, one candidate each, TTL `ttl`) and
/// renews them, every third of the TTL, for three rounds: enough elections
/// that the driver's renewals take several batches (etcd: nested reads, several requests;
/// Redis and PostgreSQL: several calls), which the random schedules, with one or two
/// elections per driver, never reach. After the first round an operator ends three of the
/// terms (early, middle and last in the driver's order): from the next round on exactly
/// those renewals fail, every other one succeeds with its own token and a confirmation
/// that is no older and outlives the next round. Each round renews all but the last
/// hundredth of the terms, then the rest a millisecond later, each group right after a
/// campaign of one more election on the driver (on etcd a campaign confirms the lease
/// anew, as campaigns beside renewals do): the first group costs exactly two store
/// requests (two batches: a batch per term, or one too many or too few, fails), the
/// second none (the batches serve it, however new the lease's confirmation). Then every
/// candidate resigns (those whose terms ended too, as their elections do when they close,
/// and the extra ones) and the store holds no term.
///
/// # Panics
///
/// If a renewal's outcome differs, a round costs other than said, or a step fails.
pub async fn many_elections_on_one_driver_are_renewed_in_batches<M: Model>(
    net: &Net,
    model: &M,
    n: usize,
    ttl: Duration,
) {
    use futures::StreamExt as _;

    let driver = model.driver(net, ClientId(0));
    let candidate = |i: usize, kind: &str| {
        Candidate::new(
            format!("{kind}-{i:05}"),
            format!("c-{kind}-{i:05}"),
            b"v".to_vec(),
            ttl,
        )
    };
    let candidates: Vec<Candidate> = (0..n).map(|i| candidate(i, "many")).collect();
    let mut extra = Vec::new();
    let mut grants: Vec<_> = futures::stream::iter(&candidates)
        .map(|candidate| driver.campaign(candidate))
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .zip(&candidates)
        .map(|(grant, candidate)| {
            grant.unwrap_or_else(|e| panic!("{} is not elected: {e}", candidate.election))
        })
        .collect();
    let ended = [1, n / 2, n - 1];
    for round in 0..3 {
        sleep(ttl / 3).await;
        // All but the last hundredth, then (a millisecond later) the rest: the first
        // group's two batches read or renew every held term, so the second group's
        // renewals need no request.
        let split = n - n / 100;
        // Before each group, one more election on the driver (not renewed here): its
        // campaign confirms the lease anew (etcd: a keep-alive sent after it began), as
        // campaigns beside renewals do; a renewal must still take its term's unused read
        // when that read followed a keep-alive recent enough, not read every key again.
        extra.push(campaign_extra(&driver, &candidate(extra.len(), "extra")).await);
        let before = net.report().requests;
        let mut renewals = futures::future::join_all(
            candidates[..split]
                .iter()
                .zip(&grants)
                .map(|(candidate, grant)| driver.renew(candidate, grant)),
        )
        .await;
        let first = net.report().requests - before;
        sleep(Duration::from_millis(1)).await;
        extra.push(campaign_extra(&driver, &candidate(extra.len(), "extra")).await);
        let middle = net.report().requests;
        renewals.extend(
            futures::future::join_all(
                candidates[split..]
                    .iter()
                    .zip(&grants[split..])
                    .map(|(candidate, grant)| driver.renew(candidate, grant)),
            )
            .await,
        );
        let second = net.report().requests - middle;
        assert_eq!(
            first, 2,
            "round {round}: renewing {split} terms did not take two batches (store requests)"
        );
        assert_eq!(
            second, 0,
            "round {round}: the renewals due right after the batches (and a campaign) sent \
             store requests of their own"
        );
        for (i, renewal) in renewals.into_iter().enumerate() {
            let election = &candidates[i].election;
            let gone = round > 0 && ended.contains(&i);
            match renewal {
                Ok(renewed) => {
                    assert!(
                        !gone,
                        "round {round}: {election}'s term, ended, was renewed"
                    );
                    assert_eq!(
                        renewed.fencing_token, grants[i].fencing_token,
                        "round {round}: {election}'s renewal changed its token"
                    );
                    // A renewal may answer with a confirmation shared with other terms,
                    // never an older one; the term must outlive the next round.
                    assert!(
                        renewed.confirmed_at >= grants[i].confirmed_at
                            && renewed.confirmed_at + ttl > Instant::now() + ttl / 3,
                        "round {round}: {election}'s renewal goes back or falls short: \
                         {renewed:?} after {:?}",
                        grants[i]
                    );
                    grants[i] = renewed;
                }
                Err(e) => assert!(
                    gone && matches!(e, leader_core::Error::TermGone),
                    "round {round}: {election}'s renewal failed: {e}"
                ),
            }
        }
        if round == 0 {
            for &i in &ended {
                model
                    .end_term(net, &candidates[i].election)
                    .unwrap_or_else(|| panic!("no term of {} to end", candidates[i].election));
            }
        }
    }
    // The ended terms' candidates too, as their elections do when they close: whatever
    // their driver kept of them (etcd's side keys on the shared lease) goes.
    for (candidate, grant) in candidates
        .iter()
        .zip(&grants)
        .chain(extra.iter().map(|(candidate, grant)| (candidate, grant)))
    {
        driver
            .resign(candidate, Some(grant.fencing_token))
            .await
            .unwrap_or_else(|e| panic!("{} does not resign: {e}", candidate.election));
    }
    if let Some(left) = model.terms_left(net) {
        assert!(
            left.is_empty(),
            "terms left after every resignation: {left:?}"
        );
    }
}

/// Campaigns for `candidate` (sole in its election) and returns it with its grant.
async fn campaign_extra<D: Driver>(
    driver: &D,
    candidate: &Candidate,
) -> (Candidate, leader_core::Grant) {
    let grant = driver
        .campaign(candidate)
        .await
        .unwrap_or_else(|e| panic!("{} is not elected: {e}", candidate.election));
    (candidate.clone(), grant)
}
