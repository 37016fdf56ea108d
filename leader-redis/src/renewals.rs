//! Renewals per process, not per election: one script call renews every term the driver
//! holds (on one server), and a renewal that a recent call already covered is answered
//! from it.
//!
//! A term's renewal asks for a confirmation newer than its last one. If a batch sent at
//! most a sixth of the term's TTL ago renewed it (owner and fencing token compared in the
//! script, expiry set to the full TTL from then), that batch's send time is the answer:
//! the key lives until at least then + TTL, as the `Driver` contract asks. Otherwise the
//! renewal sends a batch with every held term whose confirmation is that old, so the terms
//! about to ask find theirs ready. With terms renewing every third of their TTL, a driver
//! sends about one call per third of a TTL, however many elections it holds.
//!
//! A term that its election stopped asking to renew (it ended without a resignation
//! reaching the store yet) is left out of other terms' calls half a TTL after its last
//! request: its key then expires at most one and a half TTLs after that, instead of one.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// The most keys in one call (the script's arguments are three per key).
pub(crate) const BATCH: usize = 1000;

/// One term this driver holds, by its leader key.
struct Held {
    owner: String,
    token: u64,
    ttl: Duration,
    /// Send time of the last request that renewed (or granted) it.
    confirmed: Instant,
    /// When its election last asked for a renewal (or was granted).
    asked: Instant,
    /// A renewal found it gone.
    gone: bool,
}

/// A term to renew in a batch: its leader key, owner, fencing token and TTL.
#[derive(Debug, Clone)]
pub(crate) struct Due {
    pub(crate) key: String,
    pub(crate) owner: String,
    pub(crate) token: u64,
    pub(crate) ttl: Duration,
}

/// What the cache says of a term's renewal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cached {
    /// Renewed by a recent batch sent at this instant.
    Renewed(Instant),
    /// A batch found it gone.
    Gone,
    /// Nothing recent enough: send a batch.
    Miss,
}

#[derive(Default)]
pub(crate) struct Renewals {
    terms: Mutex<BTreeMap<String, Held>>,
    /// One batch at a time: renewals that arrive meanwhile wait, and most then find theirs
    /// in the cache.
    pub(crate) batch: tokio::sync::Mutex<()>,
}

impl Renewals {
    fn terms(&self) -> MutexGuard<'_, BTreeMap<String, Held>> {
        self.terms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Term `token` of `owner` on `key` was granted by a request sent at `confirmed`.
    pub(crate) fn hold(
        &self,
        key: &str,
        owner: &str,
        token: u64,
        ttl: Duration,
        confirmed: Instant,
    ) {
        self.terms().insert(
            key.to_owned(),
            Held {
                owner: owner.to_owned(),
                token,
                ttl,
                confirmed,
                asked: Instant::now(),
                gone: false,
            },
        );
    }

    /// `owner` no longer holds term `token` (any term, if `None`) on `key`: it resigned,
    /// or withdrew.
    pub(crate) fn release(&self, key: &str, owner: &str, token: Option<u64>) {
        let mut terms = self.terms();
        if terms
            .get(key)
            .is_some_and(|held| held.owner == owner && token.is_none_or(|t| t == held.token))
        {
            terms.remove(key);
        }
    }

    /// Term `token` of `owner` on `key`, last confirmed at `after`, asks to be renewed.
    pub(crate) fn ask(
        &self,
        key: &str,
        owner: &str,
        token: u64,
        ttl: Duration,
        after: Instant,
    ) -> Cached {
        let now = Instant::now();
        let mut terms = self.terms();
        // Looked up before inserting: a held term (the usual case) costs no key copy.
        if !terms.contains_key(key) {
            terms.insert(
                key.to_owned(),
                Held {
                    owner: owner.to_owned(),
                    token,
                    ttl,
                    confirmed: after,
                    asked: now,
                    gone: false,
                },
            );
        }
        let Some(held) = terms.get_mut(key) else {
            return Cached::Miss;
        };
        if held.owner != owner || held.token != token {
            // Another term of this key (a newer one of another candidate of this driver):
            // this one is not held here any more.
            return Cached::Gone;
        }
        held.asked = now;
        if held.gone {
            Cached::Gone
        } else if held.confirmed > after && now.saturating_duration_since(held.confirmed) <= ttl / 6
        {
            Cached::Renewed(held.confirmed)
        } else {
            Cached::Miss
        }
    }

    /// The other terms a call sent now renews besides `key`'s (at most `limit`): every
    /// held term whose election asks for renewals (it did within half a TTL: it asks every
    /// third of one) and whose confirmation is older than a sixth of its TTL.
    pub(crate) fn due(&self, key: &str, limit: usize) -> Vec<Due> {
        let now = Instant::now();
        let mut terms = self.terms();
        // Forget terms nobody asked about for two TTLs: their elections ended them.
        terms.retain(|_, held| now.saturating_duration_since(held.asked) < held.ttl * 2);
        terms
            .iter()
            .filter(|(held_key, held)| {
                let stale = now.saturating_duration_since(held.confirmed) > held.ttl / 6;
                let asking = now.saturating_duration_since(held.asked) < held.ttl / 2;
                held_key.as_str() != key && stale && asking && !held.gone
            })
            .take(limit)
            .map(|(held_key, held)| Due {
                key: held_key.clone(),
                owner: held.owner.clone(),
                token: held.token,
                ttl: held.ttl,
            })
            .collect()
    }

    /// A batch sent at `sent_at` renewed the terms of `batch` where `renewed` says so.
    pub(crate) fn record(&self, batch: &[Due], renewed: &[bool], sent_at: Instant) {
        let mut terms = self.terms();
        for (due, renewed) in batch.iter().zip(renewed) {
            if let Some(held) = terms.get_mut(&due.key)
                && held.owner == due.owner
                && held.token == due.token
            {
                if *renewed {
                    held.confirmed = held.confirmed.max(sent_at);
                } else {
                    held.gone = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_recent_batch_answers_and_a_stale_one_does_not() {
        let renewals = Renewals::default();
        let ttl = Duration::from_secs(3);
        let granted = Instant::now();
        renewals.hold("a", "me", 7, ttl, granted);
        renewals.hold("b", "me", 9, ttl, granted);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(renewals.ask("a", "me", 7, ttl, granted), Cached::Miss);
        // b asked too (it would soon): as stale, it goes in the same call.
        assert_eq!(renewals.ask("b", "me", 9, ttl, granted), Cached::Miss);
        let mut due = vec![Due {
            key: "a".into(),
            owner: "me".into(),
            token: 7,
            ttl,
        }];
        due.extend(renewals.due("a", 10));
        assert_eq!(due.len(), 2, "b is as stale: renewed in the same call");
        let sent = Instant::now();
        renewals.record(&due, &[true, true], sent);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            renewals.ask("a", "me", 7, ttl, granted),
            Cached::Renewed(sent)
        );
        assert_eq!(
            renewals.ask("b", "me", 9, ttl, granted),
            Cached::Renewed(sent)
        );
        // Older than a sixth of the TTL: no longer an answer.
        tokio::time::advance(ttl / 6).await;
        assert_eq!(renewals.ask("a", "me", 7, ttl, sent), Cached::Miss);
        // Only a confirmation newer than the caller's counts.
        assert_eq!(
            renewals.ask("a", "me", 7, ttl, Instant::now()),
            Cached::Miss
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gone_and_replaced_terms_are_gone_and_abandoned_ones_are_not_renewed() {
        let renewals = Renewals::default();
        let ttl = Duration::from_secs(3);
        let granted = Instant::now();
        renewals.hold("a", "me", 7, ttl, granted);
        renewals.hold("b", "me", 9, ttl, granted);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(renewals.ask("b", "me", 9, ttl, granted), Cached::Miss);
        let due = renewals.due("a", 10);
        assert_eq!(due.len(), 1);
        renewals.record(&due, &[false], Instant::now());
        assert_eq!(renewals.ask("b", "me", 9, ttl, granted), Cached::Gone);
        // A newer term of another candidate on the same key replaces ours.
        renewals.hold("a", "you", 8, ttl, Instant::now());
        assert_eq!(renewals.ask("a", "me", 7, ttl, granted), Cached::Gone);
        // "a" (you) is no longer asked about: after half a TTL it is left out.
        tokio::time::advance(ttl / 2 + Duration::from_millis(1)).await;
        renewals.hold("c", "me", 11, ttl, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            renewals.due("c", 10).is_empty(),
            "nothing else is asked for"
        );
        renewals.release("c", "me", Some(10));
        assert_eq!(
            renewals.ask("c", "me", 11, ttl, Instant::now()),
            Cached::Miss,
            "a release of another term leaves this one"
        );
        renewals.release("c", "me", Some(11));
        assert_eq!(
            renewals.ask("c", "me", 11, ttl, Instant::now()),
            Cached::Miss,
            "a released term is registered again when asked"
        );
    }
}
