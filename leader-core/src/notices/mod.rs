//! Store-pushed wakeups, for drivers: one push connection per driver (Redis pub/sub,
//! PostgreSQL `LISTEN`, ...) shared by every waiting candidate and observer of the driver.
//!
//! A driver implements [`Source`] for its store's push connection (connect, subscribe,
//! unsubscribe, a health query, the messages) and keeps a [`Hub`] of it. The hub:
//!
//! - routes each message to the watchers ([`Notices`]) of its channel, through the
//!   driver's [`Source::route`] (which may act on some messages itself, such as a driver's
//!   own channel);
//! - connects on its first use, inside the caller's runtime, and subscribes to every
//!   watched channel (and the source's [fixed ones](Source::fixed_channels));
//! - wakes every watcher at each (re)connection and each disconnection, since messages may
//!   have been missed meanwhile (a wakeup is a reason to look, never a fact);
//! - reconnects with jittered exponential backoff (leader-core's, so a seeded simulation
//!   replays it), back to the shortest delay after a connection that was up;
//! - checks an idle connection every [`Settings::health_check_every`] with
//!   [`Commands::ping`]: a half-open socket would otherwise leave waiters waiting on
//!   messages that never come;
//! - keeps a channel nobody watches subscribed for [`Settings::linger`] (unsubscribed at a
//!   health check), or unsubscribes it at once if that is zero;
//! - wakes and (re)subscribes in the order of the channels' first subscription, not of
//!   their names (which often hold random ids), so that a seeded simulation replays
//!   exactly;
//! - ends its connection task when the hub and every watcher are gone.
//!
//! [`observe`] is the `Driver::observe` loop of a store with such a connection: look at
//! the election, then wait for a notice or for the time the look says.
//!
//! The module names no store; its tests run it on a fake source with Tokio's paused clock.

mod hub;
mod observe;
mod task;

use std::time::Duration;

use futures::stream::BoxStream;

use crate::Result;

pub use hub::{Hub, Notices};
pub use observe::{Look, Observed, observe};

/// The commands of one push connection. Each call ends within the source's own limit:
/// an answer, or an error (a timeout is an error) that makes the hub reconnect.
#[async_trait::async_trait]
pub trait Commands: Send {
    /// Subscribes to `channels`: `Ok(true)` once the store confirmed (anything pushed on
    /// them afterwards is received), `Ok(false)` if the store refused them (the connection
    /// is fine: an ACL without them, say), `Err` if the connection failed.
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool>;
    /// Unsubscribes from `channel`.
    async fn unsubscribe(&mut self, channel: &str) -> Result<()>;
    /// A health check: a trivial round trip on the connection.
    async fn ping(&mut self) -> Result<()>;
}

/// One open push connection: its commands, and its messages, in the order the store sent
/// them. The messages **end when the connection drops**: every subscription is then gone
/// and what was pushed meanwhile is lost (the hub reconnects and wakes everyone).
pub struct Connection<M> {
    /// Its commands.
    pub commands: Box<dyn Commands>,
    /// Its messages; the stream ends with the connection.
    pub messages: BoxStream<'static, M>,
}

impl<M> std::fmt::Debug for Connection<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

/// A store's push connections, as a driver adapts them for its [`Hub`]: what the hub needs
/// of the store, and nothing else.
#[async_trait::async_trait]
pub trait Source: Send + Sync + 'static {
    /// A pushed message.
    type Message: Send + 'static;

    /// Opens a new connection, subscribed to nothing yet (`attempt` counts the connections
    /// tried so far: a source with several servers may try them in turn). Ends within the
    /// source's own limit.
    async fn connect(&self, attempt: usize) -> Result<Connection<Self::Message>>;

    /// The channel whose watchers `message` wakes, or `None` to wake nobody (a message not
    /// worth a look, or one the source acted on itself).
    fn route<'m>(&self, message: &'m Self::Message) -> Option<&'m str>;

    /// Channels subscribed on every connection besides the watched ones (after them), for
    /// messages the source routes itself. None by default.
    fn fixed_channels(&self) -> Vec<String> {
        Vec::new()
    }

    /// Wakes what the source routes itself, after the hub woke every watcher at a
    /// (re)connection or a disconnection. Nothing by default.
    fn wake_all(&self) {}

    /// The connection's name in logs ("Redis pub/sub", "PostgreSQL LISTEN").
    fn name(&self) -> &'static str;
}

/// How a [`Hub`] keeps its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a channel nobody watches stays subscribed, so that a candidate that
    /// campaigns again (or an observer restarted) costs no unsubscribe and subscribe. It is
    /// unsubscribed at the first health check after that; with zero, at once.
    pub linger: Duration,
    /// How often the connection is checked with [`Commands::ping`] (and lingering
    /// channels are unsubscribed).
    pub health_check_every: Duration,
    /// How long [`Hub::subscribe`] waits for the store to confirm a subscription before
    /// returning anyway.
    pub confirm_within: Duration,
    /// The first delay before reconnecting; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// The longest delay before reconnecting.
    pub max_backoff: Duration,
}

impl Default for Settings {
    /// No linger, a health check every 5 s, 5 s to confirm, reconnections after 50 ms
    /// doubling to 2 s.
    fn default() -> Self {
        Settings {
            linger: Duration::ZERO,
            health_check_every: Duration::from_secs(5),
            confirm_within: Duration::from_secs(5),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}
