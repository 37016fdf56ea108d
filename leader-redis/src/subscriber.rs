//! One pub/sub connection per driver, shared by every waiting candidate and observer: the
//! driver's [`RedisIo::pubsub`] connections as a source of leader-core's [notices
//! hub](leader_core::notices) (routing, linger, reconnection, wakeups at reconnection,
//! health check). What is Redis's here: the time limit of each pub/sub command, and which
//! messages are worth a look.

use std::sync::Arc;
use std::time::Duration;

use leader_core::notices::{Commands, Connection, Hub, Settings, Source};
use leader_core::{Error, Result};
use tokio::time::timeout;

use crate::io::{Message, PubSub, PubSubConnection, RedisIo};

/// How long a connection, a (un)subscription or a health check may take before the
/// connection is deemed dead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an idle pub/sub connection is checked with a PING: a half-open socket (the
/// server or a middlebox gone without a FIN) would otherwise leave waiters and observers
/// waiting on messages that never come.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long a channel nobody watches stays subscribed: a candidate that resigns and
/// campaigns again (or an observer restarted) then sends no `UNSUBSCRIBE` and
/// `SUBSCRIBE`.
const LINGER: Duration = Duration::from_secs(20);

/// The driver's pub/sub connection: routes each channel's messages to its watchers
/// (leader-core's `Notices`), reconnects when the connection drops (to the next node of a
/// Cluster, to the master that Sentinel names now), and wakes every watcher at each
/// (re)connection, since messages may have been missed meanwhile. Its connection task
/// starts on the first subscription (inside the caller's runtime) and ends when the driver
/// and every watcher are gone.
pub(crate) type Subscriber = Hub<PubSubSource>;

/// The driver's [`Subscriber`] on `io`.
pub(crate) fn subscriber(io: Arc<dyn RedisIo>) -> Subscriber {
    Hub::new(
        PubSubSource { io },
        Settings {
            linger: LINGER,
            health_check_every: HEALTH_CHECK_EVERY,
            confirm_within: SUBSCRIBE_TIMEOUT * 2,
            ..Settings::default()
        },
    )
}

/// The pub/sub connections of a driver, as the hub's source.
pub(crate) struct PubSubSource {
    io: Arc<dyn RedisIo>,
}

/// A pub/sub connection's commands, each within [`SUBSCRIBE_TIMEOUT`].
struct Limited(Box<dyn PubSub>);

/// `call`, or a timeout error after [`SUBSCRIBE_TIMEOUT`].
async fn limited<T>(call: impl Future<Output = Result<T>>) -> Result<T> {
    timeout(SUBSCRIBE_TIMEOUT, call)
        .await
        .map_err(|_| Error::Timeout(SUBSCRIBE_TIMEOUT))?
}

#[async_trait::async_trait]
impl Commands for Limited {
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool> {
        limited(self.0.subscribe(channels)).await
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        limited(self.0.unsubscribe(channel)).await
    }

    async fn ping(&mut self) -> Result<()> {
        limited(self.0.ping()).await
    }
}

#[async_trait::async_trait]
impl Source for PubSubSource {
    type Message = Message;

    async fn connect(&self, attempt: usize) -> Result<Connection<Message>> {
        let PubSubConnection { commands, messages } = limited(self.io.pubsub(attempt)).await?;
        Ok(Connection {
            commands: Box::new(Limited(commands)),
            messages,
        })
    }

    fn route<'m>(&self, message: &'m Message) -> Option<&'m str> {
        crate::keyspace::worth_a_look(&message.channel, &message.payload)
            .then_some(message.channel.as_str())
    }

    fn name(&self) -> &'static str {
        "Redis pub/sub"
    }
}
