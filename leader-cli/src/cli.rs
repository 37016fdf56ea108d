//! The command line: every subcommand, flag and help text of `leader`.
//!
//! This file depends on `clap` and `humantime` only: `build.rs` includes it to generate the
//! man page and the shell completions from these very definitions.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit status: answered, or the command exited 0.
pub(crate) const OK: u8 = 0;
/// Exit status: nobody leads (`who`), or the term was lost with `run --once`.
pub(crate) const NO_LEADER: u8 = 1;
/// Exit status: bad flags, a bad store URL or settings that cannot be safe.
pub(crate) const USAGE: u8 = 2;
/// Exit status: the store could not be asked (unreachable, timed out, refused credentials).
pub(crate) const STORE: u8 = 3;

/// The exit statuses, as `leader --help` and the man page show them (a macro, so that
/// `concat!` can put them in the help text).
macro_rules! exit_statuses {
    () => {
        "Exit status:\n  \
        0    answered (who, observe, check); run: the command exited 0, or a signal came\n       \
             while waiting in line\n  \
        1    who: nobody leads; run --once: the term was lost\n  \
        2    bad flags, a bad or unknown store URL, or settings that cannot be safe\n  \
        3    the store could not be asked: unreachable, timed out, or it refused the\n       \
             credentials\n  \
        N    run: the command's own exit status (128 + signal number if a signal ended it;\n       \
             127 if it could not be started)"
    };
}

/// `leader`: runs a program on exactly one machine at a time, and tells who leads.
#[derive(Parser)]
#[command(
    name = "leader",
    version,
    disable_help_subcommand = true,
    about = "Runs a program on exactly one machine at a time, and tells who leads",
    after_help = concat!(
        "Examples:\n  \
        leader run --store etcd://10.0.0.1:2379 --name reports -- ./reports-cron --daily\n  \
        LEADER_STORE=redis://10.0.0.2:6379 leader run --name consumer --grace 5s -- ./consume\n  \
        leader who --store etcd://10.0.0.1:2379 reports\n  \
        leader observe --store etcd://10.0.0.1:2379 reports --json\n  \
        leader check --ttl 10s --grace 2s\n\n\
        With an etcd:// store and no prefix, `leader run --name jobs` and `etcdctl elect jobs`\n\
        contend in one election. Logs go to stderr (RUST_LOG overrides the level).\n\n",
        exit_statuses!()
    )
)]
pub(crate) struct Cli {
    /// Log warnings and errors only (`run` logs its life at info by default).
    #[arg(long, short, global = true)]
    pub(crate) quiet: bool,
    /// How log lines on stderr look: `text`, or `json` (one object per line, for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Commands,
}

/// The format of log lines.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub(crate) enum Commands {
    /// Campaign; once elected, run CMD until it exits, the term ends, or a signal comes.
    #[command(
        after_help = "When the term ends (store unreachable, key gone), CMD's process group gets \
        SIGTERM at once and SIGKILL when --grace is up, still before the store could elect anyone \
        else. CMD dies with `leader run` (SIGKILL on Linux). Logs one line on stderr per step: \
        waiting, elected, command started, term ended (and why), signals sent, command exited.\n\n\
        Exit status: CMD's (128 + signal if a signal ended it); 1 if the term was lost with \
        --once; 2 for bad flags or settings; 3 if the store cannot be asked at start or refuses \
        the credentials; 0 if stopped by SIGTERM or SIGINT while waiting in line."
    )]
    Run(RunArgs),
    /// Print a line per leader change: the leader's value, or "" when nobody leads.
    Observe(ObserveArgs),
    /// Print the current leader's value; exit 1 if nobody leads.
    Who(ObserveArgs),
    /// List every candidate standing, the leader first, then the waiters in the order they
    /// would lead: one line each (`leader` or `waiting`, the id, the value, tab-separated;
    /// one JSON object with --json); exit 1 if nobody stands.
    Candidates(ObserveArgs),
    /// Check a TTL, grace and safety margin: the failover after a crash, how long a cut-off
    /// leader's command may still run, the margin left for clock drift.
    #[command(
        after_help = "Prints what `leader run` with these settings promises, and exits 2 (naming \
        the rule) on a combination that cannot be safe. Asks no store."
    )]
    Check(CheckArgs),
}

/// `--store`, from the flag or `$LEADER_STORE`.
#[derive(Args)]
pub(crate) struct Store {
    /// The store URL: etcd://host:port[/prefix/], redis://host:port[/db], postgres://…
    /// (see the README for TLS, Cluster and Sentinel forms).
    #[arg(long, env = "LEADER_STORE", value_name = "URL", hide_env_values = true)]
    pub(crate) store: String,
}

/// The flags of `leader run`.
#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) store: Store,
    /// The election's name.
    #[arg(long)]
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) timing: Timing,
    /// What `leader who` and `leader observe` show while this machine leads (default: a
    /// unique candidate id, hostname-pid-random).
    #[arg(long)]
    pub(crate) value: Option<String>,
    /// Exit (status 1) instead of campaigning again after the term is lost.
    #[arg(long)]
    pub(crate) once: bool,
    /// The program and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// The timing flags `run` and `check` share.
#[derive(Args, Clone, Copy)]
pub(crate) struct Timing {
    /// The lease: a crashed leader is replaced about this long after its last renewal.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,
    /// How long CMD gets between SIGTERM and SIGKILL when the term ends; the term ends this
    /// long (plus the safety margin and 100ms for the kill) before the store could elect
    /// anyone else.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) grace: Duration,
    /// What is kept for clock-rate drift between this machine and the store (default: 2% of
    /// the TTL, at least 2ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) safety_margin: Option<Duration>,
}

/// The flags of `leader check`.
#[derive(Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) timing: Timing,
}

/// The flags of `leader observe` and `leader who`.
#[derive(Args)]
pub(crate) struct ObserveArgs {
    #[command(flatten)]
    pub(crate) store: Store,
    /// The election's name.
    pub(crate) name: String,
    /// One JSON object per line: {"leader": {"value", "fencingToken", "id"} or null}.
    #[arg(long)]
    pub(crate) json: bool,
}
