//! `Election::lead` against real etcd and redis-server processes: the next candidate is
//! elected only after this one's work is gone, at shutdown and after a loss; a work that
//! panics or returns ends its term; a work that ignores its token is aborted at the
//! deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leader::{CancellationToken, Election, Event, Status, Term};
use leader_core::testing::conformance::{next_event, wait_until, within};
use leader_testkit::FaultProxy;
use leader_testkit::{etcd, redis, unique};
use tokio::task::JoinHandle;

const TTL: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(30);

/// The store a test runs against, kept alive for the test.
enum Store {
    Etcd(leader_testkit::EtcdServer),
    Redis(leader_testkit::RedisServer),
}

impl Store {
    async fn start(kind: &str) -> Store {
        match kind {
            "etcd" => Store::Etcd(etcd().await),
            _ => Store::Redis(redis().await),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Store::Etcd(server) => server.client_addr(0),
            Store::Redis(server) => server.addr(),
        }
    }

    fn url(&self, addr: SocketAddr) -> String {
        match self {
            Store::Etcd(_) => format!("etcd://{addr}"),
            Store::Redis(_) => format!("redis://{addr}"),
        }
    }

    async fn election(&self, addr: SocketAddr, name: &str) -> Election {
        let driver = leader::connect(&self.url(addr)).await.expect("connect");
        Election::builder(driver, name)
            .ttl(TTL)
            .safety_margin(MARGIN)
            .retry(Duration::from_millis(50), Duration::from_millis(200))
            .build()
            .expect("valid settings")
    }
}

/// What happened, in order, with the instant it happened.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, Instant)>>>);

impl Log {
    fn push_at(&self, what: impl Into<String>, at: Instant) {
        self.0.lock().expect("log lock").push((what.into(), at));
    }

    fn push(&self, what: impl Into<String>) {
        self.push_at(what, Instant::now());
    }

    fn entries(&self) -> Vec<String> {
        let log = self.0.lock().expect("log lock");
        log.iter().map(|(what, _)| what.clone()).collect()
    }

    fn at(&self, what: &str) -> Option<Instant> {
        let log = self.0.lock().expect("log lock");
        log.iter().find(|(w, _)| w == what).map(|(_, at)| *at)
    }
}

/// Logs when it is dropped: the instant the work that holds it is gone.
struct Gone(Log, &'static str);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.push(self.1);
    }
}

/// A's work: logs when it starts; once its token is cancelled it takes `takes` to return
/// (unless `stubborn`: then it never looks at the token). It checks at every step that B
/// does not lead.
fn a_work(
    log: &Log,
    takes: Duration,
    stubborn: bool,
    b: Status,
) -> impl FnMut(Term) -> futures::future::BoxFuture<'static, ()> + Send + use<> {
    let log = log.clone();
    move |term: Term| {
        let (log, b) = (log.clone(), b.clone());
        Box::pin(async move {
            let _gone = Gone(log.clone(), "a gone");
            log.push("a started");
            let stop = term.cancellation_token();
            loop {
                if b.is_leader() {
                    log.push("overlap: b leads while a's work runs");
                }
                tokio::select! {
                    () = stop.cancelled(), if !stubborn => break,
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
            let until = tokio::time::Instant::now() + takes;
            while tokio::time::Instant::now() < until {
                if b.is_leader() {
                    log.push("overlap: b leads while a's work runs");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            log.push("a stopped");
        })
    }
}

/// B's work: logs the instant B began to lead, then waits for its token.
fn b_work(log: &Log) -> impl FnMut(Term) -> futures::future::BoxFuture<'static, ()> + Send + use<> {
    let log = log.clone();
    move |term: Term| {
        let log = log.clone();
        Box::pin(async move {
            log.push_at("b elected", term.elected_at());
            term.cancellation_token().cancelled().await;
        })
    }
}

fn spawn_lead<W, Fut>(
    election: &Election,
    stop: &CancellationToken,
    work: W,
) -> JoinHandle<leader::Result<()>>
where
    W: FnMut(Term) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (election, stop) = (election.clone(), stop.clone());
    tokio::spawn(async move { election.lead(stop.cancelled_owned(), work).await })
}

async fn at_shutdown_the_next_leader_comes_after_the_work(kind: &str) {
    let store = Store::start(kind).await;
    let name = unique("lead-shutdown");
    let a = store.election(store.addr(), &name).await;
    let b = store.election(store.addr(), &name).await;
    let log = Log::default();
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let a_lead = spawn_lead(
        &a,
        &a_stop,
        a_work(&log, Duration::from_millis(500), false, b.status()),
    );
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    let b_lead = spawn_lead(&b, &b_stop, b_work(&log));
    a_stop.cancel();
    within("a's lead returns", WAIT, a_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    wait_until("b's work started", WAIT, || log.at("b elected").is_some()).await;
    assert_eq!(
        log.entries(),
        ["a started", "a stopped", "a gone", "b elected"],
        "the whole log"
    );
    let (gone, elected) = (log.at("a gone"), log.at("b elected"));
    assert!(gone < elected, "{gone:?} {elected:?}");
    b_stop.cancel();
    within("b's lead returns", WAIT, b_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_at_shutdown_the_next_leader_comes_after_the_work() {
    at_shutdown_the_next_leader_comes_after_the_work("etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_at_shutdown_the_next_leader_comes_after_the_work() {
    at_shutdown_the_next_leader_comes_after_the_work("redis").await;
}

/// A is cut off from the store; its work ignores its token. The work is aborted at A's
/// deadline, and the store elects B only after that.
async fn after_a_loss_a_stubborn_work_is_aborted_before_the_next_leader(kind: &str) {
    let store = Store::start(kind).await;
    let proxy = FaultProxy::start(store.addr()).await.expect("proxy starts");
    let name = unique("lead-loss");
    let a = store.election(proxy.addr(), &name).await;
    let b = store.election(store.addr(), &name).await;
    let log = Log::default();
    let mut a_events = a.subscribe();
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let a_lead = spawn_lead(&a, &a_stop, a_work(&log, Duration::ZERO, true, b.status()));
    wait_until("a leads", WAIT, || a.status().is_leader()).await;
    let b_lead = spawn_lead(&b, &b_stop, b_work(&log));
    let term = a.term().expect("a leads");
    proxy.hold();
    assert!(
        next_event("a elected", WAIT, &mut a_events)
            .await
            .is_leader()
    );
    let lost = next_event("a lost", WAIT, &mut a_events).await;
    assert!(matches!(lost, Event::Lost { .. }), "{lost:?}");
    wait_until("b leads", WAIT, || b.status().is_leader()).await;
    wait_until("b's work started", WAIT, || log.at("b elected").is_some()).await;
    let entries = log.entries();
    assert_eq!(
        entries,
        ["a started", "a gone", "b elected"],
        "the whole log"
    );
    let gone = log.at("a gone").expect("a's work is gone");
    let deadline = term.deadline();
    // Aborted at the deadline: the abort takes effect when the runtime next polls the task,
    // a few milliseconds at most on an idle machine; never anywhere near the margin.
    assert!(
        gone <= deadline + MARGIN / 4,
        "the work was gone {:?} after the deadline",
        gone - deadline
    );
    assert!(gone < log.at("b elected").expect("b elected"));
    proxy.pass();
    a_stop.cancel();
    b_stop.cancel();
    within("a's lead returns", WAIT, a_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    within("b's lead returns", WAIT, b_lead)
        .await
        .expect("task")
        .expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_after_a_loss_a_stubborn_work_is_aborted_before_the_next_leader() {
    after_a_loss_a_stubborn_work_is_aborted_before_the_next_leader("etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_after_a_loss_a_stubborn_work_is_aborted_before_the_next_leader() {
    after_a_loss_a_stubborn_work_is_aborted_before_the_next_leader("redis").await;
}

/// A work that panics, then one that returns: each ends its term with a resignation, and
/// `lead` campaigns again; the other candidate gets the next term each time.
async fn panic_and_early_return_end_the_term(kind: &str) {
    let store = Store::start(kind).await;
    let name = unique("lead-panic");
    let a = store.election(store.addr(), &name).await;
    let mut events = a.subscribe();
    let stop = CancellationToken::new();
    let terms = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&terms);
    let lead = spawn_lead(&a, &stop, move |term: Term| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => panic!("the work fails"),
                1 => {}
                _ => term.cancellation_token().cancelled().await,
            }
        }
    });
    let mut tokens = Vec::new();
    // The panicking work's term, then the returning work's: each resigned.
    for _ in 0..2 {
        let elected = next_event("elected", WAIT, &mut events).await;
        assert!(elected.is_leader(), "{elected:?}");
        let token = elected.fencing_token();
        let end = next_event("the term's end", WAIT, &mut events).await;
        assert_eq!(
            end,
            Event::Resigned {
                fencing_token: token
            }
        );
        tokens.push(token);
    }
    // Then a third term, whose work waits for its token.
    let elected = next_event("elected a third time", WAIT, &mut events).await;
    tokens.push(elected.fencing_token());
    assert!(tokens.is_sorted() && tokens[0] < tokens[2], "{tokens:?}");
    wait_until("the third work started", WAIT, || {
        terms.load(Ordering::SeqCst) == 3
    })
    .await;
    assert!(!lead.is_finished(), "lead goes on");
    assert!(a.status().is_leader());
    stop.cancel();
    within("lead returns", WAIT, lead)
        .await
        .expect("task")
        .expect("clean shutdown");
    assert_eq!(
        next_event("resigned at shutdown", WAIT, &mut events).await,
        Event::Resigned {
            fencing_token: tokens[2]
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_panic_and_early_return_end_the_term() {
    panic_and_early_return_end_the_term("etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_panic_and_early_return_end_the_term() {
    panic_and_early_return_end_the_term("redis").await;
}
