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
