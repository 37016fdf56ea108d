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
use std::future::Future;
use std::pin::Pin;
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

/// A request to the stream, forwarded by a future of its own so that the task never waits
/// on a full request channel while etcd waits for it to read responses.
enum Request {
    Watch(Vec<u8>, WatchOptions),
    Cancel(i64),
}

/// An open stream: the queue of requests to it, its responses, and the future that
/// forwards the requests.
struct Open {
    requests: mpsc::UnboundedSender<Request>,
    responses: WatchResponseStream,
    forward: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
}

impl Open {
    fn new(sender: WatchRequestSender, responses: WatchResponseStream) -> Self {
        let (requests, mut queued) = mpsc::unbounded_channel::<Request>();
        let mut sender = sender;
        let forward = Box::pin(async move {
            while let Some(request) = queued.recv().await {
                match request {
                    Request::Watch(key, options) => sender.watch(key, Some(options)).await,
                    Request::Cancel(id) => sender.cancel(id).await,
                }
                .map_err(from_etcd)?;
            }
            Ok(())
        });
        Open {
            requests,
            responses,
            forward,
        }
    }
}

/// What the task waits for next.
enum Next {
    Command(Option<Command>),
    Response(std::result::Result<Option<WatchResponse>, etcd_client::Error>),
    Forwarded(Result<()>),
}

/// The task that owns the stream: runs as long as a subscription or the driver can send it
/// commands; the stream is closed when no watch is left.
async fn run(
    client: Client,
    request_timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut routes: HashMap<i64, mpsc::UnboundedSender<Delivery>> = HashMap::new();
    let mut stream: Option<Open> = None;
    loop {
        let next = match stream.as_mut() {
            Some(open) => tokio::select! {
                command = commands.recv() => Next::Command(command),
                response = open.responses.message() => Next::Response(response),
                forwarded = &mut open.forward => Next::Forwarded(forwarded),
            },
            None => Next::Command(commands.recv().await),
        };
        let failure = match next {
            Next::Command(None) => return,
            Next::Command(Some(Command::Watch {
                id,
                key,
                options,
                deliver,
            })) => {
                let options = options.with_watch_id(id);
                match stream.as_ref() {
                    Some(open) => {
                        let _ = open.requests.send(Request::Watch(key, options));
                        routes.insert(id, deliver);
                    }
                    // The first watch opens the stream.
                    None => match open(&client, request_timeout, key, options).await {
                        Ok((sender, responses)) => {
                            stream = Some(Open::new(sender, responses));
                            routes.insert(id, deliver);
                        }
                        Err(err) => {
                            let _ = deliver.send(Err(err));
                        }
                    },
                }
                continue;
            }
            Next::Command(Some(Command::Cancel(id))) => {
                if routes.remove(&id).is_some()
                    && let Some(open) = stream.as_ref()
                {
                    let _ = open.requests.send(Request::Cancel(id));
                }
                if routes.is_empty() && stream.is_some() {
                    debug!("no watch left: closing the shared watch stream");
                    stream = None;
                }
                continue;
            }
            Next::Response(Ok(Some(response))) => {
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
            Next::Response(Ok(None)) => unexpected("etcd closed the shared watch stream"),
            Next::Response(Err(err)) => from_etcd(err),
            Next::Forwarded(Ok(())) => unexpected("the shared watch stream's requests ended"),
            Next::Forwarded(Err(err)) => err,
        };
        debug!(error = %ErrorChain(&failure), watches = routes.len(), "the shared watch stream failed");
        fail_all(&mut routes, &failure);
        stream = None;
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
