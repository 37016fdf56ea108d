//! The metrics an election records, through a debugging recorder installed for this test
//! binary alone (a recorder is global: each test uses its own election names).

use std::time::Duration;

use leader_core::testing::MemoryStore;
use leader_core::testing::conformance::{next_event, wait_until};
use leader_core::{Election, Event, LossReason};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};

const WAIT: Duration = Duration::from_secs(30);

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<Snapshotter> = std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    })
}

/// Every metric recorded so far, by (kind, metric name, labels): a snapshot drains the
/// debugging recorder's counters and histograms, so they are added up here.
type Seen = std::collections::BTreeMap<(String, String, Vec<(String, String)>), DebugValue>;

/// One test at a time: a snapshot taken by another test between a gauge's change and this
/// test's look at it could be what this test reads (seen once: a gauge read 0 right after
/// the election that set it to 1).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn seen() -> std::sync::MutexGuard<'static, Seen> {
    static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(Seen::new());
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key: CompositeKey = key;
        let (kind, key) = key.into_parts();
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let slot = (format!("{kind:?}"), key.name().to_owned(), labels);
        match (seen.get_mut(&slot), value) {
            (Some(DebugValue::Counter(total)), DebugValue::Counter(n)) => *total += n,
            (Some(DebugValue::Histogram(all)), DebugValue::Histogram(more)) => all.extend(more),
            (_, value) => {
                seen.insert(slot, value);
            }
        }
    }
    seen
}

/// A metric: its kind, name, labels other than `name`, and value.
type Metric = (MetricKind, String, Vec<(String, String)>, DebugValue);

/// The metrics of election `name`.
fn metrics_of(name: &str) -> Vec<Metric> {
    let copy = |value: &DebugValue| match value {
        DebugValue::Counter(n) => DebugValue::Counter(*n),
        DebugValue::Gauge(v) => DebugValue::Gauge(*v),
        DebugValue::Histogram(samples) => DebugValue::Histogram(samples.clone()),
    };
    let mut found = Vec::new();
    for ((kind, metric, labels), value) in seen().iter() {
        if !labels.iter().any(|(k, v)| k == "name" && v == name) {
            continue;
        }
        let kind = match kind.as_str() {
            "Gauge" => MetricKind::Gauge,
            "Counter" => MetricKind::Counter,
            _ => MetricKind::Histogram,
        };
        let others = labels
            .iter()
            .filter(|(k, _)| k != "name")
            .cloned()
            .collect();
        found.push((kind, metric.clone(), others, copy(value)));
    }
    found
}

fn gauge(name: &str) -> Option<f64> {
    metrics_of(name)
        .into_iter()
        .find_map(|(kind, metric, _, value)| match value {
            DebugValue::Gauge(v)
                if kind == MetricKind::Gauge && metric == "leader_election_master_status" =>
            {
                Some(v.into_inner())
            }
            _ => None,
        })
}

fn counter(name: &str, metric: &str, label: (&str, &str)) -> u64 {
    metrics_of(name)
        .into_iter()
        .find_map(|(kind, m, labels, value)| match value {
            DebugValue::Counter(n)
                if kind == MetricKind::Counter
                    && m == metric
                    && labels == [(label.0.to_owned(), label.1.to_owned())] =>
            {
                Some(n)
            }
            _ => None,
        })
        .unwrap_or(0)
}

fn renewals(name: &str) -> usize {
    metrics_of(name)
        .into_iter()
        .find_map(|(_, metric, _, value)| match value {
            DebugValue::Histogram(samples) if metric == "leader_election_renewal_seconds" => {
                Some(samples.len())
            }
            _ => None,
        })
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn gauge_goes_to_one_then_zero_and_each_transition_is_counted() {
    let _serial = SERIAL.lock().await;
    snapshotter(); // installs the recorder
    let store = MemoryStore::new();
    let driver = store.driver();
    let name = "metrics-transitions";
    let e = Election::builder(driver.clone(), name)
        .ttl(Duration::from_secs(3))
        .build()
        .expect("valid");
    let mut events = e.subscribe();
    assert_eq!(gauge(name), None, "nothing before the first term");

    e.campaign().await.expect("elected");
    assert_eq!(gauge(name), Some(1.0));
    assert_eq!(
        counter(
            name,
            "leader_election_transitions_total",
            ("event", "elected")
        ),
        1
    );
    e.resign().await.expect("resign");
    assert_eq!(gauge(name), Some(0.0));
    assert_eq!(
        counter(
            name,
            "leader_election_transitions_total",
            ("event", "resigned")
        ),
        1
    );

    // A term that is renewed, then lost when the store cannot be reached.
    e.campaign().await.expect("elected again");
    assert_eq!(gauge(name), Some(1.0));
    wait_until("renewed twice", WAIT, || renewals(name) >= 2).await;
    driver.set_connected(false);
    next_event("elected", WAIT, &mut events).await;
    next_event("resigned", WAIT, &mut events).await;
    next_event("elected", WAIT, &mut events).await;
    assert_eq!(
        next_event("lost", WAIT, &mut events).await,
        Event::Lost {
            fencing_token: 2,
            reason: LossReason::Expired
        }
    );
    assert_eq!(gauge(name), Some(0.0));
    assert_eq!(
        counter(
            name,
            "leader_election_transitions_total",
            ("event", "elected")
        ),
        2
    );
    assert_eq!(
        counter(name, "leader_election_transitions_total", ("event", "lost")),
        1
    );
    assert_eq!(
        counter(
            name,
            "leader_election_transitions_total",
            ("event", "resigned")
        ),
        1
    );
    assert!(
        counter(name, "leader_election_store_errors_total", ("op", "renew")) >= 1,
        "the failed renewals are counted: {:?}",
        metrics_of(name)
    );
    driver.set_connected(true);
}

#[tokio::test(start_paused = true)]
async fn store_errors_are_counted_by_operation() {
    let _serial = SERIAL.lock().await;
    snapshotter(); // installs the recorder
    let store = MemoryStore::new();
    let name = "metrics-errors";
    let e = Election::builder(store.driver(), name)
        .build()
        .expect("valid");
    store.set_available(false);
    assert!(e.campaign().await.is_err());
    assert!(e.leader().await.is_err());
    assert_eq!(
        counter(
            name,
            "leader_election_store_errors_total",
            ("op", "campaign")
        ),
        1
    );
    assert_eq!(
        counter(name, "leader_election_store_errors_total", ("op", "leader")),
        1
    );
    store.set_available(true);
    // The background withdrawal of what the failed campaign may have left may have failed
    // too (op `resign`); an answer such as "not a leader" is no store error.
    let before = counter(name, "leader_election_store_errors_total", ("op", "resign"));
    let _ = e.resign().await;
    assert!(matches!(
        e.resign().await,
        Err(leader_core::Error::NotALeader)
    ));
    assert_eq!(
        counter(name, "leader_election_store_errors_total", ("op", "resign")),
        before
    );
}
