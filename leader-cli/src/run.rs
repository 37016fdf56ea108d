//! `leader run`: campaign, run the command while leading, stop it before anyone else can
//! be elected. Each step is one log line (target `leader_cli`, info unless `--quiet`).

use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use futures::StreamExt;
use leader::{Election, Error, Event, EventStream, LossReason, StoreUrl, Term};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal as Incoming, SignalKind, signal};
use tracing::{info, warn};

use crate::check::Plan;
use crate::cli::{NO_LEADER, OK, RunArgs, USAGE};
use crate::errors::{fail, one_line, parse_store, say};
use crate::logging::TARGET;

/// The signals that stop `leader run`.
struct Stops {
    term: Incoming,
    int: Incoming,
    hup: Incoming,
}

impl Stops {
    fn new() -> Option<Self> {
        Some(Stops {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
        })
    }

    /// The next stop signal, as the one to forward to the command (SIGHUP becomes SIGTERM).
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.hup.recv() => Signal::SIGTERM,
        }
    }
}

/// `leader run`.
pub(crate) async fn run(args: RunArgs) -> ExitCode {
    let plan = Plan::new(args.timing);
    if let Err(rule) = plan.check() {
        say(&format!("unsafe settings: {rule} (see `leader check`)"));
        return ExitCode::from(USAGE);
    }
    if !which("setpriv") {
        say(
            "setpriv is needed to make the command die with `leader run`: install util-linux \
             (apt-get install util-linux)",
        );
        return ExitCode::from(USAGE);
    }
    let url = match parse_store(&args.store.store).await {
        Ok(url) => url,
        Err(code) => return code,
    };
    let driver = match leader::connect_to(&url).await {
        Ok(driver) => driver,
        Err(err) => return fail("cannot reach the store", Some(&url), &err),
    };
    let mut builder = Election::builder(driver, args.name.clone())
        .ttl(plan.ttl)
        .safety_margin(plan.margin());
    if let Some(value) = &args.value {
        builder = builder.value(value.clone());
    }
    let election = match builder.build() {
        Ok(election) => election,
        Err(err) => return fail("bad settings", None, &err),
    };
    let Some(mut stops) = Stops::new() else {
        say("cannot handle signals");
        return ExitCode::from(NO_LEADER);
    };
    // Ask the store once before standing: a store that cannot be asked is exit 3 at once,
    // not an endless retry (later outages are retried).
    let current = tokio::select! {
        biased;
        _ = stops.next() => return ExitCode::from(OK),
        current = election.leader() => current,
    };
    let current = match current {
        Ok(current) => current,
        Err(err) => return fail("cannot ask the store", Some(&url), &err),
    };
    let mut events = election.subscribe();
    let value = String::from_utf8_lossy(election.value()).into_owned();
    let leader_now = current.map(|l| l.value_lossy().into_owned());
    info!(
        target: TARGET,
        election = %args.name,
        candidate = %election.id(),
        store = %url,
        leader = leader_now.as_deref().unwrap_or(""),
        "waiting to be elected"
    );
    let (retry_min, retry_max) = (Duration::from_millis(200), Duration::from_secs(10));
    let mut delay = retry_min;
    loop {
        let campaigned = tokio::select! {
            biased;
            _ = stops.next() => return withdraw_and_exit(&election, &url).await,
            campaigned = election.campaign() => campaigned,
        };
        let term = match campaigned {
            Ok(term) => term,
            Err(err) if !err.is_transient() => {
                return fail("cannot campaign", Some(&url), &err);
            }
            Err(err) => {
                warn!(target: TARGET, store = %url, error = %one_line(&err), retry_in = ?delay, "campaign failed; trying again");
                tokio::select! {
                    biased;
                    _ = stops.next() => return withdraw_and_exit(&election, &url).await,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(retry_max);
                continue;
            }
        };
        delay = retry_min;
        match lead(&args, &plan, &term, &value, &mut stops, &mut events).await {
            Led::Exit(code) => return code,
            Led::Lost if args.once => {
                say("lost the election (--once)");
                return ExitCode::from(NO_LEADER);
            }
            Led::Lost => {
                tokio::time::sleep(retry_min).await;
                info!(target: TARGET, election = %args.name, "waiting to be elected again");
            }
        }
    }
}

/// How a term of `leader run` ended.
enum Led {
    /// Exit with this status.
    Exit(ExitCode),
    /// The term was lost; the command is gone.
    Lost,
}

/// Runs the command for `term`, until it exits, a stop signal comes, or the term ends.
async fn lead(
    args: &RunArgs,
    plan: &Plan,
    term: &Term,
    value: &str,
    stops: &mut Stops,
    events: &mut EventStream,
) -> Led {
    let token = term.fencing_token();
    info!(target: TARGET, election = %args.name, fencing_token = token, "elected");
    let mut child = match spawn(args, token, value) {
        Ok(child) => child,
        Err(err) => {
            say(&format!("cannot start {:?}: {err}", args.command[0]));
            resign(term, "the command could not start").await;
            return Led::Exit(ExitCode::from(127));
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    info!(
        target: TARGET,
        pid = group.map_or(0, Pid::as_raw),
        command = ?args.command,
        "started the command"
    );
    // The term's end, as the library reports it, or as `is_valid()` says (which also counts
    // a suspension of the machine, which the timers behind `ended()` do not).
    let lost = async {
        let mut check = tokio::time::interval(
            plan.grace
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
            // The command exited by itself: make sure nothing it started survives, hand
            // over, and exit as it did.
            let code = exited(status.ok());
            send(group, Signal::SIGKILL, "for whatever the command left behind");
            resign(term, "the command exited").await;
            return Led::Exit(code);
        }
        forward = stops.next() => Some(forward),
        () = &mut lost => None,
    };
    match ended {
        Some(forward) => {
            // Stop: the command first, then resign, then exit with its status.
            info!(target: TARGET, signal = %forward, "stopping: a signal came");
            send(group, forward, "passing the signal on");
            let status = tokio::select! {
                status = child.wait() => status.ok(),
                () = &mut lost => {
                    log_end(term, events).await;
                    stop(&mut child, group, plan.grace, term).await
                }
            };
            let code = exited(status);
            send(
                group,
                Signal::SIGKILL,
                "for whatever the command left behind",
            );
            resign(term, "stopped by a signal").await;
            Led::Exit(code)
        }
        None => {
            log_end(term, events).await;
            let status = stop(&mut child, group, plan.grace, term).await;
            exited(status);
            Led::Lost
        }
    }
}

/// Logs why `term` ended: the library's event for it if one comes, else what is known.
async fn log_end(term: &Term, events: &mut EventStream) {
    let token = term.fencing_token();
    let wait = tokio::time::timeout(Duration::from_millis(200), async {
        while let Some(event) = events.next().await {
            match event {
                Event::Lost {
                    fencing_token,
                    reason,
                } if fencing_token == token => return Some(Some(reason)),
                Event::Resigned { fencing_token } if fencing_token == token => return Some(None),
                _ => {}
            }
        }
        None
    });
    let (reason, detail) = match wait.await.ok().flatten() {
        Some(Some(LossReason::Expired)) => ("deadline", LossReason::Expired.to_string()),
        Some(Some(LossReason::Gone)) => ("key deleted", LossReason::Gone.to_string()),
        Some(Some(other)) => ("lost", other.to_string()),
        Some(None) => ("resigned", "resigned".to_owned()),
        None if std::time::Instant::now() >= term.deadline() => {
            ("deadline", "its deadline passed".to_owned())
        }
        None => ("lost", "the term ended".to_owned()),
    };
    warn!(target: TARGET, fencing_token = token, reason, detail = %detail, "the term ended; stopping the command");
}

/// Resigns `term`, logging why and how it went.
async fn resign(term: &Term, why: &str) {
    match term.resign().await {
        Ok(()) => info!(target: TARGET, fencing_token = term.fencing_token(), why, "resigned"),
        Err(Error::NotALeader) => {}
        Err(err) => {
            warn!(target: TARGET, fencing_token = term.fencing_token(), error = %one_line(&err), "could not resign; the term expires by itself")
        }
    }
}

/// The exit status a shell would give for a command that ended with `status`; logs it.
fn exited(status: Option<ExitStatus>) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = match status.map(|s| (s.code(), s.signal())) {
        Some((Some(code), _)) => {
            info!(target: TARGET, status = code, "the command exited");
            code
        }
        Some((None, Some(signal))) => {
            let name =
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
            info!(target: TARGET, signal = %name, status = 128 + signal, "the command was ended by a signal");
            128 + signal
        }
        _ => {
            warn!(target: TARGET, "the command's exit status is unknown");
            1
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
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

/// Sends `signal` to the command's group if anything is left of it, and logs it.
fn send(group: Option<Pid>, signal: Signal, why: &str) {
    if let Some(group) = group
        && killpg(group, signal).is_ok()
    {
        info!(target: TARGET, signal = %signal, group = group.as_raw(), why, "signalled the command's process group");
    }
}

/// SIGTERM to the command's group, SIGKILL to the group when `grace` is up (and once the
/// command exited, for whatever it started); its exit status.
///
/// The grace is for stopping before the term's deadline: it runs out `grace` after the
/// deadline at the latest, still inside the term's margin. A process that was paused past
/// that (SIGSTOP, a stalled VM) kills the group at once: someone else may lead already.
async fn stop(
    child: &mut Child,
    group: Option<Pid>,
    grace: Duration,
    term: &Term,
) -> Option<ExitStatus> {
    let kill_by = term.deadline() + grace;
    let grace = grace.min(kill_by.saturating_duration_since(std::time::Instant::now()));
    if grace.is_zero() {
        send(
            group,
            Signal::SIGKILL,
            "the term's deadline and grace have passed",
        );
    } else {
        send(group, Signal::SIGTERM, "the term ended");
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            send(group, Signal::SIGKILL, "the grace is up");
            child.wait().await.ok()
        }
    };
    // Whatever the command started goes too, before anyone else can be elected.
    send(
        group,
        Signal::SIGKILL,
        "for whatever the command left behind",
    );
    status
}

async fn withdraw_and_exit(election: &Election, url: &StoreUrl) -> ExitCode {
    // Dropping the campaign withdrew it; make sure the store has nothing of ours left.
    match election.resign().await {
        Ok(()) | Err(Error::NotALeader) => {
            info!(target: TARGET, "stopped by a signal while waiting; withdrew");
            ExitCode::from(OK)
        }
        Err(err) => fail("could not withdraw", Some(url), &err),
    }
}
