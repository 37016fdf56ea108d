//! Beyond election: the line of candidates, proclaim, planned handover, and writes fenced
//! by the term (`txn_if_leader`).

use std::collections::HashMap;

use etcd_client::{TxnOp, TxnResponse};
use leader_core::{CandidateInfo, Error, LeaderInfo, Result};
use tracing::{debug, info};

use crate::error::{ErrorChain, unexpected};
use crate::io::{Compare, Kv as KeyValue, Op, OpResult, Range, Sort, Txn};
use crate::keys::{
    Side, marker_key, nomination_key, nomination_value, parse_marker, parse_nomination, side_key,
};
use crate::lease::whole_seconds;
use crate::{Inner, lock};

/// An election as etcd holds it, read at one revision.
pub(crate) struct Line {
    /// The keys of the election (`<prefix><election>/…`), by create revision.
    keys: Vec<KeyValue>,
    /// The id side keys' values, by key.
    ids: HashMap<Vec<u8>, String>,
    /// The nominee's key, while a nomination stands.
    nominee: Option<String>,
    /// The token of the last term elected out of line (0: none).
    marker: i64,
    prefix: String,
}

impl Line {
    /// The key that leads: none while a nomination stands (its nominee is about to lead);
    /// else the lowest key not passed over by a handover.
    fn leader(&self) -> Option<&KeyValue> {
        if self.nominee.is_some() {
            return None;
        }
        self.keys
            .iter()
            .find(|kv| kv.create_revision >= self.marker)
    }

    /// The keys in the order they would lead: the leader (or the nominee), then the keys
    /// not passed over, then those passed over (they create their keys again in turn).
    fn ordered(&self) -> Vec<(&KeyValue, bool)> {
        let first = match &self.nominee {
            Some(nominee) => self
                .keys
                .iter()
                .find(|kv| kv.key.as_slice() == nominee.as_bytes()),
            None => self.leader(),
        };
        let is_leader = self.nominee.is_none();
        let mut line: Vec<(&KeyValue, bool)> =
            first.map(|kv| (kv, is_leader)).into_iter().collect();
        let rest = |passed: bool| {
            self.keys.iter().filter(move |kv| {
                (kv.create_revision < self.marker) == passed
                    && first.is_none_or(|first| first.key.as_slice() != kv.key.as_slice())
            })
        };
        line.extend(rest(false).map(|kv| (kv, false)));
        line.extend(rest(true).map(|kv| (kv, false)));
        line
    }

    /// The candidate id of `kv`: its id side key's value, or (a key without one, such as
    /// `etcdctl elect`'s) the key's name after the election prefix (its lease in hex).
    fn id(&self, kv: &KeyValue) -> String {
        self.ids.get(kv.key.as_slice()).cloned().unwrap_or_else(|| {
            String::from_utf8_lossy(
                &kv.key.as_slice()[self.prefix.len().min(kv.key.as_slice().len())..],
            )
            .into_owned()
        })
    }
}

/// The value of an id side key, by the candidate key it belongs to.
fn ids_by_key(prefix: &str, sides: &[KeyValue]) -> HashMap<Vec<u8>, String> {
    let id_prefix = side_key(prefix, Side::Id);
    sides
        .iter()
        .filter_map(|kv| {
            let suffix = kv.key.as_slice().strip_prefix(id_prefix.as_bytes())?;
            let mut key = prefix.as_bytes().to_vec();
            key.extend_from_slice(suffix);
            Some((
                key,
                String::from_utf8_lossy(kv.value.as_slice()).into_owned(),
            ))
        })
        .collect()
}

impl Inner {
    /// Every key of the election whose keys start with `prefix`, with the ids, the
    /// nomination and the marker, at one revision.
    pub(crate) async fn line(&self, prefix: &str) -> Result<Line> {
        let read = Txn::new().and_then([
            Op::Get(Range::prefix(prefix).sort(Sort::CreateAscend)),
            Op::Get(Range::prefix(side_key(prefix, Side::Id))),
            Op::get(nomination_key(prefix)),
            Op::get(marker_key(prefix)),
        ]);
        let response = self.request(self.io.txn(read)).await?;
        match response.results.as_slice() {
            [
                OpResult::Get(keys),
                OpResult::Get(ids),
                OpResult::Get(nomination),
                OpResult::Get(marker),
            ] => Ok(Line {
                keys: keys.kvs.to_vec(),
                ids: ids_by_key(prefix, &ids.kvs),
                nominee: nomination
                    .kvs
                    .first()
                    .and_then(|kv| parse_nomination(kv.value.as_slice()))
                    .map(|(key, _)| key),
                marker: marker
                    .kvs
                    .first()
                    .map_or(0, |kv| parse_marker(kv.value.as_slice())),
                prefix: prefix.to_owned(),
            }),
            _ => Err(unexpected("etcd answered a read with other operations")),
        }
    }

    /// The leader of the election whose keys start with `prefix`, and the revision of the
    /// answer: the lowest key not passed over by a handover; none while a nomination
    /// stands.
    pub(crate) async fn leader_of(&self, prefix: &str) -> Result<(Option<LeaderInfo>, i64)> {
        let lowest = |min: i64| {
            Range::prefix(prefix)
                .sort(Sort::CreateAscend)
                .min_create_revision(min)
                .limit(1)
        };
        let read = Txn::new().and_then([
            Op::Get(lowest(0)),
            Op::get(nomination_key(prefix)),
            Op::get(marker_key(prefix)),
        ]);
        let response = self.request(self.io.txn(read)).await?;
        let revision = response.revision;
        let (first, nominated, marker) = match response.results.as_slice() {
            [
                OpResult::Get(first),
                OpResult::Get(nominated),
                OpResult::Get(marker),
            ] => (
                first.kvs.first().cloned(),
                !nominated.kvs.is_empty(),
                marker
                    .kvs
                    .first()
                    .map_or(0, |kv| parse_marker(kv.value.as_slice())),
            ),
            _ => return Err(unexpected("etcd answered a read with other operations")),
        };
        if nominated {
            return Ok((None, revision));
        }
        let leader = match first {
            Some(kv) if kv.create_revision < marker => {
                // Passed over by a handover: the leader is the lowest key after the marker's.
                let (response, _) = self.request(self.io.range(lowest(marker))).await?;
                response.kvs.first().cloned()
            }
            other => other,
        };
        let leader = leader.map(|kv| {
            LeaderInfo::new(
                String::from_utf8_lossy(&kv.key[prefix.len().min(kv.key.len())..]),
                kv.value.as_slice(),
                u64::try_from(kv.create_revision).unwrap_or(0),
            )
        });
        Ok((leader, revision))
    }

    /// Every candidate of the election whose keys start with `prefix`, the leader first.
    pub(crate) async fn candidates_of(&self, prefix: &str) -> Result<Vec<CandidateInfo>> {
        let line = self.line(prefix).await?;
        Ok(line
            .ordered()
            .into_iter()
            .map(|(kv, is_leader)| CandidateInfo::new(line.id(kv), kv.value.as_slice(), is_leader))
            .collect())
    }

    /// etcd's Proclaim: puts `value` on the key of `candidate`'s term `token`, with its
    /// lease, only while the key stands with that create revision.
    pub(crate) async fn proclaim_value(
        &self,
        candidate: &str,
        token: u64,
        value: &[u8],
    ) -> Result<()> {
        let Some(key) = self.term_key(candidate, token) else {
            return Err(Error::TermGone);
        };
        if key.gone.is_cancelled() {
            return Err(Error::TermGone);
        }
        // The watch of held keys takes this put for ours, not an operator's.
        self.expect_put(key.create_revision, value);
        let txn = Txn::new()
            .when([
                Compare::create_revision(&*key.key, key.create_revision),
                Compare::lease(&*key.key, key.lease),
            ])
            .and_then([Op::put(&*key.key, value, key.lease)]);
        let response = self.request(self.io.txn(txn)).await?;
        if response.succeeded {
            Ok(())
        } else {
            Err(Error::TermGone)
        }
    }

    /// Ends `candidate`'s term `token` and nominates the waiting candidate `nominee`, in
    /// one transaction: deletes the term's key (and its side keys) and puts the
    /// nomination, on a lease of its own of `ttl`, only while the term's key stands with
    /// its create revision and the nominee's key with the create revision seen.
    pub(crate) async fn hand_over_term(
        &self,
        candidate: &str,
        token: u64,
        nominee: &str,
        prefix: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let Some(key) = self.term_key(candidate, token) else {
            return Err(Error::TermGone);
        };
        let not_waiting = || Error::NotWaiting {
            id: nominee.to_owned(),
        };
        let line = self.line(prefix).await?;
        let Some(target) = line
            .keys
            .iter()
            .find(|kv| kv.key.as_slice() != key.key.as_bytes() && line.id(kv) == nominee)
            .cloned()
        else {
            return Err(not_waiting());
        };
        // A candidate of etcdctl or Go (a key without an id side key) ahead of the nominee
        // knows nothing of nominations: it would lead by the lowest key beside the nominee.
        let foreign_ahead = line.keys.iter().any(|kv| {
            kv.create_revision < target.create_revision
                && kv.key.as_slice() != key.key.as_bytes()
                && !line.ids.contains_key(kv.key.as_slice())
        });
        if foreign_ahead {
            return Err(Error::Unsupported {
                operation: "hand_over past a candidate of etcdctl or Go's concurrency package",
            });
        }
        let target_key = String::from_utf8_lossy(target.key.as_slice()).into_owned();
        let seconds = i64::try_from(whole_seconds(ttl)).unwrap_or(i64::MAX);
        let nomination_lease = self.request(self.io.lease_grant(seconds)).await?.id;
        // As for a resignation: the deletion below is no news to the watch of held keys.
        self.release_term(key.create_revision);
        let nomination = nomination_key(prefix);
        let txn = Txn::new()
            .when([
                Compare::create_revision(&*key.key, key.create_revision),
                Compare::create_revision(target_key.as_str(), target.create_revision),
            ])
            .and_then([
                Op::delete(&*key.key),
                Op::delete(side_key(&key.key, Side::Id)),
                Op::delete(side_key(&key.key, Side::Guard)),
                Op::delete(side_key(&key.key, Side::Ttl)),
                Op::put(
                    nomination.as_str(),
                    nomination_value(&target_key, key.create_revision),
                    nomination_lease,
                ),
            ])
            .or_else([Op::get(&*key.key)]);
        let response = self.request(self.io.txn(txn)).await?;
        if response.succeeded {
            info!(key = %key.key, nominee = %target_key, "handed over");
            lock(&self.keys).forget(candidate, &key.key, Some(key.create_revision));
            return Ok(());
        }
        if let Err(err) = self.request(self.io.lease_revoke(nomination_lease)).await {
            debug!(error = %ErrorChain(&err), "could not revoke an unused nomination lease");
        }
        let stands = response.gets().into_iter().any(|get| {
            get.kvs
                .first()
                .is_some_and(|kv| kv.create_revision == key.create_revision)
        });
        if stands {
            Err(not_waiting())
        } else {
            Err(Error::TermGone)
        }
    }

    /// Runs `ops` only while the key of the held term `token` stands with its create
    /// revision.
    pub(crate) async fn txn_if_held(&self, token: u64, ops: Vec<TxnOp>) -> Result<TxnResponse> {
        let held = i64::try_from(token)
            .ok()
            .and_then(|revision| self.held_key(revision));
        let Some(key) = held else {
            return Err(Error::Fenced {
                resource: format!("the etcd key of term {token}"),
                token,
                newer: None,
            });
        };
        let revision = i64::try_from(token).unwrap_or(0);
        let response = self
            .request(self.io.client_txn(&key, revision, ops))
            .await?;
        if let Some(response) = response {
            Ok(response)
        } else {
            Err(Error::Fenced {
                resource: key.to_string(),
                token,
                newer: None,
            })
        }
    }
}
