//! The seam between the driver's protocol and etcd: [`EtcdIo`], one method per kind of
//! request the protocol sends, in plain data types of this module (etcd-client's response
//! types cannot be built outside that crate).
//!
//! The protocol (campaign, line, renewals, withdrawal, observe, candidates, handover,
//! proclaim, fences) decides what to send and what the answers mean; an [`EtcdIo`] only
//! carries requests and answers. [`ClientIo`](crate::ClientIo) does it with etcd-client;
//! the crate's simulation test does it against a model of etcd.

use async_trait::async_trait;
use leader_core::{Error, Result};
use tokio::sync::mpsc;

/// A key as etcd holds it (etcd's `mvccpb.KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the transaction that created the key (0 in a deletion's event).
    pub create_revision: i64,
    /// The revision of its last change (of the deletion, in a deletion's event).
    pub mod_revision: i64,
    /// How many times it was written since its creation (1 after the create).
    pub version: i64,
    /// Its lease (0: none).
    pub lease: i64,
}

/// How a [`Compare`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's field is less than the operand.
    Less,
    /// The key's field is greater than the operand.
    Greater,
}

/// What a [`Compare`] compares a key's field with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The create revision (0 for a key that does not exist).
    CreateRevision(i64),
    /// The revision of the last change (0 for a key that does not exist).
    ModRevision(i64),
    /// The version (0 for a key that does not exist).
    Version(i64),
    /// The value (a key that does not exist compares false, whatever the operator).
    Value(Vec<u8>),
    /// The lease (0 for a key that does not exist or has none).
    Lease(i64),
}

/// One compare of a transaction, on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: Vec<u8>,
    /// The operator.
    pub op: CompareOp,
    /// The field and the operand.
    pub target: Target,
}

impl Compare {
    /// `key`'s create revision equals `revision` (0: the key does not exist).
    pub fn create_revision(key: impl Into<Vec<u8>>, revision: i64) -> Self {
        Self::equal(key, Target::CreateRevision(revision))
    }

    /// `key`'s lease equals `lease`.
    pub fn lease(key: impl Into<Vec<u8>>, lease: i64) -> Self {
        Self::equal(key, Target::Lease(lease))
    }

    /// `key`'s value equals `value`.
    pub fn value(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self::equal(key, Target::Value(value.into()))
    }

    /// `key`'s field `target` equals the operand.
    pub fn equal(key: impl Into<Vec<u8>>, target: Target) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target,
        }
    }
}

/// The order of a range read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sort {
    /// By key, ascending (etcd's default).
    #[default]
    Key,
    /// By create revision, ascending.
    CreateAscend,
    /// By create revision, descending.
    CreateDescend,
}

/// A range read (etcd's `RangeRequest`, with the options the protocol uses).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Range {
    /// The key, or the range's first key.
    pub key: Vec<u8>,
    /// The end of the range (exclusive); None: the key alone.
    pub end: Option<Vec<u8>>,
    /// At most this many keys (0: all).
    pub limit: i64,
    /// The order of the answer (applied before the limit).
    pub sort: Sort,
    /// Only keys created at or after this revision (0: no bound).
    pub min_create_revision: i64,
    /// Only keys created at or before this revision (0: no bound).
    pub max_create_revision: i64,
    /// Read at this revision (0: the current one); one compacted away is an error.
    pub revision: i64,
    /// Answer the keys and their revisions and leases, not their values.
    pub keys_only: bool,
}

impl Range {
    /// The key `key` alone.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Range {
            key: key.into(),
            ..Range::default()
        }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let key = prefix.into();
        let end = prefix_end(&key);
        Range {
            key,
            end: Some(end),
            ..Range::default()
        }
    }

    /// In this order.
    #[must_use]
    pub fn sort(mut self, sort: Sort) -> Self {
        self.sort = sort;
        self
    }

    /// At most `limit` keys.
    #[must_use]
    pub fn limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    /// Only keys created at or after `revision`.
    #[must_use]
    pub fn min_create_revision(mut self, revision: i64) -> Self {
        self.min_create_revision = revision;
        self
    }

    /// Only keys created at or before `revision`.
    #[must_use]
    pub fn max_create_revision(mut self, revision: i64) -> Self {
        self.max_create_revision = revision;
        self
    }

    /// Without the values.
    #[must_use]
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.key.as_slice(),
            Some(end) => {
                key >= self.key.as_slice() && (end.as_slice() == b"\0" || key < end.as_slice())
            }
        }
    }
}

/// The end of the range of keys that start with `prefix` (etcd's `GetPrefixRangeEnd`):
/// `\0` (every key) for an empty prefix.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The answer to a range read.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RangeResult {
    /// The keys, in the order asked for, up to the limit.
    pub kvs: Vec<Kv>,
    /// Whether more keys matched than the limit let through.
    pub more: bool,
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Puts `value` at `key`, on `lease` (0: none).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease (0: none).
        lease: i64,
    },
    /// Reads.
    Get(Range),
    /// Deletes `key` (or, with `end`, the range `key..end`).
    Delete {
        /// The key, or the first of the range.
        key: Vec<u8>,
        /// The end of the range (exclusive); None: the key alone.
        end: Option<Vec<u8>>,
    },
    /// Reads, as a nested transaction with no compares (etcd's `RequestOp.request_txn`,
    /// etcd 3.3 and later). etcd bounds a nested transaction's lists by what the lists of
    /// the ones around it leave of `--max-txn-ops` (128): one request of nested reads
    /// reads thousands of keys, where flat reads take one request per 128. But etcd runs
    /// a transaction holding a nested one as a write (a raft entry, an fsync), not as a
    /// read.
    Reads(Vec<Range>),
}

impl Op {
    /// A put of `value` at `key` on `lease` (0: none).
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    /// A read of `key` alone.
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Get(Range::key(key))
    }

    /// A deletion of `key` alone.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete {
            key: key.into(),
            end: None,
        }
    }
}

/// The answer to one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A put was done.
    Put,
    /// A read's answer.
    Get(RangeResult),
    /// How many keys a deletion deleted.
    Delete(i64),
    /// The answers of nested reads, in order.
    Reads(Vec<RangeResult>),
}

/// A transaction: if every compare holds, the `success` operations, else the `failure`
/// ones, all at one revision (a new one if anything was written).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Txn {
    /// The compares.
    pub compare: Vec<Compare>,
    /// What to do if they all hold.
    pub success: Vec<Op>,
    /// What to do otherwise.
    pub failure: Vec<Op>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// With these compares.
    #[must_use]
    pub fn when(mut self, compare: impl Into<Vec<Compare>>) -> Self {
        self.compare = compare.into();
        self
    }

    /// Doing these if the compares hold.
    #[must_use]
    pub fn and_then(mut self, ops: impl Into<Vec<Op>>) -> Self {
        self.success = ops.into();
        self
    }

    /// Doing these if they do not.
    #[must_use]
    pub fn or_else(mut self, ops: impl Into<Vec<Op>>) -> Self {
        self.failure = ops.into();
        self
    }
}

/// The answer to a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TxnResult {
    /// The store's revision after it (the header's).
    pub revision: i64,
    /// Whether the compares held.
    pub succeeded: bool,
    /// The answers of the operations done, in order.
    pub results: Vec<OpResult>,
}

impl TxnResult {
    /// The read answers among the results, in order.
    pub fn gets(&self) -> Vec<&RangeResult> {
        self.results
            .iter()
            .filter_map(|result| match result {
                OpResult::Get(range) => Some(range),
                _ => None,
            })
            .collect()
    }
}

/// A lease granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Its id.
    pub id: i64,
    /// Its TTL in seconds as granted.
    pub ttl: i64,
}

/// A lease's remaining time (etcd's `LeaseTimeToLiveResponse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTtl {
    /// The remaining time in whole seconds, truncated toward zero (etcd 3.4: a lease with
    /// less than a second left, or expired less than a second ago, reads 0), or -1 if etcd
    /// has no such lease.
    pub ttl: i64,
    /// The TTL it was granted, in seconds (0 if etcd has no such lease).
    pub granted: i64,
    /// The raft term of the member that answered.
    pub raft_term: u64,
}

/// One watch to create on a stream (etcd's `WatchCreateRequest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRequest {
    /// The watch id, chosen by the client, unique on its stream.
    pub id: i64,
    /// The key, or the range's first key.
    pub key: Vec<u8>,
    /// The end of the range (exclusive); None: the key alone.
    pub end: Option<Vec<u8>>,
    /// The first revision to report (0: changes after the watch is created).
    pub start_revision: i64,
    /// Leave out puts (deletions only).
    pub no_put: bool,
}

impl WatchRequest {
    /// Every change of `key` (puts and deletions) from `start_revision` on.
    pub fn key(id: i64, key: impl Into<Vec<u8>>, start_revision: i64) -> Self {
        WatchRequest {
            id,
            key: key.into(),
            end: None,
            start_revision,
            no_put: false,
        }
    }

    /// Every change of the keys that start with `prefix`.
    pub fn prefix(id: i64, prefix: impl Into<Vec<u8>>, start_revision: i64) -> Self {
        let key = prefix.into();
        let end = prefix_end(&key);
        WatchRequest {
            end: Some(end),
            ..Self::key(id, key, start_revision)
        }
    }
}

/// A request on an open watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchCommand {
    /// Creates a watch.
    Watch(WatchRequest),
    /// Cancels the watch with this id.
    Cancel(i64),
}

/// One event of a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// A deletion (else a put).
    pub deleted: bool,
    /// The key after the change (for a deletion: the key and the deletion's revision as
    /// `mod_revision`, the rest empty).
    pub kv: Kv,
}

/// One message of a watch stream (etcd's `WatchResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WatchMessage {
    /// The watch it belongs to.
    pub watch_id: i64,
    /// The confirmation of the watch's creation.
    pub created: bool,
    /// The watch ended (refused, compacted, or cancelled).
    pub canceled: bool,
    /// With `canceled`: the start revision was compacted away; the oldest revision left.
    pub compact_revision: i64,
    /// With `canceled`: why.
    pub cancel_reason: String,
    /// The events, in revision order, every event of one revision in one message.
    pub events: Vec<WatchEvent>,
}

/// An open watch stream: requests go in, messages come out. The messages end (`None`)
/// when the connection drops or the stream fails (an error first, when there is one).
#[derive(Debug)]
pub struct WatchStream {
    /// Watches to create or cancel on this stream.
    pub commands: mpsc::UnboundedSender<WatchCommand>,
    /// The stream's messages, in order.
    pub messages: mpsc::UnboundedReceiver<Result<WatchMessage>>,
}

/// etcd's requests, as the driver's protocol sends them: the only way it reaches etcd.
///
/// Each method sends one request and returns its answer, with etcd's errors as
/// [`leader_core::Error`]s (a refusal that retrying cannot fix as [`Error::Denied`]). The
/// caller bounds each call with its own timeout and may drop it at any await: the request
/// may still take effect (as with any request sent to a server). Implementations keep
/// no protocol state: they make no decision the protocol would need to know about.
#[async_trait]
pub trait EtcdIo: Send + Sync + 'static {
    /// Grants a lease of `ttl` seconds.
    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant>;
    /// Revokes lease `id`, deleting every key on it at one revision. `Ok(false)`: etcd
    /// has no such lease (expired, or revoked before).
    async fn lease_revoke(&self, id: i64) -> Result<bool>;
    /// One keep-alive of lease `id`: its TTL in seconds as renewed (a positive number),
    /// or 0 if etcd has no such lease. ([`ClientIo`](crate::ClientIo) answers 1 for the
    /// first keep-alive of a stream: etcd-client keeps that answer's TTL to itself.)
    async fn lease_keep_alive(&self, id: i64) -> Result<i64>;
    /// Lease `id`'s remaining time as etcd's leader reads it (`LeaseTimeToLive`).
    async fn lease_time_to_live(&self, id: i64) -> Result<LeaseTtl>;
    /// The raft term of a linearizable count-only read of `key` (a key the client may
    /// read: the election's): a member answers it only after the leader of a term at
    /// least that one confirmed with a quorum that it still leads.
    async fn raft_term(&self, key: &[u8]) -> Result<u64>;
    /// A linearizable range read; its answer, and the store's revision.
    async fn range(&self, range: Range) -> Result<(RangeResult, i64)>;
    /// A transaction. A put on a lease etcd does not have fails the whole transaction
    /// with an error that [`lease_not_found`] recognises.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;
    /// Opens a watch stream with its first watch.
    async fn watch(&self, first: WatchRequest) -> Result<WatchStream>;
    /// A transaction of etcd-client's own operations, run only while `key` has create
    /// revision `create_revision` (`EtcdDriver::txn_if_leader`); `Ok(None)` when the
    /// compare failed. An I/O layer without etcd-client answers [`Error::Unsupported`].
    async fn client_txn(
        &self,
        key: &str,
        create_revision: i64,
        ops: Vec<etcd_client::TxnOp>,
    ) -> Result<Option<etcd_client::TxnResponse>>;
}

/// etcd's "requested lease not found", as an [`EtcdIo`] of another kind than etcd-client
/// reports it (etcd-client's own is recognised from its message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseNotFound;

impl std::fmt::Display for LeaseNotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("etcdserver: requested lease not found")
    }
}

impl std::error::Error for LeaseNotFound {}

/// Whether `err` says that etcd has no such lease (expired or revoked).
pub fn lease_not_found(err: &Error) -> bool {
    crate::error::says_lease_not_found(err)
        || matches!(err, Error::Store(source) if source.downcast_ref::<LeaseNotFound>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_follow_etcd() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), b"\0".to_vec());
        let range = Range::prefix("e/");
        assert!(range.contains(b"e/1"));
        assert!(!range.contains(b"e0"));
        assert!(!range.contains(b"e"));
        assert!(Range::key("k").contains(b"k"));
        assert!(!Range::key("k").contains(b"k2"));
    }
}
