//! Planned handover (`Election::hand_over`) beside a resignation, in one process: two
//! candidates on drivers of their own take turns, the leader handing over to the waiter
//! and resigning alternately; each timed from the call to the waiter's `campaign()`
//! returning. A store whose driver does not support handover yet gets a note, no figure.

use std::time::Duration;

use leader_core::{Election, Error};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

use super::{Bench, cells, p50_p99};
use crate::BoxResult;
use crate::contender::SETTLE;
use crate::results::{Goal, Results};
use crate::stats::{histogram, quantile_ms, record};
use leader_chaos::StoreKind;

const TTL: Duration = Duration::from_secs(5);

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    for store in StoreKind::ALL {
        let name = store.name();
        let Some((handover, resign)) = alternate(bench, store)
            .await
            .map_err(|err| format!("{name}: {err}"))?
        else {
            results.note(format!(
                "Handover: the {name} driver does not support `hand_over` yet (no figure)."
            ));
            continue;
        };
        let what = "planned handover in one process, hand_over() to the nominee's Elected";
        super::latency(results, &format!("{name}.handover"), &handover, what);
        let what = "resignation in the same run, resign() to the next candidate's Elected";
        super::latency(results, &format!("{name}.handover_resign"), &resign, what);
        results.figure(
            &format!("{name}.handover_p50_ratio_to_resign"),
            quantile_ms(&handover, 0.5) / quantile_ms(&resign, 0.5),
            "ratio",
            Goal::None,
            "handover p50 / resignation p50, alternating in one process",
        );
    }
    let row = cells(|s| p50_p99(results, &format!("{}.handover", s.name())));
    results.row(
        "planned handover, hand_over() to the nominee's Elected, in one process, p50 / p99",
        row,
    );
    let row = cells(|s| p50_p99(results, &format!("{}.handover_resign", s.name())));
    results.row(
        "beside it: resign() to the next candidate's Elected, same process, p50 / p99",
        row,
    );
    Ok(())
}

/// Alternating handovers and resignations (half the run's handoffs each); `None` if the
/// driver does not support handover.
async fn alternate(
    bench: &Bench,
    store: StoreKind,
) -> BoxResult<Option<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>)>> {
    let name = format!("handover-{}-{}", store.name(), bench.tag);
    let mut pair = Vec::new();
    for _ in 0..2 {
        pair.push(
            Election::builder(bench.stores.driver(store).await?, name.clone())
                .ttl(TTL)
                .build()?,
        );
    }
    let (mut leader, mut waiter) = (pair.remove(0), pair.remove(0));
    leader.campaign().await?;
    let (mut handover, mut resign) = (histogram(), histogram());
    for i in 0..bench.sizes.handoffs {
        let (tx, mut rx) = mpsc::channel(1);
        let campaign = tokio::spawn({
            let waiter = waiter.clone();
            async move {
                let term = waiter.campaign().await;
                let _ = tx.send(Instant::now()).await;
                term
            }
        });
        in_line(&leader, waiter.id()).await;
        let started = Instant::now();
        let handed = if i % 2 == 0 {
            leader.hand_over(waiter.id()).await
        } else {
            leader.resign().await
        };
        match handed {
            Ok(()) => {}
            Err(Error::Unsupported { .. }) => {
                campaign.abort();
                let _ = leader.resign().await;
                return Ok(None);
            }
            Err(err) => return Err(err.into()),
        }
        let elected = timeout(Duration::from_secs(20), rx.recv())
            .await?
            .ok_or("the waiter's campaign ended")?;
        campaign.await??;
        let h = if i % 2 == 0 {
            &mut handover
        } else {
            &mut resign
        };
        record(h, elected.duration_since(started));
        std::mem::swap(&mut leader, &mut waiter);
    }
    let _ = leader.resign().await;
    Ok(Some((handover, resign)))
}

/// Until `id` waits in `leader`'s election (by `candidates()`; where the driver cannot
/// list them, a settling pause).
async fn in_line(leader: &Election, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match leader.candidates().await {
            Ok(line) if line.iter().any(|c| c.id == id && !c.is_leader) => return,
            Ok(_) => sleep(Duration::from_millis(2)).await,
            Err(_) => {
                sleep(SETTLE).await;
                return;
            }
        }
    }
}
