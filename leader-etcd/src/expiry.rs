//! Crash failover at the TTL: the waiter next in line revokes its predecessor's lease as
//! soon as etcd's leader shows that lease expired, instead of waiting for etcd's sweep of
//! expired leases (every 500 ms), which put crash failover at up to TTL + 0.5 s. Any client
//! may revoke any lease; what needs care is knowing that it expired.
//!
//! etcd 3.4 answers `LeaseTimeToLive` with the remaining time truncated to whole seconds:
//! 0 means "less than a second left, or expired less than a second ago", never "expired"
//! (see the test `lease_time_to_live_zero_is_not_expiry`). So a single answer proves
//! nothing. The proof here takes a series of reads of the lease:
//!
//! 1. A read `r1` that says 0 at etcd's time `t1` bounds the expiry as of then:
//!    `e1 < t1 + 1 s`.
//! 2. A keep-alive that etcd's leader accepts at `x` sets the remaining time to the granted
//!    TTL `G` (at least 2 s: a lease of 1 s reads 0 even just renewed, and is left to the
//!    sweep), so every read in `[x, x + G - 1 s)` says at least 1. Reads closer together
//!    than `G - 1 s` (checked on this process's clock with a margin) that all say 0 thus
//!    show that no keep-alive was accepted between the first and the last: the expiry is
//!    still `e1`.
//! 3. The last read is sent at least [`EXPIRED_AFTER`] (a second and 5% for clock-rate
//!    differences) after `r1`'s answer came, so it was served after `e1`: the lease had
//!    expired by then. etcd's lessor never renews a lease whose expiry has passed (it
//!    answers "not found" once its revocation is done), so it cannot come back to life.
//! 4. Every read reports the same raft term, and a linearizable read sent after the last
//!    one reports it too: one etcd leader, whose lessor saw every keep-alive, answered
//!    them all (a deposed leader that has not noticed yet could otherwise answer from a
//!    stale lessor while a new one accepts keep-alives).
//!
//! The old leader's deadline had passed by then: it counts from the sending of its last
//! accepted keep-alive plus the TTL less its safety margin, and etcd's expiry from that
//! keep-alive's arrival plus the TTL. Revoking the lease then does what etcd's sweep would
//! do a little later. (A revocation that etcd applies under a new etcd leader, which
//! extends every lease when it takes over, is the same hazard as the sweep's own
//! revocation proposed before the change: no new one.)
//!
//! Cost: while the lease reads `k` ≥ 2 seconds left, the next read comes `k - 1` seconds
//! later; near the end (and always, for leases of 2 s, whose renewed remaining time reads
//! one second) every twentieth of the TTL: 10 reads per second for a waiter behind a 2 s
//! lease, one every few seconds behind a 10 s lease until its leader stops renewing.

use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info};

use crate::Inner;
use crate::io::lease_not_found;

/// How long after the answer of the first read saying 0 the lease has certainly expired at
/// etcd: a second, and 5% for the rates of this process's clock and etcd's.
const EXPIRED_AFTER: Duration = Duration::from_millis(1050);

/// The shortest and longest pause between reads near a lease's end.
const STEP_MIN: Duration = Duration::from_millis(50);
const STEP_MAX: Duration = Duration::from_millis(500);

/// What the reads so far have shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Zero {
    /// When the answer of the first read of the series saying 0 came.
    since: Instant,
    /// The raft term of every read of the series.
    raft_term: u64,
    /// When the last read of the series was sent.
    last_sent: Instant,
}

/// What to do after one read of the lease.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Read again at this instant.
    ReadAt(Instant),
    /// The series proves the lease expired, if a linearizable read still reports this
    /// raft term.
    Confirm(u64),
    /// Nothing to do: the lease is gone, or too short to tell.
    Stop,
}

/// The pause between reads near the end of a lease granted `granted`.
fn step(granted: Duration) -> Duration {
    (granted / 20).clamp(STEP_MIN, STEP_MAX)
}

/// Folds one read (sent at `sent`, answered at `answered`, saying `ttl` of a lease granted
/// `granted` seconds, at raft term `raft_term`) into the series `zero`.
fn fold(
    zero: &mut Option<Zero>,
    sent: Instant,
    answered: Instant,
    ttl: i64,
    granted: i64,
    raft_term: u64,
) -> Next {
    if ttl < 0 || granted < 2 {
        *zero = None;
        return Next::Stop;
    }
    let granted = Duration::from_secs(granted.unsigned_abs());
    let step = step(granted);
    if ttl >= 1 {
        // At least `ttl` seconds were left: the remaining time cannot fall below a second
        // for `ttl - 1` seconds.
        *zero = None;
        let quiet = Duration::from_secs(ttl.unsigned_abs() - 1);
        return Next::ReadAt(sent + quiet.max(step));
    }
    // Reads of one series must be close enough that none misses an accepted keep-alive
    // (which reads at least 1 for `granted - 1 s`): half that, on this process's clock.
    let max_gap = (granted - Duration::from_secs(1)) / 2;
    match zero {
        Some(series)
            if series.raft_term == raft_term
                && answered.saturating_duration_since(series.last_sent) < max_gap =>
        {
            series.last_sent = sent;
            if sent >= series.since + EXPIRED_AFTER {
                return Next::Confirm(raft_term);
            }
        }
        _ => {
            *zero = Some(Zero {
                since: answered,
                raft_term,
                last_sent: sent,
            });
        }
    }
    Next::ReadAt(answered + step)
}

impl Inner {
    /// Watches lease `lease` (the lease of the key this candidate waits behind, its
    /// election's leader) and revokes it once it has certainly expired (see the module's
    /// proof). Returns when it did, or when there is nothing to do (the lease is gone, or
    /// granted for a second only). Never fails: a failed read starts the series again
    /// after a pause, and the caller's watch goes on either way.
    pub(crate) async fn revoke_once_expired(&self, lease: i64) {
        let mut zero: Option<Zero> = None;
        let mut failures = 0u32;
        loop {
            let sent = Instant::now();
            let answer = match self.request(self.io.lease_time_to_live(lease)).await {
                Ok(answer) => answer,
                Err(err) => {
                    zero = None;
                    failures = failures.saturating_add(1);
                    debug!(lease = %format!("{lease:x}"), error = %err, "reading a leader's lease failed");
                    sleep(STEP_MAX * failures.min(10)).await;
                    continue;
                }
            };
            failures = 0;
            let answered = Instant::now();
            match fold(
                &mut zero,
                sent,
                answered,
                answer.ttl,
                answer.granted,
                answer.raft_term,
            ) {
                Next::Stop => return,
                Next::ReadAt(at) => sleep_until(at).await,
                Next::Confirm(raft_term) => {
                    match self.request(self.io.raft_term()).await {
                        Ok(confirmed) if confirmed == raft_term => {}
                        _ => {
                            zero = None;
                            continue;
                        }
                    }
                    info!(lease = %format!("{lease:x}"), "the leader's lease expired at etcd; revoking it rather than waiting for etcd's sweep");
                    match self.request(self.io.lease_revoke(lease)).await {
                        Ok(_) => return,
                        Err(err) if lease_not_found(&err) => return,
                        Err(err) => {
                            debug!(lease = %format!("{lease:x}"), error = %err, "revoking an expired lease failed");
                            zero = None;
                            sleep(STEP_MAX).await;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds reads (sent at ms, answered at ms, ttl, raft term) of a lease granted
    /// `granted` seconds; returns the last verdict.
    fn series(granted: i64, reads: &[(u64, u64, i64, u64)]) -> Next {
        let base = Instant::now();
        let mut zero = None;
        let mut next = Next::Stop;
        for &(sent, answered, ttl, term) in reads {
            next = fold(
                &mut zero,
                base + MS * sent as u32,
                base + MS * answered as u32,
                ttl,
                granted,
                term,
            );
        }
        next
    }

    #[test]
    fn zeros_for_over_a_second_from_one_raft_term_prove_expiry() {
        let reads: Vec<_> = (0..12).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        assert_eq!(series(2, &reads), Next::Confirm(7));
    }

    #[test]
    fn a_second_of_zeros_is_not_enough() {
        // The first answer at 5 ms; the last read sent at 1,000 ms < 5 + 1,050.
        let reads: Vec<_> = (0..11).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
    }

    #[test]
    fn a_renewal_seen_in_between_starts_the_series_again() {
        let mut reads: Vec<_> = (0..6).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        reads.push((600, 605, 1, 7));
        reads.extend((7..18).map(|i| (i * 100, i * 100 + 5, 0, 7)));
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
        reads.push((1800, 1805, 0, 7));
        assert_eq!(series(2, &reads), Next::Confirm(7));
    }

    #[test]
    fn another_raft_term_starts_the_series_again() {
        let mut reads: Vec<_> = (0..6).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        reads.extend((6..12).map(|i| (i * 100, i * 100 + 5, 0, 8)));
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
    }

    #[test]
    fn reads_too_far_apart_could_miss_a_renewal() {
        // Granted 2 s: a renewal reads >= 1 for a second; reads 600 ms apart (over half of
        // it) do not count as one series.
        let reads: Vec<_> = (0..5).map(|i| (i * 600, i * 600 + 5, 0, 7)).collect();
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
        // Granted 3 s: a renewal reads >= 1 for 2 s; 600 ms apart is close enough.
        assert_eq!(series(3, &reads), Next::Confirm(7));
    }

    #[test]
    fn one_second_leases_and_gone_leases_are_left_to_etcd() {
        let reads: Vec<_> = (0..30).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        assert_eq!(series(1, &reads), Next::Stop);
        assert_eq!(series(5, &[(0, 5, -1, 7)]), Next::Stop);
    }

    #[test]
    fn seconds_left_set_the_next_read() {
        let base = Instant::now();
        let mut zero = None;
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 6, 10, 1),
            Next::ReadAt(base + Duration::from_secs(5))
        );
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 1, 10, 1),
            Next::ReadAt(base + STEP_MAX)
        );
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 1, 2, 1),
            Next::ReadAt(base + 100 * MS)
        );
    }
}
