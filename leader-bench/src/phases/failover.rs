//! Crash failover: SIGKILL the leader at a spread of phases of its renewal interval and
//! time until the next candidate process leads, as a multiple of the TTL. The three stores
//! are measured at once (the candidates idle while they wait for a TTL to pass); the TTLs
//! one after the other.

use std::time::Duration;

use super::{Bench, cells, shown};
use crate::BoxResult;
use crate::charts;
use crate::contender::{Exit, SETTLE, handoffs, ours};
use crate::results::{Goal, Results};
use crate::stats::spread;
use leader_chaos::StoreKind;

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    let crashes = bench.sizes.crashes;
    let mut chart: Vec<(&str, f64, Vec<f64>)> = Vec::new();
    for &secs in &bench.sizes.crash_ttls {
        eprintln!("  TTL {secs}s, {crashes} kills on each store");
        let ttl = Duration::from_secs(secs);
        let per_store = StoreKind::ALL.map(|store| async move {
            let contender = ours(
                bench.stores.url(store),
                ttl,
                format!("crash-{}-{secs}-{}", store.name(), bench.tag),
                Exit::AfterResign,
            )
            .map_err(|err| err.to_string())?;
            // The leader was elected about SETTLE ago: kill it past its first renewal (a
            // third of the TTL), at a phase spread over the next renewal interval.
            let renewal = ttl / 3;
            let phase = |i: usize| (renewal + renewal.mul_f64(spread(i))).saturating_sub(SETTLE);
            handoffs(&contender, "KILL", crashes, phase)
                .await
                .map_err(|err| format!("{} at TTL {secs}s: {err}", store.name()))
        });
        let measured = futures::future::try_join_all(per_store).await?;
        for (store, h) in StoreKind::ALL.into_iter().zip(measured) {
            let h = h.by_signal;
            let multiple = |us: u64| us as f64 / 1e6 / secs as f64;
            let name = store.name();
            results.figure(
                &format!("{name}.failover_median_ttl.{secs}s"),
                multiple(h.value_at_quantile(0.5)),
                "x TTL",
                Goal::None,
                &format!("crash failover at TTL {secs}s, median (n={})", h.len()),
            );
            results.figure(
                &format!("{name}.failover_max_ttl.{secs}s"),
                multiple(h.max()),
                "x TTL",
                Goal::AtMost(1.1),
                &format!("crash failover at TTL {secs}s, max (n={})", h.len()),
            );
            chart.push((
                name,
                secs as f64,
                charts::histogram_ms(&h)
                    .iter()
                    .map(|ms| ms / 1000.0 / secs as f64)
                    .collect(),
            ));
        }
        let row = cells(|s| {
            format!(
                "{} / {}",
                shown(
                    results,
                    &format!("{}.failover_median_ttl.{secs}s", s.name())
                ),
                shown(results, &format!("{}.failover_max_ttl.{secs}s", s.name()))
            )
        });
        results.row(
            format!(
                "crash failover at TTL {secs}s, killed at a random phase after the first renewal, median / max as x TTL (n={crashes})"
            ),
            row,
        );
    }
    results.note(
        "Crash failover: the leader process gets SIGKILL past its first renewal, at a phase \
         spread evenly over the next renewal interval; timed by the orchestrator from the \
         signal to the next candidate's `elected` line, as a multiple of the TTL.",
    );
    charts::failover_multiples(&bench.charts.join(charts::FAILOVER_SVG), &chart)?;
    Ok(())
}
