//! The watch of held keys: how a leader learns at once that its key is gone.
//!
//! One etcd watch stream per driver, opened when the first term is held, carries one watch
//! per held key (its watch id is the key's create revision, which etcd makes unique) that
//! reports the key's deletion: by an operator (`etcdctl del`), by a late request, or by etcd
//! itself when the lease was revoked or expired. A deletion cancels the term's `gone`
//! token, which [`EtcdDriver::renew`](crate::EtcdDriver) checks first and waits on while a
//! renewal is in flight, and which
//! [`EtcdDriver::term_gone`](crate::EtcdDriver::term_gone) resolves on.
//!
//! The stream also confirms renewals, so that a renewal costs no request per key: a key is
//! *covered* when its watch is registered on the current stream after a revision at which
//! the key was seen to exist (with its create revision and lease). A renewal whose
//! keep-alive etcd answered at revision `R` trusts a covered key once a progress request on
//! the stream, sent after the renewal began, is answered at a revision of at least `R`:
//! the stream is alive, the watch has reported everything up to `R`, and it reported no
//! deletion. One progress request serves every renewal that asked before it was sent.
//! Otherwise (the stream is down or being restarted, the key not covered yet, the watching
//! member behind the one that answered the keep-alive, or no answer in time) the renewal
//! reads the key.
//!
//! A key's first watch starts right after the revision at which the campaign read it, so
//! that no deletion since goes unseen. The stream is restarted after any error, with
//! backoff; the restart watches every held key from the current revision (an old start
//! revision would make etcd scan its history, or be compacted away), and each key is
//! covered again after its next renewal's read, which also notices a deletion during the
//! outage.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, WatchFilterType, WatchOptions, WatchResponse};
use futures::StreamExt;
use leader_core::{CancellationToken, Error, Result};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, warn};

use crate::campaign::CandidateKey;
use crate::error::{ErrorChain, from_etcd, unexpected};
use crate::lease::Confirmation;
use crate::{Inner, lock};

/// The first pause before the stream is restarted after an error.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest pause before the stream is restarted.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A stream that worked this long starts over with the first pause when it fails.
const HEALTHY_FOR: Duration = Duration::from_secs(30);
/// Progress requests left unanswered before the task stops sending more (a server that
/// does not answer them; renewals then read their keys).
const MAX_UNANSWERED_PROBES: usize = 8;

/// The terms this driver's candidates hold, and the handle of the task that watches them.
pub(crate) struct HeldKeys {
    shared: Arc<Shared>,
    /// Commands to the watch task; dropping the sender (with the driver) ends the task.
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
}

struct Shared {
    state: Mutex<State>,
    /// The last progress answer on the current stream.
    probes: watch::Sender<ProbeAnswer>,
    /// Set while progress requests go unanswered (a server that does not answer them):
    /// renewals then read their keys at once instead of waiting for an answer.
    probes_unanswered: AtomicBool,
}

#[derive(Default)]
struct State {
    /// By create revision (the fencing token, and the watch id).
    terms: HashMap<i64, HeldTerm>,
    /// Counts the streams: a watch registered on an earlier one covers nothing.
    generation: u64,
}

struct HeldTerm {
    key: String,
    lease: i64,
    gone: CancellationToken,
    /// A revision at which the key was seen to exist with this create revision and lease.
    verified_at: i64,
    /// Until its first watch is created: that watch starts right after `verified_at`, so
    /// that no deletion since the campaign read the key goes unseen. Later watches (after
    /// a stream failed) start at the current revision and a renewal reads the key.
    fresh: bool,
    /// The stream generation of the key's watch, and the revision after which that watch
    /// reports every deletion; set when etcd confirms the watch's creation.
    watching: Option<(u64, i64)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ProbeAnswer {
    generation: u64,
    /// The store revision in the answer.
    revision: i64,
    /// When the progress request it answers was sent.
    sent_at: Option<Instant>,
}

#[derive(Debug)]
enum Command {
    Watch(i64),
    Unwatch(i64),
    /// A progress request, unless one sent at or after this instant is unanswered.
    Probe(Instant),
}

/// Requests to the stream, forwarded by a future of their own so that the task never waits
/// on a full request channel while etcd waits for it to read responses.
enum Request {
    Watch(String, WatchOptions),
    Cancel(i64),
    Progress,
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
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                probes: watch::Sender::new(ProbeAnswer::default()),
                probes_unanswered: AtomicBool::new(false),
            }),
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
        let term = lock(&self.shared.state).terms.remove(&token);
        if let Some(term) = term {
            term.gone.cancel();
            self.send(Command::Unwatch(token));
        }
    }

    /// The stream generation that covers term `token`, if one does.
    fn covered(&self, token: i64) -> Option<u64> {
        let state = lock(&self.shared.state);
        let term = state.terms.get(&token)?;
        match term.watching {
            Some((generation, after))
                if generation == state.generation
                    && after <= term.verified_at
                    && !term.gone.is_cancelled() =>
            {
                Some(generation)
            }
            _ => None,
        }
    }

    /// Whether the watch shows that term `token`'s key still exists, at `revision` or
    /// later: it covers the key, and a progress request sent after this call began is
    /// answered on the same stream at `revision` or later (so the stream is alive, and has
    /// reported every deletion up to there). Waits at most `limit` for that answer.
    async fn watch_confirms(&self, token: i64, revision: i64, limit: Duration) -> bool {
        if revision <= 0 || self.shared.probes_unanswered.load(Ordering::Relaxed) {
            return false;
        }
        let requested_at = Instant::now();
        let mut answers = self.shared.probes.subscribe();
        let Some(generation) = self.covered(token) else {
            return false;
        };
        answers.borrow_and_update();
        // One progress request answers every renewal that asked before it was sent.
        self.send(Command::Probe(requested_at));
        let answered = timeout(limit, async {
            loop {
                if answers.changed().await.is_err() {
                    return false;
                }
                let answer = *answers.borrow_and_update();
                if answer.generation != generation {
                    return false;
                }
                // Answers come in order: earlier probes' first.
                if answer.sent_at.is_some_and(|sent| sent >= requested_at) {
                    // Behind the keep-alive's revision: the watching member lags.
                    return answer.revision >= revision;
                }
            }
        })
        .await;
        // Not gone, and still on the same stream, after the answer.
        matches!(answered, Ok(true)) && self.covered(token) == Some(generation)
    }
}

impl Inner {
    /// Starts watching the key of the term `key` holds, seen to exist at `verified_at`.
    pub(crate) fn hold_term(&self, key: &CandidateKey, verified_at: i64) {
        let token = key.create_revision;
        lock(&self.held.shared.state).terms.insert(
            token,
            HeldTerm {
                key: key.key.clone(),
                lease: key.lease,
                gone: key.gone.clone(),
                verified_at,
                fresh: true,
                watching: None,
            },
        );
        let mut commands = lock(&self.held.commands);
        let running = commands.as_ref().is_some_and(|c| !c.is_closed());
        if !running {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = WatchTask {
                shared: Arc::clone(&self.held.shared),
                client: self.client.clone(),
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

    /// Stops watching term `token` (resigned: its end is no news).
    pub(crate) fn release_term(&self, token: i64) {
        let released = lock(&self.held.shared.state).terms.remove(&token).is_some();
        if released {
            self.held.send(Command::Unwatch(token));
        }
    }

    /// Ends every held term on lease `lease`: etcd says the lease is gone.
    pub(crate) fn lease_gone(&self, lease: i64) {
        let tokens: Vec<i64> = lock(&self.held.shared.state)
            .terms
            .iter()
            .filter(|(_, term)| term.lease == lease)
            .map(|(&token, _)| token)
            .collect();
        for token in tokens {
            self.held.gone(token);
        }
    }

    /// Confirms that `key`'s term still exists after the keep-alive `confirmation`: from
    /// the watch if it covers the key and has caught up with the keep-alive's revision,
    /// else by reading the key. [`Error::TermGone`] if it does not exist any more (with its
    /// create revision and lease): then the term's token is cancelled too.
    pub(crate) async fn confirm_key(
        &self,
        key: &CandidateKey,
        confirmation: Confirmation,
        max_age: Duration,
    ) -> Result<()> {
        let token = key.create_revision;
        let limit = (max_age / 2).min(self.request_timeout);
        if self
            .held
            .watch_confirms(token, confirmation.revision, limit)
            .await
        {
            return Ok(());
        }
        debug!(key = %key.key, fencing_token = token, "reading the key to confirm the term");
        let response = self
            .request(self.client.clone().get(key.key.as_str(), None))
            .await?;
        let ours = response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == token && kv.lease() == key.lease);
        if !ours {
            warn!(key = %key.key, fencing_token = token, "the key of a held term is gone");
            self.held.gone(token);
            key.gone.cancel();
            return Err(Error::TermGone);
        }
        let revision = response.header().map_or(0, |h| h.revision());
        if let Some(term) = lock(&self.held.shared.state).terms.get_mut(&token) {
            term.verified_at = term.verified_at.max(revision);
        }
        Ok(())
    }
}

/// The task that owns the watch stream.
struct WatchTask {
    shared: Arc<Shared>,
    client: Client,
    request_timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl WatchTask {
    async fn run(mut self) {
        let mut retry = FIRST_RETRY;
        let mut failures = 0u32;
        loop {
            // Idle (no stream) until a term is held.
            while lock(&self.shared.state).terms.is_empty() {
                if self.commands.recv().await.is_none() {
                    return;
                }
            }
            let started = Instant::now();
            let result = self.stream().await;
            // Whatever the stream covered, it covers nothing any more.
            {
                let mut state = lock(&self.shared.state);
                state.generation += 1;
                for term in state.terms.values_mut() {
                    term.watching = None;
                    term.fresh = false;
                }
            }
            // A new stream (maybe to another member) gets its own chance to answer.
            self.shared
                .probes_unanswered
                .store(false, Ordering::Relaxed);
            match result {
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
                            "the watch of held etcd keys failed; renewals read their keys \
                             until it is restarted"
                        );
                    }
                    failures = failures.saturating_add(1);
                    // The restart watches every held key: commands meanwhile are moot.
                    let until = Instant::now() + retry;
                    loop {
                        tokio::select! {
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
        let (generation, mut keys) = {
            let state = lock(&self.shared.state);
            let keys: Vec<(i64, String, i64)> = state
                .terms
                .iter()
                .map(|(&token, term)| (token, term.key.clone(), term.start()))
                .collect();
            (state.generation, keys)
        };
        let Some((first, first_key, first_start)) = keys.pop() else {
            return Ok(Ended::NothingHeld);
        };
        debug!(keys = keys.len() + 1, "opening the watch of held etcd keys");
        let stream = match timeout(
            self.request_timeout,
            self.client
                .clone()
                .watch(first_key, Some(watch_options(first, first_start))),
        )
        .await
        {
            Ok(stream) => stream.map_err(from_etcd)?,
            Err(_) => return Err(Error::Timeout(self.request_timeout)),
        };
        let (mut sender, mut responses) = stream.split();
        let (requests, mut queued) = mpsc::unbounded_channel::<Request>();
        // The watch ids requested on this stream and not cancelled, with their start
        // revisions (0: the current one).
        let mut active: HashMap<i64, i64> = HashMap::from([(first, first_start)]);
        for (token, key, start) in keys {
            active.insert(token, start);
            let _ = requests.send(Request::Watch(key, watch_options(token, start)));
        }
        let forward = async move {
            while let Some(request) = queued.recv().await {
                match request {
                    Request::Watch(key, options) => sender.watch(key, Some(options)).await,
                    Request::Cancel(id) => sender.cancel(id).await,
                    Request::Progress => sender.request_progress().await,
                }
                .map_err(from_etcd)?;
            }
            Ok::<(), Error>(())
        };
        tokio::pin!(forward);
        let mut probes: VecDeque<Instant> = VecDeque::new();
        let shared = &self.shared;
        let commands = &mut self.commands;
        loop {
            tokio::select! {
                forwarded = &mut forward => {
                    forwarded?;
                    return Err(unexpected("the watch request stream ended"));
                }
                command = commands.recv() => {
                    let Some(command) = command else {
                        return Ok(Ended::DriverGone);
                    };
                    match command {
                        Command::Watch(token) => {
                            if active.contains_key(&token) {
                                continue;
                            }
                            let term = lock(&shared.state)
                                .terms
                                .get(&token)
                                .map(|t| (t.key.clone(), t.start()));
                            if let Some((key, start)) = term {
                                active.insert(token, start);
                                let _ = requests.send(Request::Watch(key, watch_options(token, start)));
                            }
                        }
                        Command::Unwatch(token) => {
                            if active.remove(&token).is_some() {
                                let _ = requests.send(Request::Cancel(token));
                            }
                        }
                        Command::Probe(requested_at) => {
                            let pending = probes.back().is_some_and(|&sent| sent >= requested_at);
                            if pending {
                                continue;
                            }
                            if probes.len() >= MAX_UNANSWERED_PROBES {
                                shared.probes_unanswered.store(true, Ordering::Relaxed);
                                continue;
                            }
                            probes.push_back(Instant::now());
                            let _ = requests.send(Request::Progress);
                        }
                    }
                }
                response = responses.next() => {
                    let Some(response) = response else {
                        return Err(unexpected("etcd closed the watch stream"));
                    };
                    let response = response.map_err(from_etcd)?;
                    handle(shared, generation, response, &mut active, &mut probes, &requests)?;
                }
            }
        }
    }
}

/// A watch of a key's deletions from revision `start` (0: from now on), with the term's
/// create revision as its id.
fn watch_options(token: i64, start: i64) -> WatchOptions {
    WatchOptions::new()
        .with_watch_id(token)
        .with_start_revision(start)
        .with_filters([WatchFilterType::NoPut])
}

impl HeldTerm {
    /// The revision its next watch starts from (0: the current one).
    fn start(&self) -> i64 {
        if self.fresh { self.verified_at + 1 } else { 0 }
    }
}

/// Applies one response of the stream of generation `generation`.
fn handle(
    shared: &Shared,
    generation: u64,
    response: WatchResponse,
    active: &mut HashMap<i64, i64>,
    probes: &mut VecDeque<Instant>,
    requests: &mpsc::UnboundedSender<Request>,
) -> Result<()> {
    let id = response.watch_id();
    let revision = response.header().map_or(0, |h| h.revision());
    if response.created() {
        if response.canceled() {
            return Err(unexpected(format!(
                "etcd refused to watch a held key (watch {id}): {}",
                response.cancel_reason()
            )));
        }
        if let Some(&start) = active.get(&id) {
            // The watch reports every deletion after this revision: the one before its
            // start, or the store's revision at its creation if it started there.
            let after = if start > 0 { start - 1 } else { revision };
            if let Some(term) = lock(&shared.state).terms.get_mut(&id) {
                term.watching = Some((generation, after));
                term.fresh = false;
            }
        }
        return Ok(());
    }
    if response.canceled() {
        if active.remove(&id).is_some() {
            return Err(unexpected(format!(
                "etcd cancelled the watch of a held key (watch {id}, compacted at {}): {}",
                response.compact_revision(),
                response.cancel_reason()
            )));
        }
        // The answer to a cancellation of ours.
        return Ok(());
    }
    if !response.events().is_empty() {
        // The watch filters puts out: every event is the key's deletion.
        if active.remove(&id).is_some() {
            let _ = requests.send(Request::Cancel(id));
        }
        let term = lock(&shared.state).terms.remove(&id);
        if let Some(term) = term {
            warn!(
                key = %term.key,
                fencing_token = id,
                "the key of a held term was deleted; the term is gone"
            );
            term.gone.cancel();
        }
        return Ok(());
    }
    // No events, neither created nor cancelled: the answer to a progress request.
    shared.probes_unanswered.store(false, Ordering::Relaxed);
    if let Some(sent_at) = probes.pop_front() {
        shared.probes.send_replace(ProbeAnswer {
            generation,
            revision,
            sent_at: Some(sent_at),
        });
    }
    Ok(())
}
