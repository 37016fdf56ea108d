//! One pub/sub connection per driver, shared by every waiting candidate and observer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::io::RedisIo;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;
use tracing::{debug, warn};

/// How long a (un)subscription or a health check may take before the connection is deemed
/// dead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an idle pub/sub connection is checked with a PING: a half-open socket (the
/// server or a middlebox gone without a FIN) would otherwise leave waiters and observers
/// waiting on messages that never come.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long a channel nobody watches stays subscribed: a candidate that resigns and
/// campaigns again (or an observer restarted) then sends no `UNSUBSCRIBE` and
/// `SUBSCRIBE`.
const LINGER: Duration = Duration::from_secs(20);

/// Routes the messages of the driver's one pub/sub connection to each channel's watchers,
/// and reconnects when the connection drops. Each (re)connection wakes every watcher, since
/// messages may have been missed meanwhile. The connection task starts on the first
/// subscription (inside the caller's runtime) and ends when the driver and every watcher
/// are gone.
pub(crate) struct Subscriber {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    idle: Mutex<Option<Idle>>,
}

/// What the connection task starts with: the I/O layer and the commands' receiver.
type Idle = (Arc<dyn RedisIo>, mpsc::UnboundedReceiver<Command>);

struct Shared {
    channels: Mutex<BTreeMap<String, Channel>>,
    /// The next channel's `seq`.
    next: std::sync::atomic::AtomicU64,
}

struct Channel {
    /// Order of first subscription: reconnections subscribe and wake in this order, not in
    /// the channels' names' (which hold random candidate ids), so that a seeded simulation
    /// replays exactly.
    seq: u64,
    notices: watch::Sender<u64>,
    watchers: usize,
    /// Since when nobody watches it (it stays subscribed for [`LINGER`]).
    idle_since: Option<tokio::time::Instant>,
}

enum Command {
    /// Subscribe; answers false if Redis refused the channel (an ACL without it).
    Subscribe(String, oneshot::Sender<bool>),
}

/// A watcher of one channel; the channel is unsubscribed when its last watcher drops.
pub(crate) struct Notices {
    channel: String,
    rx: watch::Receiver<u64>,
    shared: Weak<Shared>,
}

impl Notices {
    /// Forgets the notices received so far.
    pub(crate) fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Resolves at the next notice: a message on the channel, or a reconnection.
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
        let mut channels = shared.lock();
        if let Some(channel) = channels.get_mut(&self.channel) {
            channel.watchers = channel.watchers.saturating_sub(1);
            if channel.watchers == 0 {
                // Unsubscribed by the connection task once it has lingered.
                channel.idle_since = Some(tokio::time::Instant::now());
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Channel>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self, channel: &str) {
        if let Some(channel) = self.lock().get(channel) {
            channel.notices.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Forgets the channels that nobody has watched for [`LINGER`], and returns them.
    fn lingered(&self) -> Vec<String> {
        let now = tokio::time::Instant::now();
        let mut channels = self.lock();
        let mut old: Vec<(u64, String)> = channels
            .iter()
            .filter(|(_, c)| c.idle_since.is_some_and(|at| now - at >= LINGER))
            .map(|(name, c)| (c.seq, name.clone()))
            .collect();
        old.sort();
        let old: Vec<String> = old.into_iter().map(|(_, name)| name).collect();
        for name in &old {
            channels.remove(name);
        }
        old
    }

    fn notify_all(&self) {
        let channels = self.lock();
        let mut ordered: Vec<&Channel> = channels.values().collect();
        ordered.sort_by_key(|c| c.seq);
        for channel in ordered {
            channel.notices.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Every channel, in the order of their first subscription.
    fn names(&self) -> Vec<String> {
        let channels = self.lock();
        let mut ordered: Vec<(&String, &Channel)> = channels.iter().collect();
        ordered.sort_by_key(|(_, c)| c.seq);
        ordered.into_iter().map(|(name, _)| name.clone()).collect()
    }
}

impl Subscriber {
    pub(crate) fn new(io: Arc<dyn RedisIo>) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        Subscriber {
            shared: Arc::new(Shared {
                channels: Mutex::new(BTreeMap::new()),
                next: std::sync::atomic::AtomicU64::new(0),
            }),
            commands,
            idle: Mutex::new(Some((io, rx))),
        }
    }

    /// Subscribes to `channel` and returns its watcher. Waits for Redis to confirm the
    /// subscription when pub/sub is up (so nothing published afterwards is missed); when it
    /// is down, returns at once: waiters then rely on the key's expiry timer.
    pub(crate) async fn subscribe(&self, channel: &str) -> Notices {
        match self.subscribe_checked(channel).await {
            Ok(notices) | Err(notices) => notices,
        }
    }

    /// A watcher of `channel` if it is subscribed already (watched, or lingering after its
    /// last watcher), without a `SUBSCRIBE`; `None` otherwise.
    pub(crate) fn existing(&self, channel: &str) -> Option<Notices> {
        let mut channels = self.shared.lock();
        let entry = channels.get_mut(channel)?;
        entry.idle_since = None;
        entry.watchers += 1;
        Some(Notices {
            channel: channel.to_owned(),
            rx: entry.notices.subscribe(),
            shared: Arc::downgrade(&self.shared),
        })
    }

    /// As [`subscribe`](Self::subscribe), but `Err` (with a watcher that only wakes at
    /// reconnections) if Redis refused the channel.
    pub(crate) async fn subscribe_checked(
        &self,
        channel: &str,
    ) -> std::result::Result<Notices, Notices> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some((io, rx)) = idle {
            tokio::spawn(run(io, Arc::clone(&self.shared), rx));
        }
        let seq = self
            .shared
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (rx, lingering) = {
            let mut channels = self.shared.lock();
            let entry = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    seq,
                    notices: watch::Sender::new(0),
                    watchers: 0,
                    idle_since: None,
                });
            let lingering = entry.watchers == 0 && entry.idle_since.take().is_some();
            entry.watchers += 1;
            (entry.notices.subscribe(), lingering)
        };
        let notices = Notices {
            channel: channel.to_owned(),
            rx,
            shared: Arc::downgrade(&self.shared),
        };
        if lingering {
            // Still subscribed from its last watcher.
            return Ok(notices);
        }
        let (confirmed, confirmation) = oneshot::channel();
        if self
            .commands
            .send(Command::Subscribe(channel.to_owned(), confirmed))
            .is_ok()
            && let Ok(Ok(false)) = timeout(SUBSCRIBE_TIMEOUT * 2, confirmation).await
        {
            return Err(notices);
        }
        Ok(notices)
    }
}

/// The connection task: connect, subscribe every channel, route messages; reconnect with
/// backoff when the connection drops (to the next node of a Cluster, to the master that
/// Sentinel names now).
async fn run(
    io: Arc<dyn RedisIo>,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0_usize;
    loop {
        let ended = match timeout(SUBSCRIBE_TIMEOUT, io.pubsub(attempt)).await {
            Ok(Ok(connection)) => connected(connection, &shared, &mut commands).await,
            Ok(Err(err)) => {
                warn!(error = %leader_core::ErrorChain(&err), "Redis pub/sub connection failed; waiters fall back to expiry timers");
                Ended::Disconnected
            }
            Err(_) => {
                warn!("Redis pub/sub connection timed out; waiters fall back to expiry timers");
                Ended::Disconnected
            }
        };
        attempt = attempt.wrapping_add(1);
        match ended {
            Ended::DriverGone => return,
            Ended::Disconnected => {}
        }
        // Messages may have been missed: every watcher looks at its key again.
        shared.notify_all();
        let wake = tokio::time::Instant::now() + backoff;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        // Meanwhile, confirm new subscriptions at once: they are made on reconnection.
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, confirmed)) => {
                        let _ = confirmed.send(true);
                    }
                },
            }
        }
    }
}

enum Ended {
    DriverGone,
    Disconnected,
}

async fn connected(
    connection: crate::io::PubSubConnection,
    shared: &Shared,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Ended {
    let crate::io::PubSubConnection {
        commands: mut sink,
        messages: mut stream,
    } = connection;
    let channels: Vec<String> = shared.names();
    if !channels.is_empty()
        && !matches!(
            timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(&channels)).await,
            Ok(Ok(true))
        )
    {
        return Ended::Disconnected;
    }
    debug!(channels = channels.len(), "Redis pub/sub connected");
    shared.notify_all();
    let mut health = tokio::time::interval(HEALTH_CHECK_EVERY);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.reset();
    loop {
        tokio::select! {
            _ = health.tick() => {
                for channel in shared.lingered() {
                    let unsubscribed = timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(&channel)).await;
                    if !matches!(unsubscribed, Ok(Ok(()))) {
                        return Ended::Disconnected;
                    }
                }
                let pong = timeout(SUBSCRIBE_TIMEOUT, sink.ping()).await;
                if !matches!(pong, Ok(Ok(()))) {
                    warn!("Redis pub/sub connection failed its health check; reconnecting");
                    return Ended::Disconnected;
                }
            }
            command = commands.recv() => match command {
                None => return Ended::DriverGone,
                Some(Command::Subscribe(channel, confirmed)) => {
                    let subscribed =
                        timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(std::slice::from_ref(&channel))).await;
                    match subscribed {
                        Ok(Ok(true)) => {
                            let _ = confirmed.send(true);
                        }
                        // Refused (an ACL without this channel): the connection is fine.
                        Ok(Ok(false)) => {
                            shared.lock().remove(&channel);
                            let _ = confirmed.send(false);
                        }
                        _ => {
                            let _ = confirmed.send(true);
                            warn!(%channel, "Redis SUBSCRIBE failed; reconnecting pub/sub");
                            return Ended::Disconnected;
                        }
                    }
                }
            },
            message = stream.next() => match message {
                Some(message) => {
                    if crate::keyspace::worth_a_look(&message.channel, &message.payload) {
                        shared.notify(&message.channel);
                    }
                }
                None => {
                    warn!("Redis pub/sub connection lost; reconnecting");
                    return Ended::Disconnected;
                }
            },
        }
    }
}
