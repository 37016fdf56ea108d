//! The Redis names one election uses, the rule for names, and the durations derived from a
//! TTL that the scripts are given.

use std::time::Duration;

use leader_core::{Candidate, Error, Result};

/// The Redis names one election uses; see [`RedisDriver`](crate::RedisDriver).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ElectionKeys {
    /// The leader's term, a string `L\n<token>\n<owner>\n<value>` with the lease as
    /// expiry (or `N\n<nominee>` while a handover's nomination lasts).
    pub leader: String,
    /// The counter the fencing tokens come from.
    pub fence: String,
    /// The channel that announces `elected` and `resigned` (to observers).
    pub channel: String,
    /// The line of waiting candidates: a sorted set of places (`<owner>\n<value>`) by
    /// arrival (server time in µs).
    pub line: String,
    /// When each place in line expires unless its driver refreshes it (server time in
    /// ms), a sorted set.
    pub line_until: String,
    /// A marker that one driver pruned the line this refresh period (`PX` the period).
    pub line_maintained: String,
    /// The prefix of each waiting candidate's own channel: a resignation wakes only the
    /// head of the line, on `wake_prefix` + its owner token.
    pub wake_prefix: String,
}

impl ElectionKeys {
    /// The keys and channels of `election` under `prefix`.
    pub fn new(prefix: &str, election: &str) -> Self {
        let tag = format!("{prefix}{{{election}}}");
        ElectionKeys {
            leader: format!("{tag}:leader"),
            fence: format!("{tag}:fence"),
            channel: format!("{tag}:events"),
            line: format!("{tag}:line"),
            line_until: format!("{tag}:line-until"),
            line_maintained: format!("{tag}:line-maintained"),
            wake_prefix: format!("{tag}:wake:"),
        }
    }

    /// The leader key of `election` under `prefix` alone (what a renewal needs: no other
    /// name made).
    pub(crate) fn leader_only(prefix: &str, election: &str) -> String {
        format!("{prefix}{{{election}}}:leader")
    }

    /// The channel that wakes the waiting candidate `owner`.
    pub fn wake(&self, owner: &str) -> String {
        format!("{}{owner}", self.wake_prefix)
    }
}

/// Whether `election` (under `prefix`) has keys of its own: the name sits between `{` and
/// `}` (the hash tag), so it must contain neither (else two names could share keys, or an
/// election's keys could land in different Cluster slots); the prefix, shared by every
/// election of the driver, neither, for the same reason. Names are case-sensitive (as
/// Redis keys are): `Jobs` and `jobs` are two elections; `:` and `/` are ordinary
/// characters inside the tag, so `a` and `a:b` never nest.
pub(crate) fn check_name(prefix: &str, election: &str) -> Result<()> {
    if election.contains(['{', '}']) {
        return Err(Error::invalid_config(
            "name",
            "must not contain `{` or `}` with Redis (they delimit the election's hash tag, so \
             such a name could share keys with another election or split its own across \
             Cluster slots)",
        ));
    }
    if prefix.contains(['{', '}']) {
        return Err(Error::invalid_config(
            "prefix",
            "must not contain `{` or `}` with Redis (the election name is the hash tag)",
        ));
    }
    Ok(())
}

/// A candidate's place in line: `<owner>\n<value>` (the line lists values too, for
/// [`Driver::candidates`](leader_core::Driver::candidates)).
pub(crate) fn place(candidate: &Candidate) -> Vec<u8> {
    let mut place = Vec::with_capacity(candidate.id.len() + 1 + candidate.value.len());
    place.extend_from_slice(candidate.id.as_bytes());
    place.push(b'\n');
    place.extend_from_slice(&candidate.value);
    place
}

/// How long a place in line lives without a refresh: 1.25 of the shortest TTL among its
/// driver's waiters, refreshed every [`period`]. A place left behind (a campaign that
/// landed after its withdrawal) is pruned at the first maintenance after that (one per
/// period and election): within 1.25 + 2/3 < 2 TTLs.
pub(crate) fn keep(ttl: Duration) -> Duration {
    ttl * 5 / 4
}

/// How often a driver refreshes its waiters' places: two thirds of their shortest TTL.
pub(crate) fn period(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// A duration in whole milliseconds, at least 1.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_key_alone_is_the_elections_leader_key() {
        for (prefix, election) in [("leader:", "jobs"), ("", "a:b"), ("p/", "é")] {
            assert_eq!(
                ElectionKeys::leader_only(prefix, election),
                ElectionKeys::new(prefix, election).leader
            );
        }
    }
}
