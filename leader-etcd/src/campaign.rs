//! Candidates' keys: naming them, creating them (a new create revision per term), deleting
//! only one's own, and waiting for the predecessors in line.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchFilterType, WatchOptions,
};
use leader_core::{CancellationToken, Candidate, Error, Result};
use tracing::{debug, warn};

use crate::error::{from_etcd, says_lease_not_found, unexpected, watch_cancelled};
use crate::lease::LeaseSlot;
use crate::{Inner, lock};

/// The key of one candidate: its name, its lease, and the term it holds if known.
#[derive(Clone)]
pub(crate) struct CandidateKey {
    pub(crate) key: String,
    pub(crate) lease: i64,
    pub(crate) slot: Arc<LeaseSlot>,
    /// The key's create revision (the term's fencing token); 0 while unknown: before the
    /// key is first created, and from the moment a request that may create it is sent
    /// until its answer comes.
    pub(crate) create_revision: i64,
    /// Cancelled when etcd says the term `create_revision` is gone.
    pub(crate) gone: CancellationToken,
    /// The attempt lease of the last create sent whose outcome is unknown (0: none): what a
    /// withdrawal revokes before it reads the key.
    pub(crate) attempt: i64,
}

/// What a side key of a candidate's key holds.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    /// The candidate's id (on the key's lease), for `candidates()`.
    Id,
    /// The guard of the last create, on the attempt lease.
    Guard,
}

/// The side key `kind` of the candidate key `key` (`<prefix><election>/<suffix>`):
/// `<prefix><election>\0id\0<suffix>` or `…\0try\0<suffix>`. Outside every election's
/// range (`<prefix><name>/`): election names hold no `/`, and neither does the rest. Still
/// under `<prefix><election>`, so one permission on that prefix covers both.
pub(crate) fn side_key(key: &str, kind: Side) -> String {
    let (election, suffix) = key.rsplit_once('/').unwrap_or((key, ""));
    let kind = match kind {
        Side::Id => "id",
        Side::Guard => "try",
    };
    format!("{election}\0{kind}\0{suffix}")
}


/// What a waiter's watch message means, events in revision order.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Nothing that matters: keep waiting.
    Wait,
    /// The predecessor was deleted at this revision, and the waiter's own key was not
    /// touched before it.
    Lead(i64),
    /// The waiter's own key was deleted or written: the wait proves nothing about it.
    Look,
}

/// `events`: (deleted, key, revision), in revision order, every event of a revision in one
/// message. Any change of `own` at or before the predecessor's deletion (at the same
/// revision too: a prefix delete, a lease revoked) spoils the proof.
fn step<'a>(
    events: impl IntoIterator<Item = (bool, &'a [u8], i64)>,
    predecessor: &[u8],
    own: &[u8],
) -> Step {
    let mut lead = None;
    for (deleted, key, revision) in events {
        if key == own && lead.is_none_or(|at| revision <= at) {
            return Step::Look;
        }
        if key == predecessor && deleted && lead.is_none() {
            lead = Some(revision);
        }
    }
    lead.map_or(Step::Wait, Step::Lead)
}

/// The key of each candidate that has one, and the index of the key names in use, so that
/// naming a key costs O(1) however many candidates the driver has.
#[derive(Default)]
pub(crate) struct Keys {
    by_candidate: HashMap<String, CandidateKey>,
    names: HashSet<String>,
}

impl Keys {
    pub(crate) fn get(&self, candidate: &str) -> Option<&CandidateKey> {
        self.by_candidate.get(candidate)
    }

    fn insert(&mut self, candidate: String, key: CandidateKey) {
        let name = key.key.clone();
        // Names are unique among candidates: the replaced one was only the old entry's.
        if let Some(old) = self.by_candidate.insert(candidate, key)
            && old.key != name
        {
            self.names.remove(&old.key);
        }
        self.names.insert(name);
    }

    /// Forgets `candidate`'s key if it is still `name`, with `create_revision` if given.
    pub(crate) fn forget(&mut self, candidate: &str, name: &str, create_revision: Option<i64>) {
        let matches = self.by_candidate.get(candidate).is_some_and(|k| {
            k.key == name && create_revision.is_none_or(|rev| k.create_revision == rev)
        });
        if matches && let Some(old) = self.by_candidate.remove(candidate) {
            self.names.remove(&old.key);
        }
    }

    /// Records the create revision of `candidate`'s key `name` (0: unknown from now on,
    /// a create on attempt lease `attempt` may land, or none if 0); returns the token that
    /// is cancelled when that term is gone.
    fn set_create_revision(
        &mut self,
        candidate: &str,
        name: &str,
        revision: i64,
        attempt: i64,
    ) -> Option<CancellationToken> {
        let entry = self.by_candidate.get_mut(candidate)?;
        if entry.key != name {
            return None;
        }
        if entry.create_revision != revision {
            entry.create_revision = revision;
            entry.gone = CancellationToken::new();
        }
        entry.attempt = attempt;
        Some(entry.gone.clone())
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.by_candidate.len(), self.names.len())
    }
}

impl Inner {
    /// A key for `candidate` on lease `lease`, unique among this driver's candidates:
    /// `<prefix><election>/<lease hex>`, with `_<n>` after it for a second candidate of the
    /// same election on the same lease. Costs one lookup per sibling of that election on
    /// that lease (usually none), not one per key of the driver.
    pub(crate) fn allocate_key(
        &self,
        candidate: &Candidate,
        lease: i64,
        slot: &Arc<LeaseSlot>,
    ) -> CandidateKey {
        let mut keys = lock(&self.keys);
        if let Some(existing) = keys.get(&candidate.id)
            && existing.lease == lease
        {
            return existing.clone();
        }
        let key = free_name(
            &keys.names,
            &format!("{}{}/{lease:x}", self.prefix, candidate.election),
        );
        let entry = CandidateKey {
            key,
            lease,
            slot: Arc::clone(slot),
            create_revision: 0,
            gone: CancellationToken::new(),
            attempt: 0,
        };
        keys.insert(candidate.id.clone(), entry.clone());
        entry
    }

    /// The key of `candidate`, if it has one.
    pub(crate) fn candidate_key(&self, candidate: &str) -> Option<CandidateKey> {
        lock(&self.keys).get(candidate).cloned()
    }

    /// The key of `candidate` if it holds the term `fencing_token`.
    pub(crate) fn term_key(&self, candidate: &str, fencing_token: u64) -> Option<CandidateKey> {
        lock(&self.keys)
            .get(candidate)
            .filter(|k| {
                k.create_revision > 0
                    && u64::try_from(k.create_revision).ok() == Some(fencing_token)
            })
            .cloned()
    }

    /// Creates `candidate`'s `key` if absent; if it exists (an earlier term of this
    /// candidate), deletes that term's key (by its create revision) and creates it again,
    /// so that each term gets a new create revision. Returns the create revision and the
    /// token cancelled when the term is gone.
    ///
    /// The create also puts the key's id side key (on the same lease) and its guard key on
    /// the slot's attempt lease, all in one transaction: see [`crate::lease`]. Until its
    /// answer comes, the candidate's key records the attempt lease, which a withdrawal
    /// revokes before it reads the key.
    pub(crate) async fn create_key(
        &self,
        candidate: &Candidate,
        key: &CandidateKey,
    ) -> Result<(i64, CancellationToken)> {
        for _ in 0..4 {
            let attempt = self.attempt_lease(&key.slot).await?;
            // From here until the answer, the key may exist with a revision we do not know:
            // a withdrawal revokes the attempt lease, then reads it.
            lock(&self.keys).set_create_revision(&candidate.id, &key.key, 0, attempt);
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([
                    TxnOp::put(
                        key.key.as_str(),
                        candidate.value.as_slice(),
                        Some(PutOptions::new().with_lease(key.lease)),
                    ),
                    TxnOp::put(
                        side_key(&key.key, Side::Id),
                        candidate.id.as_str(),
                        Some(PutOptions::new().with_lease(key.lease)),
                    ),
                    TxnOp::put(
                        side_key(&key.key, Side::Guard),
                        "",
                        Some(PutOptions::new().with_lease(attempt)),
                    ),
                ])
                .or_else([TxnOp::get(key.key.as_str(), None)]);
            let response = match self.request(self.client.clone().txn(txn)).await {
                Ok(response) => response,
                Err(err) if says_lease_not_found(&err) => {
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
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                if revision <= 0 {
                    return Err(unexpected("etcd answered a transaction without a revision"));
                }
                let gone = lock(&self.keys)
                    .set_create_revision(&candidate.id, &key.key, revision, 0)
                    .unwrap_or_default();
                return Ok((revision, gone));
            }
            // Nothing was written.
            lock(&self.keys).set_create_revision(&candidate.id, &key.key, 0, 0);
            let existing = response.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| (kv.create_revision(), kv.lease())),
                _ => None,
            });
            match existing {
                // Deleted since: try again.
                None => continue,
                // A term of ours that ended: delete exactly that one.
                Some((revision, lease)) if lease == key.lease => {
                    debug!(key = %key.key, revision, "deleting this candidate's earlier term");
                    self.delete_own(&key.key, revision).await?;
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
    /// taken the key's name since.
    pub(crate) async fn delete_own(&self, key: &str, revision: i64) -> Result<()> {
        let sides = |deletes: &mut Vec<TxnOp>| {
            deletes.push(TxnOp::delete(side_key(key, Side::Id), None));
            deletes.push(TxnOp::delete(side_key(key, Side::Guard), None));
        };
        let mut then = vec![TxnOp::delete(key, None)];
        sides(&mut then);
        let delete = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, revision)])
            .and_then(then);
        let response = self.request(self.client.clone().txn(delete)).await?;
        if !response.succeeded() {
            let mut then = Vec::new();
            sides(&mut then);
            let leftovers = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then(then);
            self.request(self.client.clone().txn(leftovers)).await?;
        }
        Ok(())
    }

    /// Deletes the side keys of `key` if the key itself does not exist (a withdrawal that
    /// found no key: a create that failed may still have left nothing, but a guard of an
    /// earlier create may be there).
    pub(crate) async fn delete_sides_if_absent(&self, key: &str) -> Result<()> {
        let leftovers = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::delete(side_key(key, Side::Id), None),
                TxnOp::delete(side_key(key, Side::Guard), None),
            ]);
        self.request(self.client.clone().txn(leftovers)).await?;
        Ok(())
    }

    /// The create revision of `key` if it exists on this candidate's lease: what a
    /// withdrawal whose term is unknown (a create whose answer never came) deletes, by
    /// that exact revision.
    pub(crate) async fn own_revision(&self, key: &CandidateKey) -> Result<Option<i64>> {
        let response = self
            .request(self.client.clone().get(key.key.as_str(), None))
            .await?;
        Ok(response
            .kvs()
            .first()
            .filter(|kv| kv.lease() == key.lease && kv.create_revision() > 0)
            .map(|kv| kv.create_revision()))
    }

    /// Waits until no key of the election has a create revision below `revision` (the
    /// create revision of `own`), watching only the predecessor's deletion. Fails if lease
    /// `lease` of `slot` is lost meanwhile.
    ///
    /// Returns the revision at which `own` is known to exist with this term's create
    /// revision and lease, and no key below it. Each read (a transaction) reads the keys
    /// below and `own` at one revision. Keys below a waiter can only disappear (every new
    /// key gets a higher create revision), so when the predecessor was the only key below,
    /// its deletion at revision R leaves none, and the same watch (over both keys, in
    /// revision order, every event of R included) shows `own` neither deleted nor
    /// overwritten up to R: no read is needed after it. With several below, it reads again
    /// once its predecessor goes.
    pub(crate) async fn wait_for_predecessors(
        &self,
        prefix: &str,
        own: &str,
        revision: i64,
        slot: &LeaseSlot,
        lease: i64,
    ) -> Result<i64> {
        let mut lease_changes = slot.subscribe();
        loop {
            if *lease_changes.borrow_and_update() != lease {
                return Err(Error::TermGone);
            }
            // Two at most: enough to tell "the only one below" from "one of several"; and
            // this candidate's own key, at the same revision.
            let options = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(revision - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(2);
            let read =
                Txn::new().and_then([TxnOp::get(prefix, Some(options)), TxnOp::get(own, None)]);
            let response = self.request(self.client.clone().txn(read)).await?;
            let at = response.header().map_or(0, |h| h.revision());
            let (below, mine) = match response.op_responses().as_slice() {
                [TxnOpResponse::Get(below), TxnOpResponse::Get(mine)] => {
                    (below.clone(), mine.clone())
                }
                _ => return Err(unexpected("etcd answered a read with other operations")),
            };
            let ours = mine
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == revision && kv.lease() == lease);
            if !ours {
                warn!(key = %own, "campaign key vanished while waiting (deleted, or the lease expired?)");
                return Err(Error::TermGone);
            }
            let Some(predecessor) = below.kvs().first() else {
                // None below, and ours there, at one revision.
                return Ok(at);
            };
            let sole = below.kvs().len() == 1 && !below.more();
            let predecessor = predecessor.key().to_vec();
            let from = at + 1;
            debug!(
                predecessor = %String::from_utf8_lossy(&predecessor),
                sole,
                "waiting for the predecessor's deletion"
            );
            // The predecessor alone; or, when it is the only key below, the range from one
            // of the two keys to the other, to see both in one ordered stream.
            let own = own.as_bytes();
            let (start, options) = if sole {
                let (low, high) = if predecessor.as_slice() < own {
                    (predecessor.clone(), own.to_vec())
                } else {
                    (own.to_vec(), predecessor.clone())
                };
                let mut end = high;
                end.push(0);
                (
                    low,
                    WatchOptions::new()
                        .with_start_revision(from)
                        .with_range(end),
                )
            } else {
                (
                    predecessor.clone(),
                    WatchOptions::new()
                        .with_start_revision(from)
                        .with_filters([WatchFilterType::NoPut]),
                )
            };
            let mut watch = self
                .request(self.client.clone().watch(start, Some(options)))
                .await?;
            loop {
                let message = tokio::select! {
                    message = watch.message() => message.map_err(from_etcd)?,
                    changed = lease_changes.changed() => {
                        if changed.is_err() || *lease_changes.borrow_and_update() != lease {
                            return Err(Error::TermGone);
                        }
                        continue;
                    }
                };
                let Some(message) = message else {
                    return Err(unexpected("etcd closed the watch stream"));
                };
                if message.canceled() {
                    if message.compact_revision() > 0 {
                        // The start revision was compacted away: look again, from now.
                        debug!(
                            compact_revision = message.compact_revision(),
                            "the predecessor's watch was compacted; reading again"
                        );
                        break;
                    }
                    // Anything else (a refusal, the member losing its leader) is an error
                    // for the caller to retry with backoff, not a reason to look again now.
                    return Err(watch_cancelled(message.cancel_reason()));
                }
                let events = message.events().iter().filter_map(|event| {
                    let kv = event.kv()?;
                    let deleted = event.event_type() == EventType::Delete;
                    Some((deleted, kv.key(), kv.mod_revision()))
                });
                match step(events, &predecessor, own) {
                    Step::Wait => {}
                    // Ours was deleted or written: unless it is still this term's key,
                    // the term is gone; else look again.
                    Step::Look => {
                        if !self.key_is_ours_by_name(own, revision, lease).await? {
                            return Err(Error::TermGone);
                        }
                        break;
                    }
                    Step::Lead(at) if sole => return Ok(at),
                    Step::Lead(_) => break,
                }
            }
        }
    }

    /// Whether `own` exists with create revision `revision` on lease `lease` now (a
    /// linearizable read).
    async fn key_is_ours_by_name(&self, own: &[u8], revision: i64, lease: i64) -> Result<bool> {
        let response = self.request(self.client.clone().get(own, None)).await?;
        Ok(response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == revision && kv.lease() == lease))
    }
}

/// `base`, or the first of `base_1`, `base_2`, … that is not in `used`.
fn free_name(used: &HashSet<String>, base: &str) -> String {
    if !used.contains(base) {
        return base.to_owned();
    }
    (1u64..)
        .map(|n| format!("{base}_{n}"))
        .find(|name| !used.contains(name))
        .unwrap_or_else(|| base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_leads_on_its_predecessors_deletion_unless_its_own_key_changed_first() {
        let (pred, own) = (b"e/a".as_slice(), b"e/b".as_slice());
        let e =
            |deleted: bool, key: &'static str, revision: i64| (deleted, key.as_bytes(), revision);
        assert_eq!(step([e(true, "e/a", 9)], pred, own), Step::Lead(9));
        assert_eq!(step([e(false, "e/a", 9)], pred, own), Step::Wait);
        assert_eq!(
            step([e(false, "e/ab", 8), e(true, "e/ab", 9)], pred, own),
            Step::Wait,
            "other keys in the watched range do not matter"
        );
        assert_eq!(
            step([e(true, "e/b", 8), e(true, "e/a", 9)], pred, own),
            Step::Look,
            "ours went first"
        );
        assert_eq!(
            step([e(false, "e/b", 8), e(true, "e/a", 9)], pred, own),
            Step::Look,
            "ours was overwritten first"
        );
        assert_eq!(
            step([e(true, "e/a", 9), e(true, "e/b", 10)], pred, own),
            Step::Lead(9),
            "ours went after: the watch of held keys reports it"
        );
        assert_eq!(
            step([e(true, "e/a", 9), e(true, "e/b", 9)], pred, own),
            Step::Look,
            "ours went in the same revision (a prefix delete, a revoked lease)"
        );
    }

    fn key(name: &str, revision: i64) -> CandidateKey {
        CandidateKey {
            key: name.to_owned(),
            lease: 1,
            slot: crate::lease::Leases::new().slot(1),
            create_revision: revision,
            gone: CancellationToken::new(),
            attempt: 0,
        }
    }

    #[test]
    fn names_skip_those_in_use() {
        let mut used = HashSet::new();
        assert_eq!(free_name(&used, "e/1"), "e/1");
        used.insert("e/1".to_owned());
        assert_eq!(free_name(&used, "e/1"), "e/1_1");
        used.insert("e/1_1".to_owned());
        assert_eq!(free_name(&used, "e/1"), "e/1_2");
        assert_eq!(free_name(&used, "f/1"), "f/1");
    }

    #[test]
    fn the_index_follows_inserts_replacements_and_forgets() {
        let mut keys = Keys::default();
        keys.insert("a".into(), key("e/1", 0));
        keys.insert("b".into(), key("e/1_1", 0));
        assert_eq!(keys.len(), (2, 2));
        // a moves to a new lease: its old name is free again.
        keys.insert("a".into(), key("e/2", 0));
        assert_eq!(keys.len(), (2, 2));
        assert!(!keys.names.contains("e/1"));
        // A forget for another term of b keeps it; one for its name and term removes it.
        keys.set_create_revision("b", "e/1_1", 7, 0);
        keys.forget("b", "e/1_1", Some(6));
        assert_eq!(keys.len(), (2, 2));
        keys.forget("b", "e/1_1", Some(7));
        assert_eq!(keys.len(), (1, 1));
        keys.forget("a", "e/2", None);
        assert_eq!(keys.len(), (0, 0));
    }

    #[test]
    fn a_new_create_revision_gets_a_new_gone_token() {
        let mut keys = Keys::default();
        keys.insert("a".into(), key("e/1", 0));
        let first = keys.set_create_revision("a", "e/1", 5, 0).expect("a's key");
        first.cancel();
        let unknown = keys.set_create_revision("a", "e/1", 0, 3).expect("a's key");
        assert!(!unknown.is_cancelled());
        let second = keys.set_create_revision("a", "e/1", 9, 0).expect("a's key");
        assert!(!second.is_cancelled());
        assert!(keys.set_create_revision("a", "e/other", 9, 0).is_none());
    }
}
