//! Candidates' keys as the driver knows them: naming them (one per candidate, unique in
//! the driver), their side keys (id, guard), the election's nomination and marker keys,
//! and the index of each candidate's key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use leader_core::Candidate;

use crate::gone::Gone;
use crate::lease::LeaseSlot;
use crate::{Inner, lock};

/// The key of one candidate: its name, its lease, and the term it holds if known.
#[derive(Clone)]
pub(crate) struct CandidateKey {
    /// Shared with the index of names in use and the held terms: one copy per key.
    pub(crate) key: Arc<str>,
    pub(crate) lease: i64,
    pub(crate) slot: Arc<LeaseSlot>,
    /// The key's create revision (the term's fencing token); 0 while unknown: before the
    /// key is first created, and from the moment a request that may create it is sent
    /// until its answer comes.
    pub(crate) create_revision: i64,
    /// Cancelled when etcd says the term `create_revision` is gone.
    pub(crate) gone: Gone,
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
    /// The most the term's TTL may be, in milliseconds (on the key's lease): what lets the
    /// next in line end the term once its lease has less left than the lease's TTL less
    /// the term's (see [`crate::expiry`]).
    Ttl,
}

impl Side {
    /// Every side key a candidate's key may have: they go when it goes.
    pub(crate) const ALL: [Side; 3] = [Side::Id, Side::Guard, Side::Ttl];
}

/// The side key `kind` of the candidate key `key` (`<prefix><election>/<suffix>`):
/// `<prefix><election>\0id\0<suffix>`, `…\0try\0<suffix>` or `…\0ttl\0<suffix>`. Outside every election's
/// range (`<prefix><name>/`): election names hold no `/`, and neither does the rest. Still
/// under `<prefix><election>`, so one permission on that prefix covers both.
pub(crate) fn side_key(key: &str, kind: Side) -> String {
    let (election, suffix) = key.rsplit_once('/').unwrap_or((key, ""));
    let kind = match kind {
        Side::Id => "id",
        Side::Guard => "try",
        Side::Ttl => "ttl",
    };
    format!("{election}\0{kind}\0{suffix}")
}

/// The value of a term's TTL side key ([`Side::Ttl`]): the candidate's TTL in
/// milliseconds, rounded up (a term's TTL is never longer: see `campaign_term`).
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    let millis = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// The TTL a TTL side key's value says, if it is one ([`ttl_millis`]'s decimal).
pub(crate) fn parse_ttl(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(Duration::from_millis)
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
    /// By candidate id (boxed: no spare capacity kept per entry).
    by_candidate: HashMap<Box<str>, CandidateKey>,
    names: HashSet<Arc<str>>,
}

impl Keys {
    pub(crate) fn get(&self, candidate: &str) -> Option<&CandidateKey> {
        self.by_candidate.get(candidate)
    }

    fn insert(&mut self, candidate: String, key: CandidateKey) {
        let name = Arc::clone(&key.key);
        // Names are unique among candidates: the replaced one was only the old entry's.
        if let Some(old) = self.by_candidate.insert(candidate.into_boxed_str(), key)
            && old.key != name
        {
            self.names.remove(&old.key);
        }
        self.names.insert(name);
    }

    /// Forgets `candidate`'s key if it is still `name`, with `create_revision` if given.
    pub(crate) fn forget(&mut self, candidate: &str, name: &str, create_revision: Option<i64>) {
        let matches = self.by_candidate.get(candidate).is_some_and(|k| {
            *k.key == *name && create_revision.is_none_or(|rev| k.create_revision == rev)
        });
        if matches && let Some(old) = self.by_candidate.remove(candidate) {
            self.names.remove(&old.key);
        }
    }

    /// Records the create revision of `candidate`'s key `name` (0: unknown from now on,
    /// a create on attempt lease `attempt` may land, or none if 0); returns the token that
    /// is cancelled when that term is gone.
    pub(crate) fn set_create_revision(
        &mut self,
        candidate: &str,
        name: &str,
        revision: i64,
        attempt: i64,
    ) -> Option<Gone> {
        let entry = self.by_candidate.get_mut(candidate)?;
        if *entry.key != *name {
            return None;
        }
        if entry.create_revision != revision {
            entry.create_revision = revision;
            entry.gone = Gone::new();
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
            key: key.into(),
            lease,
            slot: Arc::clone(slot),
            create_revision: 0,
            gone: Gone::new(),
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
}

/// `base`, or the first of `base_1`, `base_2`, … that is not in `used`.
fn free_name(used: &HashSet<Arc<str>>, base: &str) -> String {
    if !used.contains(base) {
        return base.to_owned();
    }
    (1u64..)
        .map(|n| format!("{base}_{n}"))
        .find(|name| !used.contains(name.as_str()))
        .unwrap_or_else(|| base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_side_keys_round_up_and_read_back() {
        assert_eq!(ttl_millis(Duration::from_secs(1)), 1000);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(
            parse_ttl(
                ttl_millis(Duration::from_millis(2500))
                    .to_string()
                    .as_bytes()
            ),
            Some(Duration::from_millis(2500))
        );
        for bad in [
            &b""[..],
            b"-5",
            b"1.5",
            b"12a",
            b"\xff",
            b"99999999999999999999999",
        ] {
            assert_eq!(parse_ttl(bad), None, "{bad:?}");
        }
        assert_eq!(side_key("svc/jobs/beef", Side::Ttl), "svc/jobs\0ttl\0beef");
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
            key: name.into(),
            lease: 1,
            slot: crate::lease::Leases::new().slot(1),
            create_revision: revision,
            gone: Gone::new(),
            attempt: 0,
        }
    }

    #[test]
    fn names_skip_those_in_use() {
        let mut used = HashSet::new();
        assert_eq!(free_name(&used, "e/1"), "e/1");
        used.insert("e/1".into());
        assert_eq!(free_name(&used, "e/1"), "e/1_1");
        used.insert("e/1_1".into());
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
