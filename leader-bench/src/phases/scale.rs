//! Handoffs in one process with many candidates waiting in line behind the leader: the
//! latency, and the store's work per handoff (the herd's cost).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use leader_core::{CancellationToken, Election};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

use super::{Bench, cells, shown};
use crate::BoxResult;
use crate::charts;
use crate::results::{Goal, Results};
use crate::stats::{histogram, quantile_ms, record};
use crate::stores::{Stores, redis_monitored};
use leader_chaos::StoreKind;

/// The store's work per handoff in [`scale_handoffs`].
struct PerHandoff {
    /// Client requests (etcd: gRPC messages received; Redis: commands sent by clients,
    /// counted by MONITOR; PostgreSQL: statements).
    requests: f64,
    /// Redis: `redis.call`s inside the election's scripts (MONITOR). etcd: watch messages
    /// sent (to waiters, observers and leaders). PostgreSQL: none.
    other: f64,
    /// Redis: every command run, client and script alike, from `INFO commandstats`.
    store_work: f64,
    /// Campaigns that failed and were retried (none expected).
    retried: u64,
    /// Whether the store was quiet or steady before the measurement began.
    settled: bool,
}

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    let count = bench.sizes.scale_handoffs;
    let mut chart: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    let mut point =
        |name: &str, waiting: usize, value: f64| match chart.iter_mut().find(|(n, _)| n == name) {
            Some((_, points)) => points.push((waiting, value)),
            None => chart.push((name.to_owned(), vec![(waiting, value)])),
        };
    for &waiting in &bench.sizes.waiting {
        eprintln!("  {waiting} waiting");
        for store in StoreKind::ALL {
            let (h, per) = scale_handoffs(&bench.stores, store, waiting, count, bench.tag)
                .await
                .map_err(|err| format!("{} with {waiting} waiting: {err}", store.name()))?;
            let name = store.name();
            let at = format!("{waiting}_waiting");
            let heavy = waiting >= 1000;
            results.figure(
                &format!("{name}.scale_handoff_p50_ms.{at}"),
                quantile_ms(&h, 0.5),
                "ms",
                Goal::None,
                &format!("handoff in one process, resign() to Elected, p50 with {waiting} waiting (n={count})"),
            );
            let requests_goal = match store {
                StoreKind::Etcd | StoreKind::Postgres if heavy => Goal::AtMost(10.0),
                _ => Goal::None,
            };
            let requests_what = match store {
                StoreKind::Etcd => "gRPC messages received",
                StoreKind::Redis => "commands sent by clients (MONITOR)",
                StoreKind::Postgres => "statements (pg_stat_statements)",
            };
            results.figure(
                &format!("{name}.requests_per_handoff.{at}"),
                per.requests,
                "requests",
                requests_goal,
                &format!("store requests per handoff with {waiting} waiting: {requests_what}"),
            );
            results.figure(
                &format!("{name}.campaigns_retried.{at}"),
                per.retried as f64,
                "campaigns",
                Goal::None,
                &format!("campaigns that failed and were retried with {waiting} waiting"),
            );
            if !per.settled {
                results.note(format!(
                    "**{name} with {waiting} waiting: the store was still busy with the \
                     candidates' entries when the measurement began** (the counts include some)"
                ));
            }
            if per.retried > 0 {
                results.note(format!(
                    "**{name} with {waiting} waiting: {} campaigns failed and were retried** \
                     (none expected)",
                    per.retried
                ));
            }
            match store {
                StoreKind::Etcd => {
                    results.figure(
                        &format!("etcd.watch_messages_per_handoff.{at}"),
                        per.other,
                        "messages",
                        Goal::None,
                        &format!("watch messages etcd sent per handoff with {waiting} waiting"),
                    );
                    point("etcd: requests", waiting, per.requests);
                    point("etcd: watch messages sent", waiting, per.other);
                }
                StoreKind::Redis => {
                    results.figure(
                        &format!("redis.script_calls_per_handoff.{at}"),
                        per.other,
                        "commands",
                        Goal::None,
                        &format!("redis.call()s inside scripts per handoff with {waiting} waiting (MONITOR)"),
                    );
                    results.figure(
                        &format!("redis.store_work_per_handoff.{at}"),
                        per.store_work,
                        "commands",
                        if heavy { Goal::AtMost(15.0) } else { Goal::None },
                        &format!("commands Redis ran per handoff with {waiting} waiting, client and inside scripts (INFO commandstats)"),
                    );
                    point("redis: commands", waiting, per.requests);
                    point("redis: commands inside scripts", waiting, per.other);
                }
                StoreKind::Postgres => point("postgres: statements", waiting, per.requests),
            }
        }
        let row = cells(|s| {
            let get =
                |what: &str| shown(results, &format!("{}.{what}.{waiting}_waiting", s.name()));
            let other = match s {
                StoreKind::Etcd => get("watch_messages_per_handoff"),
                StoreKind::Redis => format!(
                    "{}; {} in all",
                    get("script_calls_per_handoff"),
                    get("store_work_per_handoff")
                ),
                StoreKind::Postgres => "-".to_owned(),
            };
            format!(
                "{} ms ({}, {other})",
                get("scale_handoff_p50_ms"),
                get("requests_per_handoff")
            )
        });
        results.row(
            format!(
                "handoff p50 with {waiting} waiting (etcd: requests, watch messages sent; redis: commands, commands inside scripts; in all (commandstats); postgres: statements, -; per handoff)"
            ),
            row,
        );
    }
    let (first, last) = (
        bench.sizes.waiting.first().copied().unwrap_or(1),
        bench.sizes.waiting.last().copied().unwrap_or(1),
    );
    if let (Some(one), Some(many)) = (
        results.get(&format!("redis.scale_handoff_p50_ms.{first}_waiting")),
        results.get(&format!("redis.scale_handoff_p50_ms.{last}_waiting")),
    ) && last > first
    {
        results.figure(
            &format!("redis.scale_handoff_p50_ratio.{last}_to_{first}_waiting"),
            many / one.max(0.001),
            "ratio",
            Goal::AtMost(1.5),
            &format!("handoff p50 with {last} waiting / with {first} waiting, same run"),
        );
    }
    results.note(
        "Many waiting: one process, the candidates shared round-robin by up to 20 drivers, \
         each leading for 30 ms, then resigning and queueing again; the store's work per \
         handoff is counted over the measured handoffs (etcd: gRPC messages received and \
         watch messages sent, `/metrics`; Redis: client commands and the commands inside \
         scripts by MONITOR, and every command by `INFO commandstats`; PostgreSQL: \
         statements, `pg_stat_statements`).",
    );
    let series: Vec<(&str, Vec<(usize, f64)>)> = chart
        .iter()
        .map(|(name, points)| (name.as_str(), points.clone()))
        .collect();
    charts::requests_per_handoff(&bench.charts.join(charts::REQUESTS_SVG), &series)?;
    Ok(())
}

/// Waits until every candidate is in line before measuring: all `candidates` tasks are
/// campaigning, and the store is quiet (the leader holds, the waiters wait: at most a few
/// requests per driver per half second) or, if the waiters have a steady cost of their
/// own, steady (three half seconds within 10 % of each other). Gives up waiting after
/// 10 s + 20 ms per candidate.
async fn settle(
    stores: &Stores,
    store: StoreKind,
    campaigning: &AtomicU64,
    candidates: u64,
    drivers: usize,
) -> BoxResult<bool> {
    let window = Duration::from_millis(500);
    let deadline = Instant::now()
        + Duration::from_secs(10)
        + Duration::from_millis(20) * u32::try_from(candidates)?;
    let quiet = 10 + 3 * drivers as u64;
    let mut last: Vec<u64> = Vec::new();
    while Instant::now() < deadline {
        let before = stores.requests(store).await?;
        sleep(window).await;
        let during = stores.requests(store).await?.saturating_sub(before);
        if campaigning.load(Ordering::Relaxed) < candidates {
            continue;
        }
        last.push(during);
        let steady = last.len() >= 3 && {
            let recent = &last[last.len() - 3..];
            let (lo, hi) = (recent.iter().min(), recent.iter().max());
            lo.zip(hi).is_some_and(|(lo, hi)| hi * 10 <= lo * 11)
        };
        if during <= quiet || steady {
            return Ok(true);
        }
    }
    Ok(false)
}

/// In-process handoffs with `waiting` candidates queued behind the leader, on up to 20
/// drivers shared round-robin. Returns the histogram and the store's work per handoff.
async fn scale_handoffs(
    stores: &Stores,
    store: StoreKind,
    waiting: usize,
    count: usize,
    tag: u32,
) -> BoxResult<(Histogram<u64>, PerHandoff)> {
    let ttl = Duration::from_secs(10);
    let drivers_n = waiting.clamp(1, 20);
    let mut drivers = Vec::new();
    for _ in 0..drivers_n {
        drivers.push(stores.driver(store).await?);
    }
    let name = format!("scale-{}-{waiting}-{tag}", store.name());
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, Instant)>();
    let stop = CancellationToken::new();
    // The first leader holds until every candidate is in line and the store is quiet.
    let go = CancellationToken::new();
    let retried = Arc::new(AtomicU64::new(0));
    let campaigning = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..=waiting {
        let e = Election::builder(Arc::clone(&drivers[i % drivers_n]), name.clone())
            .ttl(ttl)
            .build()?;
        let (tx, stop, go) = (tx.clone(), stop.clone(), go.clone());
        let (retried, campaigning) = (Arc::clone(&retried), Arc::clone(&campaigning));
        tasks.push(tokio::spawn(async move {
            campaigning.fetch_add(1, Ordering::Relaxed);
            while !stop.is_cancelled() {
                let term = tokio::select! {
                    () = stop.cancelled() => break,
                    term = e.campaign() => term,
                };
                if term.is_err() {
                    retried.fetch_add(1, Ordering::Relaxed);
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let _ = tx.send((true, Instant::now()));
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = go.cancelled() => {}
                }
                // Lead long enough for the previous leader to queue up again behind us.
                sleep(Duration::from_millis(30)).await;
                let _ = tx.send((false, Instant::now()));
                let _ = e.resign().await;
                // Go to the back of the line, behind the candidates just woken.
                sleep(Duration::from_millis(5)).await;
            }
        }));
        if i == 0 {
            // The first leads before the others queue up.
            sleep(Duration::from_millis(50)).await;
        }
    }
    drop(tx);
    let settled = settle(stores, store, &campaigning, waiting as u64 + 1, drivers_n).await?;
    while rx.try_recv().is_ok() {}
    let measure = async {
        go.cancel();
        let mut h = histogram();
        let mut resigned_at = None;
        let mut handoffs = 0;
        while handoffs < count {
            let (elected, at) = timeout(Duration::from_secs(60), rx.recv())
                .await?
                .ok_or("candidates gone")?;
            match (elected, resigned_at.take()) {
                (true, Some(resigned)) => {
                    record(&mut h, at.duration_since(resigned));
                    handoffs += 1;
                }
                (false, _) => resigned_at = Some(at),
                (true, None) => {}
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(h)
    };
    let per = |n: u64| n as f64 / count as f64;
    let (h, requests, other, store_work) = match store {
        StoreKind::Etcd => {
            let watch = "grpc_method=\"Watch\"";
            let before = stores.requests(store).await?;
            let sent_before = stores
                .etcd_metric("grpc_server_msg_sent_total", Some(watch))
                .await?;
            let h = measure.await?;
            let requests = stores.requests(store).await?.saturating_sub(before);
            let sent = stores
                .etcd_metric("grpc_server_msg_sent_total", Some(watch))
                .await?
                .saturating_sub(sent_before);
            (h, per(requests), per(sent), per(requests))
        }
        StoreKind::Redis => {
            // commandstats read just around the handoffs, inside MONITOR's window.
            let counted = async {
                let before = stores.redis_store_work().await?;
                let h = measure.await?;
                let work = stores.redis_store_work().await?.saturating_sub(before);
                Ok((h, work))
            };
            let ((h, work), monitored) = redis_monitored(&stores.redis, counted).await?;
            (
                h,
                per(monitored.requests),
                per(monitored.in_scripts),
                per(work),
            )
        }
        StoreKind::Postgres => {
            let before = stores.requests(store).await?;
            let h = measure.await?;
            let requests = stores.requests(store).await?.saturating_sub(before);
            (h, per(requests), 0.0, per(requests))
        }
    };
    stop.cancel();
    for task in tasks {
        let _ = timeout(Duration::from_secs(20), task).await;
    }
    Ok((
        h,
        PerHandoff {
            requests,
            other,
            store_work,
            retried: retried.load(Ordering::Relaxed),
            settled,
        },
    ))
}
