//! One `LISTEN` connection per driver, shared by every waiting candidate, observer and
//! leader of the driver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;
use tokio_postgres::{AsyncMessage, Config};

use crate::tls::Tls;
use tracing::{debug, warn};

/// How often an idle `LISTEN` connection is checked with a query: a half-open socket would
/// otherwise leave waiters waiting on notifications that never come.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The payload of the notification sent by the resign statement.
pub(crate) const RESIGNED: &str = "resigned";

/// Routes the notifications of the driver's `LISTEN` connection to each channel's
/// watchers, and reconnects when the connection drops. Each (re)connection wakes every
/// watcher, since notifications may have been missed meanwhile. The connection task starts
/// on the first subscription (inside the caller's runtime) and ends when the driver and
/// every watcher are gone.
pub(crate) struct Listener {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    idle: Mutex<Option<Idle>>,
}

struct Idle {
    config: Config,
    tls: Tls,
    timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
}

struct Shared {
    channels: Mutex<HashMap<String, Channel>>,
}

/// What a channel has seen: every notification, and the ones that free the election.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    any: u64,
    freed: u64,
}

struct Channel {
    notices: watch::Sender<Seen>,
    watchers: usize,
}

enum Command {
    Listen(String, oneshot::Sender<()>),
    Unlisten(String),
}

/// Which notifications wake a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Every notification on the channel (observers, leaders).
    Any,
    /// Only a resignation (waiting candidates: an election only frees up by resignation,
    /// or by expiry, which they time themselves).
    Freed,
}

/// A watcher of one channel; the channel is unlistened when its last watcher drops.
pub(crate) struct Notices {
    channel: String,
    interest: Interest,
    rx: watch::Receiver<Seen>,
    seen: Seen,
    shared: Weak<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Notices {
    /// Forgets the notices received so far.
    pub(crate) fn mark_seen(&mut self) {
        self.seen = *self.rx.borrow_and_update();
    }

    /// Resolves at the next notice of interest: a notification on the channel, or a
    /// reconnection of the `LISTEN` connection (which wakes everyone).
    pub(crate) async fn changed(&mut self) {
        loop {
            let now = *self.rx.borrow_and_update();
            let woken = match self.interest {
                Interest::Any => now.any != self.seen.any,
                Interest::Freed => now.freed != self.seen.freed,
            };
            if woken {
                self.seen = now;
                return;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
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
                channels.remove(&self.channel);
                let _ = self.commands.send(Command::Unlisten(self.channel.clone()));
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self, channel: &str, payload: &str) {
        if let Some(channel) = self.lock().get(channel) {
            let freed = payload == RESIGNED;
            channel.notices.send_modify(|seen| {
                seen.any = seen.any.wrapping_add(1);
                if freed {
                    seen.freed = seen.freed.wrapping_add(1);
                }
            });
        }
    }

    fn notify_all(&self) {
        for channel in self.lock().values() {
            channel.notices.send_modify(|seen| {
                seen.any = seen.any.wrapping_add(1);
                seen.freed = seen.freed.wrapping_add(1);
            });
        }
    }
}

impl Listener {
    pub(crate) fn new(config: Config, tls: Tls, timeout: Duration) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        Listener {
            shared: Arc::new(Shared {
                channels: Mutex::new(HashMap::new()),
            }),
            commands,
            idle: Mutex::new(Some(Idle {
                config,
                tls,
                timeout,
                commands: rx,
            })),
        }
    }

    /// Listens on `channel` and returns its watcher. Waits for PostgreSQL to confirm the
    /// `LISTEN` when the connection is up (so nothing notified afterwards is missed); when
    /// it is down, returns at once: waiters then rely on the row's expiry timer.
    pub(crate) async fn listen(&self, channel: &str, interest: Interest) -> Notices {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(idle) = idle {
            tokio::spawn(run(idle, Arc::clone(&self.shared)));
        }
        let rx = {
            let mut channels = self.shared.lock();
            let entry = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    notices: watch::Sender::new(Seen::default()),
                    watchers: 0,
                });
            entry.watchers += 1;
            entry.notices.subscribe()
        };
        let (confirmed, confirmation) = oneshot::channel();
        if self
            .commands
            .send(Command::Listen(channel.to_owned(), confirmed))
            .is_ok()
        {
            let _ = timeout(Duration::from_secs(5), confirmation).await;
        }
        let mut notices = Notices {
            channel: channel.to_owned(),
            interest,
            rx,
            seen: Seen::default(),
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
        match connected(
            &idle.config,
            &idle.tls,
            idle.timeout,
            &shared,
            &mut idle.commands,
        )
        .await
        {
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

fn listen_sql(verb: &str, channels: &[String]) -> String {
    // Channel names are `leader_` and hex digits (see `sql::channel`): safe to quote.
    channels
        .iter()
        .map(|channel| format!("{verb} \"{channel}\";"))
        .collect()
}

async fn connected(
    config: &Config,
    tls: &Tls,
    limit: Duration,
    shared: &Shared,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Ended {
    let down = Ended::Disconnected { was_up: false };
    let (client, mut connection) = match timeout(limit, tls.connect(config)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(err)) => {
            warn!(error = %err, "PostgreSQL LISTEN connection failed; waiters fall back to expiry timers");
            return down;
        }
        Err(_) => {
            warn!("PostgreSQL LISTEN connection timed out; waiters fall back to expiry timers");
            return down;
        }
    };
    // The connection's own task: it drives the client's requests and hands over the
    // notifications; it ends when the connection does.
    let (tx, mut messages) = mpsc::unbounded_channel();
    let driving = tokio::spawn(async move {
        while let Some(message) = connection.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(error = %err, "PostgreSQL LISTEN connection lost; reconnecting");
                    return;
                }
            }
        }
    });
    let _abort = AbortOnDrop(driving);
    let channels: Vec<String> = shared.lock().keys().cloned().collect();
    if !channels.is_empty()
        && !matches!(
            timeout(
                limit,
                client.batch_execute(&listen_sql("LISTEN", &channels))
            )
            .await,
            Ok(Ok(()))
        )
    {
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
                let answer = timeout(limit, client.simple_query("SELECT 1")).await;
                if !matches!(answer, Ok(Ok(_))) {
                    warn!("PostgreSQL LISTEN connection failed its health check; reconnecting");
                    return up;
                }
            }
            command = commands.recv() => match command {
                None => return Ended::DriverGone,
                Some(Command::Listen(channel, confirmed)) => {
                    let listened = timeout(limit, client.batch_execute(&listen_sql("LISTEN", std::slice::from_ref(&channel)))).await;
                    let _ = confirmed.send(());
                    if !matches!(listened, Ok(Ok(()))) {
                        warn!(%channel, "PostgreSQL LISTEN failed; reconnecting");
                        return up;
                    }
                }
                Some(Command::Unlisten(channel)) => {
                    if shared.lock().contains_key(&channel) {
                        continue; // watched again meanwhile
                    }
                    let unlistened = timeout(limit, client.batch_execute(&listen_sql("UNLISTEN", std::slice::from_ref(&channel)))).await;
                    if !matches!(unlistened, Ok(Ok(()))) {
                        return up;
                    }
                }
            },
            message = messages.recv() => match message {
                Some((channel, payload)) => shared.notify(&channel, &payload),
                None => return up,
            },
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
