//! Metrics, with the `metrics` feature, through the `metrics` facade: the service installs
//! the exporter. Without the feature these calls compile to nothing.
//!
//! * `leader_election_master_status{name}`: gauge, 1 while this candidate leads, else 0.
//! * `leader_election_transitions_total{name,event}`: counter; `event` is `elected`,
//!   `lost` or `resigned`.
//! * `leader_election_renewal_seconds{name}`: histogram of renewal requests' durations.
//! * `leader_election_store_errors_total{name,op}`: counter of failed store calls; `op` is
//!   `campaign`, `renew`, `resign` or `leader`.

use std::time::Duration;

use crate::{Error, Event};

/// A leadership change of election `name`: the gauge and the transition counter.
pub(crate) fn transition(name: &str, event: &Event) {
    #[cfg(feature = "metrics")]
    {
        let (label, leads) = match event {
            Event::Elected { .. } => ("elected", 1.0),
            Event::Lost { .. } => ("lost", 0.0),
            Event::Resigned { .. } => ("resigned", 0.0),
        };
        metrics::gauge!("leader_election_master_status", "name" => name.to_owned()).set(leads);
        metrics::counter!(
            "leader_election_transitions_total",
            "name" => name.to_owned(),
            "event" => label
        )
        .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (name, event);
}

/// One renewal request of election `name` took `took` (answered or not).
pub(crate) fn renewal(name: &str, took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("leader_election_renewal_seconds", "name" => name.to_owned())
        .record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (name, took);
}

/// Counts `result` as a store error of `op` if it is one (not an answer such as "not a
/// leader" or "the term is gone").
pub(crate) fn store_result<T>(name: &str, op: &'static str, result: &Result<T, Error>) {
    let Err(err) = result else {
        return;
    };
    if !matches!(err, Error::Store(_) | Error::Timeout(_) | Error::Denied(_)) {
        return;
    }
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "leader_election_store_errors_total",
        "name" => name.to_owned(),
        "op" => op
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, op);
}
