//! One `LISTEN` connection per driver, shared by every waiting candidate, observer and
//! leader of the driver: the driver's [`PostgresIo::listen_connection`] as a source of
//! leader-core's [notices hub](leader_core::notices) (routing, reconnection, wakeups at
//! reconnection, health check).
//!
//! Two kinds of channels: each election's channel (`leader_<hash>`), on which observers
//! hear elections, resignations and proclamations (the hub's watchers); and the driver's
//! own channel (`leader_d_<random>`), listened on at every connection and routed by
//! [`crate::own_channel`] to one waiter or leader of this driver.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use leader_core::Result;
use leader_core::notices::{Commands, Connection, Hub, Notices, Settings, Source};

use crate::io::{ListenClient, ListenConnection, Notification, PostgresIo};
use crate::own_channel::{Shared, TermGuard, WaiterGuard};

/// The driver's `LISTEN` connection: election channels for observers, and the driver's
/// own channel. Its connection task starts on the first use (inside the caller's runtime)
/// and ends when the driver and every watcher are gone.
pub(crate) struct Listener {
    hub: Hub<Listen>,
    shared: Arc<Shared>,
    /// The driver's channel is listened on (or the connection was down when asked).
    ready: AtomicBool,
}

/// The `LISTEN` connections of a driver, as the hub's source.
struct Listen {
    io: Arc<dyn PostgresIo>,
    shared: Arc<Shared>,
}

/// A `LISTEN` connection's commands, as the hub's (the I/O layer bounds each).
struct ListenCommands(Box<dyn ListenClient>);

#[async_trait::async_trait]
impl Commands for ListenCommands {
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool> {
        self.0.listen(channels).await.map(|()| true)
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        self.0.unlisten(channel).await
    }

    async fn ping(&mut self) -> Result<()> {
        self.0.ping().await
    }
}

#[async_trait::async_trait]
impl Source for Listen {
    type Message = Notification;

    async fn connect(&self, _attempt: usize) -> Result<Connection<Notification>> {
        let ListenConnection {
            client,
            notifications,
        } = self.io.listen_connection().await?;
        Ok(Connection {
            commands: Box::new(ListenCommands(client)),
            messages: notifications,
        })
    }

    fn route<'m>(&self, message: &'m Notification) -> Option<&'m str> {
        if message.channel == self.shared.channel {
            self.shared.notify(&message.payload);
            return None;
        }
        Some(&message.channel)
    }

    fn fixed_channels(&self) -> Vec<String> {
        vec![self.shared.channel.clone()]
    }

    fn wake_all(&self) {
        self.shared.notify_all();
    }

    fn name(&self) -> &'static str {
        "PostgreSQL LISTEN"
    }
}

impl Listener {
    pub(crate) fn new(io: Arc<dyn PostgresIo>, channel: String) -> Self {
        let shared = Arc::new(Shared::new(channel));
        let source = Listen {
            io,
            shared: Arc::clone(&shared),
        };
        // No linger: an election channel is unlistened when its last observer goes.
        let settings = Settings {
            confirm_within: Duration::from_secs(5),
            ..Settings::default()
        };
        Listener {
            hub: Hub::new(source, settings),
            shared,
            ready: AtomicBool::new(false),
        }
    }

    /// The driver's channel and its waiters.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Makes sure the driver's channel is listened on (once per driver; the connection
    /// task listens on it again after each reconnection). Waits for PostgreSQL to confirm
    /// it when the connection is up; when it is down, returns at once: everyone is woken
    /// when it comes back.
    pub(crate) async fn ensure(&self) {
        if self.ready.load(Ordering::SeqCst) {
            return;
        }
        self.hub.confirm(&self.shared.channel).await;
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Registers a waiting candidate `id` of this driver. Returns whether the keeper task
    /// must be started (it was not running).
    pub(crate) fn wait(&self, id: &str, election: &str, ttl: Duration) -> (WaiterGuard, bool) {
        self.shared.wait(id, election, ttl)
    }

    /// Registers the term `token` of leader `id` of this driver; its watch is already
    /// marked gone if the trigger's notice came before.
    pub(crate) fn hold(&self, id: &str, token: u64) -> TermGuard {
        self.shared.hold(id, token)
    }

    /// Listens on the election channel `channel` and returns its watcher.
    pub(crate) async fn listen(&self, channel: &str) -> Notices {
        let mut notices = self.hub.subscribe(channel).await;
        notices.mark_seen();
        notices
    }
}
