//! The checker: reads what the candidate processes logged (see the `chaos-candidate`
//! binary for the format) and checks the safety properties.
//!
//! **Exact check.** For every pair of consecutive terms (by fencing token, across all
//! processes), the new term's first instant of belief (`Term::elected_at`) must not be
//! before the previous term's last instant of belief: the earlier of the instant it ended
//! (`Term::ended_at`) and the last deadline its process logged. No sampling is involved;
//! the instants are the library's own, on CLOCK_MONOTONIC, one clock for every process of
//! the machine.
//!
//! **Cross-checks from the samples** (`is_leader()` every millisecond): an overlap of two
//! processes' sampled spans fails the run (and is reported beside the ones that overlap
//! only within a sample's own duration); so do a false→true flip within a term, a gap of
//! more than 5 ms between two "leader" samples of a term (outside a pause the orchestrator
//! caused), and a term that lasted over 5 ms without a single sample. A line that cannot
//! be read fails the run, except the last line of a killed process (cut short by SIGKILL).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead};
use std::path::Path;

/// The longest gap allowed between two "leader" samples of one term.
pub const MAX_SAMPLE_GAP_NS: u64 = 5_000_000;

/// Gaps over this long are kept, for the longest-gap figure.
const NOTED_GAP_NS: u64 = 2_000_000;

/// One term as one process logged it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TermLog {
    /// Which candidate process.
    pub process: usize,
    /// The term's fencing token.
    pub token: u64,
    /// The first instant of belief (`e` record), if logged.
    pub elected_ns: Option<u64>,
    /// The latest deadline logged (`e` and `d` records).
    pub last_deadline_ns: u64,
    /// When the term ended (`x` record), if logged.
    pub ended_ns: Option<u64>,
    /// "leader" samples of this term.
    pub samples: usize,
    /// (before, after) of the first and the last "leader" sample.
    pub first_sample: Option<(u64, u64)>,
    /// See `first_sample`.
    pub last_sample: Option<(u64, u64)>,
}

impl TermLog {
    /// The last instant of belief: the end, or the last deadline if that came first (or if
    /// the process was killed before it could log an end).
    pub fn belief_end_ns(&self) -> u64 {
        match self.ended_ns {
            Some(ended) => ended.min(self.last_deadline_ns),
            None => self.last_deadline_ns,
        }
    }
}

/// Everything one candidate process logged.
#[derive(Debug, Default)]
pub struct ProcessLog {
    /// Which candidate process.
    pub process: usize,
    /// Its terms, by token.
    pub terms: BTreeMap<u64, TermLog>,
    /// Flips: a term that said "leader" again after a sample said "not leader".
    pub flips: Vec<String>,
    /// Gaps over 2 ms between two "leader" samples of one term, as (token, from, to): the
    /// ones over [`MAX_SAMPLE_GAP_NS`] are violations, the others give the longest gap.
    pub gaps: Vec<(u64, u64, u64)>,
    /// Lines that could not be read.
    pub unreadable: Vec<String>,
}

/// Reads one process's log. A missing file is an empty log (the process never started);
/// an unparsable line is recorded, except a last line cut short (`torn_tail_ok`: the
/// process was killed).
pub fn read_log(process: usize, path: &Path, torn_tail_ok: bool) -> io::Result<ProcessLog> {
    let mut log = ProcessLog {
        process,
        ..ProcessLog::default()
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(log),
        Err(err) => return Err(err),
    };
    let lines: Vec<String> = io::BufReader::new(file)
        .lines()
        .collect::<io::Result<_>>()?;
    // The token of the last "leader" sample, and whether a "not leader" one came after it.
    let mut last_leader: Option<(u64, u64)> = None;
    let mut not_leader_since: Option<u64> = None;
    for (index, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let numbers: Option<Vec<u64>> = fields.iter().skip(1).map(|f| f.parse().ok()).collect();
        let record = match (fields.first().copied(), numbers.as_deref()) {
            (Some(kind), Some(numbers)) => Some((kind, numbers)),
            _ => None,
        };
        fn term(log: &mut ProcessLog, token: u64) -> &mut TermLog {
            let process = log.process;
            log.terms.entry(token).or_insert_with(|| TermLog {
                process,
                token,
                ..TermLog::default()
            })
        }
        match record {
            Some(("e", &[token, elected, deadline])) => {
                let t = term(&mut log, token);
                t.elected_ns = Some(elected);
                t.last_deadline_ns = t.last_deadline_ns.max(deadline);
            }
            Some(("d", &[token, deadline])) => {
                let t = term(&mut log, token);
                t.last_deadline_ns = t.last_deadline_ns.max(deadline);
            }
            Some(("x", &[token, ended])) => {
                term(&mut log, token).ended_ns = Some(ended);
            }
            Some(("s", &[token, before, after])) => {
                if not_leader_since.is_some() && last_leader.is_some_and(|(t, _)| t == token) {
                    log.flips.push(format!(
                        "process {process}: term {token} said \"leader\" again at {before} \
                         after \"not leader\""
                    ));
                }
                if let Some((last_token, last_after)) = last_leader
                    && last_token == token
                    && not_leader_since.is_none()
                    && before.saturating_sub(last_after) > NOTED_GAP_NS
                {
                    log.gaps.push((token, last_after, before));
                }
                let t = term(&mut log, token);
                t.samples += 1;
                t.first_sample.get_or_insert((before, after));
                t.last_sample = Some((before, after));
                last_leader = Some((token, after));
                not_leader_since = None;
            }
            Some(("n", &[before, _after])) => {
                not_leader_since = Some(before);
            }
            _ if index + 1 == lines.len() && torn_tail_ok => {}
            _ => log
                .unreadable
                .push(format!("process {process}, line {}: {line:?}", index + 1)),
        }
    }
    Ok(log)
}

/// Two consecutive terms whose beliefs overlapped, as instants (for the timeline; the
/// [`Check`] lists say the same in words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
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
    /// Whether the orchestrator had deleted the earlier term's key or revoked its lease
    /// (reported, not failed).
    pub after_tampering: bool,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Check {
    /// Terms checked exactly.
    pub terms: usize,
    /// Consecutive terms whose beliefs overlapped: a safety violation.
    pub overlaps: Vec<String>,
    /// Every exact overlap, after tampering or not, as instants.
    pub overlap_spans: Vec<Overlap>,
    /// Overlaps right after the orchestrator deleted the leader's key or revoked its lease
    /// (tampering takes away the lease the guarantee rests on): reported, not failed.
    pub overlaps_after_tampering: Vec<String>,
    /// Pairs of different processes' sampled spans that surely overlapped.
    pub sampled_overlaps: Vec<String>,
    /// Pairs whose sampled spans overlap only within a sample's duration.
    pub jitter_overlaps: usize,
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
    /// Terms that lasted over 5 ms without a sample, or were sampled without an `e`
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
        self.overlaps.is_empty()
            && self.sampled_overlaps.is_empty()
            && self.flips.is_empty()
            && self.gaps.is_empty()
            && self.unsampled.is_empty()
            && self.unreadable.is_empty()
            && self.token_violations.is_empty()
    }

    /// Every violation, one per line.
    pub fn violations(&self) -> Vec<String> {
        [
            &self.overlaps,
            &self.sampled_overlaps,
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
/// stopped a process (its sampler could not run); `tampered` are the tokens of terms
/// whose key the orchestrator deleted or whose lease it revoked.
pub fn check(logs: &[ProcessLog], pauses: &[(usize, u64, u64)], tampered: &[u64]) -> Check {
    let mut result = Check::default();
    let mut by_token: BTreeMap<u64, &TermLog> = BTreeMap::new();
    let mut owner: HashMap<u64, usize> = HashMap::new();
    // Instants at which some process's term began or ended: (process, instant).
    let handovers: Vec<(usize, u64)> = logs
        .iter()
        .flat_map(|log| log.terms.values())
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
            if let Some(&other) = owner.get(&term.token) {
                result.token_violations.push(format!(
                    "token {} used by processes {other} and {}",
                    term.token, term.process
                ));
                continue;
            }
            owner.insert(term.token, term.process);
            match term.elected_ns {
                None => result.unsampled.push(format!(
                    "process {}: term {} sampled but its election was never logged",
                    term.process, term.token
                )),
                Some(elected) => {
                    let lasted = term.belief_end_ns().saturating_sub(elected);
                    let killed_unended = term.ended_ns.is_none();
                    if term.samples == 0 && lasted > MAX_SAMPLE_GAP_NS && !killed_unended {
                        result.unsampled.push(format!(
                            "process {}: term {} lasted {:.1} ms without a sample",
                            term.process,
                            term.token,
                            lasted as f64 / 1e6
                        ));
                    }
                    by_token.insert(term.token, term);
                }
            }
            result.terms += 1;
        }
    }
    // Exact: consecutive terms, by token.
    let terms: Vec<&TermLog> = by_token.values().copied().collect();
    for pair in terms.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (Some(a_elected), Some(b_elected)) = (a.elected_ns, b.elected_ns) else {
            continue;
        };
        if b_elected < a_elected {
            result.token_violations.push(format!(
                "term {} (process {}) began before term {} (process {})",
                b.token, b.process, a.token, a.process
            ));
        }
        let a_end = a.belief_end_ns();
        if b_elected < a_end {
            let what = format!(
                "term {} (process {}) began {:.3} ms before term {} (process {}) ended",
                b.token,
                b.process,
                (a_end - b_elected) as f64 / 1e6,
                a.token,
                a.process
            );
            let after_tampering = tampered.contains(&a.token);
            result.overlap_spans.push(Overlap {
                earlier: a.token,
                earlier_process: a.process,
                later: b.token,
                later_process: b.process,
                from_ns: b_elected,
                to_ns: a_end,
                after_tampering,
            });
            if after_tampering {
                result.overlaps_after_tampering.push(what);
            } else {
                result.overlaps.push(what);
            }
        }
    }
    // Cross-check: sampled spans of different processes.
    // (process, token, sure span, widest span)
    type Sampled = (usize, u64, (u64, u64), (u64, u64));
    let spans: Vec<Sampled> = logs
        .iter()
        .flat_map(|log| log.terms.values())
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
                if tampered.contains(&a.1.min(b.1)) {
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

/// The observer's view of the store, compared with the candidates' logs.
#[derive(Debug, Default)]
pub struct Observed {
    /// Leader changes the observer saw.
    pub changes: usize,
    /// Times the observed leader's token went down: the store elected an older term after
    /// a newer one (a violation).
    pub backwards: Vec<String>,
    /// Terms some candidate led that the observer never saw (shorter than its round trip).
    pub unseen_terms: usize,
    /// Tokens the observer saw that no candidate logged: a campaign whose answer was lost
    /// after its effect landed (the key expires, or is withdrawn, unnoticed).
    pub unknown_tokens: Vec<u64>,
}

impl Observed {
    /// Whether the observer's view is consistent with the candidates'.
    pub fn passed(&self) -> bool {
        self.backwards.is_empty()
    }
}

/// Reads the observer's log: (token or none, when) per change.
pub fn read_observer_log(path: &Path) -> io::Result<Vec<(Option<u64>, u64)>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut seen = Vec::new();
    for line in io::BufReader::new(file).lines() {
        let line = line?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["o", token, at] => {
                let at = at.parse().map_err(|_| bad_line(&line))?;
                let token = match *token {
                    "-" => None,
                    token => Some(token.parse().map_err(|_| bad_line(&line))?),
                };
                seen.push((token, at));
            }
            _ => return Err(bad_line(&line)),
        }
    }
    Ok(seen)
}

fn bad_line(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("observer log: {line:?}"),
    )
}

/// Compares what the observer saw with what the candidates logged.
pub fn compare_observer(observed: &[(Option<u64>, u64)], logs: &[ProcessLog]) -> Observed {
    let logged: std::collections::BTreeSet<u64> = logs
        .iter()
        .flat_map(|log| log.terms.keys().copied())
        .collect();
    let seen: std::collections::BTreeSet<u64> =
        observed.iter().filter_map(|(token, _)| *token).collect();
    let mut result = Observed {
        changes: observed.len(),
        unseen_terms: logged.difference(&seen).count(),
        unknown_tokens: seen.difference(&logged).copied().collect(),
        ..Observed::default()
    };
    let mut highest: Option<u64> = None;
    for &(token, at) in observed {
        let Some(token) = token else { continue };
        if let Some(high) = highest
            && token < high
        {
            result.backwards.push(format!(
                "the store showed term {token} at {at}, after term {high}"
            ));
        }
        highest = highest.max(Some(token));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(process: usize, text: &str) -> ProcessLog {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, text).expect("write");
        read_log(process, &path, true).expect("read")
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_clean_handover_passes() {
        let a = log_of(
            0,
            "e 1 1000 5000\ns 1 1100 1101\ns 1 1200 1201\nx 1 1300\nn 1301 1302\n",
        );
        let b = log_of(1, "e 2 1400 9000\ns 2 1450 1451\nx 2 2000\n");
        let result = check(&[a, b], &[], &[]);
        assert!(result.passed(), "{:?}", result.violations());
        assert_eq!(result.terms, 2);
    }

    #[test]
    fn a_new_term_before_the_previous_deadline_is_an_overlap_without_any_sample() {
        // A was killed (no end): its belief lasted until its last logged deadline.
        let a = log_of(0, "e 1 1000 5000\nd 1 9000\n");
        let b = log_of(1, "e 2 8000 20000\n");
        let result = check(&[a, b], &[], &[]);
        assert_eq!(result.overlaps.len(), 1, "{result:?}");
        assert_eq!(
            result.overlap_spans,
            vec![Overlap {
                earlier: 1,
                earlier_process: 0,
                later: 2,
                later_process: 1,
                from_ns: 8000,
                to_ns: 9000,
                after_tampering: false,
            }]
        );
        let tampered = check(
            &[
                log_of(0, "e 1 1000 5000\nd 1 9000\n"),
                log_of(1, "e 2 8000 20000\n"),
            ],
            &[],
            &[1],
        );
        assert!(tampered.overlaps.is_empty());
        assert_eq!(tampered.overlaps_after_tampering.len(), 1);
        assert!(tampered.overlap_spans[0].after_tampering);
    }

    #[test]
    fn flips_gaps_unsampled_terms_and_bad_lines_fail() {
        let flip = log_of(0, "e 1 0 100000000\ns 1 10 11\nn 20 21\ns 1 30 31\n");
        assert_eq!(check(&[flip], &[], &[]).flips.len(), 1);
        let gap = format!(
            "e 1 0 {}\ns 1 10 11\ns 1 {} {}\nx 1 {}\n",
            100 * MS,
            20 * MS,
            20 * MS + 1,
            30 * MS
        );
        let gapped = log_of(0, &gap);
        let alone = check(std::slice::from_ref(&gapped), &[], &[]);
        assert!(alone.gaps.is_empty(), "no handover in the gap");
        assert_eq!(alone.quiet_gaps, 1);
        // Another process's term ended inside the gap: the samples missed a handover.
        let other = log_of(1, &format!("e 0 0 {}\nx 0 {}\n", 100 * MS, 10 * MS));
        let hiding = check(&[other, log_of(0, &gap)], &[], &[]);
        assert_eq!(hiding.gaps.len(), 1, "{hiding:?}");
        let paused = check(&[gapped], &[(0, 0, 25 * MS)], &[]);
        assert_eq!(paused.quiet_gaps, 0, "paused");
        let unsampled = log_of(0, &format!("e 1 0 {}\nx 1 {}\n", 100 * MS, 50 * MS));
        assert_eq!(check(&[unsampled], &[], &[]).unsampled.len(), 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, "e 1 0 10\nbogus\ns 1 2").expect("write");
        let killed = read_log(0, &path, true).expect("read");
        assert_eq!(
            killed.unreadable.len(),
            1,
            "only the torn last line is forgiven"
        );
        let clean_exit = read_log(0, &path, false).expect("read");
        assert_eq!(clean_exit.unreadable.len(), 2);
    }

    #[test]
    fn the_observer_must_never_see_an_older_term_after_a_newer_one() {
        let logs = [log_of(0, "e 1 0 10\nx 1 5\ne 3 20 30\nx 3 25\n")];
        let fine = compare_observer(
            &[(Some(1), 1), (None, 6), (Some(2), 7), (Some(3), 21)],
            &logs,
        );
        assert!(fine.passed());
        assert_eq!(fine.unknown_tokens, vec![2]);
        let back = compare_observer(&[(Some(3), 21), (Some(1), 22)], &logs);
        assert_eq!(back.backwards.len(), 1);
        assert_eq!(compare_observer(&[], &logs).unseen_terms, 2);
    }

    #[test]
    fn sampled_overlaps_and_reused_or_backward_tokens_fail() {
        let a = log_of(0, "e 1 0 1000\ns 1 10 11\ns 1 100 101\nx 1 200\n");
        let b = log_of(1, "e 2 300 1000\ns 2 50 51\ns 2 400 401\nx 2 500\n");
        let result = check(&[a, b], &[], &[]);
        assert_eq!(result.sampled_overlaps.len(), 1, "{result:?}");
        let reused = check(
            &[
                log_of(0, "e 5 0 10\nx 5 5\n"),
                log_of(1, "e 5 20 30\nx 5 25\n"),
            ],
            &[],
            &[],
        );
        assert_eq!(reused.token_violations.len(), 1);
        let backward = check(
            &[
                log_of(0, "e 5 100 110\nx 5 105\n"),
                log_of(1, "e 6 50 60\nx 6 55\n"),
            ],
            &[],
            &[],
        );
        assert!(!backward.token_violations.is_empty());
    }
}
