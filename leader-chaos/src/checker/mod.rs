//! The checker: reads what the candidate processes logged (see the `chaos-candidate`
//! binary for the format) and checks the safety properties, election by election.
//!
//! **Exact check.** For every pair of consecutive terms of an election (by fencing token,
//! across all processes), the new term's first instant of belief (`Term::elected_at`) must
//! not be before the previous term's last instant of belief: the earlier of the instant it
//! ended (`Term::ended_at`) and its last deadline. Every deadline comes from the library
//! itself (`ElectionBuilder::on_deadline`, written before `is_leader()` relies on it, and
//! the final one in the end record), so nothing is sampled; the instants are on
//! CLOCK_MONOTONIC, one clock for every process of the machine. A final deadline later than
//! every deadline the hook logged fails the run (the log would be missing one).
//!
//! **Cross-checks from the samples** (election 0's `is_leader()` every millisecond): an
//! overlap of two processes' sampled spans fails the run (and is reported beside the ones
//! that overlap only within a sample's own duration); so do a "leader" sample taken after
//! the term's logged last instant of belief, a false→true flip within a term, a gap of more
//! than 5 ms between two "leader" samples of a term across another term's start or end
//! (outside a pause the orchestrator caused), and a term that lasted over 5 ms without a
//! single sample. A line that cannot be read fails the run, except the last line of a
//! killed process (cut short by SIGKILL).
//!
//! **Tampering.** An overlap right after the orchestrator deleted the leader's key or
//! revoked its lease is excused only if the old term's belief ended within the store's
//! bound of the tampering; every one is listed ([`Check::tampering`]).

mod log;
mod observer;

pub use log::{ProcessLog, TermLog, last_deadline, read_log};
pub use observer::{Observed, compare_observer, read_observer_log};

use std::collections::{BTreeMap, HashMap};

/// How far apart two conversions of one `Instant` to CLOCK_MONOTONIC may land.
const CONVERSION_SLACK_NS: u64 = 50_000;

/// The longest gap allowed between two "leader" samples of one term.
pub const MAX_SAMPLE_GAP_NS: u64 = 5_000_000;

/// Two consecutive terms whose beliefs overlapped, as instants (for the timeline; the
/// [`Check`] lists say the same in words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Overlap {
    /// The election (0: the one the orchestrator drives).
    pub election: usize,
    /// The earlier term's token.
    pub earlier: u64,
    /// The process that held it.
    pub earlier_process: usize,
    /// The later term's token.
    pub later: u64,
    /// The process that held it.
    pub later_process: usize,
    /// When the later term began (the overlap's start).
    pub from_ns: u64,
    /// The earlier term's last instant of belief (the overlap's end).
    pub to_ns: u64,
    /// Whether the orchestrator had deleted the earlier term's key or revoked its lease,
    /// and the earlier term's belief ended within the bound after that (excused).
    pub after_tampering: bool,
}

/// The orchestrator deleted the key of, or revoked the lease of, election 0's term
/// `token`, sending the request at `at_ns`; the store answered at `answered_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tampering {
    /// The leader's term.
    pub token: u64,
    /// When the deleting (revoking) request was sent.
    pub at_ns: u64,
    /// When the store answered it (the tampering had taken effect).
    pub answered_ns: u64,
    /// For a revoked lease: the process that held it. On etcd a process's elections share
    /// its lease, so the revocation ends every term it held then, in every election.
    pub lease_of: Option<usize>,
}

/// What came of one [`Tampering`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TamperOutcome {
    /// The tampered term.
    pub token: u64,
    /// When the request was sent (CLOCK_MONOTONIC).
    pub at_ns: u64,
    /// How long the store took to answer it.
    pub answered_after_ns: u64,
    /// From the request to the old term's last instant of belief (0 if it had ended).
    pub to_end_ns: Option<u64>,
    /// How long the next term overlapped the old one, if it did.
    pub overlap_ns: Option<u64>,
    /// Whether that overlap ended within the bound after the store's answer (excused); an
    /// overlap past it fails.
    pub within_bound: bool,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Check {
    /// Terms checked exactly (every election).
    pub terms: usize,
    /// Terms of election 0 (the one the orchestrator drives, samples and observes).
    pub driven_terms: usize,
    /// Elections with at least one term.
    pub elections: usize,
    /// Deadlines the library's hook logged.
    pub deadlines: usize,
    /// Consecutive terms whose beliefs overlapped: a safety violation.
    pub overlaps: Vec<String>,
    /// Every exact overlap, after tampering or not, as instants.
    pub overlap_spans: Vec<Overlap>,
    /// Overlaps right after the orchestrator deleted the leader's key or revoked its lease
    /// (tampering takes away the lease the guarantee rests on), within the bound:
    /// reported, not failed.
    pub overlaps_after_tampering: Vec<String>,
    /// Every tampering and what came of it.
    pub tampering: Vec<TamperOutcome>,
    /// The bound an overlap after tampering must end within.
    pub tamper_bound_ns: u64,
    /// Terms whose final deadline is later than every deadline the hook logged.
    pub unlogged_deadlines: Vec<String>,
    /// Pairs of different processes' sampled spans that surely overlapped.
    pub sampled_overlaps: Vec<String>,
    /// Pairs whose sampled spans overlap only within a sample's duration.
    pub jitter_overlaps: usize,
    /// "leader" samples taken after the term's logged last instant of belief.
    pub late_samples: Vec<String>,
    /// False→true flips within a term.
    pub flips: Vec<String>,
    /// Sampling gaps over 5 ms while leading, outside the orchestrator's pauses, during
    /// which another process's term began or ended: the samples could not cross-check
    /// that handover (the exact check still did).
    pub gaps: Vec<String>,
    /// Sampling gaps over 5 ms with no handover in them (a busy machine descheduled the
    /// sampler): reported, not failed.
    pub quiet_gaps: usize,
    /// The longest gap between two "leader" samples of a term, outside pauses.
    pub max_gap_ns: u64,
    /// Terms that lasted over 5 ms without a sample, or were logged without an `e`
    /// record.
    pub unsampled: Vec<String>,
    /// Unreadable log lines.
    pub unreadable: Vec<String>,
    /// Fencing tokens reused by two processes, or not increasing with time.
    pub token_violations: Vec<String>,
}

impl Check {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    /// Every violation, one per line.
    pub fn violations(&self) -> Vec<String> {
        [
            &self.overlaps,
            &self.unlogged_deadlines,
            &self.sampled_overlaps,
            &self.late_samples,
            &self.flips,
            &self.gaps,
            &self.unsampled,
            &self.unreadable,
            &self.token_violations,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

/// Checks the logs. `pauses` are (process, from, to) windows in which the orchestrator
/// stopped a process (its sampler could not run); `tampered` the keys it deleted or the
/// leases it revoked, and `tamper_bound_ns` how soon after that the old term's belief must
/// end for an overlap to be excused.
pub fn check(
    logs: &[ProcessLog],
    pauses: &[(usize, u64, u64)],
    tampered: &[Tampering],
    tamper_bound_ns: u64,
) -> Check {
    let mut result = Check {
        tamper_bound_ns,
        ..Check::default()
    };
    let mut by_token: BTreeMap<usize, BTreeMap<u64, &TermLog>> = BTreeMap::new();
    let mut owner: HashMap<(usize, u64), usize> = HashMap::new();
    // Instants at which some process's term of election 0 began or ended.
    let handovers: Vec<(usize, u64)> = logs
        .iter()
        .flat_map(|log| log.terms_of(0))
        .flat_map(|t| {
            [t.elected_ns, Some(t.belief_end_ns())]
                .into_iter()
                .flatten()
                .map(move |at| (t.process, at))
        })
        .collect();
    for log in logs {
        result.flips.extend(log.flips.iter().cloned());
        result.unreadable.extend(log.unreadable.iter().cloned());
        for &(token, at) in &log.late_samples {
            result.late_samples.push(format!(
                "process {}: term {token} sampled \"leader\" at {at}, after its last logged \
                 instant of belief",
                log.process
            ));
        }
        for &(token, from, to) in &log.gaps {
            let paused = pauses
                .iter()
                .any(|&(p, start, end)| p == log.process && start < to && from < end);
            if paused {
                continue;
            }
            result.max_gap_ns = result.max_gap_ns.max(to - from);
            if to - from <= MAX_SAMPLE_GAP_NS {
                continue;
            }
            let hid_a_handover = handovers
                .iter()
                .any(|&(p, at)| p != log.process && from <= at && at <= to);
            if !hid_a_handover {
                result.quiet_gaps += 1;
                continue;
            }
            result.gaps.push(format!(
                "process {}: term {token} unsampled for {:.1} ms while another term began or \
                 ended",
                log.process,
                (to - from) as f64 / 1e6
            ));
        }
        for term in log.terms.values() {
            let key = (term.election, term.token);
            if let Some(&other) = owner.get(&key) {
                result.token_violations.push(format!(
                    "election {}: token {} used by processes {other} and {}",
                    term.election, term.token, term.process
                ));
                continue;
            }
            owner.insert(key, term.process);
            result.deadlines += term.deadlines;
            // The same instant converted twice to CLOCK_MONOTONIC differs by the time
            // between two clock readings: a few microseconds are the same deadline.
            if let Some(last) = term.final_deadline_ns
                && term
                    .hooked_deadline_ns
                    .is_none_or(|hooked| last > hooked + CONVERSION_SLACK_NS)
            {
                result.unlogged_deadlines.push(format!(
                    "process {}: election {} term {} ended with a deadline ({last}) the hook \
                     never logged (latest logged: {:?})",
                    term.process, term.election, term.token, term.hooked_deadline_ns
                ));
            }
            match term.elected_ns {
                None => result.unsampled.push(format!(
                    "process {}: election {} term {} logged but its election never was",
                    term.process, term.election, term.token
                )),
                Some(elected) => {
                    let lasted = term.belief_end_ns().saturating_sub(elected);
                    let killed_unended = term.ended_ns.is_none();
                    if term.election == 0
                        && term.samples == 0
                        && lasted > MAX_SAMPLE_GAP_NS
                        && !killed_unended
                    {
                        result.unsampled.push(format!(
                            "process {}: term {} lasted {:.1} ms without a sample",
                            term.process,
                            term.token,
                            lasted as f64 / 1e6
                        ));
                    }
                    by_token
                        .entry(term.election)
                        .or_default()
                        .insert(term.token, term);
                }
            }
            result.terms += 1;
            if term.election == 0 {
                result.driven_terms += 1;
            }
        }
    }
    result.elections = by_token.len();
    // The bound counts from the store's answer: the tampering had taken effect by then.
    let tampered_at: HashMap<u64, u64> =
        tampered.iter().map(|t| (t.token, t.answered_ns)).collect();
    let mut tamper_overlaps: HashMap<u64, (u64, bool)> = HashMap::new();
    // Exact: consecutive terms of each election, by token.
    for (&election, terms) in &by_token {
        let terms: Vec<&TermLog> = terms.values().copied().collect();
        for pair in terms.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let (Some(a_elected), Some(b_elected)) = (a.elected_ns, b.elected_ns) else {
                continue;
            };
            if b_elected < a_elected {
                result.token_violations.push(format!(
                    "election {election}: term {} (process {}) began before term {} (process {})",
                    b.token, b.process, a.token, a.process
                ));
            }
            let a_end = a.belief_end_ns();
            if b_elected >= a_end {
                continue;
            }
            let what = format!(
                "election {election}: term {} (process {}) began {:.3} ms before term {} \
                 (process {}) ended",
                b.token,
                b.process,
                (a_end - b_elected) as f64 / 1e6,
                a.token,
                a.process
            );
            let tampering = (election == 0)
                .then(|| tampered_at.get(&a.token).copied())
                .flatten()
                .or_else(|| {
                    tampered
                        .iter()
                        .find(|t| {
                            t.lease_of == Some(a.process) && (a_elected..=a_end).contains(&t.at_ns)
                        })
                        .map(|t| t.answered_ns)
                });
            let excused = tampering.is_some_and(|at| a_end <= at.saturating_add(tamper_bound_ns));
            if let Some(at) = tampering {
                if election == 0 {
                    tamper_overlaps.insert(a.token, (a_end - b_elected, excused));
                }
                if !excused {
                    result.overlaps.push(format!(
                        "{what}: after tampering, but it ended {:.3} ms after the store \
                         confirmed the tampering (bound {:.3} ms)",
                        a_end.saturating_sub(at) as f64 / 1e6,
                        tamper_bound_ns as f64 / 1e6
                    ));
                }
            }
            result.overlap_spans.push(Overlap {
                election,
                earlier: a.token,
                earlier_process: a.process,
                later: b.token,
                later_process: b.process,
                from_ns: b_elected,
                to_ns: a_end,
                after_tampering: excused,
            });
            if excused {
                result.overlaps_after_tampering.push(what);
            } else if tampering.is_none() {
                result.overlaps.push(what);
            }
        }
    }
    let driven = by_token.get(&0);
    for t in tampered {
        let overlap = tamper_overlaps.get(&t.token);
        result.tampering.push(TamperOutcome {
            token: t.token,
            at_ns: t.at_ns,
            answered_after_ns: t.answered_ns.saturating_sub(t.at_ns),
            to_end_ns: driven
                .and_then(|terms| terms.get(&t.token))
                .map(|term| term.belief_end_ns().saturating_sub(t.at_ns)),
            overlap_ns: overlap.map(|(ns, _)| *ns),
            within_bound: overlap.is_none_or(|(_, excused)| *excused),
        });
    }
    // Cross-check: sampled spans of different processes (election 0).
    // (process, token, sure span, widest span)
    type Sampled = (usize, u64, (u64, u64), (u64, u64));
    let spans: Vec<Sampled> = logs
        .iter()
        .flat_map(|log| log.terms_of(0))
        .filter_map(|t| {
            let (first, last) = (t.first_sample?, t.last_sample?);
            Some((t.process, t.token, (first.1, last.0), (first.0, last.1)))
        })
        .collect();
    let meet = |a: (u64, u64), b: (u64, u64)| a.0.max(b.0) < a.1.min(b.1);
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.0 == b.0 {
                continue;
            }
            if meet(a.2, b.2) {
                let what = format!(
                    "sampled: terms {} (process {}) and {} (process {}) both said \"leader\"",
                    a.1, a.0, b.1, b.0
                );
                // Excused with the exact overlap it shows, if that was.
                let excused = tamper_overlaps
                    .get(&a.1.min(b.1))
                    .is_some_and(|(_, excused)| *excused);
                if excused {
                    result.overlaps_after_tampering.push(what);
                } else {
                    result.sampled_overlaps.push(what);
                }
            } else if meet(a.3, b.3) {
                result.jitter_overlaps += 1;
            }
        }
    }
    result
}

/// How long, within `from..to`, no working term of election 0 believed it led (by the
/// exact spans, less the windows in `down` when its process could not work: killed or
/// stopped, as (process, from, to)): the availability a fault cost.
pub fn leaderless_ns(logs: &[ProcessLog], down: &[(usize, u64, u64)], from: u64, to: u64) -> u64 {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for term in logs.iter().flat_map(|log| log.terms_of(0)) {
        let Some(elected) = term.elected_ns else {
            continue;
        };
        let mut pieces = vec![(elected.max(from), term.belief_end_ns().min(to))];
        for &(process, down_from, down_to) in down {
            if process != term.process {
                continue;
            }
            pieces = pieces
                .into_iter()
                .flat_map(|(a, b)| [(a, b.min(down_from)), (a.max(down_to), b)])
                .filter(|(a, b)| a < b)
                .collect();
        }
        spans.extend(pieces.into_iter().filter(|(a, b)| a < b));
    }
    spans.sort_unstable();
    let mut covered = 0;
    let mut reach = from;
    for (a, b) in spans {
        if b <= reach {
            continue;
        }
        covered += b - a.max(reach);
        reach = b;
    }
    to.saturating_sub(from).saturating_sub(covered)
}

#[cfg(test)]
mod tests;
