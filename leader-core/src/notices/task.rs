//! The connection task: connect, subscribe every channel, route messages; reconnect with
//! backoff when the connection drops.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::hub::{Command, Shared};
use super::{Connection, Settings, Source};
use crate::ErrorChain;
use crate::backoff::Backoff;

enum Ended {
    /// The hub and every watcher are gone.
    DriverGone,
    /// The connection failed or dropped; `was_up` if it had subscribed first.
    Disconnected { was_up: bool },
}

/// Wakes everyone: messages may have been missed.
fn wake_all<S: Source>(shared: &Shared, source: &S) {
    shared.notify_all();
    source.wake_all();
}

pub(super) async fn run<S: Source>(
    source: Arc<S>,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    settings: Settings,
) {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut attempt = 0_usize;
    loop {
        let ended = connected(source.as_ref(), &shared, &mut commands, &settings, attempt).await;
        attempt = attempt.wrapping_add(1);
        match ended {
            Ended::DriverGone => return,
            Ended::Disconnected { was_up: true } => backoff.reset(),
            Ended::Disconnected { was_up: false } => {}
        }
        // Messages may have been missed: every watcher looks again.
        wake_all(&shared, source.as_ref());
        let wake = Instant::now() + backoff.next_delay();
        // Meanwhile, confirm new subscriptions at once: they are made on reconnection.
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, confirmed)) => {
                        let _ = confirmed.send(true);
                    }
                    Some(Command::Unsubscribe(_)) => {}
                },
            }
        }
    }
}

async fn connected<S: Source>(
    source: &S,
    shared: &Shared,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    settings: &Settings,
    attempt: usize,
) -> Ended {
    let down = Ended::Disconnected { was_up: false };
    let name = source.name();
    let Connection {
        commands: mut sink,
        mut messages,
    } = match source.connect(attempt).await {
        Ok(connection) => connection,
        Err(err) => {
            warn!(error = %ErrorChain(&err), "{name} connection failed; waiters fall back to expiry timers");
            return down;
        }
    };
    let mut channels = shared.names();
    channels.extend(source.fixed_channels());
    if !channels.is_empty() && !matches!(sink.subscribe(&channels).await, Ok(true)) {
        return down;
    }
    debug!(channels = channels.len(), "{name} connected");
    wake_all(shared, source);
    let up = Ended::Disconnected { was_up: true };
    let mut health = tokio::time::interval(settings.health_check_every);
    health.set_missed_tick_behavior(MissedTickBehavior::Delay);
    health.reset();
    loop {
        tokio::select! {
            _ = health.tick() => {
                for channel in shared.lingered(settings.linger) {
                    if sink.unsubscribe(&channel).await.is_err() {
                        return up;
                    }
                }
                if sink.ping().await.is_err() {
                    warn!("{name} connection failed its health check; reconnecting");
                    return up;
                }
            }
            command = commands.recv() => match command {
                None => return Ended::DriverGone,
                Some(Command::Subscribe(channel, confirmed)) => {
                    match sink.subscribe(std::slice::from_ref(&channel)).await {
                        Ok(true) => {
                            let _ = confirmed.send(true);
                        }
                        // Refused: the connection is fine.
                        Ok(false) => {
                            shared.remove(&channel);
                            let _ = confirmed.send(false);
                        }
                        Err(_) => {
                            let _ = confirmed.send(true);
                            warn!(%channel, "{name} subscription failed; reconnecting");
                            return up;
                        }
                    }
                }
                Some(Command::Unsubscribe(channel)) => {
                    if shared.has(&channel) {
                        continue; // watched again meanwhile
                    }
                    if sink.unsubscribe(&channel).await.is_err() {
                        return up;
                    }
                }
            },
            message = messages.next() => match message {
                Some(message) => {
                    if let Some(channel) = source.route(&message) {
                        shared.notify(channel);
                    }
                }
                None => {
                    warn!("{name} connection lost; reconnecting");
                    return up;
                }
            },
        }
    }
}
