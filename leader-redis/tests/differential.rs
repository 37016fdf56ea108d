//! The model of Redis (`tests/sim/`) against a real redis-server: the same scripted
//! sequences of I/O-layer calls (every method of `RedisIo` and of its pub/sub connection)
//! run on both, and every answer and every pushed message (the events channel, the
//! waiters' wake channels, the keyspace notifications of the leader key) is compared after
//! each step. What legitimately differs is normalised: remaining leases (`PTTL`) are
//! compared in whole seconds (or as "none" / "no expiry"). Each sequence uses its own key
//! prefix, so fencing tokens start at 1 on both sides and compare exactly.

mod sim;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use leader_redis::io::{
    Acquire, AcquireReply, Candidates, HandOver, LeaderReply, Message, Proclaim, PubSubConnection,
    RedisIo, Refresh, RefreshReply, Renewal, Resign,
};
use leader_redis::{ElectionKeys, RedisDriver};
use leader_testkit::sim::{ClientId, Net};
use leader_testkit::{RedisOptions, RedisServer};
use sim::RedisModel;

/// One call of the I/O layer, or a pause.
#[derive(Debug, Clone)]
enum Step {
    Acquire(Acquire),
    Renew(Vec<Renewal>),
    Resign(Resign),
    Refresh(Refresh),
    Leader(String),
    Candidates(Candidates),
    HandOver(HandOver),
    Proclaim(Proclaim),
    Holds(String, String, u64),
    Subscribe(Vec<String>),
    Unsubscribe(String),
    /// Waits this many milliseconds (real time: keys expire on both sides).
    Wait(u64),
}

/// A remaining lease, as compared: gone, no expiry, or whole seconds (rounded).
fn lease(pttl: i64) -> String {
    match pttl {
        -2 => "none".into(),
        -1 => "no expiry".into(),
        ms => format!("~{}s", (ms + 500) / 1000),
    }
}

/// One side: an I/O layer and a pub/sub connection on it.
struct Side {
    name: &'static str,
    io: Arc<dyn RedisIo>,
    pubsub: PubSubConnection,
    /// After a pause: the model expires keys at its next request, Redis in its own sweep
    /// (ten times a second); this makes the model look at its keys now.
    sweep: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Side {
    async fn new(
        name: &'static str,
        io: Arc<dyn RedisIo>,
        sweep: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Self {
        let pubsub = io.pubsub(0).await.expect("a pub/sub connection");
        Side {
            name,
            io,
            pubsub,
            sweep,
        }
    }

    /// Runs `step`: its answer, normalised.
    async fn run(&mut self, step: &Step) -> String {
        let io = &self.io;
        match step {
            Step::Acquire(r) => match io.acquire(r).await {
                Ok(AcquireReply::Held(Some(pttl))) => format!("Held({})", lease(pttl)),
                other => format!("{other:?}"),
            },
            Step::Renew(terms) => format!("{:?}", io.renew(terms).await),
            Step::Resign(r) => format!("{:?}", io.resign(r).await),
            Step::Refresh(r) => match io.refresh(r).await {
                Ok(RefreshReply {
                    missing,
                    head,
                    pttl,
                }) => format!(
                    "missing {missing:?}, head {:?}, lease {}",
                    String::from_utf8_lossy(&head),
                    lease(pttl)
                ),
                Err(err) => format!("Err({err})"),
            },
            Step::Leader(key) => match io.leader(key).await {
                Ok(Some(LeaderReply {
                    owner,
                    value,
                    token,
                    pttl,
                })) => format!(
                    "{owner} {:?} #{token} {}",
                    String::from_utf8_lossy(&value),
                    lease(pttl)
                ),
                other => format!("{other:?}"),
            },
            Step::Candidates(r) => format!("{:?}", io.candidates(r).await),
            Step::HandOver(r) => format!("{:?}", io.hand_over(r).await),
            Step::Proclaim(r) => format!("{:?}", io.proclaim(r).await),
            Step::Holds(key, owner, token) => {
                format!("{:?}", io.holds(key, owner, *token).await)
            }
            Step::Subscribe(channels) => {
                format!("{:?}", self.pubsub.commands.subscribe(channels).await)
            }
            Step::Unsubscribe(channel) => {
                format!("{:?}", self.pubsub.commands.unsubscribe(channel).await)
            }
            Step::Wait(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                if let Some(sweep) = &self.sweep {
                    sweep();
                }
                "waited".into()
            }
        }
    }

    /// The messages pushed since the last look: a `PING` on the pub/sub connection first
    /// (its answer comes after every message sent before it), then whatever arrives
    /// within a short quiet time.
    async fn pushed(&mut self) -> Vec<String> {
        let ping = self.pubsub.commands.ping().await;
        assert!(ping.is_ok(), "{}: PING on pub/sub: {ping:?}", self.name);
        let mut out = Vec::new();
        while let Ok(Some(Message { channel, payload })) =
            tokio::time::timeout(Duration::from_millis(30), self.pubsub.messages.next()).await
        {
            out.push(format!("{channel}: {}", String::from_utf8_lossy(&payload)));
        }
        out
    }
}

/// Runs `steps` on the model and on a real server, comparing after each step.
async fn differ(server: &RedisServer, steps: &[Step]) {
    let net = Net::quiet();
    let model = Arc::new(RedisModel::with(&net, true, false));
    let swept = Arc::clone(&model);
    let mut modelled = Side::new(
        "model",
        Arc::new(model.io(&net, ClientId(0))),
        Some(Box::new(move || swept.with_store(|_| ()))),
    )
    .await;
    let client = redis::Client::open(server.url()).expect("url");
    let mut real = Side::new("redis", RedisDriver::builder(client).build_io(), None).await;
    // The real layer reads the server's keyspace setting at its first request.
    let _ = real.io.leader("differential:warm-up").await;
    assert_eq!(
        modelled.io.keyspace(),
        real.io.keyspace(),
        "keyspace setting"
    );
    let mut seen = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let expected = real.run(step).await;
        let got = modelled.run(step).await;
        assert_eq!(got, expected, "step {i}: {step:?}");
        let expected_messages = real.pushed().await;
        let got_messages = modelled.pushed().await;
        assert_eq!(
            got_messages, expected_messages,
            "messages after step {i}: {step:?}"
        );
        seen.push(format!("{i}: {expected} {expected_messages:?}"));
    }
    println!("{}", seen.join("\n"));
    // The comparison must have had something to compare.
    let messages = seen.iter().filter(|line| !line.ends_with("[]")).count();
    assert!(messages >= 5, "only {messages} steps pushed messages");
}

async fn server() -> RedisServer {
    tokio::task::spawn_blocking(|| {
        RedisServer::start_with(RedisOptions {
            config: vec!["notify-keyspace-events KA".to_owned()],
            ..RedisOptions::default()
        })
    })
    .await
    .expect("start task")
    .expect("redis-server starts (install it with: sudo apt-get install -y redis-server)")
}

/// Builds the requests of one election's candidates.
struct Script {
    keys: ElectionKeys,
}

const LONG: u64 = 60_000;

impl Script {
    fn new(test: &str) -> Self {
        let prefix = format!("diff-{test}-{:08x}:", rand::random::<u32>());
        Script {
            keys: ElectionKeys::new(&prefix, "jobs"),
        }
    }

    fn place(who: &str) -> Vec<u8> {
        format!("{who}\nvalue of {who}").into_bytes()
    }

    fn acquire(&self, who: &str, ttl_ms: u64, in_line: bool, stand: bool, ask: bool) -> Step {
        let k = &self.keys;
        Step::Acquire(Acquire {
            leader: k.leader.clone(),
            fence: k.fence.clone(),
            line: k.line.clone(),
            channel: k.channel.clone(),
            owner: who.into(),
            value: format!("value of {who}").into_bytes(),
            ttl_ms,
            place: Self::place(who),
            in_line,
            stand,
            ask_pttl: ask,
        })
    }

    fn renewal(&self, who: &str, token: u64, ttl_ms: u64) -> Renewal {
        Renewal {
            leader: self.keys.leader.clone(),
            owner: who.into(),
            token,
            ttl_ms,
        }
    }

    fn resign(&self, who: &str, token: Option<u64>, keep_ms: u64) -> Step {
        let k = &self.keys;
        Step::Resign(Resign {
            leader: k.leader.clone(),
            line: k.line.clone(),
            line_until: k.line_until.clone(),
            owner: who.into(),
            place: Self::place(who),
            token,
            channel: k.channel.clone(),
            wake_prefix: k.wake_prefix.clone(),
            keep_ms,
        })
    }

    fn refresh(&self, who: &[&str], keep_ms: u64, period_ms: u64) -> Step {
        let k = &self.keys;
        Step::Refresh(Refresh {
            leader: k.leader.clone(),
            line: k.line.clone(),
            line_until: k.line_until.clone(),
            line_maintained: k.line_maintained.clone(),
            keep_ms,
            period_ms,
            wake_prefix: k.wake_prefix.clone(),
            places: who.iter().map(|w| Self::place(w)).collect(),
        })
    }

    fn leader(&self) -> Step {
        Step::Leader(self.keys.leader.clone())
    }

    fn candidates(&self, keep_ms: u64) -> Step {
        let k = &self.keys;
        Step::Candidates(Candidates {
            leader: k.leader.clone(),
            line: k.line.clone(),
            line_until: k.line_until.clone(),
            keep_ms,
        })
    }

    fn hand_over(&self, who: &str, token: u64, nominee: &str) -> Step {
        let k = &self.keys;
        Step::HandOver(HandOver {
            leader: k.leader.clone(),
            line: k.line.clone(),
            line_until: k.line_until.clone(),
            owner: who.into(),
            token,
            nominee: nominee.into(),
            ttl_ms: LONG,
            wake_prefix: k.wake_prefix.clone(),
            channel: k.channel.clone(),
        })
    }

    fn proclaim(&self, who: &str, token: u64, value: &str) -> Step {
        Step::Proclaim(Proclaim {
            leader: self.keys.leader.clone(),
            owner: who.into(),
            token,
            value: value.as_bytes().to_vec(),
            channel: self.keys.channel.clone(),
        })
    }

    fn holds(&self, who: &str, token: u64) -> Step {
        Step::Holds(self.keys.leader.clone(), who.into(), token)
    }

    /// Subscribes to the events channel, the wake channels of `who`, and the leader key's
    /// keyspace notifications.
    fn subscribe(&self, who: &[&str]) -> Step {
        let k = &self.keys;
        let mut channels = vec![k.channel.clone(), format!("__keyspace@0__:{}", k.leader)];
        channels.extend(who.iter().map(|w| k.wake(w)));
        Step::Subscribe(channels)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_its_handoffs_renewals_handover_and_proclaim_match() {
    let server = server().await;
    let s = Script::new("line");
    let steps = vec![
        s.subscribe(&["a", "b", "c"]),
        // a peeks and is elected; b and c stand in line (c asks the lease's end).
        s.acquire("a", LONG, false, false, false),
        s.acquire("b", LONG, false, false, false),
        s.acquire("b", LONG, false, true, false),
        s.acquire("c", LONG, false, true, true),
        s.acquire("b", LONG, true, true, false),
        s.candidates(1_000_000_000_000_000),
        s.refresh(&["b", "c", "d"], LONG, 40_000),
        s.refresh(&["c"], LONG, 40_000),
        Step::Renew(vec![s.renewal("a", 1, LONG), s.renewal("b", 1, LONG)]),
        Step::Renew(vec![s.renewal("a", 2, LONG)]),
        s.holds("a", 1),
        s.holds("a", 2),
        s.holds("b", 1),
        s.proclaim("a", 1, "10.0.0.7:9090"),
        s.proclaim("b", 1, "nope"),
        s.leader(),
        // A resignation by another token changes nothing but the line; then a's resigns.
        s.resign("a", Some(7), LONG),
        s.resign("a", Some(1), LONG),
        // b was woken (popped): elected without its place.
        s.acquire("b", LONG, false, true, false),
        s.leader(),
        // Handover to c: a nomination only c may take.
        s.hand_over("b", 2, "zed"),
        s.hand_over("a", 1, "c"),
        s.hand_over("b", 2, "c"),
        s.leader(),
        s.acquire("a", LONG, false, true, true),
        s.candidates(1_000_000_000_000_000),
        s.acquire("c", LONG, false, true, false),
        s.leader(),
        // A withdrawal without a token leaves the line and keeps the term.
        s.resign("c", None, LONG),
        s.resign("a", None, LONG),
        s.candidates(1_000_000_000_000_000),
        s.resign("c", Some(3), LONG),
        s.leader(),
        s.refresh(&[], LONG, 40_000),
        Step::Unsubscribe(s.keys.wake("a")),
    ];
    differ(&server, &steps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_wakeups_passed_on_and_pruning_match() {
    let server = server().await;
    let s = Script::new("expiry");
    let steps = vec![
        s.subscribe(&["a", "b", "c"]),
        // A short lease expires on both sides.
        s.acquire("a", 300, false, false, false),
        s.acquire("b", LONG, false, true, true),
        s.acquire("c", LONG, false, true, false),
        Step::Wait(500),
        s.leader(),
        Step::Renew(vec![s.renewal("a", 1, LONG)]),
        // Nobody leads: the refresh wakes the head (b).
        s.refresh(&["b", "c"], 400, 200),
        // b, woken, leaves instead: the wakeup passes to c.
        s.resign("b", None, 400),
        s.candidates(400),
        // c takes it; a stands in line and is never refreshed: pruned once old.
        s.acquire("c", LONG, false, true, false),
        s.acquire("a", LONG, false, true, false),
        Step::Wait(700),
        s.refresh(&[], 400, 200),
        s.candidates(400),
        // A refreshed place whose driver stops refreshing is pruned as stale.
        s.acquire("b", LONG, false, true, false),
        s.refresh(&["b"], 300, 200),
        Step::Wait(400),
        s.refresh(&[], 300, 200),
        s.candidates(300),
        s.resign("c", Some(2), 300),
        s.leader(),
        // The line's keys expire by themselves.
        Step::Wait(700),
        s.candidates(300),
    ];
    differ(&server, &steps).await;
}
