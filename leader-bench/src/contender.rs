//! Handoffs between candidate processes: ours (`leader-bench candidate`) or `etcdctl
//! elect`, timed from the leader's signal to the next one's line.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use hdrhistogram::Histogram;
use leader_testkit::LineProcess;
use tokio::process::Command;
use tokio::time::{Instant, sleep};

use crate::BoxResult;
use crate::stats::{histogram, last_number, record};

/// Time a freshly started waiter gets to enter the election before it is needed.
pub(crate) const SETTLE: Duration = Duration::from_millis(150);

/// Whether line `.0` says that process number `.1` leads.
type ElectedLine = Box<dyn Fn(&str, usize) -> bool + Send + Sync>;

/// How to start a candidate process and recognise that it leads.
pub(crate) struct Contender {
    spawn: Box<dyn Fn(usize) -> Command + Send + Sync>,
    elected: ElectedLine,
    /// A resigned leader stays up until signalled again (ours with `Exit::AfterHandoff`).
    stays: bool,
}

/// When our resigned leader process exits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Right after resign() returns, as a service stopping does: its sessions end while
    /// the next candidate takes over.
    AfterResign,
    /// Once the next candidate leads (a second signal): the handoff alone, as in a
    /// baseline where nobody exits.
    AfterHandoff,
}

/// What [`handoffs`] timed.
pub(crate) struct Handoffs {
    /// From the signal to the new leader's line, as the orchestrator sees it.
    pub(crate) by_signal: Histogram<u64>,
    /// From the start of the resignation to the new leader's election, both on
    /// CLOCK_MONOTONIC as the candidates report them (ours only; empty for `etcdctl`).
    pub(crate) resign_to_elected: Histogram<u64>,
}

fn spawn(contender: &Contender, i: usize) -> BoxResult<LineProcess> {
    Ok(LineProcess::spawn(
        (contender.spawn)(i).stderr(Stdio::null()),
    )?)
}

/// Repeats: signal the leader, time until the waiter says it leads, start a new waiter.
/// `phase(i)` is how long the `i`th leader holds before its signal.
pub(crate) async fn handoffs(
    contender: &Contender,
    signal: &str,
    count: usize,
    phase: impl Fn(usize) -> Duration,
) -> BoxResult<Handoffs> {
    let mut by_signal = histogram();
    let mut resign_to_elected = histogram();
    let mut procs: VecDeque<(usize, LineProcess)> = VecDeque::new();
    let mut first = spawn(contender, 0)?;
    first
        .wait_for_line(Duration::from_secs(20), |l| (contender.elected)(l, 0))
        .await
        .map_err(|err| format!("the first candidate was not elected: {err}"))?;
    procs.push_back((0, first));
    procs.push_back((1, spawn(contender, 1)?));
    sleep(SETTLE).await;
    for i in 0..count {
        let (_, mut leader) = procs.pop_front().ok_or("no leader")?;
        let (id, mut waiter) = procs.pop_front().ok_or("no waiter")?;
        sleep(phase(i)).await;
        let started = Instant::now();
        leader.signal(signal)?;
        let elected = waiter
            .wait_for_line(Duration::from_secs(60), |l| (contender.elected)(l, id))
            .await?;
        record(&mut by_signal, started.elapsed());
        // A killed leader says nothing more; one that resigns said when it started.
        let resigning = match signal {
            "KILL" => None,
            _ => leader
                .wait_for_line(Duration::from_secs(2), |l| l.starts_with("resigning"))
                .await
                .ok(),
        };
        if let (Some(elected_ns), Some(resigning_ns)) = (
            last_number(&elected),
            resigning.as_deref().and_then(last_number),
        ) {
            record(
                &mut resign_to_elected,
                Duration::from_nanos(elected_ns.saturating_sub(resigning_ns)),
            );
        }
        if contender.stays {
            leader.signal(signal)?;
        }
        let _ = leader.wait(Duration::from_secs(10)).await;
        procs.push_back((id, waiter));
        let next = i + 2;
        procs.push_back((next, spawn(contender, next)?));
        sleep(SETTLE).await;
    }
    // Gone before the next measurement: a candidate still in line would be led first.
    for (_, p) in &mut procs {
        // A leader that would stay up after resigning is told not to.
        let _ = p.signal(if contender.stays { "INT" } else { signal });
        let _ = p.wait(Duration::from_secs(10)).await;
    }
    Ok(Handoffs {
        by_signal,
        resign_to_elected,
    })
}

/// Our candidate: this binary's `candidate` subcommand.
pub(crate) fn ours(
    url: String,
    ttl: Duration,
    election: String,
    exit: Exit,
) -> BoxResult<Contender> {
    let exe: PathBuf = std::env::current_exe()?;
    let ttl = humantime::format_duration(ttl).to_string();
    Ok(Contender {
        spawn: Box::new(move |_| {
            let mut c = Command::new(&exe);
            c.args([
                "candidate",
                "--store",
                &url,
                "--election",
                &election,
                "--ttl",
                &ttl,
            ]);
            if exit == Exit::AfterHandoff {
                c.arg("--stay");
            }
            c
        }),
        elected: Box::new(|line, _| line.starts_with("elected")),
        stays: exit == Exit::AfterHandoff,
    })
}

/// `etcdctl elect`, each process proposing `proposal-<i>`.
pub(crate) fn etcdctl(endpoint: String, election: String) -> Contender {
    Contender {
        spawn: Box::new(move |i| {
            let mut c = Command::new("etcdctl");
            c.env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(["elect", &election, &format!("proposal-{i}")]);
            c
        }),
        elected: Box::new(|line, i| line == format!("proposal-{i}")),
        stays: false,
    }
}
