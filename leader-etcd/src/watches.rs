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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leader_core::{Error, Result};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::debug;

use crate::error::{ErrorChain, unexpected};
use crate::io::{EtcdIo, WatchCommand, WatchMessage, WatchRequest, WatchStream};
use crate::lock;

/// What a subscription receives.
type Delivery = Result<WatchMessage>;

enum Command {
    Watch {
        request: WatchRequest,
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
    pub(crate) async fn message(&mut self) -> Result<Option<WatchMessage>> {
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

    /// Watches each of `watches` on the shared stream (opening it if needed), with ids of
    /// this hub's choosing (theirs are ignored).
    pub(crate) fn subscribe(
        &self,
        io: &Arc<dyn EtcdIo>,
        request_timeout: Duration,
        watches: Vec<WatchRequest>,
    ) -> Subscription {
        let (deliver, responses) = mpsc::unbounded_channel();
        let mut state = lock(&self.state);
        let running = state.commands.as_ref().is_some_and(|c| !c.is_closed());
        if !running {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(Arc::clone(io), request_timeout, rx));
            state.commands = Some(tx);
        }
        let mut ids = Vec::with_capacity(watches.len());
        let commands = state
            .commands
            .clone()
            .unwrap_or_else(|| mpsc::unbounded_channel().0);
        for mut request in watches {
            let id = state.next_id;
            state.next_id += 1;
            ids.push(id);
            request.id = id;
            let _ = commands.send(Command::Watch {
                request,
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

/// What the task waits for next.
enum Next {
    Command(Option<Command>),
    Message(Option<Result<WatchMessage>>),
}

/// The task that owns the stream: runs as long as a subscription or the driver can send it
/// commands; the stream is closed when no watch is left.
async fn run(
    io: Arc<dyn EtcdIo>,
    request_timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut routes: BTreeMap<i64, mpsc::UnboundedSender<Delivery>> = BTreeMap::new();
    let mut stream: Option<WatchStream> = None;
    loop {
        let next = match stream.as_mut() {
            Some(open) => tokio::select! {
                // Biased: a fixed order keeps the simulation deterministic.
                biased;
                command = commands.recv() => Next::Command(command),
                message = open.messages.recv() => Next::Message(message),
            },
            None => Next::Command(commands.recv().await),
        };
        let failure = match next {
            Next::Command(None) => return,
            Next::Command(Some(Command::Watch { request, deliver })) => {
                let id = request.id;
                match stream.as_ref() {
                    Some(open) => {
                        let _ = open.commands.send(WatchCommand::Watch(request));
                        routes.insert(id, deliver);
                    }
                    // The first watch opens the stream.
                    None => match timeout(request_timeout, io.watch(request)).await {
                        Ok(Ok(opened)) => {
                            stream = Some(opened);
                            routes.insert(id, deliver);
                        }
                        Ok(Err(err)) => {
                            let _ = deliver.send(Err(err));
                        }
                        Err(_) => {
                            let _ = deliver.send(Err(Error::Timeout(request_timeout)));
                        }
                    },
                }
                continue;
            }
            Next::Command(Some(Command::Cancel(id))) => {
                if routes.remove(&id).is_some()
                    && let Some(open) = stream.as_ref()
                {
                    let _ = open.commands.send(WatchCommand::Cancel(id));
                }
                if routes.is_empty() && stream.is_some() {
                    debug!("no watch left: closing the shared watch stream");
                    stream = None;
                }
                continue;
            }
            Next::Message(Some(Ok(message))) => {
                let id = message.watch_id;
                let done = message.canceled;
                if let Some(deliver) = routes.get(&id) {
                    let _ = deliver.send(Ok(message));
                }
                if done {
                    routes.remove(&id);
                }
                continue;
            }
            Next::Message(None) => unexpected("etcd closed the shared watch stream"),
            Next::Message(Some(Err(err))) => err,
        };
        debug!(error = %ErrorChain(&failure), watches = routes.len(), "the shared watch stream failed");
        fail_all(&mut routes, &failure);
        stream = None;
    }
}

/// Every subscription gets the stream's failure; their watches are gone.
fn fail_all(routes: &mut BTreeMap<i64, mpsc::UnboundedSender<Delivery>>, err: &Error) {
    for (_, deliver) in std::mem::take(routes) {
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
