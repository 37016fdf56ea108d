//! Candidates' keys: naming them, creating them (a new create revision per term), deleting
//! only one's own, and waiting for the predecessors in line.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use leader_core::{CancellationToken, Candidate, Error, Result};
use tracing::{debug, warn};

use crate::error::{unexpected, watch_cancelled};
use crate::io::{Compare, Op, OpResult, Range, Sort, Txn, WatchRequest, lease_not_found};
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
    /// The predecessor was deleted at this revision, and neither the waiter's own key nor
    /// the election's nomination was touched before it.
    Lead(i64),
    /// The waiter's own key was deleted or written: the wait proves nothing about it.
    Look,
    /// The nomination changed (a handover, or its end) at or before the predecessor's
    /// deletion: read again.
    Reread,
}

/// `events`: (deleted, key, revision), in revision order, every event of a revision in one
/// message. Any change of `own` at or before the predecessor's deletion (at the same
/// revision too: a prefix delete, a lease revoked) spoils the proof; so does any change of
/// the `nomination` (a handover deletes the leader's key and nominates in one revision).
fn step<'a>(
    events: impl IntoIterator<Item = (bool, &'a [u8], i64)>,
    predecessor: &[u8],
    own: &[u8],
    nomination: &[u8],
) -> Step {
    let mut lead = None;
    for (deleted, key, revision) in events {
        let before_lead = lead.is_none_or(|at| revision <= at);
        if key == own && before_lead {
            return Step::Look;
        }
        if key == nomination && before_lead {
            return Step::Reread;
        }
        if key == predecessor && deleted && lead.is_none() {
            lead = Some(revision);
        }
    }
    lead.map_or(Step::Wait, Step::Lead)
}

/// How a wait in line ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waited {
    /// This candidate leads: its key stands with its create revision and lease at this
    /// revision, with nothing ahead of it.
    Lead(i64),
    /// Its key's create revision is below a term elected before (a handover passed it
    /// over): its next term would not get a higher fencing token, so it creates its key
    /// again (a new create revision) and waits anew.
    Recreate,
}

/// The key of the election's nomination (`<prefix><election>\0nominee`), given the
/// election's prefix `<prefix><election>/`: a handover puts it, on a lease of its own that
/// lasts one TTL; its value is the nominee's key, a newline, and the handing leader's
/// fencing token. It sorts before every key of the election, so that one watch range can
/// span it and the keys of the line.
pub(crate) fn nomination_key(prefix: &str) -> String {
    let election = prefix.strip_suffix('/').unwrap_or(prefix);
    format!("{election}\0nominee")
}

/// The key that records the fencing token of the last term elected out of line (by a
/// nomination): keys created before it are passed over and create their key again before
/// they lead, so that fencing tokens keep increasing. No lease; the next leader elected in
/// line deletes it (every key then has a higher create revision).
pub(crate) fn marker_key(prefix: &str) -> String {
    let election = prefix.strip_suffix('/').unwrap_or(prefix);
    format!("{election}\0elected")
}

/// The value of a nomination of `nominee_key` by the term `token`.
pub(crate) fn nomination_value(nominee_key: &str, token: i64) -> String {
    format!("{nominee_key}\n{token}")
}

/// The nominee's key and the handing leader's token, from a nomination's value.
pub(crate) fn parse_nomination(value: &[u8]) -> Option<(String, i64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (key, token) = text.rsplit_once('\n')?;
    Some((key.to_owned(), token.parse().ok()?))
}

/// The token in a marker's value (0 if none or unreadable).
pub(crate) fn parse_marker(value: &[u8]) -> i64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
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
                .when([Compare::create_revision(key.key.as_str(), 0)])
                .and_then([
                    Op::put(key.key.as_str(), candidate.value.as_slice(), key.lease),
                    Op::put(
                        side_key(&key.key, Side::Id),
                        candidate.id.as_str(),
                        key.lease,
                    ),
                    Op::put(side_key(&key.key, Side::Guard), "", attempt),
                ])
                .or_else([Op::get(key.key.as_str())]);
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
                return Ok((revision, gone));
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
            deletes.push(Op::delete(side_key(key, Side::Id)));
            deletes.push(Op::delete(side_key(key, Side::Guard)));
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
            .and_then([
                Op::delete(side_key(key, Side::Id)),
                Op::delete(side_key(key, Side::Guard)),
            ]);
        self.request(self.io.txn(leftovers)).await?;
        Ok(())
    }

    /// The create revision of `key` if it exists on this candidate's lease: what a
    /// withdrawal whose term is unknown (a create whose answer never came) deletes, by
    /// that exact revision.
    pub(crate) async fn own_revision(&self, key: &CandidateKey) -> Result<Option<i64>> {
        let (response, _) = self
            .request(self.io.range(Range::key(key.key.as_str())))
            .await?;
        Ok(response
            .kvs
            .first()
            .filter(|kv| kv.lease == key.lease && kv.create_revision > 0)
            .map(|kv| kv.create_revision))
    }

    /// Waits until this candidate leads: no key of the election has a create revision below
    /// `revision` (the create revision of `own`) and no nomination names another key, or a
    /// nomination names `own`. Watches only the predecessor's deletion (and the
    /// nomination). Fails if lease `lease` of `slot` is lost meanwhile.
    ///
    /// Returns the revision at which `own` is known to exist with this term's create
    /// revision and lease, with nothing ahead of it. Each read (a transaction) reads the
    /// keys below, `own`, the nomination and the marker at one revision. Keys below a
    /// waiter can only disappear (every new key gets a higher create revision), so when the
    /// predecessor was the only key below, its deletion at revision R leaves none, and the
    /// same watch (over both keys and the nomination, in revision order, every event of R
    /// included) shows `own` neither deleted nor overwritten and no nomination made up to
    /// R: no read is needed after it. With several below, it reads again once its
    /// predecessor goes.
    ///
    /// Nominations ([`Driver::hand_over`](leader_core::Driver::hand_over)): while one names
    /// another key, nobody else leads, and a waiter with nothing below it waits for the
    /// nomination's end (its deletion or expiry). The nominee leads even when it is not the
    /// lowest: in one transaction it ends the nomination and records its create revision
    /// in the marker. A key created before the marker's term ([`Waited::Recreate`]) creates
    /// itself again before it could lead, so fencing tokens keep increasing.
    pub(crate) async fn wait_for_predecessors(
        &self,
        prefix: &str,
        own: &str,
        revision: i64,
        slot: &LeaseSlot,
        lease: i64,
    ) -> Result<Waited> {
        let nomination = nomination_key(prefix);
        let marker = marker_key(prefix);
        let mut lease_changes = slot.subscribe();
        loop {
            if *lease_changes.borrow_and_update() != lease {
                return Err(Error::TermGone);
            }
            // Two at most: enough to tell "the only one below" from "one of several"; and
            // this candidate's own key, the nomination and the marker, at the same revision.
            let below = Range::prefix(prefix)
                .max_create_revision(revision - 1)
                .sort(Sort::CreateDescend)
                .limit(2);
            let read = Txn::new().and_then([
                Op::Get(below),
                Op::get(own),
                Op::get(nomination.as_str()),
                Op::get(marker.as_str()),
            ]);
            let response = self.request(self.io.txn(read)).await?;
            let at = response.revision;
            let (below, mine, nominated, marked) = match response.results.as_slice() {
                [
                    OpResult::Get(below),
                    OpResult::Get(mine),
                    OpResult::Get(nominated),
                    OpResult::Get(marked),
                ] => (
                    below.clone(),
                    mine.clone(),
                    nominated.clone(),
                    marked.clone(),
                ),
                _ => return Err(unexpected("etcd answered a read with other operations")),
            };
            let ours = mine
                .kvs
                .first()
                .is_some_and(|kv| kv.create_revision == revision && kv.lease == lease);
            if !ours {
                warn!(key = %own, "campaign key vanished while waiting (deleted, or the lease expired?)");
                return Err(Error::TermGone);
            }
            let passed = marked
                .kvs
                .first()
                .map_or(0, |kv| parse_marker(kv.value.as_slice()));
            if let Some(kv) = nominated.kvs.first() {
                let named = parse_nomination(kv.value.as_slice());
                match named {
                    Some((key, token)) if key == own => {
                        if revision <= token {
                            debug!(key = %own, "nominated, but created before the handing term: creating the key again");
                            return Ok(Waited::Recreate);
                        }
                        // Lead on the nomination: end it and record this term as elected
                        // out of line, only while it still names this key and the key stands.
                        let elect = Txn::new()
                            .when([
                                Compare::create_revision(nomination.as_str(), kv.create_revision),
                                Compare::create_revision(own, revision),
                                Compare::lease(own, lease),
                            ])
                            .and_then([
                                Op::delete(nomination.as_str()),
                                Op::put(marker.as_str(), revision.to_string(), 0),
                            ]);
                        let elected = self.request(self.io.txn(elect)).await?;
                        if elected.succeeded {
                            return Ok(Waited::Lead(if elected.revision > 0 {
                                elected.revision
                            } else {
                                at
                            }));
                        }
                        continue;
                    }
                    _ => {
                        // Another candidate is nominated: nobody else leads until the
                        // nomination ends (the nominee elected or withdrawn, or expiry).
                        debug!(key = %own, "waiting for the nomination to end");
                        self.wait_for_change(&nomination, at + 1, &mut lease_changes, lease)
                            .await?;
                        continue;
                    }
                }
            }
            let Some(predecessor) = below.kvs.first() else {
                if revision < passed {
                    debug!(key = %own, "passed over by a handover: creating the key again");
                    return Ok(Waited::Recreate);
                }
                self.drop_moot_marker(&marker, passed).await;
                // None below, no nomination, and ours there, at one revision.
                return Ok(Waited::Lead(at));
            };
            let sole = below.kvs.len() == 1 && !below.more;
            let predecessor = predecessor.key.clone();
            let from = at + 1;
            debug!(
                predecessor = %String::from_utf8_lossy(&predecessor),
                sole,
                "waiting for the predecessor's deletion"
            );
            // The predecessor alone (and the nomination, on a second watch of the same
            // stream); or, when it is the only key below, the range from the nomination
            // (which sorts before every key of the election) to the higher of the two keys,
            // to see all three in one ordered stream.
            let own = own.as_bytes();
            let mut watch = if sole {
                let high = if predecessor.as_slice() < own {
                    own.to_vec()
                } else {
                    predecessor.clone()
                };
                let mut end = high;
                end.push(0);
                let range = WatchRequest {
                    end: Some(end),
                    ..WatchRequest::key(0, nomination.clone(), from)
                };
                self.watches
                    .subscribe(&self.io, self.request_timeout, vec![range])
            } else {
                let deletions = WatchRequest {
                    no_put: true,
                    ..WatchRequest::key(0, predecessor.clone(), from)
                };
                self.watches.subscribe(
                    &self.io,
                    self.request_timeout,
                    vec![deletions, WatchRequest::key(0, nomination.clone(), from)],
                )
            };
            loop {
                let message = tokio::select! {
                    // Biased: a fixed order keeps the simulation deterministic.
                    biased;
                    message = watch.message() => message?,
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
                if message.canceled {
                    if message.compact_revision > 0 {
                        // The start revision was compacted away: look again, from now.
                        debug!(
                            compact_revision = message.compact_revision,
                            "the predecessor's watch was compacted; reading again"
                        );
                        break;
                    }
                    // Anything else (a refusal, the member losing its leader) is an error
                    // for the caller to retry with backoff, not a reason to look again now.
                    return Err(watch_cancelled(&message.cancel_reason));
                }
                let events = message.events.iter().map(|event| {
                    (
                        event.deleted,
                        event.kv.key.as_slice(),
                        event.kv.mod_revision,
                    )
                });
                match step(events, &predecessor, own, nomination.as_bytes()) {
                    Step::Wait => {}
                    // Ours was deleted or written: unless it is still this term's key,
                    // the term is gone; else look again.
                    Step::Look => {
                        if !self.key_is_ours_by_name(own, revision, lease).await? {
                            return Err(Error::TermGone);
                        }
                        break;
                    }
                    Step::Reread => break,
                    Step::Lead(at) if sole => {
                        self.drop_moot_marker(&marker, passed).await;
                        return Ok(Waited::Lead(at));
                    }
                    Step::Lead(_) => break,
                }
            }
        }
    }

    /// Deletes the marker `marker` if it still records the term `passed` (0: none): called
    /// by a candidate that leads in line, whose key's create revision is above it, as are
    /// all keys of the election from now on, so that the marker is moot. Best effort: a
    /// marker left behind only costs the next leader in line the same attempt.
    async fn drop_moot_marker(&self, marker: &str, passed: i64) {
        if passed <= 0 {
            return;
        }
        let moot = Txn::new()
            .when([Compare::value(marker, passed.to_string())])
            .and_then([Op::delete(marker)]);
        if let Err(err) = self.request(self.io.txn(moot)).await {
            debug!(error = %crate::error::ErrorChain(&err), "could not delete the handover marker");
        }
    }

    /// Waits for any change of `key` from revision `from` on (or for the loss of lease
    /// `lease`, as [`Error::TermGone`]).
    async fn wait_for_change(
        &self,
        key: &str,
        from: i64,
        lease_changes: &mut tokio::sync::watch::Receiver<i64>,
        lease: i64,
    ) -> Result<()> {
        let mut watch = self.watches.subscribe(
            &self.io,
            self.request_timeout,
            vec![WatchRequest::key(0, key, from)],
        );
        loop {
            let message = tokio::select! {
                // Biased: a fixed order keeps the simulation deterministic.
                biased;
                message = watch.message() => message?,
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
            if message.canceled {
                if message.compact_revision > 0 {
                    return Ok(());
                }
                return Err(watch_cancelled(&message.cancel_reason));
            }
            if !message.events.is_empty() {
                return Ok(());
            }
        }
    }

    /// Whether `own` exists with create revision `revision` on lease `lease` now (a
    /// linearizable read).
    async fn key_is_ours_by_name(&self, own: &[u8], revision: i64, lease: i64) -> Result<bool> {
        let (response, _) = self.request(self.io.range(Range::key(own))).await?;
        Ok(response
            .kvs
            .first()
            .is_some_and(|kv| kv.create_revision == revision && kv.lease == lease))
    }
}

/// The error of a key that was created again and still found itself passed over.
pub(crate) fn unexpected_recreate(key: &str) -> Error {
    unexpected(format!(
        "etcd key {key} was created again after a handover and is still below the last term"
    ))
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
        let (pred, own, nom) = (
            b"e/a".as_slice(),
            b"e/b".as_slice(),
            b"e\0nominee".as_slice(),
        );
        let e =
            |deleted: bool, key: &'static str, revision: i64| (deleted, key.as_bytes(), revision);
        assert_eq!(step([e(true, "e/a", 9)], pred, own, nom), Step::Lead(9));
        assert_eq!(step([e(false, "e/a", 9)], pred, own, nom), Step::Wait);
        assert_eq!(
            step([e(false, "e/ab", 8), e(true, "e/ab", 9)], pred, own, nom),
            Step::Wait,
            "other keys in the watched range do not matter"
        );
        assert_eq!(
            step([e(true, "e/b", 8), e(true, "e/a", 9)], pred, own, nom),
            Step::Look,
            "ours went first"
        );
        assert_eq!(
            step([e(false, "e/b", 8), e(true, "e/a", 9)], pred, own, nom),
            Step::Look,
            "ours was overwritten first"
        );
        assert_eq!(
            step([e(true, "e/a", 9), e(true, "e/b", 10)], pred, own, nom),
            Step::Lead(9),
            "ours went after: the watch of held keys reports it"
        );
        assert_eq!(
            step([e(true, "e/a", 9), e(true, "e/b", 9)], pred, own, nom),
            Step::Look,
            "ours went in the same revision (a prefix delete, a revoked lease)"
        );
        assert_eq!(
            step(
                [e(true, "e/a", 9), e(false, "e\0nominee", 9)],
                pred,
                own,
                nom
            ),
            Step::Reread,
            "a handover: the leader's key deleted and a nomination made in one revision"
        );
        assert_eq!(
            step(
                [e(true, "e/a", 9), e(false, "e\0nominee", 10)],
                pred,
                own,
                nom
            ),
            Step::Lead(9),
            "a nomination after the predecessor's deletion comes too late to matter"
        );
    }

    #[test]
    fn nominations_and_markers_read_back() {
        assert_eq!(nomination_key("p/e/"), "p/e\0nominee");
        assert_eq!(marker_key("p/e/"), "p/e\0elected");
        let value = nomination_value("p/e/1f", 42);
        assert_eq!(
            parse_nomination(value.as_bytes()),
            Some(("p/e/1f".into(), 42))
        );
        assert_eq!(parse_nomination(b"junk"), None);
        assert_eq!(parse_marker(b"17"), 17);
        assert_eq!(parse_marker(b"x"), 0);
        assert_eq!(side_key("p/e/1f_1", Side::Id), "p/e\0id\x001f_1");
        assert!(nomination_key("p/e/").as_str() < "p/e/");
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
