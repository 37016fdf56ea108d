//! The watches of waiting candidates and of observers, multiplexed on one etcd watch stream
//! per driver (etcd's Watch API carries many watchers per stream), instead of a stream per
//! waiter or observer.
//!
//! A waiter subscribes to one or more watches (its predecessor's key, the nomination); the
//! task that owns the stream gives each watch an id of its own (chosen by the client, which
//! needs etcd 3.4) and routes every response to the subscription it belongs to. Dropping a
//! subscription cancels its watches. When the stream fails, every subscription gets the
//! error (its waiter reads again, or fails its campaign, as with a stream of its own) and the
//! next subscription opens a new stream. The stream is closed when no watch is left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream};
use leader_core::{Error, Result};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::debug;

use crate::error::{ErrorChain, from_etcd, unexpected};
use crate::lock;

/// What a subscription receives.
type Delivery = Result<WatchResponse>;

enum Command {
    Watch {
        id: i64,
        key: Vec<u8>,
        options: WatchOptions,
        deliver: mpsc::UnboundedSender<Delivery>,
    },
    Cancel(i64),
}

/// The driver's hub of waiters' watches.
pub(crate) struct Watches {
    state: Arc<Mutex<State>>,
}

struct State {
    commands: Option<mpsc::UnboundedSender<Command>>,
    /// Watch ids are never reused within a driver (an id is unique per stream in etcd).
    next_id: i64,
}

/// One waiter's watches: their responses, in the order the stream delivered them.
pub(crate) struct Subscription {
    ids: Vec<i64>,
    responses: mpsc::UnboundedReceiver<Delivery>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The next response of any of this subscription's watches; an error when the shared
    /// stream failed (the watches are gone then).
    pub(crate) async fn message(&mut self) -> Result<Option<WatchResponse>> {
        match self.responses.recv().await {
            Some(Ok(response)) => Ok(Some(response)),
            Some(Err(err)) => Err(err),
            None => Ok(None),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for id in &self.ids {
            // Fails only once the task ended: the watches are gone with its stream.
            let _ = self.commands.send(Command::Cancel(*id));
        }
    }
}

impl Watches {
    pub(crate) fn new() -> Self {
        Watches {
            state: Arc::new(Mutex::new(State {
                commands: None,
                next_id: 1,
            })),
        }
    }

    /// Watches each `(key, options)` on the shared stream (opening it if needed).
    pub(crate) fn subscribe(
        &self,
        client: &Client,
        request_timeout: Duration,
        watches: Vec<(Vec<u8>, WatchOptions)>,
    ) -> Subscription {
        let (deliver, responses) = mpsc::unbounded_channel();
        let mut state = lock(&self.state);
        let running = state.commands.as_ref().is_some_and(|c| !c.is_closed());
        if !running {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(client.clone(), request_timeout, rx));
            state.commands = Some(tx);
        }
        let mut ids = Vec::with_capacity(watches.len());
        let commands = state
            .commands
            .clone()
            .unwrap_or_else(|| mpsc::unbounded_channel().0);
        for (key, options) in watches {
            let id = state.next_id;
            state.next_id += 1;
            ids.push(id);
            let _ = commands.send(Command::Watch {
                id,
                key,
                options,
                deliver: deliver.clone(),
            });
        }
        Subscription {
            ids,
            responses,
            commands,
        }
    }
}

/// The task that owns the stream: runs until no watch is left (or the driver is gone).
async fn run(
    client: Client,
    request_timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut routes: HashMap<i64, mpsc::UnboundedSender<Delivery>> = HashMap::new();
    let mut stream: Option<(WatchRequestSender, WatchResponseStream)> = None;
    loop {
        let response = async {
            match stream.as_mut() {
                Some((_, responses)) => responses.message().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Watch { id, key, options, deliver } => {
                        let options = options.with_watch_id(id);
                        let Some((sender, _)) = stream.as_mut() else {
                            // The first watch opens the stream.
                            match open(&client, request_timeout, key, options).await {
                                Ok(opened) => {
                                    stream = Some(opened);
                                    routes.insert(id, deliver);
                                }
                                Err(err) => {
                                    let _ = deliver.send(Err(err));
                                }
                            }
                            continue;
                        };
                        match sender.watch(key, Some(options)).await {
                            Ok(()) => {
                                routes.insert(id, deliver);
                            }
                            Err(err) => {
                                let err = from_etcd(err);
                                let _ = deliver.send(Err(copy(&err)));
                                fail_all(&mut routes, &err);
                                stream = None;
                            }
                        }
                    }
                    Command::Cancel(id) => {
                        if routes.remove(&id).is_some()
                            && let Some((sender, _)) = stream.as_mut()
                            && let Err(err) = sender.cancel(id).await
                        {
                            let err = from_etcd(err);
                            fail_all(&mut routes, &err);
                            stream = None;
                        }
                        if routes.is_empty() && stream.is_some() {
                            debug!("no waiter's watch left: closing the shared watch stream");
                            stream = None;
                        }
                    }
                }
            }
            response = response => {
                let failure = match response {
                    Ok(Some(response)) => {
                        let id = response.watch_id();
                        let done = response.canceled();
                        if let Some(deliver) = routes.get(&id) {
                            let _ = deliver.send(Ok(response));
                        }
                        if done {
                            routes.remove(&id);
                        }
                        continue;
                    }
                    Ok(None) => unexpected("etcd closed the shared watch stream"),
                    Err(err) => from_etcd(err),
                };
                debug!(error = %ErrorChain(&failure), watches = routes.len(), "the shared watch stream failed");
                fail_all(&mut routes, &failure);
                stream = None;
            }
        }
    }
}

/// Opens a watch stream with its first watch.
async fn open(
    client: &Client,
    request_timeout: Duration,
    key: Vec<u8>,
    options: WatchOptions,
) -> Result<(WatchRequestSender, WatchResponseStream)> {
    let opened = timeout(request_timeout, client.clone().watch(key, Some(options)))
        .await
        .map_err(|_| Error::Timeout(request_timeout))?
        .map_err(from_etcd)?;
    Ok(opened.split())
}

/// Every subscription gets the stream's failure; their watches are gone.
fn fail_all(routes: &mut HashMap<i64, mpsc::UnboundedSender<Delivery>>, err: &Error) {
    for (_, deliver) in routes.drain() {
        let _ = deliver.send(Err(copy(err)));
    }
}

/// An error for one more subscriber (errors are not `Clone`): a store error that says the
/// same, transient as the original.
fn copy(err: &Error) -> Error {
    match err {
        Error::Denied(_) => Error::denied(std::io::Error::other(ErrorChain(err).to_string())),
        Error::Timeout(limit) => Error::Timeout(*limit),
        _ => unexpected(ErrorChain(err).to_string()),
    }
}
