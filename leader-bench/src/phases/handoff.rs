//! Graceful handoff between candidate processes: SIGTERM to the leader, timed to the next
//! candidate's election, on every store; beside `etcdctl elect` on etcd and beside a
//! `pg_advisory_lock` handoff on PostgreSQL, interleaved in blocks so that the machine's
//! drift over the run weighs on both alike.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::{Instant, sleep, timeout};

use super::{Bench, cells, latency, p50_p99, shown};
use crate::BoxResult;
use crate::charts;
use crate::contender::{Exit, Handoffs, etcdctl, handoffs, ours};
use crate::results::{Goal, Results};
use crate::stats::{histogram, quantile_ms, record};
use crate::stores::postgres_client;
use leader_chaos::StoreKind;

/// The term's TTL in the handoff measurements (a graceful handoff does not wait for it).
const TTL: Duration = Duration::from_secs(5);

/// What the ratios are measured against, beside ours.
enum Baseline {
    Etcdctl,
    AdvisoryLock,
}

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    let sizes = &bench.sizes;
    let mut chart: Vec<(String, Vec<f64>)> = Vec::new();
    for store in StoreKind::ALL {
        eprintln!("  {}", store.name());
        let baseline = match store {
            StoreKind::Etcd => Some(Baseline::Etcdctl),
            StoreKind::Redis => None,
            StoreKind::Postgres => Some(Baseline::AdvisoryLock),
        };
        let (ours_h, theirs, staying) = beside(bench, store, baseline.as_ref()).await?;
        let name = store.name();
        latency(
            results,
            &format!("{name}.handoff_signal"),
            &ours_h.by_signal,
            "graceful handoff, SIGTERM to the new leader's line (orchestrator's clock)",
        );
        latency(
            results,
            &format!("{name}.handoff"),
            &ours_h.resign_to_elected,
            "graceful handoff, resign() to the next candidate's Elected (CLOCK_MONOTONIC)",
        );
        chart.push((
            format!("ours on {name}"),
            charts::histogram_ms(&ours_h.by_signal),
        ));
        match (baseline, theirs) {
            (Some(Baseline::Etcdctl), Some(theirs)) => {
                latency(
                    results,
                    "etcd.etcdctl_handoff_signal",
                    &theirs,
                    "`etcdctl elect` handoff, SIGINT to the new leader's line, same etcd",
                );
                results.figure(
                    "etcd.handoff_ratio_to_etcdctl",
                    quantile_ms(&ours_h.by_signal, 0.5) / quantile_ms(&theirs, 0.5),
                    "ratio",
                    Goal::AtMost(0.8),
                    "graceful handoff p50, ours / `etcdctl elect` (signal to line, interleaved)",
                );
                chart.push(("etcdctl elect".to_owned(), charts::histogram_ms(&theirs)));
            }
            (Some(Baseline::AdvisoryLock), Some(theirs)) => {
                latency(
                    results,
                    "postgres.advisory_lock_handoff",
                    &theirs,
                    "`pg_advisory_unlock` in one session to `pg_advisory_lock` returning in another",
                );
                let staying = staying.ok_or("no handoffs of leaders that stay up")?;
                latency(
                    results,
                    "postgres.handoff_staying",
                    &staying,
                    "graceful handoff, resign() to the next candidate's Elected, the resigned \
                     process staying up (connected) until then",
                );
                results.figure(
                    "postgres.handoff_p50_ratio_to_advisory_lock",
                    quantile_ms(&staying, 0.5) / quantile_ms(&theirs, 0.5),
                    "ratio",
                    Goal::AtMost(2.0),
                    "graceful handoff p50 (resign() to Elected, the resigned process staying up as \
                     the lock's holder session does) / pg_advisory_lock handoff p50, interleaved",
                );
                results.figure(
                    "postgres.handoff_exiting_p50_ratio_to_advisory_lock",
                    quantile_ms(&ours_h.resign_to_elected, 0.5) / quantile_ms(&theirs, 0.5),
                    "ratio",
                    Goal::None,
                    "graceful handoff p50 (resign() to Elected, the resigned process exiting at \
                     once: its sessions end during the handoff) / pg_advisory_lock handoff p50, \
                     interleaved",
                );
            }
            _ => {}
        }
    }
    results.set_goal("redis.handoff_p50_ms", Goal::AtMost(2.0));
    eprintln!("  redis with appendfsync always");
    let fsync = ours(
        bench.stores.redis_fsync.url(),
        TTL,
        format!("handoff-fsync-{}", bench.tag),
        Exit::AfterResign,
    )?;
    let fsync = handoffs(&fsync, "TERM", sizes.handoffs, |_| Duration::ZERO).await?;
    latency(
        results,
        "redis.fsync_handoff",
        &fsync.resign_to_elected,
        "graceful handoff on a Redis with `appendfsync always`, resign() to Elected",
    );
    let row = cells(|s| p50_p99(results, &format!("{}.handoff_signal", s.name())));
    results.row(
        format!(
            "graceful handoff, SIGTERM to new leader's line, separate processes, p50 / p99 (n={})",
            sizes.handoffs
        ),
        row,
    );
    let etcdctl_cell = format!(
        "{} ({})",
        p50_p99(results, "etcd.etcdctl_handoff_signal"),
        shown(results, "etcd.handoff_ratio_to_etcdctl")
    );
    results.row(
        format!(
            "`etcdctl elect` handoff, SIGINT to new leader's line, same etcd, p50 / p99; in brackets ours / etcdctl, medians of {} each, interleaved in {} blocks",
            sizes.handoffs, sizes.blocks
        ),
        [etcdctl_cell, String::new(), String::new()],
    );
    let row = cells(|s| p50_p99(results, &format!("{}.handoff", s.name())));
    results.row(
        "graceful handoff, resign() call to the next candidate's Elected event (CLOCK_MONOTONIC), p50 / p99",
        row,
    );
    results.row(
        "graceful handoff as above, the resigned process staying up until the next one leads, p50 / p99",
        [
            String::new(),
            String::new(),
            p50_p99(results, "postgres.handoff_staying"),
        ],
    );
    let advisory_cell = format!(
        "{} ({}; exiting: {})",
        p50_p99(results, "postgres.advisory_lock_handoff"),
        shown(results, "postgres.handoff_p50_ratio_to_advisory_lock"),
        shown(
            results,
            "postgres.handoff_exiting_p50_ratio_to_advisory_lock"
        )
    );
    results.row(
        format!(
            "`pg_advisory_lock` handoff between two sessions (unlock to lock), p50 / p99; in brackets ours (resign() to Elected, staying up) / it, and ours exiting at once / it; medians of {} each, interleaved in {} blocks",
            sizes.handoffs, sizes.blocks
        ),
        [String::new(), String::new(), advisory_cell],
    );
    results.row(
        "graceful handoff on Redis with `appendfsync always` (as the README asks), resign() to Elected, p50 / p99",
        [String::new(), p50_p99(results, "redis.fsync_handoff"), String::new()],
    );
    results.note(
        "Graceful handoff: the leader process gets SIGTERM and resigns; the next candidate \
         process is elected. Two clocks: the orchestrator's, from the signal to the new \
         leader's line, and the candidates' own CLOCK_MONOTONIC, from the start of resign() \
         to the return of campaign(). `etcdctl elect` is timed with the orchestrator's clock \
         (SIGINT); the `pg_advisory_lock` baseline is two sessions of one process, the time \
         from sending `pg_advisory_unlock` in one to `pg_advisory_lock` returning in the \
         other (no lease, no fencing: the physical reference). Neither of its sessions ends \
         during its handoff, so the ratio to it compares our handoffs whose resigned process \
         stays up (connected) until the next one leads; our other figures are of a process \
         that exits as soon as resign() returns, as a stopping service does, and on this \
         machine's two cores its PostgreSQL sessions ending (backends exiting) overlap the \
         next one's election: both are shown.",
    );
    let series: Vec<(&str, Vec<f64>)> = chart
        .iter()
        .map(|(name, values)| (name.as_str(), values.clone()))
        .collect();
    charts::handoff_distributions(&bench.charts.join(charts::HANDOFF_SVG), &series)?;
    Ok(())
}

/// Our handoffs on `store` and, when there is a baseline, the baseline's, interleaved in
/// blocks. Each block uses an election of its own: nothing left of one block can lead the
/// next.
async fn beside(
    bench: &Bench,
    store: StoreKind,
    baseline: Option<&Baseline>,
) -> BoxResult<(Handoffs, Option<Histogram<u64>>, Option<Histogram<u64>>)> {
    let sizes = &bench.sizes;
    let blocks = if baseline.is_some() { sizes.blocks } else { 1 };
    let per_block = sizes.handoffs.div_ceil(blocks);
    let mut ours_all = Handoffs {
        by_signal: histogram(),
        resign_to_elected: histogram(),
    };
    let mut theirs_all = histogram();
    let mut staying_all = histogram();
    for block in 0..blocks {
        let name = format!("handoff-{}-{}-{block}", store.name(), bench.tag);
        let contender = ours(bench.stores.url(store), TTL, name, Exit::AfterResign)?;
        let block_h = handoffs(&contender, "TERM", per_block, |_| Duration::ZERO)
            .await
            .map_err(|err| format!("ours on {}, block {block}: {err}", store.name()))?;
        ours_all.by_signal.add(block_h.by_signal)?;
        ours_all.resign_to_elected.add(block_h.resign_to_elected)?;
        let theirs = match baseline {
            None => continue,
            Some(Baseline::Etcdctl) => {
                let contender = etcdctl(
                    bench.stores.endpoint(StoreKind::Etcd),
                    format!("etcdctl-{}-{block}", bench.tag),
                );
                handoffs(&contender, "INT", per_block, |_| Duration::ZERO)
                    .await
                    .map_err(|err| format!("etcdctl elect, block {block}: {err}"))?
                    .by_signal
            }
            Some(Baseline::AdvisoryLock) => {
                let name = format!("handoff-staying-{}-{block}", bench.tag);
                let contender = ours(bench.stores.url(store), TTL, name, Exit::AfterHandoff)?;
                let staying = handoffs(&contender, "TERM", per_block, |_| Duration::ZERO)
                    .await
                    .map_err(|err| format!("ours staying up, block {block}: {err}"))?;
                staying_all.add(staying.resign_to_elected)?;
                advisory_lock_handoffs(&bench.stores.url(StoreKind::Postgres), per_block)
                    .await
                    .map_err(|err| format!("pg_advisory_lock, block {block}: {err}"))?
            }
        };
        theirs_all.add(theirs)?;
    }
    let staying = matches!(baseline, Some(Baseline::AdvisoryLock)).then_some(staying_all);
    Ok((ours_all, baseline.map(|_| theirs_all), staying))
}

/// `count` handoffs of a PostgreSQL advisory lock between two sessions: one holds it,
/// the other blocks in `pg_advisory_lock`; timed from sending `pg_advisory_unlock` to the
/// waiter's `pg_advisory_lock` returning. The roles alternate.
async fn advisory_lock_handoffs(url: &str, count: usize) -> BoxResult<Histogram<u64>> {
    let sessions = [
        Arc::new(postgres_client(url).await?),
        Arc::new(postgres_client(url).await?),
    ];
    let mut pids = Vec::new();
    for session in &sessions {
        pids.push(
            session
                .query_one("SELECT pg_backend_pid()", &[])
                .await?
                .try_get::<_, i32>(0)?,
        );
    }
    let key = 0x6265_6e63_6800_0000_i64 | i64::from(std::process::id());
    sessions[0]
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await?;
    let mut h = histogram();
    for i in 0..count {
        let (holder, waiter) = (i % 2, 1 - i % 2);
        let waiting = Arc::clone(&sessions[waiter]);
        let locked = tokio::spawn(async move {
            waiting
                .execute("SELECT pg_advisory_lock($1)", &[&key])
                .await
                .map(|_| Instant::now())
        });
        // Until the waiter's backend is blocked on the lock.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let blocked: i64 = sessions[holder]
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted",
                    &[&pids[waiter]],
                )
                .await?
                .try_get(0)?;
            if blocked > 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err("the second session never blocked on the advisory lock".into());
            }
            sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        sessions[holder]
            .execute("SELECT pg_advisory_unlock($1)", &[&key])
            .await?;
        let locked_at = timeout(Duration::from_secs(10), locked).await???;
        record(&mut h, locked_at.duration_since(started));
    }
    Ok(h)
}
