//! The deterministic simulation of the state machine (see `leader_core::testing::sim`):
//! `SIM_SEEDS` seeds (default 2,000) spread over the cores, or the one seed `SIM_SEED`.
//!
//! `ci/test` runs the default; `ci/soak` runs 100,000 seeds. A failure prints the seed and
//! the command that replays it.

use std::time::Instant;

use leader_core::testing::sim;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a whole number")),
    )
}

#[test]
fn simulated_schedules_keep_every_safety_property() {
    if let Some(seed) = env_u64("SIM_SEED") {
        match sim::run(seed) {
            Ok(report) => println!("seed {seed}: ok, {report:?}"),
            Err(violation) => panic!("{violation}"),
        }
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(2_000);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|worker| {
            std::thread::spawn(move || {
                let mut total = sim::Report::default();
                let mut failures = Vec::new();
                let mut seed = first + worker;
                while seed < first + seeds {
                    match sim::run(seed) {
                        Ok(report) => total += report,
                        Err(violation) => failures.push(violation),
                    }
                    seed += threads;
                }
                (total, failures)
            })
        })
        .collect();
    let mut total = sim::Report::default();
    let mut failures = Vec::new();
    for worker in workers {
        let (report, found) = worker.join().expect("a simulation thread panicked");
        total += report;
        failures.extend(found);
    }
    failures.sort_by_key(|v| v.seed);
    println!(
        "{seeds} seeds from {first} in {:.1?}: {} terms, {} requests ({} failed, {} answers \
         lost, {} late effects, {} renewals answered from a shared confirmation), {} outages, \
         {} suspensions, {} API calls; {} violations",
        started.elapsed(),
        total.terms,
        total.requests,
        total.failures,
        total.lost_answers,
        total.late_effects,
        total.shared_confirmations,
        total.outages,
        total.suspensions,
        total.calls,
        failures.len()
    );
    if let Some(first) = failures.first() {
        for violation in failures.iter().take(10) {
            eprintln!("{violation}");
        }
        panic!(
            "{} of {seeds} seeds broke a property; first: {first}",
            failures.len()
        );
    }
}
