//! Renewals' reads, per process rather than per term: one transaction reads the keys of
//! every term the driver holds, and a renewal whose term such a read saw (sent after the
//! renewal's keep-alive confirmation) needs no read of its own.
//!
//! A renewal is a keep-alive of the term's lease (shared by every term on it, one per third
//! of a TTL) and a linearizable read showing the term's key still on that lease, sent after
//! the keep-alive's confirmation and newer than the read the term's previous renewal used.
//! A renewal that finds none reads all held keys in transactions of up to [`BATCH`] reads;
//! the other terms' renewals then find theirs done. 1,000 elections held by one process
//! cost a few transactions per third of a TTL, not 1,000 reads.

use std::collections::HashMap;
use std::sync::Arc;

use leader_core::{Error, Result};
use tokio::time::Instant;
use tracing::warn;

use crate::error::unexpected;
use crate::io::{Op, OpResult, Range, RangeResult, Txn};
use crate::keys::CandidateKey;
use crate::{Inner, lock};

/// Reads in one flat transaction (etcd's default `--max-txn-ops` is 128). A driver holding
/// at most this many terms reads them all in one transaction of reads alone, which etcd
/// serves with ReadIndex.
const BATCH: usize = 128;

/// A driver holding more reads them in nested transactions: 11 nested of 96 keys-only reads
/// (etcd bounds a nested transaction's lists by what the transactions around it leave of
/// 128) read 1,056 keys in one request, where flat transactions read 128: 10,000 held
/// elections cost 10 transactions per third of a TTL, not 79. Not more per request: a
/// request's operations and its answer take about half a kilobyte per key while it is
/// read, beside every renewal of the round waiting for it (32 nested, 3,072 keys, added
/// about 2 MiB to the RSS of a process holding 10,000 elections: medians of five hand runs
/// of `leader-bench hold` each, TTL 10 s, 2026-12-04). The price of nesting: etcd runs a
/// transaction holding nested ones as a write (a raft entry and an fsync on every member,
/// changing nothing), so these renewals also wait for the members' disks.
const NESTED: usize = 11;
const PER_NESTED: usize = 96;
const _: () = assert!(
    NESTED + PER_NESTED <= 128,
    "within etcd's budget along the path"
);

/// The most key bytes one request reads: the request (the keys) and its answer (keys,
/// revisions and leases, no values) stay far below etcd's 1.5 MiB request limit and gRPC's
/// 4 MiB answer limit whatever the keys' lengths.
const REQUEST_KEY_BYTES: usize = 256 * 1024;

/// Splits `terms` into the requests that read them, in order: all in one if they fit a
/// flat transaction, else requests of at most `NESTED * PER_NESTED` keys and
/// [`REQUEST_KEY_BYTES`] of key (but at least one key each).
fn requests(terms: &[(i64, Arc<str>, i64)]) -> Vec<&[(i64, Arc<str>, i64)]> {
    let flat_bytes: usize = terms.iter().map(|(_, key, _)| key.len()).sum();
    if terms.len() <= BATCH && flat_bytes <= REQUEST_KEY_BYTES {
        return if terms.is_empty() {
            Vec::new()
        } else {
            vec![terms]
        };
    }
    let mut out = Vec::new();
    let mut rest = terms;
    while !rest.is_empty() {
        let mut bytes = 0;
        let mut n = 0;
        for (_, key, _) in rest.iter().take(NESTED * PER_NESTED) {
            if n > 0 && bytes + key.len() > REQUEST_KEY_BYTES {
                break;
            }
            bytes += key.len();
            n += 1;
        }
        let (now, later) = rest.split_at(n);
        out.push(now);
        rest = later;
    }
    out
}

/// The reads of one request: flat if they fit one transaction, else nested.
fn reads(terms: &[(i64, Arc<str>, i64)]) -> Vec<Op> {
    let read = |(_, key, _): &(i64, Arc<str>, i64)| Range::key(&**key).keys_only();
    if terms.len() <= BATCH {
        terms.iter().map(|t| Op::Get(read(t))).collect()
    } else {
        terms
            .chunks(PER_NESTED)
            .map(|chunk| Op::Reads(chunk.iter().map(read).collect()))
            .collect()
    }
}

/// By token: the send time of the latest read that saw the held term's key on its lease,
/// and of the read its last renewal used.
#[derive(Default)]
pub(crate) struct Reads {
    seen: std::sync::Mutex<HashMap<i64, Seen>>,
    /// One batch at a time: renewals that arrive meanwhile find theirs in it.
    batch: tokio::sync::Mutex<()>,
}

#[derive(Clone, Copy)]
struct Seen {
    read: Instant,
    used: Option<Instant>,
    /// The send time of the last keep-alive (or grant) of the term's lease that etcd had
    /// answered alive when `read` was sent: the read shows the key on a lease that lives
    /// until at least then plus the lease's TTL.
    lease_confirmed: Option<Instant>,
}

impl Inner {
    /// Confirms, with a linearizable read sent at or after `after` (the keep-alive's
    /// confirmation), that `key`'s term still exists: its key with the term's create
    /// revision on its lease. [`Error::TermGone`] if it does not; then the term's token is
    /// cancelled too. Renewals never take the watch of held keys' word that a key exists:
    /// a watch may lag.
    #[allow(clippy::manual_async_fn)] // on purpose: an async fn keeps its arguments twice
    pub(crate) fn confirm_key<'a>(
        &'a self,
        key: &'a CandidateKey,
        after: Instant,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        async move {
            let token = key.create_revision;
            if self.read_since(token, after) {
                return Ok(());
            }
            let _batch = self.reads.batch.lock().await;
            if self.read_since(token, after) {
                return Ok(());
            }
            // Boxed: the batch's state takes room only in the renewal that reads it, not in
            // every renewal waiting for it.
            Box::pin(self.read_held(key)).await?;
            if self.read_since(token, after) {
                Ok(())
            } else {
                key.gone.cancel();
                Err(Error::TermGone)
            }
        }
    }

    /// Reads the keys of every held term, `key`'s first, in as few requests as
    /// [`requests`] allows; then forgets the reads of terms that ended since.
    async fn read_held(&self, key: &CandidateKey) -> Result<()> {
        let token = key.create_revision;
        let mut terms: Vec<(i64, Arc<str>, i64)> = self.held_terms();
        terms.retain(|(held, _, _)| *held != token);
        terms.insert(0, (token, Arc::clone(&key.key), key.lease));
        let batches = requests(&terms);
        let (first, rest) = batches.split_first().ok_or(Error::TermGone)?;
        self.read_batch(first).await?;
        for batch in rest {
            // Their own renewals will try again if this fails.
            let _ = self.read_batch(batch).await;
        }
        // Terms that ended since (the watch of held keys saw them go) are forgotten.
        let held: std::collections::HashSet<i64> = terms.iter().map(|(t, _, _)| *t).collect();
        lock(&self.reads.seen).retain(|t, _| held.contains(t));
        Ok(())
    }

    /// A renewal of term `token` that needs no request: the latest read of its key (newer
    /// than the one its last renewal used) was sent after a keep-alive of the key's lease,
    /// sent at or after `not_before`, had been answered alive. Returns that keep-alive's
    /// send time, the renewal's confirmation (as [`Inner::keep_alive`] then
    /// [`Inner::confirm_key`] would have confirmed it, with no later keep-alive); marks the
    /// read used.
    ///
    /// Why: while campaigns keep sending keep-alives (each grant needs one sent after its
    /// campaign began), every renewal would find a keep-alive newer than the last batch of
    /// reads and read every held key again; 10,000 campaigns then cost thousands of such
    /// batches. With this, a batch serves every term's renewal due within a third of a TTL
    /// of the keep-alive before it.
    pub(crate) fn read_covers(&self, token: i64, not_before: Instant) -> Option<Instant> {
        let mut seen = lock(&self.reads.seen);
        let seen = seen.get_mut(&token)?;
        let confirmed = seen.lease_confirmed?;
        let fresh = seen.used.is_none_or(|used| seen.read > used);
        if fresh && confirmed >= not_before {
            seen.used = Some(seen.read);
            Some(confirmed)
        } else {
            None
        }
    }

    /// Takes a read of term `token` sent at or after `after` and newer than the one its
    /// last renewal used: each renewal of a term rests on a read of its own, so a change
    /// the watch missed is found by the next renewal, as with a read per renewal.
    fn read_since(&self, token: i64, after: Instant) -> bool {
        let mut seen = lock(&self.reads.seen);
        let Some(seen) = seen.get_mut(&token) else {
            return false;
        };
        let fresh = seen.read >= after && seen.used.is_none_or(|used| seen.read > used);
        if fresh {
            seen.used = Some(seen.read);
        }
        fresh
    }

    /// Forgets term `token`'s reads (it ended).
    pub(crate) fn forget_reads(&self, token: i64) {
        lock(&self.reads.seen).remove(&token);
    }

    /// Reads the keys of `terms` (token, key, lease) in one transaction (flat or nested);
    /// records the ones seen on their lease, ends the others.
    async fn read_batch(&self, terms: &[(i64, Arc<str>, i64)]) -> Result<()> {
        let txn = Txn::new().and_then(reads(terms));
        // Before the send time: each was answered before the request was sent.
        let confirmations = self.leases.confirmations();
        let sent_at = Instant::now();
        let response = self.request(self.io.txn(txn)).await?;
        let answers: Vec<RangeResult> = response
            .results
            .into_iter()
            .flat_map(|result| match result {
                OpResult::Get(get) => vec![get],
                OpResult::Reads(reads) => reads,
                _ => Vec::new(),
            })
            .collect();
        if answers.len() != terms.len() {
            // Never ends a term on an answer it cannot read: the renewal fails, and tries
            // again.
            return Err(unexpected(format!(
                "etcd answered {} of {} reads",
                answers.len(),
                terms.len()
            )));
        }
        for ((token, key, lease), answer) in terms.iter().zip(answers) {
            let ours = answer
                .kvs
                .first()
                .is_some_and(|kv| kv.create_revision == *token && kv.lease == *lease);
            if ours {
                let lease_confirmed = confirmations
                    .iter()
                    .find(|(id, _)| id == lease)
                    .map(|&(_, at)| at);
                let mut seen = lock(&self.reads.seen);
                let entry = seen.entry(*token).or_insert(Seen {
                    read: sent_at,
                    used: None,
                    lease_confirmed,
                });
                if sent_at >= entry.read {
                    entry.read = sent_at;
                    entry.lease_confirmed = lease_confirmed;
                }
            } else {
                warn!(key = %key, fencing_token = token, "the key of a held term is gone");
                lock(&self.reads.seen).remove(token);
                self.end_term(*token);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(n: usize, key_len: usize) -> Vec<(i64, Arc<str>, i64)> {
        (0..n)
            .map(|i| (i as i64, "k".repeat(key_len).into(), 1))
            .collect()
    }

    fn sizes(n: usize, key_len: usize) -> Vec<usize> {
        requests(&terms(n, key_len))
            .iter()
            .map(|r| r.len())
            .collect()
    }

    #[test]
    fn up_to_128_terms_are_one_flat_read_only_transaction() {
        assert!(sizes(0, 40).is_empty());
        assert_eq!(sizes(1, 40), [1]);
        assert_eq!(sizes(128, 40), [128]);
        assert!(
            reads(&terms(128, 40))
                .iter()
                .all(|op| matches!(op, Op::Get(range) if range.keys_only))
        );
    }

    #[test]
    fn more_terms_are_read_1056_per_request_in_nested_reads() {
        assert_eq!(sizes(129, 40), [129]);
        assert_eq!(sizes(1000, 40), [1000]);
        assert_eq!(sizes(10_000, 40), [[1056; 9].as_slice(), &[496]].concat());
        let ops = reads(&terms(1000, 40));
        assert_eq!(ops.len(), 11);
        assert!(
            ops.iter()
                .all(|op| matches!(op, Op::Reads(r) if r.len() <= PER_NESTED))
        );
    }

    #[test]
    fn long_keys_split_requests_by_bytes_but_each_reads_one_at_least() {
        assert_eq!(sizes(1000, 1024), [256, 256, 256, 232]);
        assert_eq!(sizes(2, REQUEST_KEY_BYTES + 1), [1, 1]);
    }
}
