//! One chaos candidate: campaigns, holds each term until it ends, campaigns again (with
//! backoff) until SIGTERM, then resigns. It records what the exact checker needs in its log
//! file, one line per record, each written with a single `write(2)` on CLOCK_MONOTONIC
//! nanoseconds:
//!
//! ```text
//! e TOKEN ELECTED_NS DEADLINE_NS   a term began (Term::elected_at: the first instant of belief)
//! d TOKEN DEADLINE_NS              the term's deadline moved (a renewal)
//! x TOKEN ENDED_NS                 the term ended (Term::ended_at: the last instant of belief,
//!                                  unless its deadline came first)
//! s TOKEN BEFORE_NS AFTER_NS       a sample of is_leader() that said "leader"
//! n BEFORE_NS AFTER_NS             the first sample that said "not leader" after one that did
//! ```
//!
//! The sampler is a plain thread that checks `status.is_leader()` every millisecond, as a
//! cross-check of the transitions. Its stdout carries events for the orchestrator, each with
//! the CLOCK_MONOTONIC time it was seen: `campaigning ns`, `elected T ns`, `lost T ns`,
//! `resigned T ns`, and `resigning ns` when SIGTERM starts the resignation.
//!
//! ```text
//! chaos-candidate <store url> <election> <ttl ms> <log file> [--unsafe]
//! ```
//!
//! `--unsafe` exists only to show that the checker catches a broken candidate: its driver
//! claims leases ten times longer than the store grants, so its deadlines ignore the real
//! lease, as a leader that never notices it lost its lease would.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use leader_chaos::{monotonic_ns, to_monotonic_ns};
use leader_core::{CancellationToken, Election, Event};
use tokio::signal::unix::{SignalKind, signal};

fn main() {
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
    runtime.block_on(start());
}

async fn start() {
    let args: Vec<String> = std::env::args().collect();
    if !(args.len() == 5 || args.len() == 6 && args[5] == "--unsafe") {
        eprintln!("usage: chaos-candidate STORE_URL ELECTION TTL_MS LOG_FILE [--unsafe]");
        std::process::exit(2);
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .try_init();
    if let Err(err) = run(&args).await {
        eprintln!("chaos-candidate: {err}");
        std::process::exit(1);
    }
}

/// The log file, shared by the sampler thread and the main loop.
#[derive(Clone)]
struct Log(Arc<Mutex<std::fs::File>>);

impl Log {
    fn write(&self, line: String) -> std::io::Result<()> {
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

async fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let ttl = Duration::from_millis(args[3].parse()?);
    // A candidate started while the store restarts (after a fault) waits for it, as a
    // service would; only a refusal or a bad URL ends it.
    let mut delay = Duration::from_millis(50);
    let mut driver = loop {
        match leader::connect(&args[1]).await {
            Ok(driver) => break driver,
            Err(err) if err.is_transient() => {
                eprintln!("chaos-candidate: connecting: {err}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(err) => return Err(err.into()),
        }
    };
    if args.get(5).is_some_and(|flag| flag == "--unsafe") {
        driver = Arc::new(Unsafe(driver));
    }
    let (retry_min, retry_max) = (Duration::from_millis(50), ttl);
    let election = Election::builder(driver, args[2].clone())
        .ttl(ttl)
        .retry(retry_min, retry_max)
        .build()?;
    let log = Log(Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args[4])?,
    )));

    let status = election.status();
    let done = CancellationToken::new();
    // The sampler does no I/O (a write can stall for milliseconds on a busy disk and
    // would show as a gap in the samples): it hands its lines to a writer thread. The few
    // lines in flight when the process is SIGKILLed are lost, as a torn tail would be.
    let (lines, written) = std::sync::mpsc::channel::<String>();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            for line in written {
                log.write(line)?;
            }
            Ok(())
        })
    };
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            prioritize_this_thread();
            let mut was_leading = false;
            let mut last_deadline: Option<(u64, std::time::Instant)> = None;
            while !done.is_cancelled() {
                let before = monotonic_ns();
                let token = status.fencing_token();
                let after = monotonic_ns();
                match token {
                    Some(token) => {
                        let _ = lines.send(format!("s {token} {before} {after}\n"));
                        if let Some(deadline) = status.deadline()
                            && last_deadline != Some((token, deadline))
                        {
                            last_deadline = Some((token, deadline));
                            let _ =
                                lines.send(format!("d {token} {}\n", to_monotonic_ns(deadline)));
                        }
                        was_leading = true;
                    }
                    None if was_leading => {
                        let _ = lines.send(format!("n {before} {after}\n"));
                        was_leading = false;
                    }
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let mut events = election.subscribe();
    let printer = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                // Printed by the main loop, once the term's `e` record is on disk.
                Event::Elected { .. } => {}
                Event::Lost { fencing_token, .. } => stdout_line(&format!("lost {fencing_token}")),
                Event::Resigned { fencing_token } => {
                    stdout_line(&format!("resigned {fencing_token}"));
                }
                _ => {}
            }
        }
    });

    // Election::run's loop, written out so that each Term's instants can be logged.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut delay = retry_min;
    let result = loop {
        stdout_line("campaigning");
        let campaigned = tokio::select! {
            biased;
            _ = sigterm.recv() => break Ok(()),
            campaigned = election.campaign() => campaigned,
        };
        match campaigned {
            Ok(term) => {
                let token = term.fencing_token();
                log.write(format!(
                    "e {token} {} {}\n",
                    to_monotonic_ns(term.elected_at()),
                    to_monotonic_ns(term.deadline())
                ))?;
                stdout_line(&format!("elected {token}"));
                let shutdown = tokio::select! {
                    biased;
                    _ = sigterm.recv() => true,
                    () = term.ended() => false,
                };
                if shutdown {
                    stdout_line("resigning");
                    let mut resigned = term.resign().await;
                    log_end(&log, &term)?;
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
                    break resigned.or_else(|err| match err {
                        leader_core::Error::NotALeader => Ok(()),
                        err => Err(err),
                    });
                }
                log_end(&log, &term)?;
                if term
                    .ended_at()
                    .zip(Some(term.elected_at()))
                    .is_some_and(|(end, start)| end.duration_since(start) >= ttl)
                {
                    delay = retry_min;
                }
            }
            Err(err) if !err.is_transient() => break Err(err),
            Err(_) => {}
        }
        tokio::select! {
            biased;
            _ = sigterm.recv() => break Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(retry_max);
    };
    done.cancel();
    let sampled = sampler.join();
    let written = writer.join();
    drop(election);
    let _ = tokio::time::timeout(Duration::from_millis(200), printer).await;
    if sampled.is_err() {
        return Err("the sampler panicked".into());
    }
    match written {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(format!("writing the log: {err}").into()),
        Err(_) => return Err("the log writer panicked".into()),
    }
    result?;
    Ok(())
}

/// A driver that lies about its leases (ten times the TTL the store applies): for the
/// test that shows the checker catches a candidate whose deadlines ignore its lease.
struct Unsafe(Arc<dyn leader_core::Driver>);

#[leader_core::async_trait]
impl leader_core::Driver for Unsafe {
    async fn campaign(
        &self,
        candidate: &leader_core::Candidate,
    ) -> leader_core::Result<leader_core::Grant> {
        let grant = self.0.campaign(candidate).await?;
        Ok(leader_core::Grant::new(
            grant.fencing_token,
            grant.confirmed_at,
            grant.ttl * 10,
        ))
    }

    async fn renew(
        &self,
        candidate: &leader_core::Candidate,
        grant: &leader_core::Grant,
    ) -> leader_core::Result<leader_core::Grant> {
        let renewed = self.0.renew(candidate, grant).await?;
        Ok(leader_core::Grant::new(
            renewed.fencing_token,
            renewed.confirmed_at,
            renewed.ttl * 10,
        ))
    }

    async fn resign(
        &self,
        candidate: &leader_core::Candidate,
        fencing_token: Option<u64>,
    ) -> leader_core::Result<()> {
        self.0.resign(candidate, fencing_token).await
    }

    async fn leader(&self, election: &str) -> leader_core::Result<Option<leader_core::LeaderInfo>> {
        self.0.leader(election).await
    }

    fn observe(
        &self,
        election: &str,
    ) -> futures::stream::BoxStream<'static, leader_core::Result<Option<leader_core::LeaderInfo>>>
    {
        self.0.observe(election)
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

fn log_end(log: &Log, term: &leader_core::Term) -> std::io::Result<()> {
    if let Some(ended) = term.ended_at() {
        log.write(format!(
            "x {} {}\n",
            term.fencing_token(),
            to_monotonic_ns(ended)
        ))?;
    }
    Ok(())
}
