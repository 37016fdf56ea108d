//! The watch of held keys: how a leader learns at once that its key is gone.
//!
//! One etcd watch stream per driver, opened when the first term is held, carries one watch
//! per held key (its watch id is the key's create revision, which etcd makes unique). Any
//! event on a held key ends its term as gone:
//!
//! * a deletion: by an operator (`etcdctl del`), by a late request, or by etcd itself when
//!   the lease was revoked or expired;
//! * a put: an operator's `etcdctl put` detaches the key from its lease (or moves it to
//!   another), and the driver never writes a key while it holds it, so any put is someone
//!   else's and the term is not what it was.
//!
//! The event cancels the term's `gone` token, which
//! [`EtcdDriver::renew`](crate::EtcdDriver) checks before, between and after its steps
//! (the core's holder races it beside the request, through
//! [`EtcdDriver::term_gone`](crate::EtcdDriver::term_gone), which resolves on it).
//!
//! The watch is only the fast path for noticing a lost term: renewals never rely on it. A
//! watch can report an event but cannot prove that there was none (its member may lag
//! behind the one that answered a keep-alive, and on etcd 3.4 a progress notification may
//! overtake a deletion event), so every renewal reads the key after its keep-alive
//! (`Inner::confirm_key`).
//!
//! A key's first watch starts right after the revision at which the campaign read it, so
//! that no event since goes unseen. The stream is restarted after any error, with backoff;
//! the restart watches every held key from the current revision (an old start revision
//! would make etcd scan its history, or be compacted away). An event during the outage is
//! then noticed by the term's next renewal, whose read finds the key gone (or on another
//! lease).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leader_core::{Error, Result};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, warn};

use crate::error::{ErrorChain, unexpected, watch_cancelled};
use crate::gone::Gone;
use crate::io::{EtcdIo, WatchCommand, WatchMessage, WatchRequest};
use crate::keys::CandidateKey;
use crate::{Inner, lock};

/// The first pause before the stream is restarted after an error.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest pause before the stream is restarted.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A stream that worked this long starts over with the first pause when it fails.
const HEALTHY_FOR: Duration = Duration::from_secs(30);

/// The terms this driver's candidates hold, by create revision (the fencing token, and the
/// watch id).
type Terms = Arc<Mutex<BTreeMap<i64, HeldTerm>>>;

/// The terms this driver's candidates hold, and the handle of the task that watches them.
pub(crate) struct HeldKeys {
    terms: Terms,
    /// Commands to the watch task; dropping the sender (with the driver) ends the task.
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
}

struct HeldTerm {
    key: Arc<str>,
    lease: i64,
    gone: Gone,
    /// The revision the key's first watch starts from: right after the campaign's read of
    /// the key, so that no event since goes unseen. 0 once that watch was requested: later
    /// ones (after the stream failed) start at the current revision.
    start: i64,
    /// The value of a proclamation of this term sent and not yet seen: its put is ours.
    proclaimed: Option<Box<[u8]>>,
}

impl HeldTerm {
    /// The start revision of a watch of the key requested now (0: the current revision).
    fn take_start(&mut self) -> i64 {
        std::mem::take(&mut self.start)
    }
}

#[derive(Debug)]
enum Command {
    Watch(i64),
    Unwatch(i64),
}

/// Why a stream ended without an error.
enum Ended {
    /// The driver was dropped.
    DriverGone,
    /// Nothing to watch any more.
    NothingHeld,
}

impl HeldKeys {
    pub(crate) fn new() -> Self {
        HeldKeys {
            terms: Arc::new(Mutex::new(BTreeMap::new())),
            commands: Mutex::new(None),
        }
    }

    fn send(&self, command: Command) {
        if let Some(commands) = lock(&self.commands).as_ref() {
            // A send fails only once the task ended, i.e. the driver is being dropped.
            let _ = commands.send(command);
        }
    }

    /// Ends term `token` as gone (cancels its token) if it is held.
    fn gone(&self, token: i64) {
        let term = lock(&self.terms).remove(&token);
        if let Some(term) = term {
            term.gone.cancel();
            self.send(Command::Unwatch(token));
        }
    }
}

impl Inner {
    /// Starts watching the key of the term `key` holds, seen to exist at `verified_at`.
    pub(crate) fn hold_term(&self, key: &CandidateKey, verified_at: i64) {
        let token = key.create_revision;
        lock(&self.held.terms).insert(
            token,
            HeldTerm {
                key: Arc::clone(&key.key),
                lease: key.lease,
                gone: key.gone.clone(),
                start: if verified_at > 0 { verified_at + 1 } else { 0 },
                proclaimed: None,
            },
        );
        let mut commands = lock(&self.held.commands);
        let running = commands.as_ref().is_some_and(|c| !c.is_closed());
        if !running {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = WatchTask {
                terms: Arc::clone(&self.held.terms),
                io: Arc::clone(&self.io),
                request_timeout: self.request_timeout,
                commands: rx,
            };
            tokio::spawn(task.run());
            *commands = Some(tx);
        }
        if let Some(commands) = commands.as_ref() {
            let _ = commands.send(Command::Watch(token));
        }
    }

    /// The key of held term `token`, if held.
    pub(crate) fn held_key(&self, token: i64) -> Option<Arc<str>> {
        lock(&self.held.terms)
            .get(&token)
            .map(|term| term.key.clone())
    }

    /// The next put of held term `token`'s key with `value`, on its lease and with its
    /// create revision, is this driver's own (a proclamation), not news of a lost term.
    pub(crate) fn expect_put(&self, token: i64, value: &[u8]) {
        if let Some(term) = lock(&self.held.terms).get_mut(&token) {
            term.proclaimed = Some(value.into());
        }
    }

    /// Every held term: its token, key and lease.
    pub(crate) fn held_terms(&self) -> Vec<(i64, Arc<str>, i64)> {
        lock(&self.held.terms)
            .iter()
            .map(|(token, term)| (*token, term.key.clone(), term.lease))
            .collect()
    }

    /// Stops watching term `token` (resigned: its end is no news).
    pub(crate) fn release_term(&self, token: i64) {
        self.forget_reads(token);
        let released = lock(&self.held.terms).remove(&token).is_some();
        if released {
            self.held.send(Command::Unwatch(token));
        }
    }

    /// Ends term `token` as gone, if it is held: etcd says its key is.
    pub(crate) fn end_term(&self, token: i64) {
        self.forget_reads(token);
        self.held.gone(token);
    }

    /// Ends every held term on lease `lease`: etcd says the lease is gone.
    pub(crate) fn lease_gone(&self, lease: i64) {
        let tokens: Vec<i64> = lock(&self.held.terms)
            .iter()
            .filter(|(_, term)| term.lease == lease)
            .map(|(&token, _)| token)
            .collect();
        for token in tokens {
            self.held.gone(token);
        }
    }
}

/// The task that owns the watch stream.
struct WatchTask {
    terms: Terms,
    io: Arc<dyn EtcdIo>,
    request_timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl WatchTask {
    async fn run(mut self) {
        let mut retry = FIRST_RETRY;
        let mut failures = 0u32;
        loop {
            // Idle (no stream) until a term is held.
            while lock(&self.terms).is_empty() {
                if self.commands.recv().await.is_none() {
                    return;
                }
            }
            let started = Instant::now();
            match self.stream().await {
                Ok(Ended::DriverGone) => return,
                Ok(Ended::NothingHeld) => continue,
                Err(err) => {
                    if started.elapsed() >= HEALTHY_FOR {
                        retry = FIRST_RETRY;
                        failures = 0;
                    }
                    if failures.is_multiple_of(10) {
                        warn!(
                            error = %ErrorChain(&err),
                            failures = failures + 1,
                            "the watch of held etcd keys failed; until it is restarted, a \
                             lost term is noticed at its next renewal"
                        );
                    }
                    failures = failures.saturating_add(1);
                    // The restart watches every held key: commands meanwhile are moot.
                    let until = Instant::now() + retry;
                    loop {
                        tokio::select! {
                            // Biased: a fixed order keeps the simulation deterministic.
                            biased;
                            () = sleep_until(until) => break,
                            command = self.commands.recv() => if command.is_none() {
                                return;
                            },
                        }
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Opens a stream, watches every held key on it, and serves it until it fails.
    async fn stream(&mut self) -> Result<Ended> {
        // The stream starts with every held key: queued commands are covered by that.
        loop {
            match self.commands.try_recv() {
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(Ended::DriverGone),
            }
        }
        let mut keys: Vec<(i64, Arc<str>, i64)> = lock(&self.terms)
            .iter_mut()
            .map(|(&token, term)| (token, term.key.clone(), term.take_start()))
            .collect();
        let Some((first, first_key, first_start)) = keys.pop() else {
            return Ok(Ended::NothingHeld);
        };
        debug!(keys = keys.len() + 1, "opening the watch of held etcd keys");
        let mut stream = match timeout(
            self.request_timeout,
            self.io
                .watch(WatchRequest::key(first, first_key.as_bytes(), first_start)),
        )
        .await
        {
            Ok(stream) => stream?,
            Err(_) => return Err(Error::Timeout(self.request_timeout)),
        };
        let requests = stream.commands.clone();
        // The watch ids requested on this stream and not cancelled.
        let mut active: BTreeSet<i64> = BTreeSet::from([first]);
        for (token, key, start) in keys {
            active.insert(token);
            let _ = requests.send(WatchCommand::Watch(WatchRequest::key(
                token,
                key.as_bytes(),
                start,
            )));
        }
        let terms = &self.terms;
        let commands = &mut self.commands;
        loop {
            tokio::select! {
                // Biased: a fixed order keeps the simulation deterministic.
                biased;
                command = commands.recv() => {
                    let Some(command) = command else {
                        return Ok(Ended::DriverGone);
                    };
                    match command {
                        Command::Watch(token) => {
                            if active.contains(&token) {
                                continue;
                            }
                            let term = lock(terms)
                                .get_mut(&token)
                                .map(|t| (t.key.clone(), t.take_start()));
                            if let Some((key, start)) = term {
                                active.insert(token);
                                let request = WatchRequest::key(token, key.as_bytes(), start);
                                let _ = requests.send(WatchCommand::Watch(request));
                            }
                        }
                        Command::Unwatch(token) => {
                            if active.remove(&token) {
                                let _ = requests.send(WatchCommand::Cancel(token));
                            }
                        }
                    }
                }
                message = stream.messages.recv() => {
                    let Some(message) = message else {
                        return Err(unexpected("etcd closed the watch stream"));
                    };
                    handle(terms, &message?, &mut active, &requests)?;
                }
            }
        }
    }
}

/// Applies one response of the stream.
fn handle(
    terms: &Mutex<BTreeMap<i64, HeldTerm>>,
    response: &WatchMessage,
    active: &mut BTreeSet<i64>,
    requests: &mpsc::UnboundedSender<WatchCommand>,
) -> Result<()> {
    let id = response.watch_id;
    if response.canceled {
        let ours = active.remove(&id);
        if response.created {
            // etcd refused to create the watch (a missing permission, say).
            return Err(watch_cancelled(&response.cancel_reason));
        }
        if !ours {
            // The answer to a cancellation of ours.
            return Ok(());
        }
        if response.compact_revision > 0 {
            return Err(unexpected(format!(
                "etcd compacted the watch of a held key (watch {id}) at revision {}",
                response.compact_revision
            )));
        }
        return Err(watch_cancelled(&response.cancel_reason));
    }
    let Some(event) = response.events.first() else {
        // The confirmation of a watch's creation (or a progress notification): no news.
        return Ok(());
    };
    let kv = &event.kv;
    if response.events.len() == 1
        && !event.deleted
        && let Some(term) = lock(terms).get_mut(&id)
        && kv.create_revision == id
        && kv.lease == term.lease
        && term.proclaimed.as_deref() == Some(kv.value.as_slice())
    {
        // This driver's own proclamation: same term, same lease, the value it sent.
        term.proclaimed = None;
        return Ok(());
    }
    if active.remove(&id) {
        let _ = requests.send(WatchCommand::Cancel(id));
    }
    let term = lock(terms).remove(&id);
    if let Some(term) = term {
        let what = if event.deleted {
            "deleted"
        } else {
            "overwritten"
        };
        warn!(
            key = %term.key,
            fencing_token = id,
            "the key of a held term was {what}; the term is gone"
        );
        term.gone.cancel();
    }
    Ok(())
}
