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

use leader_core::{Error, Result};
use tokio::time::Instant;
use tracing::warn;

use crate::io::{Op, OpResult, Range, Txn};
use crate::keys::CandidateKey;
use crate::{Inner, lock};

/// Reads in one transaction (etcd's default `--max-txn-ops` is 128). Flat, keys only: a
/// transaction of reads alone is served by etcd's ReadIndex. (Nested transactions would
/// read thousands of keys per request, but etcd treats any transaction holding a nested one
/// as a write: a raft entry and an fsync on every member per renewal batch, so a slow disk
/// would cost terms that a read survives.)
const BATCH: usize = 128;

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
}

impl Inner {
    /// Confirms, with a linearizable read sent at or after `after` (the keep-alive's
    /// confirmation), that `key`'s term still exists: its key with the term's create
    /// revision on its lease. [`Error::TermGone`] if it does not; then the term's token is
    /// cancelled too. Renewals never take the watch of held keys' word that a key exists:
    /// a watch may lag.
    pub(crate) async fn confirm_key(&self, key: &CandidateKey, after: Instant) -> Result<()> {
        let token = key.create_revision;
        if self.read_since(token, after) {
            return Ok(());
        }
        let _batch = self.reads.batch.lock().await;
        if self.read_since(token, after) {
            return Ok(());
        }
        // Every held term, this one first.
        let mut terms: Vec<(i64, String, i64)> = self.held_terms();
        terms.retain(|(held, _, _)| *held != token);
        terms.insert(0, (token, key.key.clone(), key.lease));
        let (first, rest) = terms.split_at(terms.len().min(BATCH));
        // Boxed: the request's futures take room only while a batch is read, not in every
        // renewal waiting for it.
        Box::pin(self.read_batch(first)).await?;
        for batch in rest.chunks(BATCH) {
            // Their own renewals will try again if this fails.
            let _ = Box::pin(self.read_batch(batch)).await;
        }
        // Terms that ended since (the watch of held keys saw them go) are forgotten.
        let held: std::collections::HashSet<i64> = terms.iter().map(|(t, _, _)| *t).collect();
        lock(&self.reads.seen).retain(|t, _| held.contains(t));
        if self.read_since(token, after) {
            Ok(())
        } else {
            key.gone.cancel();
            Err(Error::TermGone)
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

    /// Reads the keys of `terms` (token, key, lease) in one transaction; records the ones
    /// seen on their lease, ends the others.
    async fn read_batch(&self, terms: &[(i64, String, i64)]) -> Result<()> {
        let txn = Txn::new().and_then(
            terms
                .iter()
                .map(|(_, key, _)| Op::Get(Range::key(key.as_str()).keys_only()))
                .collect::<Vec<_>>(),
        );
        let sent_at = Instant::now();
        let response = self.request(self.io.txn(txn)).await?;
        let answers = response.results;
        for ((token, key, lease), answer) in terms.iter().zip(answers) {
            let ours = match answer {
                OpResult::Get(get) => get
                    .kvs
                    .first()
                    .is_some_and(|kv| kv.create_revision == *token && kv.lease == *lease),
                _ => false,
            };
            if ours {
                let mut seen = lock(&self.reads.seen);
                let entry = seen.entry(*token).or_insert(Seen {
                    read: sent_at,
                    used: None,
                });
                entry.read = entry.read.max(sent_at);
            } else {
                warn!(key = %key, fencing_token = token, "the key of a held term is gone");
                lock(&self.reads.seen).remove(token);
                self.end_term(*token);
            }
        }
        Ok(())
    }
}
