//! 10,000 elections held by one process on one driver: the memory they add and the
//! requests per second they cost (TTL 10 s). Each store's elections are held by a process
//! of their own (`leader-bench hold`), so that its RSS counts nothing else; the holders
//! start one after the other, and their requests are counted at once.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use leader_core::{Driver, Election};
use leader_testkit::LineProcess;
use tokio::process::Command;
use tokio::time::sleep;

use super::idle::rate;
use super::{Bench, cells, shown};
use crate::BoxResult;
use crate::results::{Goal, Results};
use crate::stats::rss_kib;
use leader_chaos::StoreKind;

/// Elections per holding process.
const MANY: usize = 10_000;
const TTL: Duration = Duration::from_secs(10);

/// Arguments of `leader-bench hold`.
#[derive(Args)]
pub(crate) struct HoldArgs {
    /// The store URL.
    #[arg(long)]
    store: String,
    /// How many elections to hold.
    #[arg(long, default_value_t = MANY)]
    elections: usize,
    /// The terms' TTL.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    ttl: Duration,
}

/// `leader-bench hold`: holds the elections on one driver, prints `ready <RSS the
/// elections added> <RSS added since the process started> <RSS now>` (KiB), then waits to
/// be killed.
///
/// The first figure's baseline is taken once the driver is connected and holds one
/// election of its own: what the elections add, without the driver's connections, its
/// lazily opened watch or `LISTEN` connection, its lease, and the code pages the first
/// election touches, all paid once per driver. The second counts all of that too.
pub(crate) async fn hold(args: HoldArgs) -> BoxResult<()> {
    let start = rss_kib();
    let driver = leader::connect(&args.store).await?;
    let prefix = format!("many-{}", std::process::id());
    let first = hold_elections(&driver, &format!("{prefix}-first"), 1, args.ttl).await?;
    let before = rss_kib();
    let elections = hold_elections(&driver, &prefix, args.elections, args.ttl).await?;
    let now = rss_kib();
    println!(
        "ready {} {} {now}",
        now.saturating_sub(before),
        now.saturating_sub(start)
    );
    std::future::pending::<()>().await;
    drop((first, elections));
    Ok(())
}

/// Campaigns for `n` elections named `{prefix}-{i}` on `driver` (64 at a time) and returns
/// them once all lead.
pub(crate) async fn hold_elections(
    driver: &Arc<dyn Driver>,
    prefix: &str,
    n: usize,
    ttl: Duration,
) -> BoxResult<Vec<Election>> {
    let mut elections = Vec::with_capacity(n);
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let e = Election::builder(Arc::clone(driver), format!("{prefix}-{i}"))
            .ttl(ttl)
            .build()?;
        elections.push(e.clone());
        pending.push(async move {
            // As a service would: a request that timed out on a busy machine is retried.
            let mut tries = 0;
            loop {
                match e.campaign().await {
                    Err(err) if err.is_transient() && tries < 20 => tries += 1,
                    result => break result,
                }
            }
        });
        if pending.len() >= 64 {
            pending.next().await.ok_or("campaign")??;
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    Ok(elections)
}

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    // One store after the other: 10,000 campaigns at once on each would starve the
    // machine's two cores. A store whose holder fails is reported; the others measured.
    let mut held = Vec::new();
    let mut failed = Vec::new();
    for store in StoreKind::ALL {
        match start_holder(store, &bench.stores.url(store)).await {
            Ok(ready) => held.push((store, ready)),
            Err(err) => failed.push(format!("{}: {err}", store.name())),
        }
    }
    sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(10);
    let rates = futures::future::try_join_all(
        held.iter()
            .map(|(store, _)| rate(&bench.stores, *store, window)),
    )
    .await?;
    for ((store, held), per_second) in held.into_iter().zip(rates) {
        // After the rates' window: several renewal rounds of all 10,000 terms later (a
        // round every third of the TTL), each of which has every renewal in flight at once.
        let renewing_kib = held
            .holder
            .pid()
            .and_then(|pid| rss_kib_of(pid).ok())
            .map(|rss| rss.saturating_sub(held.before_kib));
        let _ = held.holder.signal("KILL");
        let (kib, total_kib) = (held.added_kib, held.total_kib);
        let name = store.name();
        results.figure(
            &format!("{name}.rss_mib.10000_elections"),
            kib as f64 / 1024.0,
            "MiB",
            Goal::AtMost(20.0),
            "resident memory added by 10,000 elections on one driver in one process (from \
             a driver connected and holding one election)",
        );
        if let Some(renewing_kib) = renewing_kib {
            results.figure(
                &format!("{name}.rss_mib.10000_elections_renewing"),
                renewing_kib as f64 / 1024.0,
                "MiB",
                Goal::None,
                "resident memory added by the same 10,000 elections, from the same baseline, \
                 after 11 s more of holding them (renewal rounds of all of them, each with \
                 every renewal in flight at once): the first figure is taken as the last \
                 campaign returns, before or after the first such round",
            );
        }
        results.figure(
            &format!("{name}.rss_mib.10000_elections_and_driver"),
            total_kib as f64 / 1024.0,
            "MiB",
            Goal::None,
            "resident memory added by connecting a driver and holding 10,001 elections on it \
             (from the process's start)",
        );
        results.figure(
            &format!("{name}.requests_per_second.10000_elections"),
            per_second,
            "requests/s",
            Goal::AtMost(10.0),
            "10,000 elections held by one process on one driver, TTL 10s",
        );
    }
    let row = cells(|s| {
        format!(
            "{} MiB; {}/s",
            shown(results, &format!("{}.rss_mib.10000_elections", s.name())),
            shown(
                results,
                &format!("{}.requests_per_second.10000_elections", s.name())
            )
        )
    });
    results.row(
        "10,000 elections on one driver in one process: RSS added (from a connected driver holding one); requests/s (TTL 10s)",
        row,
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}

/// A `leader-bench hold` process, ready: the RSS its elections added, the RSS it added in
/// all, and its RSS before the elections (KiB).
struct Held {
    holder: LineProcess,
    added_kib: u64,
    total_kib: u64,
    before_kib: u64,
}

/// The resident set of process `pid`, in KiB.
fn rss_kib_of(pid: u32) -> BoxResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status").into())
}

/// Starts `leader-bench hold` on `url` and waits for its `ready` line.
async fn start_holder(store: StoreKind, url: &str) -> BoxResult<Held> {
    let exe = std::env::current_exe()?;
    let mut holder = LineProcess::spawn(
        Command::new(&exe)
            .args([
                "hold",
                "--store",
                url,
                "--elections",
                &MANY.to_string(),
                "--ttl",
                &humantime::format_duration(TTL).to_string(),
            ])
            .stderr(Stdio::inherit()),
    )?;
    let ready = holder
        .wait_for_line(Duration::from_secs(600), |l| l.starts_with("ready"))
        .await
        .map_err(|err| format!("holding {MANY} elections on {}: {err}", store.name()))?;
    let mut kib = ready
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse::<u64>().map_err(|err| format!("`{ready}`: {err}")));
    let added = kib.next().ok_or("no RSS in the ready line")??;
    let total = kib.next().ok_or("no total RSS in the ready line")??;
    let now = kib.next().ok_or("no RSS now in the ready line")??;
    Ok(Held {
        holder,
        added_kib: added,
        total_kib: total,
        before_kib: now.saturating_sub(added),
    })
}
