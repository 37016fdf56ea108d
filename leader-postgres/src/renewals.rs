//! Renewals per process, not per election: one statement renews every term the driver
//! holds, each still compared by holder and fencing token in the statement.
//!
//! A term asks for a confirmation newer than its last one. If a batch sent at most a sixth
//! of the term's TTL ago renewed it, that batch's send time is the answer (the row then
//! lives until at least that send time plus the TTL, by the server's clock, as the
//! `Driver` contract asks). Otherwise the term sends a batch with every held term whose
//! confirmation is that old, so that the terms about to ask find theirs ready. With terms
//! renewing every third of their TTL, a driver sends about one statement per third of a
//! TTL however many elections it holds.
//!
//! A term whose election stopped asking (it ended without a resignation reaching the
//! store yet) is left out of other terms' batches half a TTL after it last asked, so its
//! row expires at most one and a half TTLs after that; it is forgotten after two.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::io::Renewal as Due;

/// The most terms in one statement.
pub(crate) const BATCH: usize = 5000;

/// One term this driver holds, by its candidate id.
struct Held {
    election: String,
    token: u64,
    ttl: Duration,
    /// Send time of the last statement that renewed (or granted) it.
    confirmed: Instant,
    /// When its election last asked for a renewal (or was granted).
    asked: Instant,
    /// A batch found it gone.
    gone: bool,
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

    /// `holder` was granted term `token` of `election` by a statement sent at `confirmed`.
    pub(crate) fn hold(
        &self,
        election: &str,
        holder: &str,
        token: u64,
        ttl: Duration,
        confirmed: Instant,
    ) {
        self.terms().insert(
            holder.to_owned(),
            Held {
                election: election.to_owned(),
                token,
                ttl,
                confirmed,
                asked: Instant::now(),
                gone: false,
            },
        );
    }

    /// `holder` no longer holds term `token` (any term, if `None`): it resigned, handed
    /// over or withdrew.
    pub(crate) fn release(&self, holder: &str, token: Option<u64>) {
        let mut terms = self.terms();
        if terms
            .get(holder)
            .is_some_and(|held| token.is_none_or(|t| t == held.token))
        {
            terms.remove(holder);
        }
    }

    /// Term `token` of `holder` in `election`, last confirmed at `after`, asks to be
    /// renewed.
    pub(crate) fn ask(
        &self,
        election: &str,
        holder: &str,
        token: u64,
        ttl: Duration,
        after: Instant,
    ) -> Cached {
        let now = Instant::now();
        let mut terms = self.terms();
        let held = terms.entry(holder.to_owned()).or_insert_with(|| Held {
            election: election.to_owned(),
            token,
            ttl,
            confirmed: after,
            asked: now,
            gone: false,
        });
        if held.token != token {
            // Another term of this candidate: this one is not held any more.
            return if token > held.token {
                *held = Held {
                    election: election.to_owned(),
                    token,
                    ttl,
                    confirmed: after,
                    asked: now,
                    gone: false,
                };
                Cached::Miss
            } else {
                Cached::Gone
            };
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

    /// The terms a statement sent now renews besides `holder`'s (at most `limit`): every
    /// held term whose election asks for renewals (it did within half a TTL: it asks every
    /// third of one) and whose confirmation is older than a sixth of its TTL.
    pub(crate) fn due(&self, holder: &str, limit: usize) -> Vec<Due> {
        let now = Instant::now();
        let mut terms = self.terms();
        // Forget terms nobody asked about for two TTLs: their elections ended them.
        terms.retain(|_, held| now.saturating_duration_since(held.asked) < held.ttl * 2);
        terms
            .iter()
            .filter(|(id, held)| {
                let stale = now.saturating_duration_since(held.confirmed) > held.ttl / 6;
                let asking = now.saturating_duration_since(held.asked) < held.ttl / 2;
                id.as_str() != holder && stale && asking && !held.gone
            })
            .take(limit)
            .map(|(id, held)| Due {
                election: held.election.clone(),
                holder: id.clone(),
                token: held.token,
                ttl: held.ttl,
            })
            .collect()
    }

    /// A statement sent at `sent_at` renewed the terms of `batch` whose holders are in
    /// `renewed`; the others are gone.
    pub(crate) fn record(&self, batch: &[Due], renewed: &[String], sent_at: Instant) {
        let mut terms = self.terms();
        for due in batch {
            if let Some(held) = terms.get_mut(&due.holder)
                && held.token == due.token
            {
                if renewed.contains(&due.holder) {
                    held.confirmed = held.confirmed.max(sent_at);
                } else {
                    held.gone = true;
                }
            }
        }
    }

    /// How many terms are held (for tests and memory checks).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.terms().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(election: &str, holder: &str, token: u64, ttl: Duration) -> Due {
        Due {
            election: election.into(),
            holder: holder.into(),
            token,
            ttl,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_recent_batch_answers_and_a_stale_one_does_not() {
        let renewals = Renewals::default();
        let ttl = Duration::from_secs(3);
        let granted = Instant::now();
        renewals.hold("a", "me", 7, ttl, granted);
        renewals.hold("b", "you", 9, ttl, granted);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(renewals.ask("a", "me", 7, ttl, granted), Cached::Miss);
        assert_eq!(renewals.ask("b", "you", 9, ttl, granted), Cached::Miss);
        let mut batch = vec![due("a", "me", 7, ttl)];
        batch.extend(renewals.due("me", 10));
        assert_eq!(
            batch.len(),
            2,
            "b is as stale: renewed in the same statement"
        );
        let sent = Instant::now();
        renewals.record(&batch, &["me".to_owned(), "you".to_owned()], sent);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            renewals.ask("a", "me", 7, ttl, granted),
            Cached::Renewed(sent)
        );
        assert_eq!(
            renewals.ask("b", "you", 9, ttl, granted),
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
    async fn gone_replaced_and_abandoned_terms() {
        let renewals = Renewals::default();
        let ttl = Duration::from_secs(3);
        let granted = Instant::now();
        renewals.hold("a", "me", 7, ttl, granted);
        renewals.hold("b", "you", 9, ttl, granted);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(renewals.ask("b", "you", 9, ttl, granted), Cached::Miss);
        let batch = renewals.due("me", 10);
        assert_eq!(batch, vec![due("b", "you", 9, ttl)]);
        renewals.record(&batch, &[], Instant::now());
        assert_eq!(renewals.ask("b", "you", 9, ttl, granted), Cached::Gone);
        // A newer term of the same candidate replaces the old one.
        assert_eq!(renewals.ask("b", "you", 10, ttl, granted), Cached::Miss);
        assert_eq!(renewals.ask("b", "you", 9, ttl, granted), Cached::Gone);
        // "a" stopped asking: after half a TTL it is left out, after two it is forgotten.
        tokio::time::advance(ttl / 2).await;
        assert!(renewals.due("you", 10).is_empty());
        tokio::time::advance(ttl * 2).await;
        renewals.due("you", 10);
        assert_eq!(renewals.len(), 0);
        renewals.hold("c", "me", 11, ttl, Instant::now());
        renewals.release("me", Some(10));
        assert_eq!(renewals.len(), 1, "another term's release leaves it");
        renewals.release("me", Some(11));
        assert_eq!(renewals.len(), 0);
    }
}
