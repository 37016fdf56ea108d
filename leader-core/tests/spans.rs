//! Campaign, renewal and resignation run in spans that carry the election, the candidate
//! and the fencing token: a layer records every span's fields.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leader_core::Election;
use leader_core::testing::MemoryStore;
use leader_core::testing::conformance::wait_until;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Each span's name and fields, by span id, as recorded so far.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<BTreeMap<u64, Span>>>);

/// A span's name and its fields (name, then value as `Debug` prints it).
type Span = (String, BTreeMap<String, String>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.0.lock().expect("lock");
        spans.insert(id.into_u64(), (attrs.metadata().name().to_owned(), fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.0.lock().expect("lock");
        if let Some((_, fields)) = spans.get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

impl Spans {
    /// The fields of every span named `name`.
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        let spans = self.0.lock().expect("lock");
        spans
            .values()
            .filter(|(n, _)| n == name)
            .map(|(_, fields)| fields.clone())
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn campaign_renewal_and_resignation_spans_carry_election_candidate_and_token() {
    let spans = Spans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let store = MemoryStore::new();
    let e = Election::builder(store.driver(), "spans")
        .ttl(Duration::from_secs(3))
        .build()
        .expect("valid");
    let term = e.campaign().await.expect("elected");
    let token = term.fencing_token().to_string();
    wait_until("a renewal", Duration::from_secs(30), || {
        !spans.named("renew").is_empty()
    })
    .await;
    e.resign().await.expect("resign");

    for name in ["campaign", "renew", "resign"] {
        let found = spans.named(name);
        assert!(!found.is_empty(), "no {name} span");
        for fields in found {
            assert_eq!(
                fields.get("election").map(String::as_str),
                Some("spans"),
                "{name}: {fields:?}"
            );
            assert_eq!(
                fields.get("candidate"),
                Some(&e.id().to_owned()),
                "{name}: {fields:?}"
            );
            assert_eq!(
                fields.get("fencing_token"),
                Some(&token),
                "{name}: {fields:?}"
            );
        }
    }
}
