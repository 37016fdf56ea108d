//! One `LISTEN` connection per driver, shared by every waiting candidate, observer and
//! leader of the driver.
//!
//! Two kinds of channels: each election's channel (`leader_<hash>`), on which observers
//! hear elections, resignations and proclamations; and the driver's own channel
//! (`leader_d_<random>`), on which PostgreSQL wakes one waiter of this driver by its
//! candidate id (`w<id>`: its turn may have come) or tells a leader of this driver that
//! someone else ended its term (`g<token>:<id>`, sent by the table's trigger).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::timeout;

use crate::io::{ListenConnection, PostgresIo};
use tracing::{debug, warn};

/// How often an idle `LISTEN` connection is checked with a query: a half-open socket would
/// otherwise leave waiters waiting on notifications that never come.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How many recent "term gone" notices are kept for leaders that register after them.
const RECENT_GONE: usize = 256;

/// Routes the notifications of the driver's `LISTEN` connection, and reconnects when the
/// connection drops. Each (re)connection wakes every watcher, waiter and leader, since
/// notifications may have been missed meanwhile. The connection task starts on the first
/// use (inside the caller's runtime) and ends when the driver and every watcher are gone.
pub(crate) struct Listener {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    idle: Mutex<Option<Idle>>,
    /// The driver's channel is listened on (or the connection was down when asked).
    ready: AtomicBool,
}

struct Idle {
    io: Arc<dyn PostgresIo>,
    commands: mpsc::UnboundedReceiver<Command>,
}

pub(crate) struct Shared {
    /// The driver's own channel.
    pub(crate) channel: String,
    routes: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    /// Election channels and their watchers (observers).
    channels: BTreeMap<String, Channel>,
    /// This driver's waiting candidates, by candidate id.
    /// (Each registration has a sequence number: everyone is woken in the order they
    /// registered, whatever their ids, so that a seeded simulation replays exactly.)
    waiters: BTreeMap<String, (u64, Arc<Waiter>)>,
    /// This driver's leaders, by candidate id: the term they hold and its watch.
    terms: BTreeMap<String, (u64, u64, Arc<TermWatch>)>,
    /// The next registration's sequence number.
    next: u64,
    /// The last "term gone" notices, for a leader that registers after its notice came.
    recent_gone: VecDeque<(String, u64)>,
    /// The keeper task (refreshing waiters' places) runs.
    pub(crate) keeper: bool,
}

struct Channel {
    notices: watch::Sender<u64>,
    watchers: usize,
}

enum Command {
    Listen(String, oneshot::Sender<()>),
    Unlisten(String),
}

/// A waiting candidate of this driver.
pub(crate) struct Waiter {
    pub(crate) election: String,
    pub(crate) ttl: Duration,
    /// Woken when its turn may have come (a permit is kept if it is not waiting yet).
    pub(crate) wake: Notify,
    /// It knows it is first in line (or nominated) and keeps a timer at the expiry of
    /// whatever holds the election: the keeper need not wake it to say so.
    pub(crate) armed: AtomicBool,
}

/// A leader of this driver, told when its term is ended by someone else.
#[derive(Default)]
pub(crate) struct TermWatch {
    pub(crate) wake: Notify,
    /// The trigger said the term is gone; otherwise a wake means "look at the row".
    pub(crate) gone: AtomicBool,
}

/// A watcher of one election channel; the channel is unlistened when its last watcher
/// drops.
pub(crate) struct Notices {
    channel: String,
    rx: watch::Receiver<u64>,
    shared: Weak<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Notices {
    /// Forgets the notices received so far.
    pub(crate) fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Resolves at the next notification on the channel, or a reconnection of the
    /// `LISTEN` connection (which wakes everyone).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut routes = shared.lock();
        if let Some(channel) = routes.channels.get_mut(&self.channel) {
            channel.watchers = channel.watchers.saturating_sub(1);
            if channel.watchers == 0 {
                routes.channels.remove(&self.channel);
                let _ = self.commands.send(Command::Unlisten(self.channel.clone()));
            }
        }
    }
}

/// A waiter's registration; removed when dropped.
pub(crate) struct WaiterGuard {
    pub(crate) waiter: Arc<Waiter>,
    id: String,
    shared: Arc<Shared>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut routes = self.shared.lock();
        if routes
            .waiters
            .get(&self.id)
            .is_some_and(|(_, held)| Arc::ptr_eq(held, &self.waiter))
        {
            routes.waiters.remove(&self.id);
        }
    }
}

/// A leader's registration; removed when dropped.
pub(crate) struct TermGuard {
    pub(crate) watch: Arc<TermWatch>,
    id: String,
    shared: Arc<Shared>,
}

impl TermGuard {
    /// The leader's candidate id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for TermGuard {
    fn drop(&mut self) {
        let mut routes = self.shared.lock();
        if routes
            .terms
            .get(&self.id)
            .is_some_and(|(_, _, held)| Arc::ptr_eq(held, &self.watch))
        {
            routes.terms.remove(&self.id);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self, channel: &str, payload: &str) {
        let mut routes = self.lock();
        if channel != self.channel {
            if let Some(channel) = routes.channels.get(channel) {
                channel
                    .notices
                    .send_modify(|seen| *seen = seen.wrapping_add(1));
            }
            return;
        }
        if let Some(id) = payload.strip_prefix('w') {
            if let Some((_, waiter)) = routes.waiters.get(id) {
                waiter.wake.notify_one();
            }
        } else if let Some((token, id)) = payload
            .strip_prefix('g')
            .and_then(|rest| rest.split_once(':'))
            && let Ok(token) = token.parse::<u64>()
        {
            if let Some((_, held, watch)) = routes.terms.get(id)
                && *held == token
            {
                watch.gone.store(true, Ordering::SeqCst);
                watch.wake.notify_one();
            }
            if routes.recent_gone.len() >= RECENT_GONE {
                routes.recent_gone.pop_front();
            }
            routes.recent_gone.push_back((id.to_owned(), token));
        }
    }

    /// Wakes everyone: notifications may have been missed.
    fn notify_all(&self) {
        let routes = self.lock();
        for channel in routes.channels.values() {
            channel
                .notices
                .send_modify(|seen| *seen = seen.wrapping_add(1));
        }
        let mut wakes: Vec<(u64, &Notify)> = routes
            .waiters
            .values()
            .map(|(seq, waiter)| (*seq, &waiter.wake))
            .chain(
                routes
                    .terms
                    .values()
                    .map(|(seq, _, watch)| (*seq, &watch.wake)),
            )
            .collect();
        wakes.sort_by_key(|(seq, _)| *seq);
        for (_, wake) in wakes {
            wake.notify_one();
        }
    }

    /// The waiters of this driver, for the keeper; marks the keeper as running, or as
    /// stopped when there are none.
    pub(crate) fn waiters_for_keeper(&self) -> Vec<(String, Arc<Waiter>)> {
        let mut routes = self.lock();
        routes.keeper = !routes.waiters.is_empty();
        let mut waiters: Vec<_> = routes
            .waiters
            .iter()
            .map(|(id, (seq, waiter))| (*seq, id.clone(), Arc::clone(waiter)))
            .collect();
        waiters.sort_by_key(|(seq, _, _)| *seq);
        waiters
            .into_iter()
            .map(|(_, id, waiter)| (id, waiter))
            .collect()
    }

    /// The waiter `id`, if it still waits.
    pub(crate) fn waiter(&self, id: &str) -> Option<Arc<Waiter>> {
        self.lock()
            .waiters
            .get(id)
            .map(|(_, waiter)| Arc::clone(waiter))
    }
}

impl Listener {
    pub(crate) fn new(io: Arc<dyn PostgresIo>, channel: String) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        Listener {
            shared: Arc::new(Shared {
                channel,
                routes: Mutex::new(Routes::default()),
            }),
            commands,
            idle: Mutex::new(Some(Idle { io, commands: rx })),
            ready: AtomicBool::new(false),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Starts the connection task if it is not running yet.
    fn start(&self) {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(idle) = idle {
            tokio::spawn(run(idle, Arc::clone(&self.shared)));
        }
    }

    /// Sends a `LISTEN` for `channel` and waits for PostgreSQL to confirm it when the
    /// connection is up (so nothing notified afterwards is missed); when it is down,
    /// returns at once: everyone is woken when it comes back.
    async fn confirm(&self, channel: &str) {
        self.start();
        let (confirmed, confirmation) = oneshot::channel();
        if self
            .commands
            .send(Command::Listen(channel.to_owned(), confirmed))
            .is_ok()
        {
            let _ = timeout(Duration::from_secs(5), confirmation).await;
        }
    }

    /// Makes sure the driver's channel is listened on (once per driver; the connection
    /// task listens on it again after each reconnection).
    pub(crate) async fn ensure(&self) {
        if self.ready.load(Ordering::SeqCst) {
            return;
        }
        let channel = self.shared.channel.clone();
        self.confirm(&channel).await;
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Registers a waiting candidate `id` of this driver. Returns whether the keeper task
    /// must be started (it was not running).
    pub(crate) fn wait(&self, id: &str, election: &str, ttl: Duration) -> (WaiterGuard, bool) {
        let waiter = Arc::new(Waiter {
            election: election.to_owned(),
            ttl,
            wake: Notify::new(),
            armed: AtomicBool::new(false),
        });
        let mut routes = self.shared.lock();
        let seq = routes.next;
        routes.next += 1;
        routes
            .waiters
            .insert(id.to_owned(), (seq, Arc::clone(&waiter)));
        let start_keeper = !routes.keeper;
        routes.keeper = true;
        drop(routes);
        (
            WaiterGuard {
                waiter,
                id: id.to_owned(),
                shared: Arc::clone(&self.shared),
            },
            start_keeper,
        )
    }

    /// Registers the term `token` of leader `id` of this driver; its watch is already
    /// marked gone if the trigger's notice came before.
    pub(crate) fn hold(&self, id: &str, token: u64) -> TermGuard {
        let watch = Arc::new(TermWatch::default());
        let mut routes = self.shared.lock();
        if routes
            .recent_gone
            .iter()
            .any(|(gone, held)| gone == id && *held == token)
        {
            watch.gone.store(true, Ordering::SeqCst);
            watch.wake.notify_one();
        }
        let seq = routes.next;
        routes.next += 1;
        routes
            .terms
            .insert(id.to_owned(), (seq, token, Arc::clone(&watch)));
        drop(routes);
        TermGuard {
            watch,
            id: id.to_owned(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Listens on the election channel `channel` and returns its watcher.
    pub(crate) async fn listen(&self, channel: &str) -> Notices {
        let rx = {
            let mut routes = self.shared.lock();
            let entry = routes
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    notices: watch::Sender::new(0),
                    watchers: 0,
                });
            entry.watchers += 1;
            entry.notices.subscribe()
        };
        self.confirm(channel).await;
        let mut notices = Notices {
            channel: channel.to_owned(),
            rx,
            shared: Arc::downgrade(&self.shared),
            commands: self.commands.clone(),
        };
        notices.mark_seen();
        notices
    }
}

/// The connection task: connect, listen on every channel, route notifications; reconnect
/// with backoff when the connection drops.
async fn run(mut idle: Idle, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match connected(idle.io.as_ref(), &shared, &mut idle.commands).await {
            Ended::DriverGone => return,
            Ended::Disconnected { was_up } => {
                if was_up {
                    backoff = Duration::from_millis(50);
                }
            }
        }
        // Notifications may have been missed: every watcher looks at its row again.
        shared.notify_all();
        let wake = tokio::time::Instant::now() + backoff;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        // Meanwhile, confirm new subscriptions at once: they are made on reconnection.
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                command = idle.commands.recv() => match command {
                    None => return,
                    Some(Command::Listen(_, confirmed)) => {
                        let _ = confirmed.send(());
                    }
                    Some(Command::Unlisten(_)) => {}
                },
            }
        }
    }
}

enum Ended {
    DriverGone,
    Disconnected { was_up: bool },
}

async fn connected(
    io: &dyn PostgresIo,
    shared: &Shared,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Ended {
    let down = Ended::Disconnected { was_up: false };
    let ListenConnection {
        client,
        mut notifications,
    } = match io.listen_connection().await {
        Ok(connection) => connection,
        Err(err) => {
            warn!(error = %leader_core::ErrorChain(&err), "PostgreSQL LISTEN connection failed; waiters fall back to expiry timers");
            return down;
        }
    };
    let mut channels: Vec<String> = shared.lock().channels.keys().cloned().collect();
    channels.push(shared.channel.clone());
    if client.listen(&channels).await.is_err() {
        return down;
    }
    debug!(channels = channels.len(), "PostgreSQL LISTEN connection up");
    shared.notify_all();
    let up = Ended::Disconnected { was_up: true };
    let mut health = tokio::time::interval(HEALTH_CHECK_EVERY);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.reset();
    loop {
        tokio::select! {
            _ = health.tick() => {
                if client.ping().await.is_err() {
                    warn!("PostgreSQL LISTEN connection failed its health check; reconnecting");
                    return up;
                }
            }
            command = commands.recv() => match command {
                None => return Ended::DriverGone,
                Some(Command::Listen(channel, confirmed)) => {
                    let listened = client.listen(std::slice::from_ref(&channel)).await;
                    let _ = confirmed.send(());
                    if listened.is_err() {
                        warn!(%channel, "PostgreSQL LISTEN failed; reconnecting");
                        return up;
                    }
                }
                Some(Command::Unlisten(channel)) => {
                    if shared.lock().channels.contains_key(&channel) {
                        continue; // watched again meanwhile
                    }
                    if client.unlisten(&channel).await.is_err() {
                        return up;
                    }
                }
            },
            message = notifications.next() => match message {
                Some(n) => shared.notify(&n.channel, &n.payload),
                None => {
                    warn!("PostgreSQL LISTEN connection lost; reconnecting");
                    return up;
                }
            },
        }
    }
}
