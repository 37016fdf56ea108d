//! Waiting in line: a waiter watches only its predecessor's deletion (and the
//! nomination), and leads on a proof read from one ordered watch or one read.

use leader_core::{Error, Result};
use tracing::{debug, warn};

use crate::Inner;
use crate::error::{unexpected, watch_cancelled};
use crate::expiry::first_read_after;
use crate::io::{Compare, Op, OpResult, Range, RangeResult, Sort, Txn, TxnResult, WatchRequest};
use crate::keys::{marker_key, nomination_key, parse_marker, parse_nomination};
use crate::lease::LeaseSlot;

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
/// The next message of `watch`, while the candidate's lease stays `lease`: `TermGone` once
/// it changes (or its slot is gone), an error when etcd closes the stream.
/// None when the lease lapsed meanwhile (see `Inner::lapses`): the caller looks at its
/// key's lapses.
async fn next_message(
    watch: &mut crate::watches::Subscription,
    lease_changes: &mut tokio::sync::watch::Receiver<i64>,
    lapses: &mut tokio::sync::watch::Receiver<u64>,
    lease: i64,
) -> Result<Option<crate::io::WatchMessage>> {
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
            changed = lapses.changed() => {
                if changed.is_err() {
                    return Err(Error::TermGone);
                }
                lapses.borrow_and_update();
                return Ok(None);
            }
        };
        return message
            .map(Some)
            .ok_or_else(|| unexpected("etcd closed the watch stream"));
    }
}

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

impl Inner {
    /// Waits until this candidate leads: no key of the election has a create revision below
    /// `revision` (the create revision of `own`) and no nomination names another key, or a
    /// nomination names `own`. Watches only the predecessor's deletion (and the
    /// nomination; third in line, the lowest key's deletion too). Fails if lease `lease` of `slot` is lost meanwhile.
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
    ///
    /// `first`: the first read, if the create's transaction made it (see
    /// [`Inner::create_key`]), in this read's shape.
    pub(crate) async fn wait_for_predecessors(
        &self,
        prefix: &str,
        own: &str,
        revision: i64,
        slot: &LeaseSlot,
        lease: i64,
        (ttl, lapsed, mut first): (std::time::Duration, Option<u32>, Option<TxnResult>),
    ) -> Result<Waited> {
        let nomination = nomination_key(prefix);
        let marker = marker_key(prefix);
        let mut lease_changes = slot.subscribe();
        let mut lapse_changes = slot.subscribe_lapses();
        loop {
            if *lease_changes.borrow_and_update() != lease {
                return Err(Error::TermGone);
            }
            lapse_changes.borrow_and_update();
            if self.lapses(slot, lease, ttl).await != lapsed {
                // The next in line may end this key's term (see `Inner::lapses`).
                debug!(key = %own, "the etcd lease lapsed for a TTL while waiting: creating the key again");
                return Ok(Waited::Recreate);
            }
            let response = match first.take() {
                Some(read) => read,
                None => {
                    // Two at most: enough to tell "the only one below" from "one of
                    // several"; and this candidate's own key, the nomination and the marker,
                    // at the same revision.
                    let below = Range::prefix(prefix)
                        .max_create_revision(revision - 1)
                        .sort(Sort::CreateDescend)
                        .limit(2);
                    let read = Txn::new().and_then(line_reads(below, own, &nomination, &marker));
                    self.request(self.io.txn(read)).await?
                }
            };
            let at = response.revision;
            let Some([below, mine, nominated, marked]) = line_answers(response.results) else {
                return Err(unexpected("etcd answered a read with other operations"));
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
                        self.wait_for_change(
                            &nomination,
                            at + 1,
                            (&mut lease_changes, &mut lapse_changes),
                            lease,
                        )
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
            // The only key below leads: its term ends once its deadline has certainly
            // passed (`crate::expiry`), not at etcd's sweep.
            let target = (
                predecessor.key.clone(),
                predecessor.create_revision,
                predecessor.lease,
            );
            // Third in line (two keys below): the predecessor leads once the lowest key
            // goes, which its deletion's watch would not show; so watch that key's deletion
            // too, and from then on end the predecessor's term as the head would (with a
            // line of three, as with three replicas, every crash failover is then at the
            // deadline, not at the lease's expiry and etcd's sweep). Deeper in line, a
            // waiter learns it only by its predecessor's deletion.
            let lowest = (!sole && below.kvs.len() == 2 && !below.more)
                .then(|| below.kvs.get(1).map(|kv| kv.key.clone()))
                .flatten();
            let heads = tokio::sync::Notify::new();
            if sole {
                heads.notify_one();
            }
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
                let deletions = |key: &[u8]| WatchRequest {
                    no_put: true,
                    ..WatchRequest::key(0, key.to_vec(), from)
                };
                let mut requests = vec![
                    deletions(&predecessor),
                    WatchRequest::key(0, nomination.clone(), from),
                ];
                requests.extend(lowest.as_deref().map(deletions));
                self.watches
                    .subscribe(&self.io, self.request_timeout, requests)
            };
            let mut expiry = std::pin::pin!(async {
                let (key, revision, lease) = &target;
                if sole || lowest.is_some() {
                    heads.notified().await;
                    if *lease != 0 {
                        let first_read = first_read_after(slot.ttl());
                        self.end_expired_term(key, *revision, *lease, first_read)
                            .await;
                    }
                }
                std::future::pending::<()>().await;
            });
            loop {
                let message = tokio::select! {
                    // Biased: a fixed order keeps the simulation deterministic. The expiry
                    // never completes: the watch shows the deletion it makes.
                    biased;
                    message = next_message(&mut watch, &mut lease_changes, &mut lapse_changes, lease) => match message? {
                        Some(message) => message,
                        // Looked at above.
                        None => break,
                    },
                    () = &mut expiry => continue,
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
                if let Some(lowest) = &lowest
                    && message
                        .events
                        .iter()
                        .any(|event| event.deleted && event.kv.key == *lowest)
                {
                    // The predecessor leads now (unless its own deletion is in this
                    // message too: then `step` says so below).
                    heads.notify_one();
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
                    // A key created before the term a handover elected out of line never
                    // leads in line (its fencing token would be below that term's), here
                    // either: it creates its key again, at the head as without a
                    // predecessor above. (`passed` still holds: the marker changes only
                    // with the nomination, which this watch would have shown first.)
                    Step::Lead(_) if sole && revision < passed => {
                        debug!(
                            key = %String::from_utf8_lossy(own),
                            "passed over by a handover: creating the key again"
                        );
                        return Ok(Waited::Recreate);
                    }
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
        (lease_changes, lapses): (
            &mut tokio::sync::watch::Receiver<i64>,
            &mut tokio::sync::watch::Receiver<u64>,
        ),
        lease: i64,
    ) -> Result<()> {
        let mut watch = self.watches.subscribe(
            &self.io,
            self.request_timeout,
            vec![WatchRequest::key(0, key, from)],
        );
        loop {
            let Some(message) = next_message(&mut watch, lease_changes, lapses, lease).await?
            else {
                return Ok(());
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

/// The reads a wait decides on, at one revision: `below` (keys of the line below `own`),
/// `own`, the election's `nomination` and its `marker` keys. The campaign's create sends
/// them too (its answer is the wait's first read): one builder, so that the two never
/// differ.
pub(crate) fn line_reads(below: Range, own: &str, nomination: &str, marker: &str) -> [Op; 4] {
    [
        Op::Get(below),
        Op::get(own),
        Op::get(nomination),
        Op::get(marker),
    ]
}

/// The answers to [`line_reads`], in its order (below, own, nomination, marker); None if
/// `results` are not four reads.
pub(crate) fn line_answers(results: Vec<OpResult>) -> Option<[RangeResult; 4]> {
    let Ok(
        [
            OpResult::Get(below),
            OpResult::Get(own),
            OpResult::Get(nomination),
            OpResult::Get(marker),
        ],
    ) = <[OpResult; 4]>::try_from(results)
    else {
        return None;
    };
    Some([below, own, nomination, marker])
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
}
