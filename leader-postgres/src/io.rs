//! The I/O seam: the statements the driver's protocol sends to PostgreSQL, with typed
//! answers, and the `LISTEN` connection it hears notifications on.
//!
//! [`PostgresDriver`](crate::PostgresDriver) keeps its protocol (when to take the lead,
//! how to wait in line, how to batch renewals, whom to wake, what a notification means)
//! apart from the I/O that carries it: the real layer (tokio-postgres, built by
//! [`PostgresDriver::builder`](crate::PostgresDriver::builder)) runs each statement of the
//! crate's SQL on one shared connection; a simulation runs the same protocol over a model
//! of the store through [`PostgresDriver::with_io`](crate::PostgresDriver::with_io).
//!
//! Each method is one statement (one transaction) whose effect is atomic; its answer may
//! be lost after the effect landed (then the method returns an error). Fencing tokens are
//! the table's `bigint` as `u64`; remaining leases are milliseconds by the server's clock,
//! rounded up, `±infinity` for a row set by hand never (or always) to expire.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use leader_core::{CandidateInfo, LeaderInfo, Result};

/// One term in a batched renewal ([`PostgresIo::renew`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The election's name.
    pub election: String,
    /// The holder's candidate id.
    pub holder: String,
    /// The term's fencing token.
    pub token: u64,
    /// The lease to extend it by, from the statement's time.
    pub ttl: Duration,
}

/// One waiter's place in line, refreshed by [`PostgresIo::keep`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The election's name.
    pub election: String,
    /// The waiting candidate's id.
    pub candidate: String,
    /// How long the place lasts from the statement's time.
    pub ttl: Duration,
    /// Names the statement to its waiter (as [`AcquireRequest::stamp`]).
    pub stamp: u64,
}

/// What [`PostgresIo::keep`] says of one refreshed place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The waiting candidate's id.
    pub candidate: String,
    /// It is first in line (or nominated).
    pub first: bool,
    /// Nobody holds its election now, and no nomination names someone else.
    pub free: bool,
}

/// The request of one attempt to take the lead ([`PostgresIo::acquire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    /// The election's name.
    pub election: String,
    /// The candidate's id.
    pub candidate: String,
    /// The candidate's value.
    pub value: Vec<u8>,
    /// The lease asked for (and a place in line's).
    pub ttl: Duration,
    /// The election's channel (observers hear `elected` on it).
    pub election_channel: String,
    /// The candidate's driver's channel (its wake-ups and lost-term notices come on it).
    pub driver_channel: String,
    /// Names this statement to its waiter: kept with the place it sets (at most
    /// `i64::MAX`), and quoted by a resignation that grants the waiter the term with that
    /// place's lease (`G<token>:<stamp>:<id>`), so that the waiter knows when the
    /// statement that started the lease was sent.
    pub stamp: u64,
}

/// The answer of [`PostgresIo::acquire`].
#[derive(Debug, Clone, PartialEq)]
pub struct Acquired {
    /// The new term's fencing token when elected; `None` when the candidate joined the line
    /// (or refreshed its place in it).
    pub token: Option<u64>,
    /// First in line, or nominated.
    pub first: bool,
    /// Milliseconds until what holds the election (a lease, another's nomination) ends,
    /// by the server's clock; `None` when nothing holds it (or the row was not visible).
    pub remaining_ms: Option<f64>,
}

/// The answer of [`PostgresIo::resign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resigned {
    /// Terms released (0 or 1; 1 also for a nomination removed from a free row).
    pub released: u64,
    /// Waiters woken (0 or 1).
    pub woken: u64,
}

/// The request of [`PostgresIo::hand_over`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOverRequest {
    /// The election's name.
    pub election: String,
    /// The holder's candidate id.
    pub holder: String,
    /// The term's fencing token.
    pub token: u64,
    /// The nominee's candidate id.
    pub nominee: String,
    /// How long the nomination lasts.
    pub ttl: Duration,
    /// The election's channel.
    pub election_channel: String,
}

/// The answer of [`PostgresIo::hand_over`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandOver {
    /// The term ended and the nominee was nominated (and woken).
    pub handed: bool,
    /// The term was held (in the statement's snapshot).
    pub held: bool,
    /// The nominee waited (in the statement's snapshot).
    pub waiting: bool,
}

/// The holder of an unexpired term, as [`PostgresIo::leader`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Who leads, with its value and token.
    pub info: LeaderInfo,
    /// Milliseconds until its lease ends, by the server's clock.
    pub remaining_ms: f64,
}

/// One notification heard on a `LISTEN` connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The channel it was sent on.
    pub channel: String,
    /// Its payload.
    pub payload: String,
}

/// An open `LISTEN` connection: its commands, and the notifications it hears.
pub struct ListenConnection {
    /// `LISTEN`, `UNLISTEN` and health checks on the connection.
    pub client: Box<dyn ListenClient>,
    /// The notifications of the channels listened on, in the order the server sent them.
    /// It **ends when the connection drops**: every `LISTEN` is then gone, and the
    /// notifications sent meanwhile are lost (the protocol reconnects and looks again).
    pub notifications: BoxStream<'static, Notification>,
}

impl std::fmt::Debug for ListenConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenConnection").finish_non_exhaustive()
    }
}

/// The commands of a [`ListenConnection`]. Each fails when the connection is gone (or
/// gives no answer within the I/O layer's limit).
#[async_trait]
pub trait ListenClient: Send + Sync {
    /// `LISTEN` on each of `channels` (names of `leader_` and hex digits).
    async fn listen(&self, channels: &[String]) -> Result<()>;
    /// `UNLISTEN` `channel`.
    async fn unlisten(&self, channel: &str) -> Result<()>;
    /// A trivial query (`SELECT 1`): a half-open socket would otherwise go unnoticed.
    async fn ping(&self) -> Result<()>;
}

/// The statements of the driver's protocol, one method each, and its `LISTEN` connection.
///
/// The real implementation wraps tokio-postgres (the SQL is the crate's, as in the
/// README); the simulation of `tests/sim` implements it on a model of the tables. An
/// implementation does I/O only: it runs the statement it is asked for within its request
/// timeout (a timeout is [`Error::Timeout`](leader_core::Error::Timeout), and the effect may
/// still land), reconnects when a connection broke, and maps refusals to
/// [`Error::Denied`](leader_core::Error::Denied); every decision about what to send next is
/// the protocol's. Dropping a call's future abandons its answer, not necessarily its effect.
#[async_trait]
pub trait PostgresIo: std::fmt::Debug + Send + Sync + 'static {
    /// Opens the statements' connection now (with the schema, where the layer creates it),
    /// if it is not open: for constructors that fail when the store cannot be reached.
    async fn connect(&self) -> Result<()>;

    /// Takes the lead if the election is free for this candidate (free or expired or its
    /// own, no live nomination of someone else, nobody live before it in line), with the
    /// next fencing token, leaving the line and announcing `elected` on the election's
    /// channel; otherwise joins the line or refreshes its place. Sweeps the election's
    /// long-expired places.
    async fn acquire(&self, request: &AcquireRequest) -> Result<Acquired>;

    /// Extends each term of `batch` that is exactly that term (holder **and** token) and
    /// unexpired; returns the holders of the terms renewed.
    async fn renew(&self, batch: &[Renewal]) -> Result<Vec<String>>;

    /// Refreshes each place of `places` that still exists, sweeps long-expired places of
    /// others, and says of each refreshed place whether it is first and its election free.
    async fn keep(&self, places: &[Place]) -> Result<Vec<Kept>>;

    /// Ends the term `token` of `candidate` if it is exactly that term (no term with
    /// `None`), removes a nomination naming it and its place in line, and turns to one
    /// waiter (the live nominee, or the first in line). When the row is left free with no
    /// live nomination and that waiter's place has a stamp, grants it the term (next
    /// token, its place's expiry as the lease, its place gone), tells it
    /// `G<token>:<stamp>:<id>` on its driver's channel and announces `elected` on
    /// `election_channel`; otherwise wakes it (`w<id>`) and announces `resigned` when the
    /// row is left free.
    async fn resign(
        &self,
        election: &str,
        candidate: &str,
        token: Option<u64>,
        election_channel: &str,
    ) -> Result<Resigned>;

    /// Ends exactly this unexpired term and nominates a live waiter for one TTL, waking it
    /// and announcing `resigned`; nothing changes unless both hold.
    async fn hand_over(&self, request: &HandOverRequest) -> Result<HandOver>;

    /// Sets the value of exactly this unexpired term and announces `proclaimed` on
    /// `election_channel`; whether it was set.
    async fn proclaim(
        &self,
        election: &str,
        holder: &str,
        token: u64,
        value: &[u8],
        election_channel: &str,
    ) -> Result<bool>;

    /// The leader, then the live waiters in the order they would lead (a live nominee
    /// first).
    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>>;

    /// The holder of an unexpired term of `election`, with its remaining lease.
    async fn leader(&self, election: &str) -> Result<Option<Holder>>;

    /// Opens a new `LISTEN` connection (listening on nothing yet).
    async fn listen_connection(&self) -> Result<ListenConnection>;

    /// A random number, for the driver's channel name and the waiters' jitter: from the
    /// operating system in the real layer, from the run's seeded generator in a simulation.
    fn random(&self) -> u64;
}
