//! What a run measured and found ([`Report`]): a table for people, JSON for the results
//! files, and the figures (each with its goal) that `docs/results/soak.json` collects.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::fault::{PHASE_BINS, phase_bin};
use crate::{Fault, StoreKind, checker, timeline};

/// One injected fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// Its number in the run.
    pub round: usize,
    /// The fault.
    pub fault: Fault,
    /// When the fault began, after the leader's last renewal (its request's confirmation,
    /// from the deadline it logged), as a fraction of the renewal interval (TTL/3); `None`
    /// if no renewal of the leader was found in its log.
    pub phase: Option<f64>,
    /// The same in time.
    pub phase_after_renewal: Option<Duration>,
    /// When it was injected (CLOCK_MONOTONIC ns).
    pub started_ns: u64,
    /// When it was lifted (the same as `started_ns` for a single act).
    pub lifted_ns: u64,
    /// When the round ended (the next one starts after it).
    pub ended_ns: u64,
    /// From the fault (or, for a fault that needs no new leader, from its end) to a leader;
    /// `None`: none within the bound (a liveness failure).
    pub recovery: Option<Duration>,
    /// The bound on `recovery`.
    pub bound: Duration,
    /// How long within the round no term of the driven election believed it led (the
    /// availability the fault cost), by the exact spans.
    pub leaderless: Duration,
}

/// What a run measured and found.
#[derive(Debug)]
pub struct Report {
    /// The store.
    pub backend: StoreKind,
    /// The TTL.
    pub ttl: Duration,
    /// Elections each candidate process held (all checked exactly; the first one is driven,
    /// sampled and observed).
    pub elections: usize,
    /// Every fault injected, in order.
    pub rounds: Vec<Round>,
    /// Rounds after which no leader came back in time, or a healed candidate did not
    /// campaign again.
    pub liveness_failures: Vec<String>,
    /// Candidates that exited with a status nobody asked for.
    pub bad_exits: Vec<String>,
    /// The checker's findings.
    pub check: checker::Check,
    /// Per fault kind, the terms of the driven election that began in its rounds.
    pub terms_per_fault: BTreeMap<Fault, usize>,
    /// The observer's view, compared with the candidates'.
    pub observed: checker::Observed,
    /// What happened when, for a picture of the run ([`timeline::write_svg`]).
    pub timeline: timeline::Timeline,
}

/// Per fault kind: how many, recoveries, leaderless times, bound, phase bins hit.
struct KindSummary {
    rounds: usize,
    recoveries: Vec<Duration>,
    leaderless: Vec<Duration>,
    bound: Duration,
    bins: BTreeSet<usize>,
}

fn median(sorted: &[Duration]) -> Duration {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ns_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Report {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.check.passed()
            && self.observed.passed()
            && self.liveness_failures.is_empty()
            && self.bad_exits.is_empty()
    }

    /// For runs that measure a documented limit (a store clock stepped forward, a Redis
    /// Cluster failover): every overlap began inside a round of one of `faults`, and
    /// nothing else broke (deadlines all logged, no late sample, no flip, every line
    /// readable, tokens in order, the observer content, no bad exit). Liveness is left to
    /// the caller. The first problem, with the run's table.
    ///
    /// # Errors
    ///
    /// What broke, as above.
    pub fn passed_but_overlaps_in(&self, faults: &[Fault]) -> Result<(), String> {
        let spans: Vec<(u64, u64)> = self
            .rounds
            .iter()
            .filter(|r| faults.contains(&r.fault))
            .map(|r| (r.started_ns, r.ended_ns))
            .collect();
        for overlap in &self.check.overlap_spans {
            if !spans
                .iter()
                .any(|(from, to)| (*from..*to).contains(&overlap.from_ns))
            {
                return Err(format!(
                    "an overlap outside a round of {faults:?}: {overlap:?}\n{}",
                    self.table()
                ));
            }
        }
        let c = &self.check;
        for (what, count) in [
            ("deadlines never logged", c.unlogged_deadlines.len()),
            ("samples after the logged belief", c.late_samples.len()),
            ("flips", c.flips.len()),
            ("unreadable lines", c.unreadable.len()),
            ("fencing violations", c.token_violations.len()),
            ("bad exits", self.bad_exits.len()),
        ] {
            if count > 0 {
                return Err(format!("{count} {what}\n{}", self.table()));
            }
        }
        if !self.observed.passed() {
            return Err(format!("the observer saw a problem\n{}", self.table()));
        }
        Ok(())
    }

    fn kinds(&self) -> BTreeMap<Fault, KindSummary> {
        let mut kinds: BTreeMap<Fault, KindSummary> = BTreeMap::new();
        for round in &self.rounds {
            let kind = kinds.entry(round.fault).or_insert_with(|| KindSummary {
                rounds: 0,
                recoveries: Vec::new(),
                leaderless: Vec::new(),
                bound: round.bound,
                bins: BTreeSet::new(),
            });
            kind.rounds += 1;
            kind.recoveries.extend(round.recovery);
            kind.leaderless.push(round.leaderless);
            kind.bins.extend(round.phase.and_then(phase_bin));
        }
        for kind in kinds.values_mut() {
            kind.recoveries.sort();
            kind.leaderless.sort();
        }
        kinds
    }

    /// The tampering figures: how many, the overlaps excused, and the times from the
    /// tampering to the old leader's end (median, worst).
    fn tampering(&self) -> (usize, usize, Duration, Duration) {
        let mut to_end: Vec<Duration> = self
            .check
            .tampering
            .iter()
            .filter_map(|t| t.to_end_ns.map(Duration::from_nanos))
            .collect();
        to_end.sort();
        let overlaps = self
            .check
            .tampering
            .iter()
            .filter(|t| t.overlap_ns.is_some())
            .count();
        (
            self.check.tampering.len(),
            overlaps,
            median(&to_end),
            to_end.last().copied().unwrap_or_default(),
        )
    }

    /// A table of the figures.
    pub fn table(&self) -> String {
        let mut out = format!(
            "chaos on {}: {} faults, TTL {:?}, {} elections per candidate process\n\
             {:<24} {:>6} {:>6} {:>9} {:>9} {:>9} {:>11} {:>11} {:>6}\n",
            self.backend.name(),
            self.rounds.len(),
            self.ttl,
            self.elections,
            "fault",
            "rounds",
            "terms",
            "median",
            "worst",
            "bound",
            "leaderless",
            "(worst)",
            "phases"
        );
        for (fault, kind) in self.kinds() {
            out.push_str(&format!(
                "{:<24} {:>6} {:>6} {:>8.3}s {:>8.3}s {:>8.3}s {:>10.3}s {:>10.3}s {:>4}/{}\n",
                fault.name(),
                kind.rounds,
                self.terms_per_fault.get(&fault).copied().unwrap_or(0),
                median(&kind.recoveries).as_secs_f64(),
                kind.recoveries
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64(),
                kind.bound.as_secs_f64(),
                median(&kind.leaderless).as_secs_f64(),
                kind.leaderless
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64(),
                kind.bins.len(),
                PHASE_BINS,
            ));
        }
        let c = &self.check;
        let (tampered, excused, to_end_median, to_end_max) = self.tampering();
        out.push_str(&format!(
            "terms checked exactly: {} in {} elections ({} of the driven one), {} deadlines \
             logged by the library; overlapping terms: {}; deadlines never logged: {}; \
             sampled overlaps: {} (within a sample's duration only: {}); samples after the \
             logged belief: {}; flips: {}; sampling gaps over 5 ms across a handover: {} \
             (elsewhere, reported only: {}; longest {:.1} ms); unsampled terms: {}; \
             unreadable lines: {}; fencing violations: {}; bad exits: {}; liveness failures: \
             {}\n",
            c.terms,
            c.elections,
            c.driven_terms,
            c.deadlines,
            c.overlaps.len(),
            c.unlogged_deadlines.len(),
            c.sampled_overlaps.len(),
            c.jitter_overlaps,
            c.late_samples.len(),
            c.flips.len(),
            c.gaps.len(),
            c.quiet_gaps,
            ns_ms(c.max_gap_ns),
            c.unsampled.len(),
            c.unreadable.len(),
            c.token_violations.len(),
            self.bad_exits.len(),
            self.liveness_failures.len(),
        ));
        out.push_str(&format!(
            "tampering: {tampered} times; the old leader's belief ended {:.3} ms after it \
             (median), {:.3} ms (worst); overlaps after it: {excused}, each bound to end \
             within {:.0} ms of the tampering\n",
            ms(to_end_median),
            ms(to_end_max),
            ns_ms(c.tamper_bound_ns),
        ));
        let o = &self.observed;
        out.push_str(&format!(
            "observer: {} leader changes seen; tokens going back: {}; terms never seen (too \
             short to observe): {}; tokens seen that no candidate logged (a campaign whose \
             answer was lost): {}\n",
            o.changes,
            o.backwards.len(),
            o.unseen_terms,
            o.unknown_tokens.len()
        ));
        for violation in o.backwards.iter().take(5) {
            out.push_str(&format!("  VIOLATION: {violation}\n"));
        }
        for violation in c.violations().iter().take(10) {
            out.push_str(&format!("  VIOLATION: {violation}\n"));
        }
        for tampered in c.overlaps_after_tampering.iter().take(10) {
            out.push_str(&format!(
                "  after tampering (within the bound): {tampered}\n"
            ));
        }
        for exit in self.bad_exits.iter().take(5) {
            out.push_str(&format!("  EXIT: {exit}\n"));
        }
        for failure in self.liveness_failures.iter().take(5) {
            out.push_str(&format!("  LIVENESS: {failure}\n"));
        }
        out
    }

    /// The headline figures, each with its goal: `(name, value, goal, unit)`, names
    /// without the store (the results file prefixes it).
    pub fn figures(&self) -> Vec<(String, f64, String, &'static str)> {
        let c = &self.check;
        let count = |n: usize| n as f64;
        let mut figures = vec![
            (
                "faults".to_owned(),
                count(self.rounds.len()),
                String::new(),
                "faults",
            ),
            (
                "terms_checked_exactly".to_owned(),
                count(c.terms),
                String::new(),
                "terms",
            ),
            (
                "overlapping_terms".to_owned(),
                count(c.overlaps.len()),
                "0".to_owned(),
                "pairs",
            ),
            (
                "sampled_overlaps".to_owned(),
                count(c.sampled_overlaps.len()),
                "0".to_owned(),
                "pairs",
            ),
            (
                "fencing_violations".to_owned(),
                count(c.token_violations.len() + self.observed.backwards.len()),
                "0".to_owned(),
                "tokens",
            ),
            (
                "other_violations".to_owned(),
                count(
                    c.unlogged_deadlines.len()
                        + c.late_samples.len()
                        + c.flips.len()
                        + c.gaps.len()
                        + c.unsampled.len()
                        + c.unreadable.len()
                        + self.bad_exits.len(),
                ),
                "0".to_owned(),
                "findings",
            ),
            (
                "liveness_failures".to_owned(),
                count(self.liveness_failures.len()),
                "0".to_owned(),
                "rounds",
            ),
        ];
        let (tampered, excused, _, to_end_max) = self.tampering();
        if tampered > 0 {
            let bound = format!("<= {:.0} ms", ns_ms(c.tamper_bound_ns));
            figures.push((
                "tampering.overlaps_excused".to_owned(),
                count(excused),
                format!("each ending {bound} after the tampering"),
                "overlaps",
            ));
            figures.push((
                "tampering.to_old_leader_end_worst_ms".to_owned(),
                (ms(to_end_max) * 1000.0).round() / 1000.0,
                String::new(),
                "ms",
            ));
        }
        let kinds = self.kinds();
        let fewest_bins = kinds.values().map(|k| k.bins.len()).min().unwrap_or(0);
        figures.push((
            "phase_bins_per_fault_kind_min".to_owned(),
            count(fewest_bins),
            format!(">= {PHASE_BINS}"),
            "bins",
        ));
        for (fault, kind) in &kinds {
            let worst = kind.recoveries.last().copied().unwrap_or_default();
            figures.push((
                format!("recovery_worst_s.{}", fault.key()),
                (worst.as_secs_f64() * 1000.0).round() / 1000.0,
                format!("<= {:.1} s", kind.bound.as_secs_f64()),
                "s",
            ));
            let leaderless = kind.leaderless.last().copied().unwrap_or_default();
            figures.push((
                format!("leaderless_worst_s.{}", fault.key()),
                (leaderless.as_secs_f64() * 1000.0).round() / 1000.0,
                String::new(),
                "s",
            ));
        }
        figures
    }

    /// Everything the run found, for the results files: every round (with its phase and
    /// the availability it cost), every violation, every overlap after tampering, and the
    /// [`figures`](Self::figures).
    pub fn json(&self) -> Value {
        let c = &self.check;
        let rounds: Vec<Value> = self
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "round": r.round,
                    "fault": r.fault.name(),
                    "phase": r.phase,
                    "phase_bin": r.phase.and_then(phase_bin),
                    "phase_after_renewal_ms": r.phase_after_renewal.map(ms),
                    "started_ns": r.started_ns,
                    "lifted_ns": r.lifted_ns,
                    "ended_ns": r.ended_ns,
                    "recovery_ms": r.recovery.map(ms),
                    "bound_ms": ms(r.bound),
                    "leaderless_ms": ms(r.leaderless),
                })
            })
            .collect();
        let figures: serde_json::Map<String, Value> = self
            .figures()
            .into_iter()
            .map(|(name, value, goal, unit)| {
                (name, json!({"value": value, "goal": goal, "unit": unit}))
            })
            .collect();
        json!({
            "store": self.backend.name(),
            "ttl_ms": ms(self.ttl),
            "elections_per_process": self.elections,
            "passed": self.passed(),
            "table": self.table(),
            "figures": figures,
            "rounds": rounds,
            "check": {
                "terms": c.terms,
                "driven_terms": c.driven_terms,
                "elections": c.elections,
                "deadlines_logged": c.deadlines,
                "overlaps": c.overlaps,
                "overlap_spans": c.overlap_spans,
                "overlaps_after_tampering": c.overlaps_after_tampering,
                "tampering": c.tampering,
                "tamper_bound_ms": ns_ms(c.tamper_bound_ns),
                "unlogged_deadlines": c.unlogged_deadlines,
                "sampled_overlaps": c.sampled_overlaps,
                "jitter_overlaps": c.jitter_overlaps,
                "late_samples": c.late_samples,
                "flips": c.flips,
                "gaps": c.gaps,
                "quiet_gaps": c.quiet_gaps,
                "max_gap_ms": ns_ms(c.max_gap_ns),
                "unsampled": c.unsampled,
                "unreadable": c.unreadable,
                "token_violations": c.token_violations,
            },
            "observed": {
                "changes": self.observed.changes,
                "backwards": self.observed.backwards,
                "unseen_terms": self.observed.unseen_terms,
                "unknown_tokens": self.observed.unknown_tokens,
            },
            "liveness_failures": self.liveness_failures,
            "bad_exits": self.bad_exits,
        })
    }
}
