//! Crash failover at the TTL: the waiter next in line ends its predecessor's term as soon
//! as etcd's leader shows that term's deadline passed, instead of waiting for the lease to
//! expire and for etcd's sweep of expired leases (every 500 ms), which put crash failover
//! at up to lease TTL + 0.5 s. What needs care is knowing that it passed.
//!
//! etcd 3.4 answers `LeaseTimeToLive` with the remaining time truncated to whole seconds:
//! `k` means "less than `k + 1` seconds left" (0: less than a second left, or expired less
//! than a second ago; see the test `lease_time_to_live_zero_is_not_expiry`). Two proofs
//! use it.
//!
//! **The term's deadline (the fast proof).** A candidate's key has a TTL side key
//! (`<election>\0ttl\0<suffix>`, written in the transaction that creates the key, so with
//! the same create revision) holding the most the term's TTL `T` may be; the driver's
//! leases are granted a second more than their elections' TTL (`Inner::lease_seconds`).
//! Let `G` be the lease's granted TTL. etcd's leader sets a lease's expiry to the arrival
//! of each keep-alive it accepts plus `G` (and, when it becomes leader, every lease's to
//! then plus `G` and its election timeout). So a read saying `k`, served at etcd's time
//! `t`, shows that the last keep-alive etcd's leader accepted arrived before
//! `t + k + 1 s - G`. When `k + 1 s + T <= G` (`k = 0` with the default leases), that is
//! before `t - T`: the term's deadline, which the holder counts from the *sending* of that
//! keep-alive plus `T` less its safety margin, had passed by `t` (given that etcd's clock
//! and the holder's agree in rate within that margin, which leases assume anyway).
//! The read must come from the lessor of etcd's current leader: the raft term on an
//! answer is that of the member the client reached, filled after the answer came, so an
//! answer computed by a deposed leader's stale lessor (forwarded there just before a new
//! leader took over) can carry the new term. Reads go one at a time, so only the first of
//! a series can be such a one *when they go through one member*: the proof takes the
//! *second* of two such reads from one raft term, and a linearizable read of the
//! predecessor's key sent after it that reports that term too (one etcd leader, whose
//! lessor saw every keep-alive, was leader throughout). With several endpoints the client
//! may send the two reads to two members, each lagging behind the new term while it
//! forwards; then the proof also rests on the deposed leader stepping down (etcd's
//! CheckQuorum, within one or two election timeouts of losing its quorum) before its stale
//! lessor can read low for a lease the holder renews at the new leader: an election
//! timeout well under a second (the test servers run 100 ms) keeps that window shut; with
//! etcd's default of 1 s it rests on both forwarding races happening back to back. (The
//! answer's raft term is the term of the last entry the member applied, which lags raft's
//! own: it errs on the side of a reread.)
//!
//! **The lease's expiry (the slow proof)**, for keys without a TTL side key (an earlier
//! version of this driver, `etcdctl elect`, Go) or whose lease is not long enough:
//!
//! 1. A read that says 0, served at etcd's time `t` and answered at `a`, bounds the
//!    expiry as of then: `e < t + 1 s <= a + 1 s`. The series is anchored on its *second*
//!    zero read, not its first, as above.
//! 2. A keep-alive that etcd's leader accepts at `x` sets the remaining time to the granted
//!    TTL `G` (at least 2 s: a lease of 1 s reads 0 even just renewed, and is left to the
//!    sweep), so every read in `[x, x + G - 1 s)` says at least 1. Reads closer together
//!    than `G - 1 s` (checked on this process's clock with a margin of half) that all say
//!    0 thus show that no keep-alive was accepted between the anchor and the last: the
//!    expiry is still the anchor's.
//! 3. The last read is sent at least [`EXPIRED_AFTER`] (a second and 5% for clock-rate
//!    differences) after the anchor's answer came, so it was served after the expiry: the
//!    lease had expired by then. etcd's lessor never renews a lease whose expiry has
//!    passed (it answers "not found" once its revocation is done).
//! 4. Every read of the series reports the same raft term, and so does a linearizable read
//!    of the predecessor's key sent after the last one.
//!
//! The old leader's deadline had passed by then too: it counts from the sending of its last
//! accepted keep-alive plus at most the lease's TTL less its safety margin. This proof
//! assumes etcd's clock runs at most about 5% slower than the waiter's over a second (a
//! suspended etcd host breaks it; so does a clock stepped by more than that on either
//! side), on top of the safety margin's assumptions.
//!
//! **A term being granted.** Both proofs are about the terms that rest on keep-alives
//! etcd had accepted when it answered the reads. A candidate that saw its key at the head
//! of the line but had not yet got the keep-alive its first deadline counts from (sent
//! after its campaign began, and accepted after those reads) would have started a term
//! whose key the waiter deletes: its grant has no earlier deadline for leader-core to check
//! it against. So a campaign does not lead on a key if the lease lapsed since the key was
//! created (a confirmation came the term's TTL, in whole seconds, after the sending of the
//! one before, counting suspensions of the machine: `Inner::lapses`); it creates the key
//! again. Without such a lapse no read could have shown the lease that stale. The
//! background keep-alive comes often enough that a lapse means etcd did not answer in
//! time. (The simulation found this: two leaders in 2 of 8,000 seeds before;
//! `ci/bites/etcd-grant-after-lapse`.)
//!
//! Either way the waiter then deletes the predecessor's key, and only that term's (by its
//! create revision), not the lease: a revocation is lease-wide, and one that lands late
//! (after a new etcd leader extended the lease and the old holder, alive after all, renewed
//! it for new terms in other elections) would end those terms. The term's deadline had
//! passed and is never extended, so its deletion is harmless however late it lands. The
//! lease itself is left to etcd's sweep.
//!
//! Cost: while the lease reads more than the proof needs, the next read comes when it can
//! first read low enough (`k - 1` seconds later for the fast proof on the default leases);
//! near the end, every twentieth of the term's TTL (fast) or of the lease's (slow), at
//! least 50 ms apart. Behind a live leader of a 1 s TTL (a 2 s lease, which reads 1 while
//! it is kept alive) that is 20 reads per second; behind a 2 s TTL (3 s lease, reading 2)
//! about one; behind a 10 s TTL one every ten seconds or so until its leader stops renewing.

use std::time::Duration;

use leader_core::{Backoff, Error, ErrorChain};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use crate::Inner;
use crate::io::Range;
use crate::keys::{Side, parse_ttl, side_key};

/// How long after the answer of the first read saying 0 the lease has certainly expired at
/// etcd: a second, and 5% for the rates of this process's clock and etcd's.
const EXPIRED_AFTER: Duration = Duration::from_millis(1050);

/// The first read comes at most this long after the wait began (see [`first_read_after`]).
const FIRST_READ_AFTER: Duration = Duration::from_secs(1);

/// How long after its wait began a waiter on a lease of `own_lease` first reads its
/// predecessor's lease: a sixth of its own lease (a third of a second behind a 1 s TTL, whose
/// lease is 2 s), at most a second. A waiter that leads sooner (a resignation, a handoff)
/// costs no read at all; a live leader renews at least every third of its TTL, so a read at
/// once would almost always find it far from its end. A waiter that began waiting behind a
/// leader already dead (say, its own process restarted meanwhile) proves the deadline
/// passed that much later, no more.
pub(crate) fn first_read_after(own_lease: Duration) -> Duration {
    FIRST_READ_AFTER.min(own_lease / 6)
}

/// The shortest and longest pause between reads near a lease's end.
const STEP_MIN: Duration = Duration::from_millis(50);
const STEP_MAX: Duration = Duration::from_millis(500);

/// What the reads so far have shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Zero {
    /// When the answer of the series' second read came (its anchor: see step 1).
    since: Option<Instant>,
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

/// The pause between reads near the end of what lasts `ttl`: a term (the fast proof) or
/// a lease granted `ttl` (the slow one).
fn step(ttl: Duration) -> Duration {
    (ttl / 20).clamp(STEP_MIN, STEP_MAX)
}

/// The highest reading (in whole seconds) of a lease granted `granted` that proves the
/// deadline of a term whose TTL is at most `term_ttl` passed (see the module's fast proof):
/// `k` with `k + 1 s + term_ttl <= granted`; `None` when no reading does.
fn proving(granted: Duration, term_ttl: Duration) -> Option<u64> {
    granted
        .checked_sub(term_ttl)?
        .checked_sub(Duration::from_secs(1))
        .map(|spare| spare.as_secs())
}

/// Folds one read (sent at `sent`, answered at `answered`, saying `ttl` of a lease granted
/// `granted` seconds, at raft term `raft_term`) into the series `zero`; `term_ttl` is the
/// most the predecessor's term's TTL may be, if its key says (its TTL side key).
fn fold(
    zero: &mut Option<Zero>,
    sent: Instant,
    answered: Instant,
    ttl: i64,
    granted: i64,
    raft_term: u64,
    term_ttl: Option<Duration>,
) -> Next {
    if ttl < 0 || granted < 1 {
        *zero = None;
        return Next::Stop;
    }
    let granted_s = granted.unsigned_abs();
    let granted = Duration::from_secs(granted_s);
    if ttl.unsigned_abs() > granted_s {
        // More left than granted: a lessor not promoted yet (a new etcd leader before its
        // first entry, or one just deposed) answers "forever". It says nothing.
        *zero = None;
        return Next::ReadAt(answered + step(granted));
    }
    let ttl = ttl.unsigned_abs();
    if let Some(term_ttl) = term_ttl
        && let Some(proving) = proving(granted, term_ttl)
    {
        let step = step(term_ttl);
        if ttl > proving {
            // The lease cannot read `proving` before `ttl - proving - 1` seconds.
            *zero = None;
            let quiet = Duration::from_secs(ttl - proving - 1);
            return Next::ReadAt(sent + quiet.max(step));
        }
        return match zero {
            // The second such read from one raft term: see the module's fast proof.
            Some(series) if series.raft_term == raft_term => Next::Confirm(raft_term),
            _ => {
                *zero = Some(Zero {
                    since: None,
                    raft_term,
                    last_sent: sent,
                });
                // Soon, not at once: a series that keeps starting again is no hot loop.
                Next::ReadAt(answered + step / 4)
            }
        };
    }
    if granted_s < 2 {
        // A lease of a second reads 0 even just renewed: left to etcd's sweep.
        *zero = None;
        return Next::Stop;
    }
    let step = step(granted);
    if ttl >= 1 {
        // At least `ttl` seconds were left: the remaining time cannot fall below a second
        // for `ttl - 1` seconds.
        *zero = None;
        let quiet = Duration::from_secs(ttl - 1);
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
            let since = *series.since.get_or_insert(answered);
            if sent >= since + EXPIRED_AFTER {
                return Next::Confirm(raft_term);
            }
            // Every step, and the last read exactly when the anchor is old enough.
            Next::ReadAt((answered + step).min(since + EXPIRED_AFTER))
        }
        _ => {
            *zero = Some(Zero {
                since: None,
                raft_term,
                last_sent: sent,
            });
            // The anchor soon after: the remaining time fell below a second within the
            // last step, so an early anchor bounds the expiry closely. (A quarter step,
            // not at once: a series that keeps starting again is no hot loop.)
            Next::ReadAt(answered + step / 4)
        }
    }
}

impl Inner {
    /// Watches lease `lease` of the key `key` with create revision `revision` (the term
    /// this candidate waits behind: its election's leader) and deletes that term's key once
    /// the lease has certainly expired (see the module's proof). Returns when it did, or
    /// when there is nothing to do (the lease is gone, granted for a second only, or etcd
    /// refuses a read). Never fails: a failed read starts the series again after a
    /// jittered backoff, and the caller's watch goes on either way.
    pub(crate) async fn end_expired_term(
        &self,
        key: &[u8],
        revision: i64,
        lease: i64,
        first_read: Duration,
    ) {
        let mut zero: Option<Zero> = None;
        let mut backoff = Backoff::new(STEP_MAX, STEP_MAX * 20);
        let lease_hex = format!("{lease:x}");
        sleep(first_read).await;
        let term_ttl = self.term_ttl(key, revision).await;
        loop {
            let sent = Instant::now();
            let answer = match self.request(self.io.lease_time_to_live(lease)).await {
                Ok(answer) => answer,
                Err(err) => {
                    if give_up(&err, &lease_hex, "reading the leader's lease") {
                        return;
                    }
                    zero = None;
                    sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let answered = Instant::now();
            match fold(
                &mut zero,
                sent,
                answered,
                answer.ttl,
                answer.granted,
                answer.raft_term,
                term_ttl,
            ) {
                Next::Stop => return,
                Next::ReadAt(at) => {
                    backoff.reset();
                    sleep_until(at).await;
                }
                Next::Confirm(raft_term) => {
                    match self.request(self.io.raft_term(key)).await {
                        Ok(confirmed) if confirmed == raft_term => {}
                        Ok(_) => {
                            debug!(lease = %lease_hex, "etcd's leader changed meanwhile: reading the lease again");
                            zero = None;
                            continue;
                        }
                        Err(err) => {
                            if give_up(&err, &lease_hex, "confirming etcd's leader") {
                                return;
                            }
                            zero = None;
                            sleep(backoff.next_delay()).await;
                            continue;
                        }
                    }
                    info!(lease = %lease_hex, revision, ?term_ttl, "the leader's term is over by its lease at etcd; ending it rather than waiting for etcd's sweep");
                    match self
                        .delete_own(&String::from_utf8_lossy(key), revision, false)
                        .await
                    {
                        Ok(()) => return,
                        Err(err) => {
                            if give_up(&err, &lease_hex, "deleting the expired term's key") {
                                return;
                            }
                            zero = None;
                            sleep(backoff.next_delay()).await;
                        }
                    }
                }
            }
        }
    }
}

impl Inner {
    /// The most the TTL of the term with key `key` and create revision `revision` may be,
    /// as its TTL side key says (written with the key, so with its create revision); `None`
    /// without one (a key of `etcdctl elect`, of Go, of an earlier version of this driver)
    /// or when it cannot be read: then only the slow proof applies.
    async fn term_ttl(&self, key: &[u8], revision: i64) -> Option<Duration> {
        let key = std::str::from_utf8(key).ok()?;
        let side = side_key(key, Side::Ttl);
        match self.request(self.io.range(Range::key(side))).await {
            Ok((found, _)) => found
                .kvs
                .iter()
                .find(|kv| kv.create_revision == revision)
                .and_then(|kv| parse_ttl(&kv.value)),
            Err(err) => {
                debug!(error = %ErrorChain(&err), "reading the leader's TTL failed; proving its lease's expiry instead");
                None
            }
        }
    }
}

/// Whether `err` (doing `what`) means the fast path cannot work (a refusal: etcd's sweep
/// will do); logs it either way.
fn give_up(err: &Error, lease: &str, what: &str) -> bool {
    if matches!(err, Error::Denied(_)) {
        warn!(lease, error = %ErrorChain(err), "{what} was refused; leaving the lease to etcd's sweep");
        true
    } else {
        debug!(lease, error = %ErrorChain(err), "{what} failed; trying again");
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds reads (sent at ms, answered at ms, ttl, raft term) of a lease granted
    /// `granted` seconds; returns the last verdict.
    fn series(granted: i64, reads: &[(u64, u64, i64, u64)]) -> Next {
        series_of(granted, None, reads)
    }

    /// As [`series`], behind a term whose TTL side key says `term_ttl`.
    fn series_of(granted: i64, term_ttl: Option<Duration>, reads: &[(u64, u64, i64, u64)]) -> Next {
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
                term_ttl,
            );
        }
        next
    }

    #[test]
    fn zeros_for_over_a_second_from_one_raft_term_prove_expiry() {
        // Anchored on the second read's answer (105 ms): the read sent at 1,200 ms is the
        // first at least 1,050 ms after it.
        let reads: Vec<_> = (0..13).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        assert_eq!(series(2, &reads), Next::Confirm(7));
    }

    #[test]
    fn the_first_zero_read_does_not_anchor_the_series() {
        // Over 1,050 ms after the first zero answer, but not after the second's.
        let reads: Vec<_> = (0..12).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
    }

    #[test]
    fn more_left_than_granted_says_nothing() {
        // A lessor not promoted yet answers "forever": read again a step later, and start
        // the series again.
        let base = Instant::now();
        let mut zero = None;
        fold(&mut zero, base, base + 5 * MS, 0, 2, 7, None);
        fold(&mut zero, base + 100 * MS, base + 105 * MS, 0, 2, 7, None);
        assert_eq!(
            fold(
                &mut zero,
                base + 200 * MS,
                base + 205 * MS,
                9_223_372_036,
                2,
                7,
                None
            ),
            Next::ReadAt(base + 305 * MS)
        );
        assert_eq!(zero, None);
    }

    #[test]
    fn a_second_of_zeros_is_not_enough() {
        // The anchor's answer at 105 ms; the last read sent at 1,100 ms < 105 + 1,050.
        let reads: Vec<_> = (0..12).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
    }

    #[test]
    fn a_renewal_seen_in_between_starts_the_series_again() {
        let mut reads: Vec<_> = (0..6).map(|i| (i * 100, i * 100 + 5, 0, 7)).collect();
        reads.push((600, 605, 1, 7));
        reads.extend((7..19).map(|i| (i * 100, i * 100 + 5, 0, 7)));
        assert!(matches!(series(2, &reads), Next::ReadAt(_)));
        reads.push((1900, 1905, 0, 7));
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
            fold(&mut zero, base, base + 5 * MS, 6, 10, 1, None),
            Next::ReadAt(base + Duration::from_secs(5))
        );
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 1, 10, 1, None),
            Next::ReadAt(base + STEP_MAX)
        );
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 1, 2, 1, None),
            Next::ReadAt(base + 100 * MS)
        );
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_readings_that_prove_a_terms_deadline() {
        // The default leases: a second more than the TTL, rounded up.
        assert_eq!(proving(2 * SECOND, SECOND), Some(0));
        assert_eq!(proving(3 * SECOND, 2 * SECOND), Some(0));
        assert_eq!(proving(3 * SECOND, 1500 * MS), Some(0));
        assert_eq!(proving(2 * SECOND, 500 * MS), Some(0));
        // etcd raised the lease (its shortest TTL), or a fixed lease TTL of the builder.
        assert_eq!(proving(3 * SECOND, SECOND), Some(1));
        assert_eq!(proving(10 * SECOND, 3 * SECOND), Some(6));
        // A lease no longer than the term (an earlier version, a fixed lease TTL): none.
        assert_eq!(proving(2 * SECOND, 2 * SECOND), None);
        assert_eq!(proving(2 * SECOND, 1001 * MS), None);
        assert_eq!(proving(SECOND, SECOND), None);
    }

    #[test]
    fn two_proving_reads_from_one_raft_term_prove_the_deadline_passed() {
        let fast = Some(SECOND);
        // A 2 s lease behind a 1 s term: two reads of 0, at once, without a second's wait.
        assert_eq!(
            series_of(2, fast, &[(0, 5, 0, 7), (20, 25, 0, 7)]),
            Next::Confirm(7)
        );
        // One read proves nothing (it may be a deposed leader's), nor two of two terms.
        assert!(matches!(
            series_of(2, fast, &[(0, 5, 0, 7)]),
            Next::ReadAt(_)
        ));
        assert!(matches!(
            series_of(2, fast, &[(0, 5, 0, 7), (20, 25, 0, 8)]),
            Next::ReadAt(_)
        ));
        // A read of 1 in between starts again.
        assert!(matches!(
            series_of(2, fast, &[(0, 5, 0, 7), (20, 25, 1, 7), (40, 45, 0, 7)]),
            Next::ReadAt(_)
        ));
        // Behind a term as long as the lease less nothing: only the slow proof.
        assert!(matches!(
            series_of(2, Some(2 * SECOND), &[(0, 5, 0, 7), (20, 25, 0, 7)]),
            Next::ReadAt(_)
        ));
        // A lease raised to 3 s behind a 1 s term: a read of 1 proves it too.
        assert_eq!(
            series_of(3, fast, &[(0, 5, 1, 7), (20, 25, 1, 7)]),
            Next::Confirm(7)
        );
    }

    #[test]
    fn a_live_lease_is_read_again_when_it_could_first_prove() {
        let base = Instant::now();
        let mut zero = None;
        // A 3 s lease behind a 2 s term, reading 2: it cannot read 0 within a second.
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 2, 3, 1, Some(2 * SECOND)),
            Next::ReadAt(base + SECOND)
        );
        // A 2 s lease behind a 1 s term, reading 1: every twentieth of the term (50 ms).
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 1, 2, 1, Some(SECOND)),
            Next::ReadAt(base + 50 * MS)
        );
        // An 11 s lease behind a 10 s term, reading 10: nine seconds later.
        assert_eq!(
            fold(&mut zero, base, base + 5 * MS, 10, 11, 1, Some(10 * SECOND)),
            Next::ReadAt(base + 9 * SECOND)
        );
    }
}
