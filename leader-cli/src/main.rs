//! `leader`: runs any program on exactly one machine at a time, and tells who leads.
//!
//! See `leader --help` and the crate README.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use leader::{Election, Error, LeaderInfo};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// Exit status for bad flags or a bad store URL.
const USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "leader",
    version,
    about = "Runs a program on exactly one machine at a time, and tells who leads",
    after_help = "Examples:\n  \
        leader run --store etcd://10.0.0.1:2379 --name reports -- ./reports-cron --daily\n  \
        LEADER_STORE=redis://10.0.0.2:6379 leader run --name consumer --grace 5s -- ./consume\n  \
        leader who --store etcd://10.0.0.1:2379 reports\n  \
        leader observe --store etcd://10.0.0.1:2379 reports --json\n\n\
        With an etcd:// store and no prefix, `leader run --name jobs` and `etcdctl elect jobs`\n\
        contend in one election. Logs go to stderr (RUST_LOG=info for more)."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Campaign; once elected, run CMD until it exits, the term ends, or a signal comes.
    #[command(
        after_help = "When the term ends (store unreachable, key gone), CMD's process group gets \
        SIGTERM at once and SIGKILL when --grace is up, still before the store could elect anyone \
        else. CMD dies with `leader run` (SIGKILL on Linux). Exit status: CMD's (128 + signal if a \
        signal ended it); 1 if the term was lost with --once or on a store error that retrying \
        cannot fix; 0 if stopped by SIGTERM or SIGINT while waiting in line."
    )]
    Run(RunArgs),
    /// Print a line per leader change: the leader's value, or "" when nobody leads.
    Observe(ObserveArgs),
    /// Print the current leader's value; exit 1 if nobody leads.
    Who(ObserveArgs),
}

#[derive(Args)]
struct Store {
    /// The store URL: etcd://host:port[/prefix/] or redis://host:port[/db].
    #[arg(long, env = "LEADER_STORE", value_name = "URL", hide_env_values = true)]
    store: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("store", &leader::redact_urls(&self.store))
            .finish()
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    store: Store,
    /// The election's name.
    #[arg(long)]
    name: String,
    /// The lease: a crashed leader is replaced about this long after its last renewal.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// What `leader who` and `leader observe` show while this machine leads (default: a
    /// unique candidate id, hostname-pid-random).
    #[arg(long)]
    value: Option<String>,
    /// How long CMD gets between SIGTERM and SIGKILL when the term ends; the term ends this
    /// long before the store could elect anyone else. Under half the TTL.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Exit (status 1) instead of campaigning again after the term is lost.
    #[arg(long)]
    once: bool,
    /// The program and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct ObserveArgs {
    #[command(flatten)]
    store: Store,
    /// The election's name.
    name: String,
    /// One JSON object per line: {"leader": {"value", "fencingToken", "id"} or null}.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            eprintln!("leader: a command is needed: run, observe or who (see leader --help)");
            return ExitCode::from(USAGE);
        }
        Err(err) if err.use_stderr() => {
            // One line: the error, and what it refers to when clap puts that on the next;
            // a store URL the user typed keeps its password to itself.
            let text = leader::redact_urls(&err.to_string());
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ")
                .to_owned();
            if line.ends_with(':')
                && let Some(next) = lines.next()
            {
                line = format!("{line} {next}");
            }
            eprintln!("leader: {line}");
            return ExitCode::from(USAGE);
        }
        Err(err) => {
            // --help, --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    // One thread: the child is spawned by the thread that lives as long as the process,
    // so its parent-death signal fires only when `leader` itself dies.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("leader: cannot start: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Commands::Run(args) => run(args).await,
            Commands::Observe(args) => observe(args).await,
            Commands::Who(args) => who(args).await,
        }
    })
}

/// Reports `err` on one line; bad configuration is a usage error.
fn fail(what: &str, err: &Error) -> ExitCode {
    eprintln!("leader: {what}: {}", chain(err));
    match err {
        Error::InvalidConfig { .. } => ExitCode::from(USAGE),
        _ => ExitCode::from(1),
    }
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    leader::ErrorChain(err).to_string()
}

async fn connect(store: &Store) -> Result<std::sync::Arc<dyn leader::Driver>, ExitCode> {
    leader::connect(&store.store)
        .await
        .map_err(|err| fail("cannot use the store", &err))
}

/// The exit status a shell would give for a child that ended with `status`.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Time allowed between sending SIGKILL and the group being gone.
const KILL_ALLOWANCE: Duration = Duration::from_millis(100);

/// The term's safety margin: the grace, plus the default margin for clock-rate drift, plus
/// the time a SIGKILL takes, so that the command is gone before the store could elect
/// anyone else.
fn margin(ttl: Duration, grace: Duration) -> Duration {
    grace + (ttl / 50).max(Duration::from_millis(2)) + KILL_ALLOWANCE
}

async fn run(args: RunArgs) -> ExitCode {
    let margin = margin(args.ttl, args.grace);
    if margin >= args.ttl / 2 {
        eprintln!(
            "leader: --grace ({:?}) plus {:?} for drift and the kill must be under half the --ttl ({:?})",
            args.grace,
            margin - args.grace,
            args.ttl
        );
        return ExitCode::from(USAGE);
    }
    if !which("setpriv") {
        eprintln!(
            "leader: setpriv (util-linux) is needed to make the command die with `leader run`"
        );
        return ExitCode::from(1);
    }
    // Parse the URL before anything else, so that a bad one is a usage error at once.
    if let Err(err) = leader::StoreUrl::parse(&args.store.store) {
        return fail("bad --store", &err);
    }
    let driver = match connect(&args.store).await {
        Ok(driver) => driver,
        Err(code) => return code,
    };
    let mut builder = Election::builder(driver, args.name.clone())
        .ttl(args.ttl)
        .safety_margin(margin);
    if let Some(value) = &args.value {
        builder = builder.value(value.clone());
    }
    let election = match builder.build() {
        Ok(election) => election,
        Err(err) => return fail("bad settings", &err),
    };
    let (Ok(mut sigterm), Ok(mut sigint), Ok(mut sighup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("leader: cannot handle signals");
        return ExitCode::from(1);
    };
    let value = String::from_utf8_lossy(election.value()).into_owned();
    let (retry_min, retry_max) = (Duration::from_millis(200), Duration::from_secs(10));
    let mut delay = retry_min;
    loop {
        let campaigned = tokio::select! {
            biased;
            _ = sigterm.recv() => return withdraw_and_exit(election).await,
            _ = sigint.recv() => return withdraw_and_exit(election).await,
            _ = sighup.recv() => return withdraw_and_exit(election).await,
            campaigned = election.campaign() => campaigned,
        };
        let term = match campaigned {
            Ok(term) => term,
            Err(err) if !err.is_transient() => return fail("cannot campaign", &err),
            Err(err) => {
                warn!(error = %chain(&err), ?delay, "campaign failed; trying again");
                tokio::select! {
                    biased;
                    _ = sigterm.recv() => return withdraw_and_exit(election).await,
                    _ = sigint.recv() => return withdraw_and_exit(election).await,
                    _ = sighup.recv() => return withdraw_and_exit(election).await,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(retry_max);
                continue;
            }
        };
        delay = retry_min;
        let token = term.fencing_token();
        info!(election = %args.name, fencing_token = token, "elected; starting the command");
        let mut child = match spawn(&args, token, &value) {
            Ok(child) => child,
            Err(err) => {
                eprintln!("leader: cannot start {:?}: {err}", args.command[0]);
                let _ = term.resign().await;
                return ExitCode::from(127);
            }
        };
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        // The term's end, as the library reports it, or as `is_valid()` says (which also
        // counts a suspension of the machine, which the timers behind `ended()` do not).
        let lost = async {
            let mut check = tokio::time::interval(
                args.grace
                    .clamp(Duration::from_millis(10), Duration::from_millis(100)),
            );
            loop {
                tokio::select! {
                    () = term.ended() => return,
                    _ = check.tick() => {
                        if !term.is_valid() {
                            return;
                        }
                    }
                }
            }
        };
        tokio::pin!(lost);
        let ended = tokio::select! {
            biased;
            status = child.wait() => {
                // The command exited by itself: make sure nothing it started survives,
                // hand over, and exit as it did.
                signal_group(group, Signal::SIGKILL);
                let _ = term.resign().await;
                return match status {
                    Ok(status) => exit_code(status),
                    Err(_) => ExitCode::from(1),
                };
            }
            _ = sigterm.recv() => Some(Signal::SIGTERM),
            _ = sigint.recv() => Some(Signal::SIGINT),
            _ = sighup.recv() => Some(Signal::SIGTERM),
            () = &mut lost => None,
        };
        match ended {
            Some(forward) => {
                // Stop: the command first, then resign, then exit with its status.
                signal_group(group, forward);
                let status = tokio::select! {
                    status = child.wait() => status.ok(),
                    () = &mut lost => stop(&mut child, group, args.grace).await,
                };
                signal_group(group, Signal::SIGKILL);
                let _ = term.resign().await;
                return status.map_or(ExitCode::from(1), exit_code);
            }
            None => {
                warn!(
                    election = %args.name,
                    fencing_token = token,
                    "the term ended; stopping the command"
                );
                let _ = stop(&mut child, group, args.grace).await;
                if args.once {
                    eprintln!("leader: lost the election (--once)");
                    return ExitCode::from(1);
                }
                tokio::time::sleep(retry_min).await;
            }
        }
    }
}

/// Starts the command in a process group of its own, with the term in its environment,
/// and (through `setpriv`) a parent-death signal, so that it never outlives `leader`.
/// Processes it starts in a new session (`setsid`) leave the group and are not covered.
fn spawn(args: &RunArgs, token: u64, value: &str) -> std::io::Result<Child> {
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .args(&args.command);
    command
        .process_group(0)
        .env("LEADER_ELECTION", &args.name)
        .env("LEADER_FENCING_TOKEN", token.to_string())
        .env("LEADER_VALUE", value)
        .kill_on_drop(true)
        .spawn()
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        let _ = killpg(group, signal);
    }
}

/// SIGTERM to the command's group, SIGKILL to the group when `grace` is up (and once the
/// command exited, for whatever it started); its exit status.
async fn stop(
    child: &mut Child,
    group: Option<Pid>,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    signal_group(group, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            signal_group(group, Signal::SIGKILL);
            child.wait().await.ok()
        }
    };
    // Whatever the command started goes too, before anyone else can be elected.
    signal_group(group, Signal::SIGKILL);
    status
}

async fn withdraw_and_exit(election: Election) -> ExitCode {
    // Dropping the campaign withdrew it; make sure the store has nothing of ours left.
    match election.resign().await {
        Ok(()) | Err(Error::NotALeader) => ExitCode::SUCCESS,
        Err(err) => fail("could not withdraw", &err),
    }
}

fn show(leader: Option<&LeaderInfo>, json: bool) -> String {
    match (leader, json) {
        (Some(leader), false) => leader.value_lossy().into_owned(),
        (None, false) => String::new(),
        (Some(leader), true) => serde_json::json!({
            "leader": {
                "value": leader.value_lossy(),
                "fencingToken": leader.fencing_token,
                "id": leader.id,
            }
        })
        .to_string(),
        (None, true) => serde_json::json!({ "leader": null }).to_string(),
    }
}

/// An election handle that never campaigns, to ask the store who leads `args.name`.
async fn observer(args: &ObserveArgs) -> Result<Election, ExitCode> {
    let driver = connect(&args.store).await?;
    Election::builder(driver, args.name.as_str())
        .build()
        .map_err(|err| fail("bad election name", &err))
}

async fn observe(args: ObserveArgs) -> ExitCode {
    let election = match observer(&args).await {
        Ok(election) => election,
        Err(code) => return code,
    };
    let mut changes = election.observe();
    let Ok(mut sigterm) = signal(SignalKind::terminate()) else {
        return ExitCode::from(1);
    };
    loop {
        let change = tokio::select! {
            biased;
            _ = sigterm.recv() => return ExitCode::SUCCESS,
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            change = changes.next() => change,
        };
        match change {
            Some(Ok(leader)) => println!("{}", show(leader.as_ref(), args.json)),
            Some(Err(err)) => warn!(error = %chain(&err), "store error; still watching"),
            None => return ExitCode::from(1),
        }
    }
}

async fn who(args: ObserveArgs) -> ExitCode {
    let election = match observer(&args).await {
        Ok(election) => election,
        Err(code) => return code,
    };
    match election.leader().await {
        Ok(Some(leader)) => {
            println!("{}", show(Some(&leader), args.json));
            ExitCode::SUCCESS
        }
        Ok(None) => {
            if args.json {
                println!("{}", show(None, true));
            }
            ExitCode::from(1)
        }
        Err(err) => fail("cannot ask the store", &err),
    }
}
