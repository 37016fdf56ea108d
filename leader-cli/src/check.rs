//! `leader check`: the arithmetic of a term, as `leader run` sets it up.
//!
//! `leader run` gives the library a safety margin of `grace + drift + 100ms` (the time the
//! command gets between SIGTERM and SIGKILL, what is kept for clock-rate drift, and the time
//! a SIGKILL takes), so the term's deadline is `TTL - margin` after the send time of its
//! last successful renewal. At the deadline the command's group gets SIGTERM, `grace` later
//! SIGKILL, and it is gone `drift` before the store could elect anyone else (`TTL` after
//! that renewal reached the store). leader-core renews every `TTL / 3` and requires the
//! margin to be under half the TTL.

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{CheckArgs, OK, Timing, USAGE};

/// `d`, to the millisecond, as humantime writes it ("7s 700ms").
fn format_duration(d: Duration) -> humantime::FormattedDuration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(ms))
}

/// Time allowed between sending SIGKILL and the group being gone.
pub(crate) const KILL_ALLOWANCE: Duration = Duration::from_millis(100);

/// The timing of a `leader run` term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The lease.
    pub(crate) ttl: Duration,
    /// SIGTERM to SIGKILL.
    pub(crate) grace: Duration,
    /// Kept for clock-rate drift.
    pub(crate) drift: Duration,
}

impl Plan {
    /// The plan for these flags: the drift allowance defaults to the library's default
    /// safety margin (2% of the TTL, at least 2ms).
    pub(crate) fn new(timing: Timing) -> Self {
        Plan {
            ttl: timing.ttl,
            grace: timing.grace,
            drift: timing
                .safety_margin
                .unwrap_or_else(|| (timing.ttl / 50).max(Duration::from_millis(2))),
        }
    }

    /// The safety margin the library gets: the term ends this long before the store could
    /// elect anyone else.
    pub(crate) fn margin(&self) -> Duration {
        self.grace + self.drift + KILL_ALLOWANCE
    }

    /// After its last successful renewal, how long until the term's deadline (SIGTERM).
    pub(crate) fn deadline(&self) -> Duration {
        self.ttl.saturating_sub(self.margin())
    }

    /// The clock-rate difference the drift allowance absorbs: this machine's clock may run
    /// this much slower than the store's (a fraction).
    pub(crate) fn tolerated_drift(&self) -> f64 {
        let rest = self.ttl.saturating_sub(self.drift).as_secs_f64();
        if rest == 0.0 {
            return f64::INFINITY;
        }
        self.drift.as_secs_f64() / rest
    }

    /// `Err(the rule broken)` if these settings cannot be safe.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(leader::MIN_TTL..=leader::MAX_TTL).contains(&self.ttl) {
            return Err(format!(
                "--ttl {} is outside {}..={} (rule: the TTL range leader-core accepts)",
                format_duration(self.ttl),
                format_duration(leader::MIN_TTL),
                format_duration(leader::MAX_TTL)
            ));
        }
        if self.drift.is_zero() {
            return Err(
                "--safety-margin 0s leaves nothing for clock drift: no two clocks run at \
                 exactly the same rate (rule: the safety margin must be above zero)"
                    .to_owned(),
            );
        }
        if self.margin() >= self.ttl / 2 {
            return Err(format!(
                "--grace {} + --safety-margin {} + {} for the kill = {} must be under half \
                 the --ttl ({}), so that the renewal due every TTL/3 comes before the \
                 deadline (rule: margin < TTL/2)",
                format_duration(self.grace),
                format_duration(self.drift),
                format_duration(KILL_ALLOWANCE),
                format_duration(self.margin()),
                format_duration(self.ttl / 2)
            ));
        }
        Ok(())
    }

    /// What these settings promise, one line per fact.
    pub(crate) fn report(&self) -> Vec<String> {
        let ttl = self.ttl;
        let etcd = Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
        let killed = self.deadline() + self.grace;
        vec![
            format!(
                "failover after a crash: at most {} after the leader's last renewal (etcd \
                 leases are whole seconds: {}), plus the next candidate's round trip",
                format_duration(ttl),
                format_duration(etcd)
            ),
            format!(
                "a leader cut off from the store: its command gets SIGTERM {} after its last \
                 successful renewal, SIGKILL at {}, and is gone by {}: it may still run up to \
                 {} after the cut",
                format_duration(self.deadline()),
                format_duration(killed),
                format_duration(killed + KILL_ALLOWANCE),
                format_duration(killed + KILL_ALLOWANCE)
            ),
            format!(
                "margin left for clock drift: {} (this machine's clock may run up to {:.2}% \
                 slower than the store's)",
                format_duration(self.drift),
                self.tolerated_drift() * 100.0
            ),
            format!(
                "renewals: every {}; the term survives store trouble for {} after its last \
                 renewal",
                format_duration(ttl / 3),
                format_duration(self.deadline())
            ),
        ]
    }
}

/// `leader check`.
pub(crate) fn check(args: &CheckArgs) -> ExitCode {
    let plan = Plan::new(args.timing);
    if let Err(rule) = plan.check() {
        crate::errors::say(&format!("unsafe: {rule}"));
        return ExitCode::from(USAGE);
    }
    for line in plan.report() {
        println!("{line}");
    }
    ExitCode::from(OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(ttl: u64, grace: u64, drift: Option<u64>) -> Plan {
        Plan::new(Timing {
            ttl: Duration::from_millis(ttl),
            grace: Duration::from_millis(grace),
            safety_margin: drift.map(Duration::from_millis),
        })
    }

    #[test]
    fn the_defaults_are_safe_and_match_leader_run() {
        let p = plan(10_000, 2_000, None);
        assert_eq!(p.drift, Duration::from_millis(200));
        assert_eq!(p.margin(), Duration::from_millis(2_300));
        assert_eq!(p.deadline(), Duration::from_millis(7_700));
        assert!(p.check().is_ok());
        // The command is gone exactly the drift allowance before the TTL.
        assert_eq!(p.deadline() + p.grace + KILL_ALLOWANCE, p.ttl - p.drift);
        let drift = p.tolerated_drift();
        assert!((drift - 0.2 / 9.8).abs() < 1e-9, "{drift}");
        let report = p.report().join("\n");
        assert!(report.contains("SIGTERM 7s 700ms"), "{report}");
        assert!(report.contains("SIGKILL at 9s 700ms"), "{report}");
        assert!(report.contains("gone by 9s 800ms"), "{report}");
        assert!(report.contains("2.04%"), "{report}");
    }

    #[test]
    fn the_library_default_drift_is_at_least_2ms() {
        assert_eq!(plan(50, 0, None).drift, Duration::from_millis(2));
    }

    #[test]
    fn unsafe_combinations_name_their_rule() {
        // 500ms + 200ms + 100ms = 800ms, under 1s.
        assert!(plan(2_000, 500, Some(200)).check().is_ok());
        let err = plan(4_000, 2_000, None).check().expect_err("2.18s >= 2s");
        assert!(err.contains("margin < TTL/2"), "{err}");
        // Exactly half is not under half.
        let err = plan(3_000, 1_200, Some(200))
            .check()
            .expect_err("1.5s = 1.5s");
        assert!(err.contains("margin < TTL/2"), "{err}");
        let err = plan(10_000, 2_000, Some(0)).check().expect_err("no drift");
        assert!(err.contains("above zero"), "{err}");
        let err = plan(5, 0, Some(1)).check().expect_err("ttl too short");
        assert!(err.contains("TTL range"), "{err}");
    }

    #[test]
    fn etcd_rounds_the_ttl_up_to_whole_seconds() {
        let report = plan(2_500, 500, None).report().join("\n");
        assert!(report.contains("whole seconds: 3s"), "{report}");
    }
}
