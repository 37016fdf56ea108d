//! The hub a driver keeps, the watchers it hands out, and the routing table they share
//! with the connection task.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

use super::task::run;
use super::{Settings, Source};

/// One push connection of a driver, shared by all its watchers: see the
/// [module](super)'s documentation.
pub struct Hub<S: Source> {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    /// What the connection task starts with, until it starts.
    idle: Mutex<Option<(Arc<S>, mpsc::UnboundedReceiver<Command>)>>,
    settings: Settings,
}

impl<S: Source> std::fmt::Debug for Hub<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What the connection task is asked to do.
pub(super) enum Command {
    /// Subscribe; answers false if the store refused the channel.
    Subscribe(String, oneshot::Sender<bool>),
    /// Unsubscribe, unless the channel is watched again meanwhile.
    Unsubscribe(String),
}

/// The routing table: the watched (and lingering) channels.
pub(super) struct Shared {
    channels: Mutex<Channels>,
}

#[derive(Default)]
struct Channels {
    by_name: BTreeMap<String, Channel>,
    /// The next channel's `seq`.
    next: u64,
}

struct Channel {
    /// Order of first subscription: (re)subscriptions and wakeups go in this order.
    seq: u64,
    notices: watch::Sender<u64>,
    watchers: usize,
    /// Since when nobody watches it (it stays subscribed for the linger).
    idle_since: Option<Instant>,
}

/// A watcher of one channel. When the last watcher of a channel drops, the channel is
/// unsubscribed (after the hub's linger).
pub struct Notices {
    channel: String,
    rx: watch::Receiver<u64>,
    shared: Weak<Shared>,
    /// Keeps the connection task running while a watcher lives; asks it to unsubscribe.
    commands: mpsc::UnboundedSender<Command>,
    /// The hub unsubscribes at once when the last watcher drops (no linger).
    at_once: bool,
}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notices")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Notices {
    /// The channel watched.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Forgets the notices received so far.
    pub fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Resolves at the next notice: a message routed to the channel, or a reconnection or
    /// disconnection of the hub's connection (which wakes every watcher). Never resolves
    /// once the channel was refused by the store.
    pub async fn changed(&mut self) {
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
        let Some(channel) = channels.by_name.get_mut(&self.channel) else {
            return;
        };
        channel.watchers = channel.watchers.saturating_sub(1);
        if channel.watchers > 0 {
            return;
        }
        if self.at_once {
            channels.by_name.remove(&self.channel);
            let _ = self
                .commands
                .send(Command::Unsubscribe(self.channel.clone()));
        } else {
            // Unsubscribed by the connection task once it has lingered.
            channel.idle_since = Some(Instant::now());
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the watchers of `channel`.
    pub(super) fn notify(&self, channel: &str) {
        if let Some(channel) = self.lock().by_name.get(channel) {
            channel.notices.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every watcher, in the order of their channels' first subscription.
    pub(super) fn notify_all(&self) {
        let channels = self.lock();
        let mut ordered: Vec<&Channel> = channels.by_name.values().collect();
        ordered.sort_by_key(|c| c.seq);
        for channel in ordered {
            channel.notices.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Every channel (watched or lingering), in the order of their first subscription.
    pub(super) fn names(&self) -> Vec<String> {
        let channels = self.lock();
        let mut ordered: Vec<(&String, &Channel)> = channels.by_name.iter().collect();
        ordered.sort_by_key(|(_, c)| c.seq);
        ordered.into_iter().map(|(name, _)| name.clone()).collect()
    }

    /// Forgets the channels that nobody has watched for `linger`, and returns them in
    /// the order of their first subscription.
    pub(super) fn lingered(&self, linger: std::time::Duration) -> Vec<String> {
        let now = Instant::now();
        let mut channels = self.lock();
        let mut old: Vec<(u64, String)> = channels
            .by_name
            .iter()
            .filter(|(_, c)| c.idle_since.is_some_and(|at| now - at >= linger))
            .map(|(name, c)| (c.seq, name.clone()))
            .collect();
        old.sort();
        old.into_iter()
            .map(|(_, name)| {
                channels.by_name.remove(&name);
                name
            })
            .collect()
    }

    /// Whether `channel` is watched (or lingering).
    pub(super) fn has(&self, channel: &str) -> bool {
        self.lock().by_name.contains_key(channel)
    }

    /// Forgets `channel` (the store refused it): its watchers are never woken again.
    pub(super) fn remove(&self, channel: &str) {
        self.lock().by_name.remove(channel);
    }
}

impl<S: Source> Hub<S> {
    /// A hub for `source`; it connects on its first subscription.
    pub fn new(source: S, settings: Settings) -> Self {
        Self::with_source(Arc::new(source), settings)
    }

    /// As [`new`](Self::new), for a source the driver shares with the hub.
    pub fn with_source(source: Arc<S>, settings: Settings) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        Hub {
            shared: Arc::new(Shared {
                channels: Mutex::new(Channels::default()),
            }),
            commands,
            idle: Mutex::new(Some((source, rx))),
            settings,
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts the connection task if it is not running yet.
    fn start(&self) {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some((source, commands)) = idle {
            tokio::spawn(run(
                source,
                Arc::clone(&self.shared),
                commands,
                self.settings.clone(),
            ));
        }
    }

    fn notices(&self, channel: &str, rx: watch::Receiver<u64>) -> Notices {
        Notices {
            channel: channel.to_owned(),
            rx,
            shared: Arc::downgrade(&self.shared),
            commands: self.commands.clone(),
            at_once: self.settings.linger.is_zero(),
        }
    }

    /// Subscribes to `channel` and returns its watcher. Waits for the store to confirm the
    /// subscription when the connection is up (so nothing pushed afterwards is missed), at
    /// most [`Settings::confirm_within`]; when it is down, returns at once (everyone is
    /// woken when it comes back). A channel still subscribed (lingering after its last
    /// watcher) costs no subscription.
    pub async fn subscribe(&self, channel: &str) -> Notices {
        match self.subscribe_checked(channel).await {
            Ok(notices) | Err(notices) => notices,
        }
    }

    /// As [`subscribe`](Self::subscribe), but `Err` (with a watcher that is never woken)
    /// if the store refused the channel.
    pub async fn subscribe_checked(&self, channel: &str) -> Result<Notices, Notices> {
        self.start();
        let (rx, lingering) = {
            let mut channels = self.shared.lock();
            let seq = channels.next;
            let entry = channels
                .by_name
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    seq,
                    notices: watch::Sender::new(0),
                    watchers: 0,
                    idle_since: None,
                });
            let new = entry.seq == seq;
            let lingering = entry.watchers == 0 && entry.idle_since.take().is_some();
            entry.watchers += 1;
            let rx = entry.notices.subscribe();
            if new {
                channels.next += 1;
            }
            (rx, lingering)
        };
        let notices = self.notices(channel, rx);
        if lingering {
            // Still subscribed from its last watcher.
            return Ok(notices);
        }
        if self.confirm(channel).await {
            Ok(notices)
        } else {
            Err(notices)
        }
    }

    /// Asks the connection task to subscribe to `channel` (again) without watching it, and
    /// waits as [`subscribe`](Self::subscribe) does: for a [fixed
    /// channel](Source::fixed_channels), to know it is subscribed before relying on it.
    /// `false` if the store refused it.
    pub async fn confirm(&self, channel: &str) -> bool {
        self.start();
        let (confirmed, confirmation) = oneshot::channel();
        if self
            .commands
            .send(Command::Subscribe(channel.to_owned(), confirmed))
            .is_ok()
            && let Ok(Ok(false)) = timeout(self.settings.confirm_within, confirmation).await
        {
            return false;
        }
        true
    }

    /// A watcher of `channel` if it is subscribed already (watched, or lingering after its
    /// last watcher), without a subscription; `None` otherwise.
    pub fn existing(&self, channel: &str) -> Option<Notices> {
        let rx = {
            let mut channels = self.shared.lock();
            let entry = channels.by_name.get_mut(channel)?;
            entry.idle_since = None;
            entry.watchers += 1;
            entry.notices.subscribe()
        };
        Some(self.notices(channel, rx))
    }
}
