//! Creating a candidate's key (a new create revision per term) and deleting only one's
//! own.

use leader_core::{Candidate, Result};

use crate::gone::Gone;
use tracing::{debug, warn};

use crate::error::unexpected;
use crate::io::{Compare, Op, OpResult, Range, Sort, Txn, TxnResult, lease_not_found};
use crate::keys::{
    CandidateKey, Side, marker_key, nomination_key, parse_nomination, side_key, ttl_millis,
};
use crate::wait::{line_answers, line_reads};
use crate::{Inner, lock};

impl Inner {
    /// Creates `candidate`'s `key` if absent; if it exists (an earlier term of this
    /// candidate), deletes that term's key (by its create revision) and creates it again,
    /// so that each term gets a new create revision. Returns the create revision and the
    /// token cancelled when the term is gone.
    ///
    /// The create also puts the key's id side key and its TTL side key (on the same lease)
    /// and its guard key on the slot's attempt lease, all in one transaction: see
    /// [`crate::lease`] and [`crate::expiry`]. Until its
    /// answer comes, the candidate's key records the attempt lease, which a withdrawal
    /// revokes before it reads the key.
    ///
    /// The same transaction reads the line as the wait's first read does (see
    /// [`Inner::wait_for_predecessors`]), at the create's own revision: etcd's reads inside
    /// a transaction see its writes, so the key just created is the newest of `prefix`,
    /// and the (up to) two below it follow it. One request less per campaign. The third
    /// value is that read, in the wait's shape, or None if the answer does not show it
    /// (the wait then reads again).
    pub(crate) async fn create_key(
        &self,
        candidate: &Candidate,
        key: &CandidateKey,
        prefix: &str,
    ) -> Result<(i64, Gone, Option<TxnResult>)> {
        for _ in 0..4 {
            let attempt = self.attempt_lease(&key.slot).await?;
            // From here until the answer, the key may exist with a revision we do not know:
            // a withdrawal revokes the attempt lease, then reads it.
            lock(&self.keys).set_create_revision(&candidate.id, &key.key, 0, attempt);
            let writes: [Op; CREATE_WRITES] = [
                Op::put(&*key.key, candidate.value.as_slice(), key.lease),
                Op::put(
                    side_key(&key.key, Side::Id),
                    candidate.id.as_str(),
                    key.lease,
                ),
                Op::put(side_key(&key.key, Side::Guard), "", attempt),
                Op::put(
                    side_key(&key.key, Side::Ttl),
                    ttl_millis(candidate.ttl).to_string(),
                    key.lease,
                ),
            ];
            // What the wait reads first, with ours and the two below it as the line.
            let reads = line_reads(
                Range::prefix(prefix).sort(Sort::CreateDescend).limit(3),
                &key.key,
                &nomination_key(prefix),
                &marker_key(prefix),
            );
            let txn = Txn::new()
                .when([Compare::create_revision(&*key.key, 0)])
                .and_then(writes.into_iter().chain(reads).collect::<Vec<_>>())
                .or_else([Op::get(&*key.key)]);
            let response = match self.request(self.io.txn(txn)).await {
                Ok(response) => response,
                Err(err) if lease_not_found(&err) => {
                    // Nothing was written. Which lease: the attempt lease (revoked by a
                    // withdrawal of another create, or expired), or the candidate's?
                    lock(&self.keys).set_create_revision(&candidate.id, &key.key, 0, 0);
                    if self.lease_lives(key.lease).await? {
                        debug!(attempt = %format!("{attempt:x}"), "the attempt lease is gone; taking a new one");
                        self.attempt_gone(&key.slot, attempt).await;
                        continue;
                    }
                    return Err(err);
                }
                Err(err) => return Err(err),
            };
            if response.succeeded {
                let revision = response.revision;
                if revision <= 0 {
                    return Err(unexpected("etcd answered a transaction without a revision"));
                }
                let gone = lock(&self.keys)
                    .set_create_revision(&candidate.id, &key.key, revision, 0)
                    .unwrap_or_default();
                let line = first_read(response, &key.key, revision);
                return Ok((revision, gone, line));
            }
            // Nothing was written.
            lock(&self.keys).set_create_revision(&candidate.id, &key.key, 0, 0);
            let existing = response
                .gets()
                .into_iter()
                .find_map(|get| get.kvs.first().map(|kv| (kv.create_revision, kv.lease)));
            match existing {
                // Deleted since: try again.
                None => continue,
                // A term of ours that ended: delete exactly that one.
                Some((revision, lease)) if lease == key.lease => {
                    debug!(key = %key.key, revision, "deleting this candidate's earlier term");
                    self.delete_own(&key.key, revision, false).await?;
                }
                Some((revision, lease)) => {
                    warn!(
                        key = %key.key,
                        revision,
                        lease = %format!("{lease:x}"),
                        "this candidate's key exists on another lease; not touching it"
                    );
                    return Err(unexpected(format!(
                        "etcd key {} belongs to lease {lease:x}, not {:x}",
                        key.key, key.lease
                    )));
                }
            }
        }
        Err(unexpected(format!(
            "etcd key {} could not be created (it kept existing, or the attempt lease kept vanishing)",
            key.key
        )))
    }

    /// Deletes `key` only if it is the term with create revision `revision`: never anyone
    /// else's key, never a newer term of the same candidate, even if the request lands late.
    /// Its side keys go with it; if the key is gone already, they go if no other term has
    /// taken the key's name since. With `withdraw`, a nomination naming the key goes too
    /// (the nominee withdraws: the line resumes at once).
    pub(crate) async fn delete_own(&self, key: &str, revision: i64, withdraw: bool) -> Result<()> {
        let nomination = nomination_key(&format!(
            "{}/",
            key.rsplit_once('/').map_or(key, |(e, _)| e)
        ));
        let sides = |deletes: &mut Vec<Op>| {
            deletes.extend(Side::ALL.map(|side| Op::delete(side_key(key, side))));
        };
        let mut then = vec![Op::delete(key)];
        sides(&mut then);
        if withdraw {
            then.push(Op::get(nomination.as_str()));
        }
        let delete = Txn::new()
            .when([Compare::create_revision(key, revision)])
            .and_then(then);
        let response = self.request(self.io.txn(delete)).await?;
        if !response.succeeded {
            let mut then = Vec::new();
            sides(&mut then);
            let leftovers = Txn::new()
                .when([Compare::create_revision(key, 0)])
                .and_then(then);
            self.request(self.io.txn(leftovers)).await?;
            return Ok(());
        }
        let naming_us = response.gets().into_iter().find_map(|get| {
            get.kvs
                .first()
                .filter(|kv| {
                    parse_nomination(kv.value.as_slice()).is_some_and(|(named, _)| named == key)
                })
                .map(|kv| kv.create_revision)
        });
        if let Some(nominated) = naming_us {
            debug!(key, "the nominee withdraws: ending its nomination");
            let end = Txn::new()
                .when([Compare::create_revision(nomination.as_str(), nominated)])
                .and_then([Op::delete(nomination.as_str())]);
            self.request(self.io.txn(end)).await?;
        }
        Ok(())
    }

    /// Deletes the side keys of `key` if the key itself does not exist (a withdrawal that
    /// found no key: a create that failed may still have left nothing, but a guard of an
    /// earlier create may be there).
    pub(crate) async fn delete_sides_if_absent(&self, key: &str) -> Result<()> {
        let leftovers = Txn::new()
            .when([Compare::create_revision(key, 0)])
            .and_then(Side::ALL.map(|side| Op::delete(side_key(key, side))));
        self.request(self.io.txn(leftovers)).await?;
        Ok(())
    }

    /// The create revision of `key` if it exists on this candidate's lease: what a
    /// withdrawal whose term is unknown (a create whose answer never came) deletes, by
    /// that exact revision.
    pub(crate) async fn own_revision(&self, key: &CandidateKey) -> Result<Option<i64>> {
        let (response, _) = self.request(self.io.range(Range::key(&*key.key))).await?;
        Ok(response
            .kvs
            .first()
            .filter(|kv| kv.lease == key.lease && kv.create_revision > 0)
            .map(|kv| kv.create_revision))
    }
}

/// The writes of a create, before the reads of [`line_reads`] in its answer.
const CREATE_WRITES: usize = 4;

/// The line as the create's transaction read it (see [`Inner::create_key`]), as the wait's
/// own read answers it: the keys below `own` (at most two, and whether there are more),
/// `own`, the nomination and the marker, at the create's revision. None unless the newest
/// key of the election is `own` with this term's create revision.
fn first_read(created: TxnResult, own: &str, revision: i64) -> Option<TxnResult> {
    let mut results = created.results;
    let reads = results.split_off(CREATE_WRITES.min(results.len()));
    let [mut line, mine, nominated, marked] = line_answers(reads)?;
    let newest = line.kvs.first()?;
    if newest.key != own.as_bytes() || newest.create_revision != revision {
        return None;
    }
    line.kvs.remove(0);
    Some(TxnResult {
        revision: created.revision,
        succeeded: true,
        results: [line, mine, nominated, marked]
            .into_iter()
            .map(OpResult::Get)
            .collect(),
    })
}
