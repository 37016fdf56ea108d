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

use crate::error::{from_etcd, unexpected, watch_cancelled};
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

    /// Records the create revision of `candidate`'s key `name` (0: unknown from now on);
    /// returns the token that is cancelled when that term is gone.
    fn set_create_revision(
        &mut self,
        candidate: &str,
        name: &str,
        revision: i64,
    ) -> Option<CancellationToken> {
        let entry = self.by_candidate.get_mut(candidate)?;
        if entry.key != name {
            return None;
        }
        if entry.create_revision != revision {
            entry.create_revision = revision;
            entry.gone = CancellationToken::new();
        }
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
    pub(crate) async fn create_key(
        &self,
        candidate: &Candidate,
        key: &CandidateKey,
    ) -> Result<(i64, CancellationToken)> {
        for _ in 0..2 {
            // From here until the answer, the key may exist with a revision we do not know:
            // a withdrawal reads it first.
            lock(&self.keys).set_create_revision(&candidate.id, &key.key, 0);
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    key.key.as_str(),
                    candidate.value.as_slice(),
                    Some(PutOptions::new().with_lease(key.lease)),
                )])
                .or_else([TxnOp::get(key.key.as_str(), None)]);
            let response = self.request(self.client.clone().txn(txn)).await?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                if revision <= 0 {
                    return Err(unexpected("etcd answered a transaction without a revision"));
                }
                let gone = lock(&self.keys)
                    .set_create_revision(&candidate.id, &key.key, revision)
                    .unwrap_or_default();
                return Ok((revision, gone));
            }
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
            "etcd key {} keeps existing after deletion",
            key.key
        )))
    }

    /// Deletes `key` only if it is the term with create revision `revision`: never anyone
    /// else's key, never a newer term of the same candidate, even if the request lands late.
    pub(crate) async fn delete_own(&self, key: &str, revision: i64) -> Result<()> {
        let delete = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key, None)]);
        self.request(self.client.clone().txn(delete)).await?;
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

    /// Waits until no key of the election has a create revision below `revision`,
    /// watching only the predecessor's deletion. Fails if lease `lease` of `slot` is lost
    /// meanwhile.
    pub(crate) async fn wait_for_predecessors(
        &self,
        prefix: &str,
        revision: i64,
        slot: &LeaseSlot,
        lease: i64,
    ) -> Result<()> {
        let mut lease_changes = slot.subscribe();
        loop {
            if *lease_changes.borrow_and_update() != lease {
                return Err(Error::TermGone);
            }
            let options = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(revision - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let response = self
                .request(self.client.clone().get(prefix, Some(options)))
                .await?;
            let Some(predecessor) = response.kvs().first() else {
                return Ok(());
            };
            let predecessor = predecessor.key().to_vec();
            let from = response.header().map_or(0, |h| h.revision()) + 1;
            debug!(
                predecessor = %String::from_utf8_lossy(&predecessor),
                "waiting for the predecessor's deletion"
            );
            let options = WatchOptions::new()
                .with_start_revision(from)
                .with_filters([WatchFilterType::NoPut]);
            let mut watch = self
                .request(self.client.clone().watch(predecessor, Some(options)))
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
                if message
                    .events()
                    .iter()
                    .any(|event| event.event_type() == EventType::Delete)
                {
                    break;
                }
            }
        }
    }

    /// The revision at which `key` exists with `revision` and its lease, or `None` if it
    /// does not (etcd-io/etcd#11051: a campaign whose lease expired while it waited must
    /// not report success). A linearizable read (etcd's default): it sees every change
    /// that etcd committed before it was sent, whichever member answers.
    pub(crate) async fn key_is_ours(
        &self,
        key: &CandidateKey,
        revision: i64,
    ) -> Result<Option<i64>> {
        let response = self
            .request(self.client.clone().get(key.key.as_str(), None))
            .await?;
        let ours = response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == revision && kv.lease() == key.lease);
        Ok(ours.then(|| response.header().map_or(0, |h| h.revision())))
    }

    /// Confirms, after a keep-alive, that `key`'s term still exists: a linearizable read
    /// finds the key with the term's create revision and lease. [`Error::TermGone`] if it
    /// does not; then the term's token is cancelled too. Renewals never take the watch of
    /// held keys for this: it can report a deletion, never that there was none.
    pub(crate) async fn confirm_key(&self, key: &CandidateKey) -> Result<()> {
        let token = key.create_revision;
        if self.key_is_ours(key, token).await?.is_some() {
            return Ok(());
        }
        warn!(key = %key.key, fencing_token = token, "the key of a held term is gone");
        self.end_term(token);
        key.gone.cancel();
        Err(Error::TermGone)
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

    fn key(name: &str, revision: i64) -> CandidateKey {
        CandidateKey {
            key: name.to_owned(),
            lease: 1,
            slot: crate::lease::Leases::new().slot(1),
            create_revision: revision,
            gone: CancellationToken::new(),
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
        keys.set_create_revision("b", "e/1_1", 7);
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
        let first = keys.set_create_revision("a", "e/1", 5).expect("a's key");
        first.cancel();
        let unknown = keys.set_create_revision("a", "e/1", 0).expect("a's key");
        assert!(!unknown.is_cancelled());
        let second = keys.set_create_revision("a", "e/1", 9).expect("a's key");
        assert!(!second.is_cancelled());
        assert!(keys.set_create_revision("a", "e/other", 9).is_none());
    }
}
