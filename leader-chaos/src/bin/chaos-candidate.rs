//! One chaos candidate process: holds `--elections` elections on one driver (so that the
//! driver's batched renewals face every fault), and for each one campaigns, holds each term
//! until it ends, campaigns again (with backoff) until SIGTERM, then resigns. It records what
//! the exact checker needs in its log file, one line per record, each written with a single
//! `write(2)` on CLOCK_MONOTONIC nanoseconds (`E` is the election's index, 0 for the first):
//!
//! ```text
//! e E TOKEN ELECTED_NS DEADLINE_NS   a term began (Term::elected_at: the first instant of belief)
//! d E TOKEN DEADLINE_NS              the term got or moved to this deadline: written by the
//!                                    library's on_deadline hook, synchronously, before
//!                                    is_leader() relies on it (a SIGKILL right after cannot
//!                                    lose it)
//! x E TOKEN ENDED_NS DEADLINE_NS     the term ended (Term::ended_at), with its final deadline
//!                                    (Term::deadline once it ended)
//! s E TOKEN BEFORE_NS AFTER_NS       a sample of is_leader() that said "leader" (election 0)
//! n E BEFORE_NS AFTER_NS             the first sample that said "not leader" after one that did
//! ```
//!
//! The sampler is a plain thread that checks the first election's `status.is_leader()` every
//! millisecond, as a cross-check; the exact check reads only the library's own instants.
//! Stdout carries the first election's events for the orchestrator, each with the
//! CLOCK_MONOTONIC time it was seen: `campaigning ns`, `elected T ns`, `lost T ns`,
//! `resigned T ns`, and `resigning ns` when SIGTERM starts the resignation.
//!
//! ```text
//! chaos-candidate <store url> <election> <ttl ms> <log file> [--elections N]
//!                 [--unsafe[=lease|answer-time]]
//! ```
//!
//! `--unsafe` exists only to show that the checker catches a broken candidate:
//! `--unsafe` (or `=lease`) claims leases ten times longer than the store grants;
//! `--unsafe=answer-time` counts each lease from the instant its answer arrived instead of
//! the instant its request was sent (the textbook lease bug: a slow answer makes the
//! candidate believe for as long past the store's expiry).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use leader_chaos::{monotonic_ns, to_monotonic_ns};
use leader_core::{CancellationToken, Election, Event};
use tokio::signal::unix::{SignalKind, signal};

/// A chaos candidate (see the crate's `chaos-candidate` docs for the log format).
#[derive(Debug, Parser)]
#[command(name = "chaos-candidate")]
struct Args {
    /// The store's URL, for `leader::connect`.
    store_url: String,
    /// The first election's name; the others are `NAME-1`, `NAME-2`, ...
    election: String,
    /// The TTL in milliseconds.
    ttl_ms: u64,
    /// The log file (appended to).
    log_file: PathBuf,
    /// How many elections this process holds on its one driver.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    elections: u32,
    /// A deliberately broken candidate, to show that the checker catches it.
    #[arg(long = "unsafe", num_args = 0..=1, default_missing_value = "lease", require_equals = true)]
    unsafe_mode: Option<Unsafe>,
}

/// The ways a candidate can be broken on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Unsafe {
    /// Leases ten times longer than the store's.
    Lease,
    /// Each lease counted from its answer's arrival, not its request's sending.
    AnswerTime,
}

fn main() {
    let args = Args::parse();
    // Every thread of the candidate runs at a lower nice value (as root), so that a busy
    // machine does not hold the state lock away from the real-time sampler for long.
    // Threads inherit it: set it before the runtime starts its workers.
    quiet(
        "renice",
        &["-n", "-10", "-p", &std::process::id().to_string()],
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chaos-candidate: {err}");
            std::process::exit(1);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .try_init();
    if let Err(err) = runtime.block_on(run(args)) {
        eprintln!("chaos-candidate: {err}");
        std::process::exit(1);
    }
}

/// The log file, shared by the sampler thread, the deadline hooks and the main loops.
#[derive(Clone)]
struct Log(Arc<Mutex<std::fs::File>>);

impl Log {
    fn write(&self, line: &str) -> std::io::Result<()> {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line: a SIGKILL cannot interleave two records.
        file.write_all(line.as_bytes())
    }
}

fn stdout_line(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line} {}", monotonic_ns());
    let _ = out.flush();
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn run(args: Args) -> BoxResult<()> {
    let ttl = Duration::from_millis(args.ttl_ms);
    // A candidate started while the store restarts (after a fault) waits for it, as a
    // service would; only a refusal or a bad URL ends it.
    let mut delay = Duration::from_millis(50);
    let mut driver = loop {
        match leader::connect(&args.store_url).await {
            Ok(driver) => break driver,
            Err(err) if err.is_transient() => {
                eprintln!("chaos-candidate: connecting: {err}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(err) => return Err(err.into()),
        }
    };
    if let Some(mode) = args.unsafe_mode {
        driver = Arc::new(Broken {
            inner: driver,
            mode,
        });
    }
    let log = Log(Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log_file)?,
    )));
    let mut elections = Vec::new();
    for index in 0..args.elections {
        let name = match index {
            0 => args.election.clone(),
            i => format!("{}-{i}", args.election),
        };
        let hook_log = log.clone();
        let election = Election::builder(Arc::clone(&driver), name)
            .ttl(ttl)
            .retry(Duration::from_millis(50), ttl)
            .on_deadline(move |token, deadline| {
                // A failed write shows as a missing deadline: the checker then judges the
                // term by an earlier one and may report an overlap, never hide one.
                let _ = hook_log.write(&format!(
                    "d {index} {token} {}\n",
                    to_monotonic_ns(deadline)
                ));
            })
            .build()?;
        elections.push(election);
    }

    let done = CancellationToken::new();
    let (sampler, writer) = sample(&elections[0], &log, &done);
    let printer = print_events(&elections[0]);

    let shutdown = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut holders = tokio::task::JoinSet::new();
    for (index, election) in elections.iter().enumerate() {
        holders.spawn(hold(
            election.clone(),
            index,
            log.clone(),
            ttl,
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = sigterm.recv() => shutdown.cancel(),
            joined = holders.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(err))) => {
                    result = Err(err);
                    shutdown.cancel();
                }
                Some(Err(err)) => {
                    result = Err(err.into());
                    shutdown.cancel();
                }
            },
        }
    }
    done.cancel();
    let sampled = sampler.join();
    let written = writer.join();
    drop(elections);
    let _ = tokio::time::timeout(Duration::from_millis(200), printer).await;
    if sampled.is_err() {
        return Err("the sampler panicked".into());
    }
    match written {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(format!("writing the log: {err}").into()),
        Err(_) => return Err("the log writer panicked".into()),
    }
    result
}

/// Election::run's loop, written out so that each Term's instants can be logged: campaigns,
/// holds each term until it ends, campaigns again, until `shutdown`; then resigns.
async fn hold(
    election: Election,
    index: usize,
    log: Log,
    ttl: Duration,
    shutdown: CancellationToken,
) -> BoxResult<()> {
    let first = index == 0;
    let (retry_min, retry_max) = (Duration::from_millis(50), ttl);
    let mut delay = retry_min;
    loop {
        if first {
            stdout_line("campaigning");
        }
        let campaigned = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            campaigned = election.campaign() => campaigned,
        };
        match campaigned {
            Ok(term) => {
                let token = term.fencing_token();
                log.write(&format!(
                    "e {index} {token} {} {}\n",
                    to_monotonic_ns(term.elected_at()),
                    to_monotonic_ns(term.deadline())
                ))?;
                if first {
                    stdout_line(&format!("elected {token}"));
                }
                let stopping = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => true,
                    () = term.ended() => false,
                };
                if stopping {
                    if first {
                        stdout_line("resigning");
                    }
                    let mut resigned = term.resign().await;
                    log_end(&log, index, &term)?;
                    // The term ended locally either way; a deletion that failed (a store
                    // request lost to an earlier fault's broken connection, say) is tried
                    // again at once by `Election::resign`, for up to two TTLs.
                    let until = tokio::time::Instant::now() + ttl * 2;
                    while let Err(err) = &resigned {
                        if !err.is_transient() || tokio::time::Instant::now() >= until {
                            break;
                        }
                        eprintln!("chaos-candidate: resigning: {err}; trying again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        resigned = election.resign().await;
                    }
                    return match resigned {
                        Ok(()) | Err(leader_core::Error::NotALeader) => Ok(()),
                        Err(err) => Err(err.into()),
                    };
                }
                log_end(&log, index, &term)?;
                if term
                    .ended_at()
                    .is_some_and(|end| end.duration_since(term.elected_at()) >= ttl)
                {
                    delay = retry_min;
                }
            }
            Err(err) if !err.is_transient() => return Err(err.into()),
            Err(_) => {}
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(retry_max);
    }
}

/// Starts the sampler of `election`'s `is_leader()` (every millisecond, on a real-time
/// thread if it may) and the thread that writes its lines, until `done`.
fn sample(
    election: &Election,
    log: &Log,
    done: &CancellationToken,
) -> (
    std::thread::JoinHandle<()>,
    std::thread::JoinHandle<std::io::Result<()>>,
) {
    let status = election.status();
    // The sampler does no I/O (a write can stall for milliseconds on a busy disk and
    // would show as a gap in the samples): it hands its lines to a writer thread. The few
    // lines in flight when the process is SIGKILLed are lost, as a torn tail would be.
    let (lines, written) = std::sync::mpsc::channel::<String>();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            for line in written {
                log.write(&line)?;
            }
            Ok(())
        })
    };
    let done = done.clone();
    let sampler = std::thread::spawn(move || {
        prioritize_this_thread();
        let mut was_leading = false;
        while !done.is_cancelled() {
            let before = monotonic_ns();
            let token = status.fencing_token();
            let after = monotonic_ns();
            match token {
                Some(token) => {
                    let _ = lines.send(format!("s 0 {token} {before} {after}\n"));
                    was_leading = true;
                }
                None if was_leading => {
                    let _ = lines.send(format!("n 0 {before} {after}\n"));
                    was_leading = false;
                }
                None => {}
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    (sampler, writer)
}

/// Prints `election`'s losses and resignations for the orchestrator (its elections are
/// printed by the holder, once the term's `e` record is on disk).
fn print_events(election: &Election) -> tokio::task::JoinHandle<()> {
    let mut events = election.subscribe();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Lost { fencing_token, .. } => stdout_line(&format!("lost {fencing_token}")),
                Event::Resigned { fencing_token } => {
                    stdout_line(&format!("resigned {fencing_token}"));
                }
                _ => {}
            }
        }
    })
}

/// A driver broken on purpose (see [`Unsafe`]), for the tests that show the checker
/// catches it.
struct Broken {
    inner: Arc<dyn leader_core::Driver>,
    mode: Unsafe,
}

impl Broken {
    fn lie(&self, grant: leader_core::Grant) -> leader_core::Grant {
        match self.mode {
            Unsafe::Lease => {
                leader_core::Grant::new(grant.fencing_token, grant.confirmed_at, grant.ttl * 10)
            }
            // The instant the answer is in hand, not the instant the request left.
            Unsafe::AnswerTime => {
                leader_core::Grant::new(grant.fencing_token, tokio::time::Instant::now(), grant.ttl)
            }
        }
    }
}

#[leader_core::async_trait]
impl leader_core::Driver for Broken {
    async fn campaign(
        &self,
        candidate: &leader_core::Candidate,
    ) -> leader_core::Result<leader_core::Grant> {
        Ok(self.lie(self.inner.campaign(candidate).await?))
    }

    async fn renew(
        &self,
        candidate: &leader_core::Candidate,
        grant: &leader_core::Grant,
    ) -> leader_core::Result<leader_core::Grant> {
        Ok(self.lie(self.inner.renew(candidate, grant).await?))
    }

    async fn resign(
        &self,
        candidate: &leader_core::Candidate,
        fencing_token: Option<u64>,
    ) -> leader_core::Result<()> {
        self.inner.resign(candidate, fencing_token).await
    }

    async fn leader(&self, election: &str) -> leader_core::Result<Option<leader_core::LeaderInfo>> {
        self.inner.leader(election).await
    }

    fn observe(
        &self,
        election: &str,
    ) -> futures::stream::BoxStream<'static, leader_core::Result<Option<leader_core::LeaderInfo>>>
    {
        self.inner.observe(election)
    }

    fn term_gone(
        &self,
        candidate: &leader_core::Candidate,
        fencing_token: u64,
    ) -> futures::future::BoxFuture<'static, ()> {
        self.inner.term_gone(candidate, fencing_token)
    }

    fn check_name(&self, election: &str) -> leader_core::Result<()> {
        self.inner.check_name(election)
    }
}

/// Asks for real-time scheduling of the sampler thread (it sleeps almost all the time), so
/// that a busy machine does not leave gaps in its samples: `chrt` as root, else a lower
/// nice value, else nothing (the checker then reports the gaps).
fn prioritize_this_thread() {
    let tid = nix::unistd::gettid().to_string();
    if !quiet("chrt", &["-f", "-p", "10", &tid]) {
        quiet("renice", &["-n", "-15", "-p", &tid]);
    }
}

/// Runs a small command, quietly; whether it succeeded.
fn quiet(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The term's `x` record: its end and its final deadline.
fn log_end(log: &Log, index: usize, term: &leader_core::Term) -> std::io::Result<()> {
    if let Some(ended) = term.ended_at() {
        log.write(&format!(
            "x {index} {} {} {}\n",
            term.fencing_token(),
            to_monotonic_ns(ended),
            to_monotonic_ns(term.deadline())
        ))?;
    }
    Ok(())
}
