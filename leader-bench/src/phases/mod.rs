//! `leader-bench run`: the measurements, one module per phase, each recording its
//! figures, table rows and chart into the run's [`Results`].

mod failover;
mod floor;
mod handoff;
mod handover;
mod idle;
pub(crate) mod many;
mod scale;

use std::path::PathBuf;
use std::time::Instant;

use crate::results::{self, Goal, Results};
use crate::stores::Stores;
use crate::{BoxResult, RunArgs, Sizes};

/// The phases' names, in the order they run (`leader-bench run --only`).
pub(crate) const NAMES: [&str; 7] = [
    "floor", "handoff", "handover", "failover", "idle", "scale", "many",
];

/// What every phase needs.
pub(crate) struct Bench {
    pub(crate) stores: Stores,
    pub(crate) sizes: Sizes,
    /// Where the charts go.
    pub(crate) charts: PathBuf,
    /// Makes the run's election names its own.
    pub(crate) tag: u32,
}

/// Runs every phase, then writes bench.json and bench.md (also when a phase failed: the
/// other phases' figures are kept, the failure is noted, and the run fails at the end).
pub(crate) async fn run(args: RunArgs) -> BoxResult<()> {
    let started = Instant::now();
    if !args.only.is_empty()
        && (args.results == std::path::Path::new("docs/results")
            || args.charts == std::path::Path::new("docs"))
    {
        return Err(
            "--only writes a partial bench.json and charts: give it its own \
                    --results DIR and --charts DIR, not the committed docs/"
                .into(),
        );
    }
    let commit = results::commit();
    leader_testkit::require_binary("etcdctl", "etcd-client")?;
    let bench = Bench {
        stores: Stores::start().await?,
        sizes: Sizes::new(args.quick),
        charts: args.charts.clone(),
        tag: std::process::id(),
    };
    let mut results = Results::default();
    let mut failed = Vec::new();
    macro_rules! phase {
        ($n:literal, $what:literal, $module:ident) => {
            let selected =
                args.only.is_empty() || args.only.iter().any(|p| p == stringify!($module));
            if !selected {
                eprintln!("[{}/7] {} skipped (--only)", $n, $what);
            } else {
                eprintln!(
                    "[{}/7] {} ({:.0}s into the run)",
                    $n,
                    $what,
                    started.elapsed().as_secs_f64()
                );
                if let Err(err) = $module::measure(&bench, &mut results).await {
                    eprintln!("leader-bench: {}: {err}", $what);
                    results.note(format!("**{} failed**: {err}", $what));
                    failed.push($what);
                }
            }
        };
    }
    phase!(1, "store round trip (floor)", floor);
    phase!(2, "graceful handoff between processes", handoff);
    phase!(3, "planned handover", handover);
    phase!(4, "crash failover", failover);
    phase!(5, "idle cost", idle);
    phase!(6, "handoffs with many waiting", scale);
    phase!(7, "10,000 elections in one process", many);
    results.figure(
        "bench.samples_dropped",
        crate::stats::dropped() as f64,
        "samples",
        Goal::None,
        "samples that fell outside a histogram's range",
    );
    let versions = bench.stores.versions().await?;
    let meta = results::meta(&commit, &versions, args.quick, started.elapsed().as_secs())?;
    results.write(&args.results, &meta)?;
    println!("{}", results.markdown(&meta)?);
    eprintln!(
        "results: {} (bench.json, bench.md); charts: {}; {:.1} min",
        args.results.display(),
        args.charts.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed: {}", failed.join(", ")).into())
    }
}

/// One cell per store, in [`leader_chaos::StoreKind::ALL`]'s order.
pub(crate) fn cells(mut cell: impl FnMut(leader_chaos::StoreKind) -> String) -> [String; 3] {
    leader_chaos::StoreKind::ALL.map(&mut cell)
}

/// A recorded figure as a table shows it, or an empty cell if it was not measured.
pub(crate) fn shown(results: &Results, key: &str) -> String {
    results.get(key).map(results::number).unwrap_or_default()
}

/// `p50 ms / p99 ms` from the figures `{prefix}_p50_ms` and `{prefix}_p99_ms`, or an
/// empty cell.
pub(crate) fn p50_p99(results: &Results, prefix: &str) -> String {
    match (
        results.get(&format!("{prefix}_p50_ms")),
        results.get(&format!("{prefix}_p99_ms")),
    ) {
        (Some(p50), Some(p99)) => {
            format!("{} ms / {} ms", results::number(p50), results::number(p99))
        }
        _ => String::new(),
    }
}

/// Records `{prefix}_p50_ms` and `{prefix}_p99_ms` of a histogram of microseconds.
pub(crate) fn latency(
    results: &mut Results,
    prefix: &str,
    h: &hdrhistogram::Histogram<u64>,
    what: &str,
) {
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        results.figure(
            &format!("{prefix}_{name}_ms"),
            crate::stats::quantile_ms(h, q),
            "ms",
            Goal::None,
            &format!("{what}, {name} (n={})", h.len()),
        );
    }
}
