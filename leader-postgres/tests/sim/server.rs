//! The simulated PostgreSQL server: the tables of `store.rs` behind a clock, `LISTEN`
//! sessions, and [`SimIo`], the driver's I/O trait on top, every request through the
//! harness's `Net` (`Net::quiet()` for the differential test: no faults).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use leader_core::{CandidateInfo, Error, LeaderInfo, Result};
use leader_postgres::io::{
    AcquireRequest, Acquired, HandOver, HandOverRequest, Holder, Kept, ListenClient,
    ListenConnection, Notification, Place, PostgresIo, Renewal, Resigned,
};
use leader_testkit::sim::{ClientId, Fault, Net, REQUEST_TIMEOUT};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::store::{Notice, Tables};

/// The server's clock reads this many microseconds since 1970 when a run starts.
const EPOCH_US: i64 = 1_780_000_000_000_000;

struct Session {
    client: ClientId,
    generation: u64,
    channels: BTreeSet<String>,
    outbox: mpsc::UnboundedSender<(Instant, Notification)>,
    /// When its last notification is due: they arrive in order.
    last_at: Instant,
}

/// The simulated server.
pub struct Server {
    net: Net,
    tables: Mutex<Tables>,
    /// (the clock's origin, the last microsecond handed out)
    clock: Mutex<(Instant, i64)>,
    sessions: Mutex<BTreeMap<u64, Session>>,
    next_session: AtomicU64,
    /// The tables after each statement of the last [`SNAPSHOT_LAG`], with when it
    /// committed: the snapshots a statement that began that long ago took.
    versions: Mutex<std::collections::VecDeque<(Instant, Tables)>>,
    /// When the request running now was sent: its statement's snapshot is never older
    /// (it sees everything its client knew of when it sent it).
    sent: Mutex<Option<Instant>>,
    /// Whether statements may read a snapshot older than their writes (see
    /// [`statement`](Self::statement)); not in the differential test, whose statements
    /// run one at a time on the real server too.
    concurrent: bool,
    /// The snapshot the next statement reads (for scripted scenarios).
    next_snapshot: Mutex<Option<Tables>>,
}

/// The longest a statement's snapshot is older than its writes: how
/// long it may have waited for a row lock, or been descheduled, between taking its
/// snapshot and locking the rows it changes, while other statements committed.
const SNAPSHOT_LAG: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    /// A server whose statements run one at a time, each on the newest tables.
    pub fn new(net: Net) -> Arc<Self> {
        Self::with(net, false)
    }

    /// A server whose statements overlap (see [`statement`](Self::statement)).
    pub fn concurrent(net: Net) -> Arc<Self> {
        Self::with(net, true)
    }

    fn with(net: Net, concurrent: bool) -> Arc<Self> {
        let origin = net.store_now();
        Arc::new(Server {
            net,
            tables: Mutex::new(Tables::default()),
            clock: Mutex::new((origin, 0)),
            sessions: Mutex::new(BTreeMap::new()),
            next_session: AtomicU64::new(1),
            versions: Mutex::new(std::collections::VecDeque::new()),
            sent: Mutex::new(None),
            concurrent,
            next_snapshot: Mutex::new(None),
        })
    }

    /// `clock_timestamp()`, in microseconds since 1970; never the same twice.
    pub fn now(&self) -> i64 {
        let mut clock = lock(&self.clock);
        let elapsed = self.net.store_now().saturating_duration_since(clock.0);
        let us = EPOCH_US + i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX / 2);
        clock.1 = us.max(clock.1 + 1);
        clock.1
    }

    /// Runs one statement on the tables and delivers its notifications after it commits.
    /// On a [`concurrent`](Self::concurrent) server a fifth of the statements read a
    /// snapshot taken up to [`SNAPSHOT_LAG`] before they land (never before they were
    /// sent), as READ COMMITTED lets them when other statements commit meanwhile (see
    /// [`Tables::began`]): in every phase, since overlapping statements are no fault.
    pub fn statement<T>(&self, f: impl FnOnce(&mut Tables, i64, &mut Vec<Notice>) -> T) -> T {
        let now = self.now();
        let mut notices = Vec::new();
        let mut tables = lock(&self.tables);
        let mut versions = lock(&self.versions);
        let at = Instant::now();
        while versions
            .front()
            .is_some_and(|(when, _)| at.saturating_duration_since(*when) > SNAPSHOT_LAG)
        {
            versions.pop_front();
        }
        let lag =
            (self.concurrent && self.net.draw(|rng| rand::Rng::random_bool(rng, 0.3))).then(|| {
                self.net.draw(|rng| {
                    Duration::from_micros(rand::Rng::random_range(
                        rng,
                        1..=SNAPSHOT_LAG.as_micros() as u64,
                    ))
                })
            });
        // The newest version committed before the snapshot was taken; the ones after it
        // are what the statement does not see.
        let sent = lock(&self.sent).unwrap_or(at);
        tables.began = lag.and_then(|lag| {
            let taken = at.checked_sub(lag)?.max(sent);
            let unseen = versions.iter().filter(|(when, _)| *when > taken).count();
            if unseen == 0 {
                return None;
            }
            let seen = versions.len() - unseen;
            let snapshot = match seen.checked_sub(1) {
                Some(i) => versions[i].1.clone(),
                // Older than every version kept: the one before the first unseen commit
                // is not kept, so read the oldest kept (a lag a little shorter).
                None => versions[0].1.clone(),
            };
            Some(Box::new(snapshot))
        });
        if let Some(forced) = lock(&self.next_snapshot).take() {
            tables.began = Some(Box::new(forced));
        }
        if tables.began.is_some() {
            self.net.model_event();
        }
        let out = f(&mut tables, now, &mut notices);
        tables.began = None;
        if self.concurrent {
            // Kept only where a later statement may read it (not in the differential test).
            versions.push_back((at, tables.clone()));
        }
        drop((tables, versions));
        self.deliver(notices);
        out
    }

    /// The next statement reads `tables`, as one that took its snapshot then and waited
    /// for a row lock since (for scripted scenarios: take `tables` with
    /// [`snapshot`](Self::snapshot)).
    pub fn snapshot_next(&self, tables: Tables) {
        *lock(&self.next_snapshot) = Some(tables);
    }

    /// A copy of the tables, with the clock's reading.
    pub fn snapshot(&self) -> (Tables, i64) {
        let now = self.now();
        (lock(&self.tables).clone(), now)
    }

    /// NOTIFY, at commit: to the sessions listening on each channel now, each delivered
    /// after the push delay (lost if the session's client is cut off), in order.
    fn deliver(&self, notices: Vec<Notice>) {
        let mut seen = BTreeSet::new();
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| self.generation(s.client) == s.generation && !s.outbox.is_closed());
        for (channel, payload) in notices {
            if !seen.insert((channel.clone(), payload.clone())) {
                continue; // PostgreSQL drops duplicates within a transaction
            }
            for session in sessions.values_mut() {
                if !session.channels.contains(&channel) {
                    continue;
                }
                let Some(delay) = self.net.push_delay(session.client) else {
                    continue;
                };
                let at = (Instant::now() + delay).max(session.last_at);
                session.last_at = at;
                let _ = session.outbox.send((
                    at,
                    Notification {
                        channel: channel.clone(),
                        payload: payload.clone(),
                    },
                ));
            }
        }
    }

    /// Drops every session (a restart; the data stays).
    pub fn drop_sessions(&self) {
        lock(&self.sessions).clear();
    }

    fn random(&self) -> u64 {
        self.net.draw(rand::Rng::random)
    }

    /// How many times `client`'s connections dropped.
    fn generation(&self, client: ClientId) -> u64 {
        *self.net.link(client).borrow()
    }
}

/// The driver's I/O on the simulated server, as client `client`.
pub struct SimIo {
    server: Arc<Server>,
    client: ClientId,
    /// The request timeout (the driver's default).
    limit: Duration,
    /// The `LISTEN` connection's (the driver's connect timeout).
    listen_limit: Duration,
}

impl std::fmt::Debug for SimIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimIo")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl SimIo {
    pub fn new(server: Arc<Server>, client: ClientId) -> Self {
        SimIo {
            server,
            client,
            // The harness's timeout for a 1 s TTL (the driver's defaults, 2 s and 5 s, are
            // for the default TTL; with a 1 s TTL a service sets them about this short).
            limit: REQUEST_TIMEOUT,
            listen_limit: REQUEST_TIMEOUT,
        }
    }

    async fn call<T: Send + std::fmt::Debug + 'static>(
        &self,
        limit: Duration,
        label: String,
        effect: impl FnOnce(&Server) -> T + Send + 'static,
    ) -> Result<T> {
        let server = Arc::clone(&self.server);
        let sent = Instant::now();
        self.server
            .net
            .call(self.client, limit, label, move || {
                *lock(&server.sent) = Some(sent);
                let out = effect(&server);
                *lock(&server.sent) = None;
                out
            })
            .await
            .map_err(Fault::into_error)
    }
}

fn token_of(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::store(std::io::Error::other("negative fencing token")))
}

fn bigint(token: u64) -> Result<i64> {
    i64::try_from(token).map_err(|_| Error::store(std::io::Error::other("token too big")))
}

fn ms(ttl: Duration) -> f64 {
    ttl.as_secs_f64() * 1000.0
}

#[leader_core::async_trait]
impl PostgresIo for SimIo {
    async fn connect(&self) -> Result<()> {
        self.call(self.limit, "connect".into(), |_| ()).await
    }

    async fn acquire(&self, r: &AcquireRequest) -> Result<Acquired> {
        let r = r.clone();
        let stamp = bigint(r.stamp)?;
        let label = format!("acquire {} {}", r.election, r.candidate);
        let (token, first, remaining_ms) = self
            .call(self.limit, label, move |server| {
                let row = server.statement(|t, now, notices| {
                    t.acquire(
                        now,
                        &r.election,
                        &r.candidate,
                        &r.value,
                        ms(r.ttl),
                        &r.election_channel,
                        &r.driver_channel,
                        stamp,
                        notices,
                    )
                });
                if let Some(token) = row.0 {
                    server.net.granted(&r.candidate, &r.election, token as u64);
                }
                row
            })
            .await?;
        Ok(Acquired {
            token: token.map(token_of).transpose()?,
            first: first.unwrap_or(false),
            remaining_ms,
        })
    }

    async fn renew(&self, batch: &[Renewal]) -> Result<Vec<String>> {
        let rows = batch
            .iter()
            .map(|b| {
                Ok((
                    b.election.clone(),
                    b.holder.clone(),
                    bigint(b.token)?,
                    ms(b.ttl),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let label = format!("renew {} terms", rows.len());
        self.call(self.limit, label, move |server| {
            server.statement(|t, now, notices| t.renew(now, &rows, notices))
        })
        .await
    }

    async fn keep(&self, places: &[Place]) -> Result<Vec<Kept>> {
        let rows = places
            .iter()
            .map(|p| {
                Ok((
                    p.election.clone(),
                    p.candidate.clone(),
                    ms(p.ttl),
                    bigint(p.stamp)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let label = format!("keep {} places", rows.len());
        let kept = self
            .call(self.limit, label, move |server| {
                server.statement(|t, now, _| t.keep(now, &rows))
            })
            .await?;
        Ok(kept
            .into_iter()
            .map(|(candidate, first, free)| Kept {
                candidate,
                first,
                free,
            })
            .collect())
    }

    async fn resign(
        &self,
        election: &str,
        candidate: &str,
        token: Option<u64>,
        election_channel: &str,
    ) -> Result<Resigned> {
        let token = token.map(bigint).transpose()?;
        let (e, c, ch) = (
            election.to_owned(),
            candidate.to_owned(),
            election_channel.to_owned(),
        );
        let label = format!("resign {e} {c} {token:?}");
        let (released, woken) = self
            .call(self.limit, label, move |server| {
                let (released, woken, granted) =
                    server.statement(|t, now, notices| t.resign(now, &e, &c, token, &ch, notices));
                if let Some((candidate, token)) = granted {
                    server.net.granted(&candidate, &e, token as u64);
                }
                (released, woken)
            })
            .await?;
        Ok(Resigned {
            released: released as u64,
            woken: woken as u64,
        })
    }

    async fn hand_over(&self, r: &HandOverRequest) -> Result<HandOver> {
        let r = r.clone();
        let token = bigint(r.token)?;
        let label = format!("hand_over {} {} -> {}", r.election, r.holder, r.nominee);
        let (handed, held, waiting) = self
            .call(self.limit, label, move |server| {
                server.statement(|t, now, notices| {
                    t.hand_over(
                        now,
                        &r.election,
                        &r.holder,
                        token,
                        &r.nominee,
                        ms(r.ttl),
                        &r.election_channel,
                        notices,
                    )
                })
            })
            .await?;
        Ok(HandOver {
            handed,
            held,
            waiting,
        })
    }

    async fn proclaim(
        &self,
        election: &str,
        holder: &str,
        token: u64,
        value: &[u8],
        election_channel: &str,
    ) -> Result<bool> {
        let token = bigint(token)?;
        let (e, h, v, ch) = (
            election.to_owned(),
            holder.to_owned(),
            value.to_vec(),
            election_channel.to_owned(),
        );
        let label = format!("proclaim {e} {h}");
        self.call(self.limit, label, move |server| {
            server.statement(|t, now, notices| t.proclaim(now, &e, &h, token, &v, &ch, notices))
        })
        .await
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        let e = election.to_owned();
        let rows = self
            .call(self.limit, format!("candidates {e}"), move |server| {
                server.statement(|t, now, _| t.candidates(now, &e))
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, value, leader)| CandidateInfo::new(id, value, leader))
            .collect())
    }

    async fn leader(&self, election: &str) -> Result<Option<Holder>> {
        let e = election.to_owned();
        let row = self
            .call(self.limit, format!("leader {e}"), move |server| {
                server.statement(|t, now, _| t.leader(now, &e))
            })
            .await?;
        row.map(|(holder, value, token, remaining_ms)| {
            Ok(Holder {
                info: LeaderInfo::new(holder, value, token_of(token)?),
                remaining_ms,
            })
        })
        .transpose()
    }

    async fn listen_connection(&self) -> Result<ListenConnection> {
        let client = self.client;
        let (tx, rx) = mpsc::unbounded_channel::<Notification>();
        // The session is made where the request lands. If the answer is lost, nobody
        // reads it: its receiver went with this future, and the next delivery drops it.
        let id = self
            .call(self.listen_limit, "connect LISTEN".into(), move |server| {
                let id = server.next_session.fetch_add(1, Ordering::Relaxed);
                let mut link = server.net.link(client);
                let generation = *link.borrow();
                let (outbox, mut queue) = mpsc::unbounded_channel::<(Instant, Notification)>();
                // The session's pump: each notification at its time, until the client's
                // link drops (then the stream ends, its LISTENs gone).
                tokio::spawn(async move {
                    loop {
                        let next = tokio::select! {
                            next = queue.recv() => next,
                            _ = link.changed() => None,
                        };
                        let Some((at, n)) = next else { return };
                        tokio::time::sleep_until(at).await;
                        if *link.borrow() != generation {
                            return;
                        }
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                });
                lock(&server.sessions).insert(
                    id,
                    Session {
                        client,
                        generation,
                        channels: BTreeSet::new(),
                        outbox,
                        last_at: Instant::now(),
                    },
                );
                id
            })
            .await?;
        Ok(ListenConnection {
            client: Box::new(SimListen {
                io: SimIo {
                    server: Arc::clone(&self.server),
                    client,
                    limit: self.listen_limit,
                    listen_limit: self.listen_limit,
                },
                id,
            }),
            notifications: futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|n| (n, rx))
            })
            .boxed(),
        })
    }

    fn random(&self) -> u64 {
        self.server.random()
    }
}

/// A simulated `LISTEN` connection's client; the session ends when it is dropped.
struct SimListen {
    io: SimIo,
    id: u64,
}

impl Drop for SimListen {
    fn drop(&mut self) {
        lock(&self.io.server.sessions).remove(&self.id);
    }
}

impl SimListen {
    /// Runs `f` on the session if it is still up.
    async fn on_session(
        &self,
        label: String,
        f: impl FnOnce(&mut Session) + Send + 'static,
    ) -> Result<()> {
        let id = self.id;
        let up = self
            .io
            .call(self.io.limit, label, move |server| {
                let mut sessions = lock(&server.sessions);
                match sessions.get_mut(&id) {
                    Some(s) if server.generation(s.client) == s.generation => {
                        f(s);
                        true
                    }
                    _ => false,
                }
            })
            .await?;
        if up {
            Ok(())
        } else {
            Err(Error::store(std::io::Error::other(
                "the LISTEN connection is closed",
            )))
        }
    }
}

#[leader_core::async_trait]
impl ListenClient for SimListen {
    async fn listen(&self, channels: &[String]) -> Result<()> {
        let channels = channels.to_vec();
        self.on_session(format!("LISTEN {channels:?}"), move |s| {
            s.channels.extend(channels);
        })
        .await
    }

    async fn unlisten(&self, channel: &str) -> Result<()> {
        let channel = channel.to_owned();
        self.on_session(format!("UNLISTEN {channel}"), move |s| {
            s.channels.remove(&channel);
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.on_session("SELECT 1".into(), |_| {}).await
    }
}
