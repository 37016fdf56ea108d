//! The seam between the driver's protocol and Redis: [`RedisIo`], one method per kind of
//! request the protocol sends (each of its scripts), and the pub/sub connection it listens
//! on.
//!
//! The protocol (what to send, how to read the answers and the pushed messages, what to
//! keep: the line, the batched renewals, the wakeups) is the same code whether the I/O is
//! the real client ([`RedisDriver::builder`](crate::RedisDriver::builder) and the other
//! constructors) or a model of Redis (the crate's simulation test, through
//! [`RedisDriver::with_io`](crate::RedisDriver::with_io)).

use futures::stream::BoxStream;
use leader_core::Result;

/// Taking the lead, or standing in line (the `ACQUIRE` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    /// The election's leader key.
    pub leader: String,
    /// The election's fencing-token counter.
    pub fence: String,
    /// The election's line (a sorted set of places by arrival, server time in µs).
    pub line: String,
    /// The events channel, where `elected` is announced.
    pub channel: String,
    /// The candidate's unique id.
    pub owner: String,
    /// What observers see about the candidate once it leads.
    pub value: Vec<u8>,
    /// The lease, in milliseconds.
    pub ttl_ms: u64,
    /// The candidate's place in line (`owner\nvalue`).
    pub place: Vec<u8>,
    /// The place may still be in line (the candidate was not woken by a pop): an election
    /// removes it.
    pub in_line: bool,
    /// Stand in line when the key is held (`false`: only look).
    pub stand: bool,
    /// Report the remaining lease of the key when it is held.
    pub ask_pttl: bool,
}

/// What [`RedisIo::acquire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireReply {
    /// Elected with this fencing token (the counter's new value).
    Elected(i64),
    /// The key is held (the candidate stands in line if it asked to); the key's remaining
    /// lease in milliseconds (`PTTL`) when asked.
    Held(Option<i64>),
}

/// One term in a batched renewal (the `RENEW` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The election's leader key.
    pub leader: String,
    /// The term's candidate.
    pub owner: String,
    /// The term's fencing token.
    pub token: u64,
    /// The new lease, in milliseconds.
    pub ttl_ms: u64,
}

/// Ending a term, a nomination, or a place in line (the `RESIGN` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resign {
    /// The election's leader key.
    pub leader: String,
    /// The election's line.
    pub line: String,
    /// When each place in line expires unless refreshed (a sorted set, server ms).
    pub line_until: String,
    /// The candidate.
    pub owner: String,
    /// Its place in line.
    pub place: Vec<u8>,
    /// The term's fencing token; `None`: leave the line (and end a nomination) only.
    pub token: Option<u64>,
    /// The events channel (`resigned` when nobody waits).
    pub channel: String,
    /// The prefix of the waiting candidates' own channels (the head is woken there).
    pub wake_prefix: String,
    /// How long the line's keys live when they have no expiry, in milliseconds.
    pub keep_ms: u64,
}

/// A driver's refresh of its waiting candidates' places in one election (the `REFRESH`
/// script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refresh {
    /// The election's leader key.
    pub leader: String,
    /// The election's line.
    pub line: String,
    /// The places' expiries.
    pub line_until: String,
    /// The marker that one driver maintained the line this period.
    pub line_maintained: String,
    /// How long a refreshed place lives, in milliseconds.
    pub keep_ms: u64,
    /// The refresh period, in milliseconds.
    pub period_ms: u64,
    /// The prefix of the waiting candidates' own channels.
    pub wake_prefix: String,
    /// The places to refresh.
    pub places: Vec<Vec<u8>>,
}

/// What [`RedisIo::refresh`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshReply {
    /// The indexes (into [`Refresh::places`]) of the places no longer in line.
    pub missing: Vec<usize>,
    /// The head of the line (a place), empty if nobody waits (or it was just woken).
    pub head: Vec<u8>,
    /// The leader key's remaining lease (`PTTL`: -2 no key, -1 no expiry).
    pub pttl: i64,
}

/// The leader and its remaining lease, read at one instant (the `LEADER` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderReply {
    /// The leader's candidate id.
    pub owner: String,
    /// Its value.
    pub value: Vec<u8>,
    /// Its term's fencing token.
    pub token: u64,
    /// The remaining lease in milliseconds.
    pub pttl: i64,
}

/// The election's candidates (the `CANDIDATES` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// The election's leader key.
    pub leader: String,
    /// The election's line.
    pub line: String,
    /// The places' expiries.
    pub line_until: String,
    /// How old a place never refreshed may be and still count, in milliseconds.
    pub keep_ms: u64,
}

/// A planned handover (the `HAND_OVER` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOver {
    /// The election's leader key.
    pub leader: String,
    /// The election's line.
    pub line: String,
    /// The places' expiries.
    pub line_until: String,
    /// The leader.
    pub owner: String,
    /// Its term's fencing token.
    pub token: u64,
    /// The waiting candidate to hand over to.
    pub nominee: String,
    /// How long the nomination lasts, in milliseconds.
    pub ttl_ms: u64,
    /// The prefix of the waiting candidates' own channels.
    pub wake_prefix: String,
    /// The events channel.
    pub channel: String,
}

/// What [`RedisIo::hand_over`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOverReply {
    /// The term ended and the nominee was named and woken.
    Done,
    /// The term is not held.
    Gone,
    /// The nominee does not wait in line.
    Absent,
}

/// A new value for a held term (the `PROCLAIM` script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proclaim {
    /// The election's leader key.
    pub leader: String,
    /// The leader.
    pub owner: String,
    /// Its term's fencing token.
    pub token: u64,
    /// The new value.
    pub value: Vec<u8>,
    /// The events channel (`proclaimed`).
    pub channel: String,
}

/// A message pushed on a subscribed channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The channel it came on.
    pub channel: String,
    /// What it says.
    pub payload: Vec<u8>,
}

/// The commands of one pub/sub connection.
#[async_trait::async_trait]
pub trait PubSub: Send {
    /// Subscribes to `channels`: `Ok(true)` once Redis confirmed, `Ok(false)` if Redis
    /// refused them (an ACL without them; the connection is fine), `Err` if the connection
    /// failed.
    async fn subscribe(&mut self, channels: &[String]) -> Result<bool>;
    /// Unsubscribes from `channel`.
    async fn unsubscribe(&mut self, channel: &str) -> Result<()>;
    /// A health check (`PING`).
    async fn ping(&mut self) -> Result<()>;
}

/// One pub/sub connection: its commands and its messages. The messages end when the
/// connection drops: anything published meanwhile is lost, and the protocol connects
/// again and subscribes anew.
pub struct PubSubConnection {
    /// Its commands.
    pub commands: Box<dyn PubSub>,
    /// The messages of the channels it is subscribed to, in order; ends with the
    /// connection.
    pub messages: BoxStream<'static, Message>,
}

impl std::fmt::Debug for PubSubConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSubConnection").finish_non_exhaustive()
    }
}

/// The requests the driver's protocol sends to Redis, and its pub/sub connections.
///
/// Every method is one request (one script call: atomic in Redis), or for pub/sub one
/// command on its connection. A request may fail with an error, or time out (the
/// implementation bounds each request with its own timeout); its effect may then have
/// landed or not, and the protocol is written for both. Dropping a request's future is
/// allowed at any await point. The real implementation sends the scripts of the driver
/// (EVALSHA, EVAL when the server lacks the script), on one server, a Cluster or the
/// master that Sentinel names, with an optional `WAIT` after each write; a simulation
/// implements the same semantics on a model of Redis. The request types mirror the
/// scripts' keys and arguments, and each reply their answer.
#[async_trait::async_trait]
pub trait RedisIo: Send + Sync + 'static {
    /// Takes the lead if the key is free (or holds this candidate's own term, or names it
    /// as nominee): a new fencing token, `elected` announced, its place (if `in_line`)
    /// removed. Otherwise stands in line if asked (keeping the first arrival's place).
    async fn acquire(&self, request: &Acquire) -> Result<AcquireReply>;
    /// Extends each term that its candidate still holds (owner and fencing token
    /// compared): per term, whether it was renewed.
    async fn renew(&self, terms: &[Renewal]) -> Result<Vec<bool>>;
    /// Ends the term (if `token` is the one held) or the candidate's nomination, or else
    /// leaves the line; wakes the head of the line (popping it) when the key is left
    /// free. Whether a term or nomination was removed.
    async fn resign(&self, request: &Resign) -> Result<bool>;
    /// Refreshes the places still in line, prunes stale ones once per period, wakes the
    /// head when nobody leads.
    async fn refresh(&self, request: &Refresh) -> Result<RefreshReply>;
    /// The leader of the election whose leader key is `leader`, with its remaining lease.
    async fn leader(&self, leader: &str) -> Result<Option<LeaderReply>>;
    /// The leader (or `("-", "")`) and then the live places in line, in order: owner and
    /// value each.
    async fn candidates(&self, request: &Candidates) -> Result<Vec<(String, Vec<u8>)>>;
    /// Ends the term and nominates a waiting candidate for one TTL.
    async fn hand_over(&self, request: &HandOver) -> Result<HandOverReply>;
    /// Sets the value of a held term, keeping its expiry: whether it was held.
    async fn proclaim(&self, request: &Proclaim) -> Result<bool>;
    /// Whether term `token` of `owner` still holds the key `leader`.
    async fn holds(&self, leader: &str, owner: &str, token: u64) -> Result<bool>;
    /// A new pub/sub connection (`attempt` counts the connections made so far: a Cluster
    /// tries its nodes in turn).
    async fn pubsub(&self, attempt: usize) -> Result<PubSubConnection>;
    /// The keyspace-notification channel prefix (`__keyspace@<db>__:`) when the server
    /// publishes the events a held term needs (deletions, expiries); `None` otherwise.
    fn keyspace(&self) -> Option<String>;
    /// Whether one script may only touch keys of one slot (a Redis Cluster): renewals are
    /// then not batched across elections.
    fn per_slot(&self) -> bool;
    /// The topology's name, for logs and `Debug`.
    fn topology(&self) -> &'static str;
    /// A uniform draw from `1..=spread` (milliseconds of jitter, so that waiters do not
    /// all ask at once): the real implementation draws from `rand`, a simulation from its
    /// seeded generator.
    fn jitter(&self, spread: u64) -> u64;
}
