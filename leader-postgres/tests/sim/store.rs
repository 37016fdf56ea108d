//! The tables of leader-postgres and the effect of each statement of `src/sql.rs`, in Rust:
//! a model of PostgreSQL for the simulation and the differential test.
//!
//! Every statement runs alone (as if serialisable): its sub-statements see the snapshot
//! taken at its start, as PostgreSQL's data-modifying CTEs do, and its notifications
//! (the statement's `pg_notify`s, then the trigger's) are delivered after it commits,
//! duplicates within it once. Times are microseconds of the server's clock since 1970;
//! `-infinity` and `infinity` are `i64::MIN` and `i64::MAX`. `clock_timestamp()` is the
//! statement's one instant (the model's clock never repeats a microsecond).

use std::collections::BTreeMap;

/// `-infinity`.
pub const NEG_INF: i64 = i64::MIN;
/// `infinity`.
pub const POS_INF: i64 = i64::MAX;

/// One row of `leader_elections`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub holder: Option<String>,
    pub value: Vec<u8>,
    pub token: i64,
    pub expires_at: i64,
    pub channel: Option<String>,
    pub nominee: Option<String>,
    pub nominated_until: i64,
}

/// One row of `leader_elections_waiters`.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiter {
    pub value: Vec<u8>,
    pub channel: String,
    pub position: i64,
    pub expires_at: i64,
    /// The stamp of the waiter's statement that set `expires_at` (NULL: none given).
    pub stamp: Option<i64>,
}

/// A notification a committed statement sends: (channel, payload).
pub type Notice = (String, String);

/// The two tables.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub elections: BTreeMap<String, Row>,
    pub waiters: BTreeMap<(String, String), Waiter>,
    /// The snapshot the running statement took when it began, if statements committed
    /// since (set by the server around each statement; `None`: the tables as they are).
    /// Under READ COMMITTED a statement's reads (its CTEs, its final `SELECT`) see that
    /// snapshot, while its writes lock and re-check the newest version of each row they
    /// change (an `UPDATE`'s `WHERE`, `ON CONFLICT`'s conflict and `DO UPDATE ... WHERE`,
    /// `FOR UPDATE`), and its AFTER triggers see the row versions it changed.
    pub began: Option<Box<Tables>>,
}

fn ms(ttl_ms: f64) -> i64 {
    // `$4::float8 * interval '1 millisecond'`: PostgreSQL keeps intervals in microseconds.
    (ttl_ms * 1000.0).round() as i64
}

/// `now + ttl`, saturating (never reaching the infinities).
fn after(now: i64, ttl_ms: f64) -> i64 {
    now.saturating_add(ms(ttl_ms)).min(POS_INF - 1)
}

/// The milliseconds from `now` to `at`, rounded up; ±infinity for the infinities.
pub fn remaining(at: i64, now: i64) -> f64 {
    match at {
        NEG_INF => f64::NEG_INFINITY,
        POS_INF => f64::INFINITY,
        _ => ((at - now) as f64 / 1000.0).ceil(),
    }
}

/// The triggers `<table>_gone` (AFTER UPDATE, when the row neither keeps the term nor is
/// released with its channel: a resignation, a handover) and `<table>_deleted` (AFTER
/// DELETE), FOR EACH ROW.
fn gone(old: &Row, new: Option<&Row>, notices: &mut Vec<Notice>) {
    let (Some(holder), Some(channel)) = (&old.holder, &old.channel) else {
        return;
    };
    let fires = match new {
        None => true,
        Some(new) => {
            (new.holder.is_some() || new.channel.is_some())
                && (new.holder != old.holder
                    || new.token != old.token
                    || new.expires_at < old.expires_at)
        }
    };
    if fires {
        notices.push((channel.clone(), format!("g{}:{holder}", old.token)));
    }
}

/// The answer of the acquire statement: (token, first, remaining ms).
pub type AcquireRow = (Option<i64>, Option<bool>, Option<f64>);

impl Tables {
    /// What the running statement's reads see: the snapshot it took when it began.
    fn snapshot(&self) -> Tables {
        match &self.began {
            Some(began) => Tables {
                elections: began.elections.clone(),
                waiters: began.waiters.clone(),
                began: None,
            },
            None => Tables {
                elections: self.elections.clone(),
                waiters: self.waiters.clone(),
                began: None,
            },
        }
    }

    /// Deletes the places `stale` (read from the snapshot) that are still expired a second
    /// ago in their newest version: `DELETE ... WHERE (name, candidate) IN (SELECT ... FOR
    /// UPDATE SKIP LOCKED)` re-checks a row another statement changed since (a place
    /// refreshed meanwhile stays; one deleted meanwhile is skipped).
    fn sweep(&mut self, stale: Vec<(String, String)>, now: i64) {
        for key in stale {
            if self
                .waiters
                .get(&key)
                .is_some_and(|w| w.expires_at <= now - 1_000_000)
            {
                self.waiters.remove(&key);
            }
        }
    }

    fn nomination_of(row: Option<&Row>, now: i64) -> Option<&String> {
        row.and_then(|r| r.nominee.as_ref().filter(|_| r.nominated_until > now))
    }

    /// Whether a live waiter other than `candidate` stands before (`position`,
    /// `candidate`) in `name`'s line.
    fn anyone_before(&self, name: &str, candidate: &str, position: i64, now: i64) -> bool {
        self.waiters.iter().any(|((n, c), w)| {
            n == name
                && c != candidate
                && w.expires_at > now
                && (w.position, c.as_str()) < (position, candidate)
        })
    }

    /// `Table::acquire`. $1 name, $2 candidate, $3 value, $4 ttl ms, $5 the election's
    /// channel, $6 the driver's channel, $7 the stamp.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        now: i64,
        name: &str,
        candidate: &str,
        value: &[u8],
        ttl_ms: f64,
        election_channel: &str,
        driver_channel: &str,
        stamp: i64,
        notices: &mut Vec<Notice>,
    ) -> AcquireRow {
        let snap = self.snapshot();
        let key = (name.to_owned(), candidate.to_owned());
        let me = snap.waiters.get(&key).map_or(now, |w| w.position);
        let first = !snap.anyone_before(name, candidate, me, now);
        let row = snap.elections.get(name);
        let nominated = Self::nomination_of(row, now);
        // `own`: a live term of this candidate's is taken anew whatever the line says.
        let own = row.is_some_and(|r| r.holder.as_deref() == Some(candidate) && r.expires_at > now);
        let ok = own
            || match nominated {
                Some(nominee) => nominee == candidate,
                None => first,
            };
        let mut acquired = None;
        // The row's newest version, which `ON CONFLICT DO UPDATE` locks, re-checks and
        // changes (the trigger's OLD).
        let newest = self.elections.get(name).cloned();
        if ok {
            match self.elections.get_mut(name) {
                None => {
                    self.elections.insert(
                        name.to_owned(),
                        Row {
                            holder: Some(candidate.to_owned()),
                            value: value.to_vec(),
                            token: now,
                            expires_at: after(now, ttl_ms),
                            channel: Some(driver_channel.to_owned()),
                            nominee: None,
                            nominated_until: NEG_INF,
                        },
                    );
                    acquired = Some(now);
                }
                Some(e) => {
                    let free = e.holder.is_none()
                        || e.holder.as_deref() == Some(candidate)
                        || e.expires_at <= now;
                    let unnominated = e.nominee.is_none()
                        || e.nominee.as_deref() == Some(candidate)
                        || e.nominated_until <= now;
                    if free && unnominated {
                        e.holder = Some(candidate.to_owned());
                        e.value = value.to_vec();
                        e.token += 1;
                        e.expires_at = after(now, ttl_ms);
                        e.channel = Some(driver_channel.to_owned());
                        e.nominee = None;
                        e.nominated_until = NEG_INF;
                        acquired = Some(e.token);
                    }
                }
            }
        }
        // The trigger's notices come after the statement's own (AFTER triggers fire at its
        // end): collected apart.
        let mut triggered = Vec::new();
        if let (Some(_), Some(old)) = (acquired, &newest) {
            gone(old, self.elections.get(name), &mut triggered);
        }
        if acquired.is_some() {
            // `left_line`'s DELETE scans the snapshot: a place inserted since stays.
            if snap.waiters.contains_key(&key) {
                self.waiters.remove(&key);
            }
        } else {
            match self.waiters.get_mut(&key) {
                Some(w) => {
                    w.value = value.to_vec();
                    w.channel = driver_channel.to_owned();
                    w.expires_at = after(now, ttl_ms);
                    w.stamp = Some(stamp);
                }
                None => {
                    self.waiters.insert(
                        key.clone(),
                        Waiter {
                            value: value.to_vec(),
                            channel: driver_channel.to_owned(),
                            position: me,
                            expires_at: after(now, ttl_ms),
                            stamp: Some(stamp),
                        },
                    );
                }
            }
        }
        // Swept: the election's places expired a second ago (others').
        let stale: Vec<_> = snap
            .waiters
            .iter()
            .filter(|((n, c), w)| n == name && c != candidate && w.expires_at <= now - 1_000_000)
            .map(|(k, _)| k.clone())
            .collect();
        self.sweep(stale, now);
        if acquired.is_some() {
            notices.push((election_channel.to_owned(), "elected".to_owned()));
        }
        notices.extend(triggered);
        let first_out = first || nominated.is_some_and(|n| n == candidate);
        let remaining_ms = row.and_then(|h| {
            let held = h.holder.as_ref().map(|_| remaining(h.expires_at, now));
            let nom = h
                .nominee
                .as_ref()
                .filter(|n| n.as_str() != candidate)
                .map(|_| remaining(h.nominated_until, now));
            match (held, nom) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        });
        (acquired, Some(first_out), remaining_ms)
    }

    /// `Table::renew`: the holders renewed.
    pub fn renew(
        &mut self,
        now: i64,
        batch: &[(String, String, i64, f64)],
        notices: &mut Vec<Notice>,
    ) -> Vec<String> {
        let snap = self.snapshot();
        let mut renewed = Vec::new();
        let matches = |row: &Row, name: &str, (n, h, t, _): &(String, String, i64, f64)| {
            n == name && row.holder.as_deref() == Some(h.as_str()) && row.token == *t
        };
        for (name, row) in &mut self.elections {
            // UPDATE ... FROM unnest(...): the snapshot's version of a row joins the first
            // matching element; the newest version must still match it (re-checked).
            let Some(seen) = snap.elections.get(name) else {
                continue;
            };
            let Some(element) = batch.iter().find(|b| matches(seen, name, b)) else {
                continue;
            };
            if seen.expires_at <= now || row.expires_at <= now || !matches(row, name, element) {
                continue;
            }
            let (_, holder, _, ttl) = element;
            let old = row.clone();
            row.expires_at = after(now, *ttl);
            gone(&old, Some(row), notices);
            renewed.push(holder.clone());
        }
        renewed
    }

    /// `Table::keep`: (candidate, first, free) for each refreshed place. The batch:
    /// (name, candidate, ttl ms, stamp).
    pub fn keep(
        &mut self,
        now: i64,
        batch: &[(String, String, f64, i64)],
    ) -> Vec<(String, bool, bool)> {
        let snap = self.snapshot();
        let mut refreshed = Vec::new();
        for ((name, candidate), w) in &mut self.waiters {
            // The UPDATE scans the snapshot: a place inserted since is not refreshed.
            if !snap
                .waiters
                .contains_key(&(name.clone(), candidate.clone()))
            {
                continue;
            }
            if let Some((_, _, ttl, stamp)) = batch
                .iter()
                .find(|(n, c, _, _)| n == name && c == candidate)
            {
                w.expires_at = after(now, *ttl);
                w.stamp = Some(*stamp);
                refreshed.push((name.clone(), candidate.clone(), w.position));
            }
        }
        // PostgreSQL returns them in no set order; the model in line order, not by id
        // (ids are random from run to run, and a replay must not depend on them).
        refreshed.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
        let stale: Vec<_> = snap
            .waiters
            .iter()
            .filter(|((n, c), w)| {
                w.expires_at <= now - 1_000_000
                    && !batch.iter().any(|(bn, bc, _, _)| bn == n && bc == c)
            })
            .map(|(k, _)| k.clone())
            .collect();
        self.sweep(stale, now);
        refreshed
            .into_iter()
            .map(|(name, candidate, position)| {
                let row = snap.elections.get(&name);
                let first = !snap.anyone_before(&name, &candidate, position, now)
                    || Self::nomination_of(row, now).is_some_and(|n| *n == candidate);
                let free = !row.is_some_and(|e| {
                    (e.holder.is_some() && e.expires_at > now)
                        || (e.nominee.as_ref().is_some_and(|n| *n != candidate)
                            && e.nominated_until > now)
                });
                (candidate, first, free)
            })
            .collect()
    }

    /// `Table::resign`: (released, woken), and the term it granted: (candidate, token).
    pub fn resign(
        &mut self,
        now: i64,
        name: &str,
        candidate: &str,
        token: Option<i64>,
        election_channel: &str,
        notices: &mut Vec<Notice>,
    ) -> (i64, i64, Option<(String, i64)>) {
        let mut triggered = Vec::new();
        // released: Some((freed, live nominee))
        let mut released = None;
        let is_term =
            |row: &Row| row.holder.as_deref() == Some(candidate) && Some(row.token) == token;
        let is_named = |row: &Row| row.nominee.as_deref() == Some(candidate);
        // The function's UPDATE matches the row in its snapshot (taken as it began: it may
        // have waited for the row's lock since), then re-checks the newest version.
        let seen = self
            .began
            .as_ref()
            .map_or(self.elections.get(name), |began| began.elections.get(name))
            .is_some_and(|row| is_term(row) || is_named(row));
        if let Some(row) = self.elections.get_mut(name).filter(|_| seen) {
            let term = is_term(row);
            let named = is_named(row);
            if term || named {
                let old = row.clone();
                if term {
                    row.holder = None;
                    row.value = Vec::new();
                    row.channel = None;
                    row.expires_at = NEG_INF;
                }
                if named {
                    row.nominee = None;
                    row.nominated_until = NEG_INF;
                }
                gone(&old, Some(row), &mut triggered);
                let nominee = row.nominee.clone().filter(|_| row.nominated_until > now);
                released = Some((row.holder.is_none(), nominee));
            }
        }
        let left = self
            .waiters
            .remove(&(name.to_owned(), candidate.to_owned()))
            .is_some();
        let nominee = released.as_ref().and_then(|(_, n)| n.clone());
        // A statement of its own (in the function), so a snapshot taken after the update:
        // the newest places.
        let next = self
            .waiters
            .iter()
            .filter(|((n, c), w)| {
                n == name
                    && c != candidate
                    && w.expires_at > now
                    && nominee.as_ref().is_none_or(|nominee| nominee == c)
            })
            .min_by(|(ka, a), (kb, b)| (a.position, &ka.1).cmp(&(b.position, &kb.1)));
        let next = next
            .filter(|_| released.is_some() || left)
            .map(|((_, c), w)| (c.clone(), w.clone()));
        // The grant: the row left free, no live nomination, a stamped place first in line.
        if let Some((c, w)) = &next
            && let Some(stamp) = w.stamp
            && released
                .as_ref()
                .is_some_and(|(freed, n)| *freed && n.is_none())
            && let Some(row) = self.elections.get_mut(name)
            && row.holder.is_none()
        {
            row.holder = Some(c.clone());
            row.value = w.value.clone();
            row.channel = Some(w.channel.clone());
            row.token += 1;
            row.expires_at = w.expires_at;
            row.nominee = None;
            row.nominated_until = NEG_INF;
            let token = row.token;
            self.waiters.remove(&(name.to_owned(), c.clone()));
            notices.push((w.channel.clone(), format!("G{token}:{stamp}:{c}")));
            notices.push((election_channel.to_owned(), "elected".to_owned()));
            notices.extend(triggered);
            return (1, 1, Some((c.clone(), token)));
        }
        let mut woken = 0;
        if let Some((c, w)) = &next {
            notices.push((w.channel.clone(), format!("w{c}")));
            woken = 1;
        }
        let mut announced = 0;
        if released.as_ref().is_some_and(|(freed, _)| *freed) {
            notices.push((election_channel.to_owned(), "resigned".to_owned()));
            announced = 1;
        }
        notices.extend(triggered);
        (announced, woken, None)
    }

    /// `Table::hand_over`: (handed, held, waiting).
    #[allow(clippy::too_many_arguments)]
    pub fn hand_over(
        &mut self,
        now: i64,
        name: &str,
        holder: &str,
        token: i64,
        nominee: &str,
        ttl_ms: f64,
        election_channel: &str,
        notices: &mut Vec<Notice>,
    ) -> (bool, bool, bool) {
        // `target` and `held` read the snapshot; the update re-checks the row's newest
        // version.
        let snap = self.snapshot();
        let target = snap
            .waiters
            .get(&(name.to_owned(), nominee.to_owned()))
            .filter(|w| nominee != holder && w.expires_at > now)
            .cloned();
        let is_term =
            |r: &Row| r.holder.as_deref() == Some(holder) && r.token == token && r.expires_at > now;
        let held = snap.elections.get(name).is_some_and(is_term);
        let mut handed = false;
        let mut triggered = Vec::new();
        // The UPDATE matches the snapshot's version (`held`), then the newest.
        if let (true, Some(target), Some(row)) = (
            held,
            &target,
            self.elections.get_mut(name).filter(|r| is_term(r)),
        ) {
            let old = row.clone();
            row.holder = None;
            row.value = Vec::new();
            row.channel = None;
            row.expires_at = NEG_INF;
            row.nominee = Some(nominee.to_owned());
            row.nominated_until = after(now, ttl_ms);
            gone(&old, Some(row), &mut triggered);
            handed = true;
            notices.push((target.channel.clone(), format!("w{nominee}")));
            notices.push((election_channel.to_owned(), "resigned".to_owned()));
        }
        notices.extend(triggered);
        (handed, held, target.is_some())
    }

    /// `Table::proclaim`: whether it was set.
    #[allow(clippy::too_many_arguments)]
    pub fn proclaim(
        &mut self,
        now: i64,
        name: &str,
        holder: &str,
        token: i64,
        value: &[u8],
        election_channel: &str,
        notices: &mut Vec<Notice>,
    ) -> bool {
        let is_term =
            |r: &Row| r.holder.as_deref() == Some(holder) && r.token == token && r.expires_at > now;
        // The UPDATE matches the snapshot's version, then re-checks the newest.
        if !self.snapshot().elections.get(name).is_some_and(is_term) {
            return false;
        }
        let Some(row) = self.elections.get_mut(name).filter(|r| is_term(r)) else {
            return false;
        };
        let old = row.clone();
        row.value = value.to_vec();
        let mut triggered = Vec::new();
        gone(&old, Some(row), &mut triggered);
        notices.push((election_channel.to_owned(), "proclaimed".to_owned()));
        notices.extend(triggered);
        true
    }

    /// `Table::candidates`: (id, value, is leader).
    pub fn candidates(&self, now: i64, name: &str) -> Vec<(String, Vec<u8>, bool)> {
        let row = self.elections.get(name);
        let leader = row.filter(|r| r.holder.is_some() && r.expires_at > now);
        let nominee = Self::nomination_of(row, now);
        let mut out: Vec<(u8, i64, String, Vec<u8>, bool)> = Vec::new();
        if let Some(l) = leader
            && let Some(holder) = &l.holder
        {
            out.push((0, 0, holder.clone(), l.value.clone(), true));
        }
        for ((n, c), w) in &self.waiters {
            if n != name || w.expires_at <= now {
                continue;
            }
            if leader.is_some_and(|l| l.holder.as_ref() == Some(c)) {
                continue;
            }
            let rank = if nominee == Some(c) { 1 } else { 2 };
            out.push((rank, w.position, c.clone(), w.value.clone(), false));
        }
        out.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
        out.into_iter().map(|(_, _, c, v, l)| (c, v, l)).collect()
    }

    /// `Table::leader`: (holder, value, token, remaining ms).
    pub fn leader(&self, now: i64, name: &str) -> Option<(String, Vec<u8>, i64, f64)> {
        let r = self.elections.get(name)?;
        if r.expires_at <= now {
            return None;
        }
        Some((
            r.holder.clone()?,
            r.value.clone(),
            r.token,
            remaining(r.expires_at, now),
        ))
    }

    /// An operator's `DELETE` of the row (the trigger fires).
    pub fn delete_row(&mut self, name: &str, notices: &mut Vec<Notice>) -> bool {
        match self.elections.remove(name) {
            Some(old) => {
                gone(&old, None, notices);
                true
            }
            None => false,
        }
    }

    /// An operator's `UPDATE ... SET expires_at = now()` (the trigger fires on an earlier
    /// expiry).
    pub fn expire_row(&mut self, now: i64, name: &str, notices: &mut Vec<Notice>) -> bool {
        match self.elections.get_mut(name) {
            Some(row) if row.holder.is_some() && row.expires_at > now => {
                let old = row.clone();
                row.expires_at = now;
                gone(&old, Some(row), notices);
                true
            }
            _ => false,
        }
    }

    /// An operator's `UPDATE ... SET fencing_token = fencing_token + 1` on a held row (the
    /// trigger fires: another token).
    pub fn bump_token(&mut self, name: &str, notices: &mut Vec<Notice>) -> bool {
        match self.elections.get_mut(name) {
            Some(row) if row.holder.is_some() => {
                let old = row.clone();
                row.token += 1;
                gone(&old, Some(row), notices);
                true
            }
            _ => false,
        }
    }
}
