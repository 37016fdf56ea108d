//! `leader-bench`: handoff, failover, idle cost and scale of the election on etcd, Redis
//! and PostgreSQL, with `etcdctl elect`, a `pg_advisory_lock` handoff and the stores' own
//! round trip measured in the same run for context. Starts its own etcd, redis-server and
//! postgres on free loopback ports, and writes its figures to `docs/results/bench.json`
//! and `bench.md` and its charts to `docs/`. Run it through `ci/bench`.
//!
//! The candidate processes it starts are this same binary (`leader-bench candidate`), and
//! so are the processes that hold 10,000 elections (`leader-bench hold`): Cargo builds
//! everything the bench runs as one target, and nothing is found by file name.

mod candidate;
mod charts;
mod contender;
mod phases;
mod results;
mod stats;
mod stores;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Benchmarks of leader election on etcd, Redis and PostgreSQL.
#[derive(Parser)]
#[command(name = "leader-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every measurement and writes the results (the default).
    Run(RunArgs),
    /// One candidate process: campaigns, prints `elected TOKEN NS` when elected, and on
    /// SIGTERM prints `resigning NS` and resigns (NS: CLOCK_MONOTONIC nanoseconds).
    Candidate(candidate::CandidateArgs),
    /// Holds N elections on one driver, prints `ready <RSS added> <RSS added in all> <RSS>`
    /// (KiB), then waits to be killed.
    Hold(phases::many::HoldArgs),
}

/// What `run` measures and where it writes.
#[derive(Args, Clone)]
pub(crate) struct RunArgs {
    /// Smaller samples (10 handoffs, 5 kills, TTLs 1s and 2s, 1 and 1,000 waiting): every
    /// key of bench.json, quickly, for iterating. The committed figures come from a full
    /// run.
    #[arg(long)]
    quick: bool,
    /// Where bench.json and bench.md go.
    #[arg(long, default_value = "docs/results")]
    results: PathBuf,
    /// Where the SVG charts go.
    #[arg(long, env = "BENCH_SVG_DIR", default_value = "docs")]
    charts: PathBuf,
    /// Runs only these phases (for looking into one figure; write such a run's results
    /// elsewhere with `--results`, since bench.json then lacks the other phases' keys).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(phases::NAMES))]
    only: Vec<String>,
}

/// Sample sizes of one run.
#[derive(Clone, Debug)]
pub(crate) struct Sizes {
    /// Graceful handoffs per store (and per baseline: `etcdctl elect`, `pg_advisory_lock`).
    pub(crate) handoffs: usize,
    /// Blocks the handoffs beside a baseline are interleaved in.
    pub(crate) blocks: usize,
    /// Kills per store and TTL.
    pub(crate) crashes: usize,
    /// TTLs of the crash failover, in seconds.
    pub(crate) crash_ttls: Vec<u64>,
    /// How long a request rate is counted for.
    pub(crate) idle_window: Duration,
    /// Candidates waiting in the scale measurement.
    pub(crate) waiting: Vec<usize>,
    /// Handoffs measured at each number of waiting candidates.
    pub(crate) scale_handoffs: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                handoffs: 10,
                blocks: 2,
                crashes: 5,
                crash_ttls: vec![1, 2],
                idle_window: Duration::from_secs(3),
                waiting: vec![1, 1000],
                scale_handoffs: 10,
            }
        } else {
            Sizes {
                handoffs: 50,
                blocks: 5,
                crashes: 20,
                crash_ttls: vec![1, 2, 5],
                idle_window: Duration::from_secs(9),
                waiting: vec![1, 10, 100, 1000],
                scale_handoffs: 30,
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => phases::run(cli.run).await,
        Some(Command::Run(args)) => phases::run(args).await,
        Some(Command::Candidate(args)) => candidate::main(args).await,
        Some(Command::Hold(args)) => phases::many::hold(args).await,
    };
    if let Err(err) = result {
        eprintln!("leader-bench: {err}");
        std::process::exit(1);
    }
}
