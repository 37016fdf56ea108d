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
use crate::contender::{Exit, Handoffs, SETTLE, etcdctl, handoffs, ours};
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
        let Beside {
            ours: ours_h,
            etcdctl: theirs,
            staying,
            postgres: references,
        } = beside(bench, store, baseline.as_ref()).await?;
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
            (Some(Baseline::AdvisoryLock), _) => {
                postgres_figures(results, &ours_h, staying, references)?;
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
            "`pg_advisory_lock` handoff between two sessions (unlock to lock), both rested as our candidates are, p50 / p99; in brackets ours (resign() to Elected, staying up) / it, and ours exiting at once / it; {} each, interleaved in {} blocks",
            sizes.handoffs, sizes.blocks
        ),
        [String::new(), String::new(), advisory_cell],
    );
    results.row(
        "the same `pg_advisory_lock` handoff with no rest, p50 / p99; in brackets ours (staying up) / it",
        [
            String::new(),
            String::new(),
            format!(
                "{} ({})",
                p50_p99(results, "postgres.advisory_lock_handoff_busy"),
                shown(results, "postgres.handoff_p50_ratio_to_busy_advisory_lock")
            ),
        ],
    );
    results.row(
        "one durable single-row `UPDATE` after the same rest, p50 / p99; in brackets ours (staying up) / it",
        [
            String::new(),
            String::new(),
            format!(
                "{} ({})",
                p50_p99(results, "postgres.durable_update"),
                shown(results, "postgres.handoff_p50_ratio_to_durable_update")
            ),
        ],
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
         other (no lease, no fencing: the physical reference), after both sessions rested \
         as long as our candidates rest before each handoff (150 ms): on this machine an \
         idle round trip costs about twice a busy one, and a commit flushed after a rest \
         several times one flushed in a busy loop, so the reference rests as ours do (the \
         busy figure is shown too). One durable single-row `UPDATE` after the same rest is \
         the least a grant costs: every grant's commit reaches the disk before it is \
         answered, and a handoff adds the resignation's round trip before it. Neither of \
         the lock's sessions ends \
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

/// The PostgreSQL figures: our handoffs beside the `pg_advisory_lock` handoff (rested as
/// ours, and busy) and beside one durable `UPDATE`.
fn postgres_figures(
    results: &mut Results,
    ours: &Handoffs,
    staying: Option<Histogram<u64>>,
    references: References,
) -> BoxResult<()> {
    let missing = "no PostgreSQL reference measured";
    let staying = staying.ok_or("no handoffs of leaders that stay up")?;
    let advisory = references.advisory.ok_or(missing)?;
    let busy = references.advisory_busy.ok_or(missing)?;
    let durable = references.durable_update.ok_or(missing)?;
    latency(
        results,
        "postgres.advisory_lock_handoff",
        &advisory,
        "`pg_advisory_unlock` in one session to `pg_advisory_lock` returning in another, both \
         sessions having rested as long as our candidates rest between handoffs",
    );
    latency(
        results,
        "postgres.advisory_lock_handoff_busy",
        &busy,
        "the same `pg_advisory_lock` handoff with no rest (the holder's session had just \
         polled the waiter's)",
    );
    latency(
        results,
        "postgres.durable_update",
        &durable,
        "one single-row UPDATE whose commit is flushed (`synchronous_commit = on`), after the \
         same rest",
    );
    latency(
        results,
        "postgres.handoff_staying",
        &staying,
        "graceful handoff, resign() to the next candidate's Elected, the resigned process \
         staying up (connected) until then",
    );
    let ours_p50 = quantile_ms(&staying, 0.5);
    results.figure(
        "postgres.handoff_p50_ratio_to_advisory_lock",
        ours_p50 / quantile_ms(&advisory, 0.5),
        "ratio",
        Goal::AtMost(2.0),
        "graceful handoff p50 (resign() to Elected, the resigned process staying up as the \
         lock's holder session does) / pg_advisory_lock handoff p50, both after the same \
         rest, interleaved",
    );
    results.figure(
        "postgres.handoff_p50_ratio_to_busy_advisory_lock",
        ours_p50 / quantile_ms(&busy, 0.5),
        "ratio",
        Goal::None,
        "the same, against the pg_advisory_lock handoff with no rest",
    );
    results.figure(
        "postgres.handoff_p50_ratio_to_durable_update",
        ours_p50 / quantile_ms(&durable, 0.5),
        "ratio",
        Goal::None,
        "graceful handoff p50 (staying up) / one durable single-row UPDATE p50 after the same \
         rest: a handoff needs at least one such commit (the grant) and the resignation's \
         round trip before it",
    );
    results.figure(
        "postgres.handoff_exiting_p50_ratio_to_advisory_lock",
        quantile_ms(&ours.resign_to_elected, 0.5) / quantile_ms(&advisory, 0.5),
        "ratio",
        Goal::None,
        "graceful handoff p50 (resign() to Elected, the resigned process exiting at once: its \
         sessions end during the handoff) / pg_advisory_lock handoff p50 (rested), interleaved",
    );
    Ok(())
}

/// What [`beside`] measured: ours, and beside them `etcdctl elect` on etcd, our handoffs
/// whose resigned process stays up and the references on PostgreSQL.
struct Beside {
    ours: Handoffs,
    etcdctl: Option<Histogram<u64>>,
    staying: Option<Histogram<u64>>,
    postgres: References,
}

/// Our handoffs on `store` and, when there is a baseline, the baseline's, interleaved in
/// blocks. Each block uses an election of its own: nothing left of one block can lead the
/// next.
async fn beside(bench: &Bench, store: StoreKind, baseline: Option<&Baseline>) -> BoxResult<Beside> {
    let sizes = &bench.sizes;
    let blocks = if baseline.is_some() { sizes.blocks } else { 1 };
    let per_block = sizes.handoffs.div_ceil(blocks);
    let mut all = Beside {
        ours: Handoffs {
            by_signal: histogram(),
            resign_to_elected: histogram(),
        },
        etcdctl: None,
        staying: None,
        postgres: References::default(),
    };
    for block in 0..blocks {
        let name = format!("handoff-{}-{}-{block}", store.name(), bench.tag);
        let contender = ours(bench.stores.url(store), TTL, name, Exit::AfterResign)?;
        let block_h = handoffs(&contender, "TERM", per_block, |_| Duration::ZERO)
            .await
            .map_err(|err| format!("ours on {}, block {block}: {err}", store.name()))?;
        all.ours.by_signal.add(block_h.by_signal)?;
        all.ours.resign_to_elected.add(block_h.resign_to_elected)?;
        match baseline {
            None => {}
            Some(Baseline::Etcdctl) => {
                let contender = etcdctl(
                    bench.stores.endpoint(StoreKind::Etcd),
                    format!("etcdctl-{}-{block}", bench.tag),
                );
                let theirs = handoffs(&contender, "INT", per_block, |_| Duration::ZERO)
                    .await
                    .map_err(|err| format!("etcdctl elect, block {block}: {err}"))?
                    .by_signal;
                all.etcdctl.get_or_insert_with(histogram).add(theirs)?;
            }
            Some(Baseline::AdvisoryLock) => {
                let name = format!("handoff-staying-{}-{block}", bench.tag);
                let contender = ours(bench.stores.url(store), TTL, name, Exit::AfterHandoff)?;
                let staying = handoffs(&contender, "TERM", per_block, |_| Duration::ZERO)
                    .await
                    .map_err(|err| format!("ours staying up, block {block}: {err}"))?;
                all.staying
                    .get_or_insert_with(histogram)
                    .add(staying.resign_to_elected)?;
                let references =
                    postgres_references(&bench.stores.url(StoreKind::Postgres), per_block)
                        .await
                        .map_err(|err| format!("PostgreSQL references, block {block}: {err}"))?;
                all.postgres.add(references)?;
            }
        }
    }
    Ok(all)
}

/// The PostgreSQL references measured beside our handoffs (see [`postgres_references`]).
#[derive(Default)]
struct References {
    /// `pg_advisory_lock` handoffs whose sessions rested [`SETTLE`] first, as ours do.
    advisory: Option<Histogram<u64>>,
    /// The same handoffs with no rest (the waiter's session had just been polled).
    advisory_busy: Option<Histogram<u64>>,
    /// One durable single-row `UPDATE` (commit flushed, as our grants are) after the same
    /// rest.
    durable_update: Option<Histogram<u64>>,
}

impl References {
    fn add(&mut self, more: References) -> BoxResult<()> {
        for (all, block) in [
            (&mut self.advisory, more.advisory),
            (&mut self.advisory_busy, more.advisory_busy),
            (&mut self.durable_update, more.durable_update),
        ] {
            if let Some(block) = block {
                match all {
                    Some(all) => all.add(block)?,
                    None => *all = Some(block),
                }
            }
        }
        Ok(())
    }
}

/// `count` handoffs of a PostgreSQL advisory lock between two sessions: one holds it,
/// the other blocks in `pg_advisory_lock`; timed from sending `pg_advisory_unlock` to the
/// waiter's `pg_advisory_lock` returning. The roles alternate. Each is timed twice over:
/// once after both sessions rested [`SETTLE`] (as our candidates rest between handoffs:
/// the reference the ratio uses), once right after the holder's session polled the
/// waiter's (busy). And `count` durable single-row `UPDATE`s after the same rest: the
/// least one commit that must reach the disk costs here, which every grant does.
async fn postgres_references(url: &str, count: usize) -> BoxResult<References> {
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
    let (mut rested, mut busy) = (histogram(), histogram());
    for i in 0..2 * count {
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
        // Rested every other time (the two kinds interleaved).
        let rest = (i / 2) % 2 == 0;
        if rest {
            sleep(SETTLE).await;
        }
        let started = Instant::now();
        sessions[holder]
            .execute("SELECT pg_advisory_unlock($1)", &[&key])
            .await?;
        let locked_at = timeout(Duration::from_secs(10), locked).await???;
        record(
            if rest { &mut rested } else { &mut busy },
            locked_at.duration_since(started),
        );
    }
    let holder = &sessions[0];
    let table = format!("leader_bench_durable_{}", std::process::id());
    holder
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO {table} VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
             SET synchronous_commit = on"
        ))
        .await?;
    let update = holder
        .prepare(&format!("UPDATE {table} SET n = n + 1 WHERE id = 1"))
        .await?;
    let mut durable = histogram();
    for _ in 0..count {
        sleep(SETTLE).await;
        let started = Instant::now();
        holder.execute(&update, &[]).await?;
        record(&mut durable, started.elapsed());
    }
    holder.batch_execute(&format!("DROP TABLE {table}")).await?;
    Ok(References {
        advisory: Some(rested),
        advisory_busy: Some(busy),
        durable_update: Some(durable),
    })
}
