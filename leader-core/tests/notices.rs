//! The notices module (`leader_core::notices`) on a fake push source, on Tokio's paused
//! clock: routing, linger, wakeups at reconnection, the health check, the backoff, the
//! order of (re)subscriptions, the end of the connection task, and the observe loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use leader_core::notices::{Commands, Connection, Hub, Look, Notices, Observed, Settings, Source};
use leader_core::{Error, LeaderInfo, Result};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// What the fake store saw and does.
#[derive(Default)]
struct Store {
    /// Every command, in order: "connect", "subscribe a,b", "unsubscribe a", "ping".
    log: Vec<String>,
    connects: usize,
    /// Connections fail.
    down: bool,
    /// Pings fail (a half-open connection: no message, no error, no answer).
    half_open: bool,
    /// Channels the store refuses.
    refused: Vec<String>,
    /// The channels of the open connection.
    subscribed: Vec<String>,
    /// The open connection's messages.
    messages: Option<mpsc::UnboundedSender<(String, String)>>,
}

#[derive(Clone, Default)]
struct Fake {
    store: Arc<Mutex<Store>>,
    /// Calls of `wake_all`.
    woken_all: Arc<AtomicUsize>,
    fixed: Vec<String>,
}

impl Fake {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("fake store lock")
    }

    /// Pushes `payload` on `channel`: delivered if the open connection subscribes to it.
    fn push(&self, channel: &str, payload: &str) -> bool {
        let store = self.store();
        match &store.messages {
            Some(tx) if store.subscribed.iter().any(|c| c == channel) => {
                tx.send((channel.to_owned(), payload.to_owned())).is_ok()
            }
            _ => false,
        }
    }

    /// Drops the open connection (its messages end).
    fn cut(&self) {
        let mut store = self.store();
        store.messages = None;
        store.subscribed.clear();
    }

    fn log(&self) -> Vec<String> {
        self.store().log.clone()
    }

    fn count(&self, entry: &str) -> usize {
        self.store().log.iter().filter(|e| *e == entry).count()
    }
}

struct FakeCommands(Arc<Mutex<Store>>);

#[async_trait::async_trait]
impl Commands for FakeCommands {
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool> {
        let mut store = self.0.lock().expect("fake store lock");
        store.log.push(format!("subscribe {}", channels.join(",")));
        if store.messages.is_none() {
            return Err(Error::Store("connection closed".into()));
        }
        if channels.iter().any(|c| store.refused.contains(c)) {
            return Ok(false);
        }
        store.subscribed.extend(channels.iter().cloned());
        Ok(true)
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        let mut store = self.0.lock().expect("fake store lock");
        store.log.push(format!("unsubscribe {channel}"));
        store.subscribed.retain(|c| c != channel);
        Ok(())
    }

    async fn ping(&mut self) -> Result<()> {
        let mut store = self.0.lock().expect("fake store lock");
        store.log.push("ping".to_owned());
        if store.half_open || store.messages.is_none() {
            return Err(Error::Timeout(Duration::from_secs(2)));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for Fake {
    type Message = (String, String);

    async fn connect(&self, _attempt: usize) -> Result<Connection<Self::Message>> {
        let mut store = self.store();
        store.log.push("connect".to_owned());
        store.connects += 1;
        if store.down {
            return Err(Error::Store("refused".into()));
        }
        store.half_open = false;
        store.subscribed.clear();
        let (tx, rx) = mpsc::unbounded_channel();
        store.messages = Some(tx);
        Ok(Connection {
            commands: Box::new(FakeCommands(Arc::clone(&self.store))),
            messages: futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|message| (message, rx))
            })
            .boxed(),
        })
    }

    fn route<'m>(&self, message: &'m Self::Message) -> Option<&'m str> {
        (message.1 != "ignore").then_some(message.0.as_str())
    }

    fn fixed_channels(&self) -> Vec<String> {
        self.fixed.clone()
    }

    fn wake_all(&self) {
        self.woken_all.fetch_add(1, Ordering::SeqCst);
    }

    fn name(&self) -> &'static str {
        "fake"
    }
}

fn settings(linger: Duration) -> Settings {
    Settings {
        linger,
        ..Settings::default()
    }
}

/// A hub on a fake store, and a weak handle on the source to see when the task ends.
fn fake_hub(fake: &Fake, linger: Duration) -> (Hub<Fake>, Weak<Fake>) {
    let source = Arc::new(fake.clone());
    let weak = Arc::downgrade(&source);
    (Hub::with_source(source, settings(linger)), weak)
}

/// Waits (on the paused clock) until `condition` holds, failing after `within`.
async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a notice comes within `within` (paused clock).
async fn woken(notices: &mut Notices, within: Duration) -> bool {
    timeout(within, notices.changed()).await.is_ok()
}

const SHORT: Duration = Duration::from_millis(100);

#[tokio::test(start_paused = true)]
async fn messages_wake_the_watchers_of_their_channel_only() {
    let fake = Fake::default();
    let (hub, _) = fake_hub(&fake, Duration::ZERO);
    let mut a1 = hub.subscribe("a").await;
    let mut a2 = hub.subscribe("a").await;
    let mut b = hub.subscribe("b").await;
    // (The first connection subscribes to "a", then the task confirms each call: an
    // already subscribed channel costs a second SUBSCRIBE, which the store accepts.)
    assert_eq!(fake.count("connect"), 1);
    assert_eq!(fake.store().subscribed, ["a", "a", "a", "b"]);
    for n in [&mut a1, &mut a2, &mut b] {
        n.mark_seen();
    }

    assert!(fake.push("a", "hello"));
    assert!(woken(&mut a1, SHORT).await);
    assert!(woken(&mut a2, SHORT).await);
    assert!(!woken(&mut b, SHORT).await, "b woken by a's message");

    // A message the source does not route wakes nobody.
    assert!(fake.push("b", "ignore"));
    assert!(!woken(&mut b, SHORT).await, "b woken by an ignored message");
    assert!(fake.push("b", "hello"));
    assert!(woken(&mut b, SHORT).await);
}

#[tokio::test(start_paused = true)]
async fn a_channel_lingers_before_it_is_unsubscribed() {
    let fake = Fake::default();
    let linger = Duration::from_secs(20);
    let (hub, _) = fake_hub(&fake, linger);
    let a = hub.subscribe("a").await;
    let subscribes = fake.count("subscribe a");
    let dropped = Instant::now();
    drop(a);

    // Watched again while it lingers: no SUBSCRIBE, and it still hears its messages.
    let mut again = hub.subscribe("a").await;
    again.mark_seen();
    assert!(fake.push("a", "x"));
    assert!(woken(&mut again, SHORT).await);
    drop(again);
    let again = hub.existing("a").expect("a still subscribed");
    assert_eq!(fake.count("subscribe a"), subscribes, "{:?}", fake.log());
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(again);

    let dropped_again = Instant::now();
    eventually("a unsubscribed", Duration::from_secs(40), || {
        fake.count("unsubscribe a") == 1
    })
    .await;
    assert!(dropped_again - dropped < linger);
    assert!(
        Instant::now() - dropped_again >= linger,
        "unsubscribed after {:?}",
        Instant::now() - dropped_again
    );
    assert!(hub.existing("a").is_none());
    // Back after it was unsubscribed: a new SUBSCRIBE.
    let _a = hub.subscribe("a").await;
    assert_eq!(
        fake.count("subscribe a"),
        subscribes + 1,
        "{:?}",
        fake.log()
    );
}

#[tokio::test(start_paused = true)]
async fn without_linger_the_last_watcher_unsubscribes_at_once() {
    let fake = Fake::default();
    let (hub, _) = fake_hub(&fake, Duration::ZERO);
    let a1 = hub.subscribe("a").await;
    let a2 = hub.subscribe("a").await;
    drop(a1);
    tokio::task::yield_now().await;
    assert_eq!(fake.count("unsubscribe a"), 0, "{:?}", fake.log());
    drop(a2);
    eventually("a unsubscribed", SHORT, || fake.count("unsubscribe a") == 1).await;
    assert!(hub.existing("a").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_message_lost_while_disconnected_wakes_every_watcher_at_reconnection() {
    let fake = Fake {
        fixed: vec!["own".to_owned()],
        ..Fake::default()
    };
    let (hub, _) = fake_hub(&fake, Duration::ZERO);
    let mut z = hub.subscribe("z").await;
    let mut a = hub.subscribe("a").await;
    let mut m = hub.subscribe("m").await;
    let woken_before = fake.woken_all.load(Ordering::SeqCst);

    fake.cut();
    // The disconnection wakes everyone at once (they fall back to their timers and look).
    for n in [&mut z, &mut a, &mut m] {
        assert!(woken(n, SHORT).await);
        n.mark_seen();
    }
    // Lost: nobody listens.
    assert!(!fake.push("a", "lost"));

    eventually("reconnected", Duration::from_secs(1), || {
        fake.store().connects == 2
    })
    .await;
    // Subscribed again in the order of first subscription, the fixed channels last.
    assert_eq!(fake.log().last().unwrap(), "subscribe z,a,m,own");
    for n in [&mut z, &mut a, &mut m] {
        assert!(
            woken(n, SHORT).await,
            "{} not woken at reconnection",
            n.channel()
        );
    }
    // The source's own routes too, at the disconnection and at the reconnection.
    assert_eq!(fake.woken_all.load(Ordering::SeqCst), woken_before + 2);
    // And messages flow again.
    a.mark_seen();
    assert!(fake.push("a", "new"));
    assert!(woken(&mut a, SHORT).await);
}

#[tokio::test(start_paused = true)]
async fn the_health_check_finds_a_dead_connection() {
    let fake = Fake::default();
    let (hub, _) = fake_hub(&fake, Duration::ZERO);
    let mut a = hub.subscribe("a").await;
    a.mark_seen();
    let every = hub.settings().health_check_every;

    // An idle healthy connection is pinged and kept.
    eventually("pinged", every * 2, || fake.count("ping") == 1).await;
    assert_eq!(fake.store().connects, 1);

    // Half-open: no error, no message, but no answer either.
    fake.store().half_open = true;
    let since = Instant::now();
    assert!(woken(&mut a, every * 2).await, "not woken");
    assert!(Instant::now() - since <= every);
    eventually("reconnected", Duration::from_secs(1), || {
        fake.store().connects == 2
    })
    .await;
    assert_eq!(fake.log().last().unwrap(), "subscribe a");
}

#[tokio::test(start_paused = true)]
async fn reconnections_back_off_and_reset_after_a_connection_that_was_up() {
    let fake = Fake::default();
    fake.store().down = true;
    let (hub, _) = fake_hub(&fake, Duration::ZERO);
    let start = Instant::now();
    // Down: returns at once, without waiting for a confirmation.
    let mut a = hub.subscribe("a").await;
    assert!(Instant::now() - start < SHORT);

    // 50 ms doubling to 2 s (jittered in their upper half): about 12 tries in 20 s, not a
    // hot loop.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let tries = fake.store().connects;
    assert!((8..=30).contains(&tries), "{tries} connections in 20 s");
    // At the longest delay: at most one try a second or two.
    let before = fake.store().connects;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let late = fake.store().connects - before;
    assert!((5..=10).contains(&late), "{late} connections in 10 s");

    // Up again: connected within the longest delay, and everyone woken.
    a.mark_seen();
    fake.store().down = false;
    eventually("connected", hub.settings().max_backoff * 2, || {
        fake.store().log.last().map(String::as_str) == Some("subscribe a")
    })
    .await;
    assert!(woken(&mut a, SHORT).await);

    // Dropped after it was up: the next try is at the shortest delay again.
    let before = fake.store().connects;
    fake.cut();
    eventually(
        "reconnected at once",
        hub.settings().min_backoff * 2,
        || fake.store().connects == before + 1,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn subscriptions_wait_for_their_confirmation_and_see_refusals() {
    let fake = Fake::default();
    fake.store().refused.push("secret".to_owned());
    let (hub, _) = fake_hub(&fake, Duration::from_secs(20));
    assert!(hub.subscribe_checked("a").await.is_ok());
    assert!(fake.store().subscribed.contains(&"a".to_owned()));
    let refused = hub.subscribe_checked("secret").await;
    assert!(refused.is_err());
    assert!(hub.existing("secret").is_none());
    // The connection is fine.
    assert_eq!(fake.store().connects, 1);
    assert!(hub.confirm("own").await);
    assert_eq!(fake.log().last().unwrap(), "subscribe own");
}

#[tokio::test(start_paused = true)]
async fn the_task_ends_when_the_hub_and_every_watcher_are_gone() {
    let fake = Fake::default();
    let (hub, source) = fake_hub(&fake, Duration::ZERO);
    // Nothing runs before the first use.
    assert_eq!(fake.store().connects, 0);
    let mut a = hub.subscribe("a").await;
    drop(hub);
    // A watcher keeps it running: messages still come.
    a.mark_seen();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(source.upgrade().is_some(), "ended with a watcher left");
    assert!(fake.push("a", "x"));
    assert!(woken(&mut a, SHORT).await);
    drop(a);
    eventually("task ended", SHORT, || source.upgrade().is_none()).await;

    // Also while it waits to reconnect.
    let fake = Fake::default();
    fake.store().down = true;
    let (hub, source) = fake_hub(&fake, Duration::ZERO);
    drop(hub.subscribe("a").await);
    drop(hub);
    eventually("task ended", SHORT, || source.upgrade().is_none()).await;
}

/// An election whose looks are counted, on the fake's channel "e".
struct Election {
    hub: Arc<Hub<Fake>>,
    looks: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Observed for Election {
    async fn notices(&self) -> Notices {
        self.hub.subscribe("e").await
    }

    async fn look(&self) -> Look {
        let n = self.looks.fetch_add(1, Ordering::SeqCst) as u64;
        (
            Ok(Some(LeaderInfo::new("me", Vec::new(), n))),
            Duration::from_secs(60),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn observe_looks_at_each_notice_or_when_the_look_said() {
    let fake = Fake::default();
    let (hub, _) = fake_hub(&fake, Duration::ZERO);
    let looks = Arc::new(AtomicUsize::new(0));
    let mut stream = leader_core::notices::observe(Election {
        hub: Arc::new(hub),
        looks: Arc::clone(&looks),
    });
    let first = stream.next().await.unwrap().unwrap().unwrap();
    assert_eq!(first.fencing_token, 0);
    assert_eq!(
        fake.store().subscribed.first().map(String::as_str),
        Some("e")
    );

    // A notice: looked again at once.
    let start = Instant::now();
    assert!(fake.push("e", "elected"));
    let second = stream.next().await.unwrap().unwrap().unwrap();
    assert_eq!(second.fencing_token, 1);
    assert!(Instant::now() - start < SHORT);

    // No notice: looked again when the look said.
    let start = Instant::now();
    let third = stream.next().await.unwrap().unwrap().unwrap();
    assert_eq!(third.fencing_token, 2);
    let waited = Instant::now() - start;
    assert!(
        waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
        "{waited:?}"
    );
    assert_eq!(looks.load(Ordering::SeqCst), 3);
}
