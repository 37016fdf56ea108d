//! The checker's tests.

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
        "d 0 1 5000\ne 0 1 1000 5000\ns 0 1 1100 1101\ns 0 1 1200 1201\nx 0 1 1300 5000\n\
         n 0 1301 1302\n",
    );
    let b = log_of(
        1,
        "d 0 2 9000\ne 0 2 1400 9000\ns 0 2 1450 1451\nx 0 2 2000 9000\n",
    );
    let result = check(&[a, b], &[], &[], 0);
    assert!(result.passed(), "{:?}", result.violations());
    assert_eq!(result.terms, 2);
    assert_eq!(result.deadlines, 2);
}

#[test]
fn a_new_term_before_the_previous_deadline_is_an_overlap_without_any_sample() {
    // A was killed (no end): its belief lasted until its last logged deadline.
    let a = || log_of(0, "d 0 1 5000\ne 0 1 1000 5000\nd 0 1 9000\n");
    let b = || log_of(1, "d 0 2 20000\ne 0 2 8000 20000\n");
    let result = check(&[a(), b()], &[], &[], 0);
    assert_eq!(result.overlaps.len(), 1, "{result:?}");
    assert_eq!(
        result.overlap_spans,
        vec![Overlap {
            election: 0,
            earlier: 1,
            earlier_process: 0,
            later: 2,
            later_process: 1,
            from_ns: 8000,
            to_ns: 9000,
            after_tampering: false,
        }]
    );
    // Tampered at 8500: the old term's belief ended 500 ns later, within a bound of
    // 1000 (excused), not within 100 (failed).
    let tampering = [Tampering {
        token: 1,
        at_ns: 8400,
        answered_ns: 8500,
        lease_of: None,
    }];
    let excused = check(&[a(), b()], &[], &tampering, 1000);
    assert!(excused.overlaps.is_empty());
    assert_eq!(excused.overlaps_after_tampering.len(), 1);
    assert!(excused.overlap_spans[0].after_tampering);
    assert_eq!(
        excused.tampering,
        vec![TamperOutcome {
            token: 1,
            at_ns: 8400,
            answered_after_ns: 100,
            to_end_ns: Some(600),
            overlap_ns: Some(1000),
            within_bound: true,
        }]
    );
    let late = check(&[a(), b()], &[], &tampering, 100);
    assert_eq!(late.overlaps.len(), 1, "{late:?}");
    assert!(!late.tampering[0].within_bound);
}

#[test]
fn elections_are_checked_apart() {
    // Election 1's term 2 overlaps its term 1; election 0's term 2 is another term.
    let a = log_of(0, "e 0 1 1000 5000\nx 0 1 2000 5000\ne 1 1 1000 9000\n");
    let b = log_of(1, "e 0 2 3000 9000\nx 0 2 4000 9000\ne 1 2 8000 20000\n");
    let result = check(&[a, b], &[], &[], 0);
    assert_eq!(result.elections, 2);
    assert_eq!(result.overlaps.len(), 1, "{result:?}");
    assert_eq!(result.overlap_spans[0].election, 1);
}

#[test]
fn a_final_deadline_the_hook_never_logged_fails() {
    let a = log_of(
        0,
        "d 0 1 5000000\ne 0 1 1000000 5000000\nx 0 1 2000000 7000000\n",
    );
    let result = check(&[a], &[], &[], 0);
    assert_eq!(result.unlogged_deadlines.len(), 1, "{result:?}");
    assert!(!result.passed());
}

#[test]
fn a_leader_sample_after_the_logged_belief_fails() {
    let a = log_of(0, "d 0 1 5000\ne 0 1 1000 5000\ns 0 1 6000 6001\n");
    let result = check(&[a], &[], &[], 0);
    assert_eq!(result.late_samples.len(), 1, "{result:?}");
}

#[test]
fn flips_gaps_unsampled_terms_and_bad_lines_fail() {
    let flip = log_of(
        0,
        "e 0 1 0 100000000\ns 0 1 10 11\nn 0 20 21\ns 0 1 30 31\n",
    );
    assert_eq!(check(&[flip], &[], &[], 0).flips.len(), 1);
    let gap = format!(
        "e 0 1 0 {}\ns 0 1 10 11\ns 0 1 {} {}\nx 0 1 {} {}\n",
        100 * MS,
        20 * MS,
        20 * MS + 1,
        30 * MS,
        100 * MS
    );
    let gapped = log_of(0, &gap);
    let alone = check(std::slice::from_ref(&gapped), &[], &[], 0);
    assert!(alone.gaps.is_empty(), "no handover in the gap");
    assert_eq!(alone.quiet_gaps, 1);
    // Another process's term ended inside the gap: the samples missed a handover.
    let other = log_of(
        1,
        &format!("e 0 0 0 {}\nx 0 0 {} {}\n", 100 * MS, 10 * MS, 100 * MS),
    );
    let hiding = check(&[other, log_of(0, &gap)], &[], &[], 0);
    assert_eq!(hiding.gaps.len(), 1, "{hiding:?}");
    let paused = check(&[gapped], &[(0, 0, 25 * MS)], &[], 0);
    assert_eq!(paused.quiet_gaps, 0, "paused");
    let unsampled = log_of(
        0,
        &format!("e 0 1 0 {}\nx 0 1 {} {}\n", 100 * MS, 50 * MS, 100 * MS),
    );
    assert_eq!(check(&[unsampled], &[], &[], 0).unsampled.len(), 1);
    // Other elections are not sampled: no sample is no violation there.
    let passenger = log_of(
        0,
        &format!("e 3 1 0 {}\nx 3 1 {} {}\n", 100 * MS, 50 * MS, 100 * MS),
    );
    assert!(check(&[passenger], &[], &[], 0).unsampled.is_empty());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    std::fs::write(&path, "e 0 1 0 10\nbogus\ns 0 1 2").expect("write");
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
    let logs = [log_of(
        0,
        "e 0 1 0 10\nx 0 1 5 10\ne 0 3 20 30\nx 0 3 25 30\n",
    )];
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
    let a = log_of(
        0,
        "e 0 1 0 1000\ns 0 1 10 11\ns 0 1 100 101\nx 0 1 200 1000\n",
    );
    let b = log_of(
        1,
        "e 0 2 300 1000\ns 0 2 50 51\ns 0 2 400 401\nx 0 2 500 1000\n",
    );
    let result = check(&[a, b], &[], &[], 0);
    assert_eq!(result.sampled_overlaps.len(), 1, "{result:?}");
    let reused = check(
        &[
            log_of(0, "e 0 5 0 10\nx 0 5 5 10\n"),
            log_of(1, "e 0 5 20 30\nx 0 5 25 30\n"),
        ],
        &[],
        &[],
        0,
    );
    assert_eq!(reused.token_violations.len(), 1);
    let backward = check(
        &[
            log_of(0, "e 0 5 100 110\nx 0 5 105 110\n"),
            log_of(1, "e 0 6 50 60\nx 0 6 55 60\n"),
        ],
        &[],
        &[],
        0,
    );
    assert!(!backward.token_violations.is_empty());
}

#[test]
fn leaderless_time_is_what_no_term_covers() {
    let logs = [
        log_of(0, "e 0 1 100 1000\nx 0 1 300 1000\n"),
        log_of(
            1,
            "e 0 2 250 1000\nx 0 2 400 1000\ne 0 3 600 1000\nx 0 3 700 1000\n",
        ),
    ];
    // 0..1000: covered 100..400 and 600..700.
    assert_eq!(leaderless_ns(&logs, &[], 0, 1000), 1000 - 300 - 100);
    assert_eq!(leaderless_ns(&logs, &[], 200, 300), 0);
    // Process 1 killed at 650: its term 3 works only 600..650.
    assert_eq!(
        leaderless_ns(&logs, &[(1, 650, u64::MAX)], 0, 1000),
        1000 - 300 - 50
    );
}

#[test]
fn the_last_deadline_is_read_from_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    std::fs::write(
        &path,
        "d 0 7 100\ne 0 7 50 100\ns 0 7 60 61\nd 1 3 999\nd 0 7 200\ns 0 7 70 71\n",
    )
    .expect("write");
    assert_eq!(last_deadline(&path, 7).expect("read"), Some(200));
    assert_eq!(last_deadline(&path, 8).expect("read"), None);
}

#[test]
fn a_revoked_lease_excuses_the_overlaps_of_every_election_of_its_process() {
    // Process 0 holds term 1 of election 0 and term 7 of election 3; its lease is revoked
    // at 8400 (answered 8500); both elections' next terms begin before it notices.
    let a = || log_of(0, "e 0 1 1000 9000\ne 3 7 1000 9000\n");
    let b = || log_of(1, "e 0 2 8600 20000\ne 3 8 8700 20000\n");
    let revoked = [Tampering {
        token: 1,
        at_ns: 8400,
        answered_ns: 8500,
        lease_of: Some(0),
    }];
    let result = check(&[a(), b()], &[], &revoked, 1000);
    assert!(result.overlaps.is_empty(), "{result:?}");
    assert_eq!(result.overlaps_after_tampering.len(), 2);
    // A deleted key is the driven election's alone: election 3's overlap is not excused.
    let deleted = [Tampering {
        lease_of: None,
        ..revoked[0]
    }];
    let result = check(&[a(), b()], &[], &deleted, 1000);
    assert_eq!(result.overlaps.len(), 1, "{result:?}");
    assert!(result.overlaps[0].starts_with("election 3"));
}
