//! What the harness checks at every instant the runtime parks and at every event.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use leader_core::Status;
use tokio::time::Instant;

/// A term: its election's name and its fencing token (tokens of different elections may
/// be equal on some stores).
pub(crate) type Term = (String, u64);

/// Watches every candidate's status and events.
#[derive(Default)]
pub(crate) struct Checker {
    pub(crate) start: Option<Instant>,
    /// The status of every candidate made.
    pub(crate) statuses: Vec<Believer>,
    /// The last token elected in each election.
    pub(crate) last_elected: BTreeMap<String, u64>,
    /// Terms (candidate's index in `statuses`, token) valid at the last sample.
    pub(crate) valid: BTreeSet<(usize, u64)>,
    /// Terms seen valid, then not: they must never be valid again. Each with when it
    /// stopped (see `reissued`).
    pub(crate) dead: BTreeMap<(usize, u64), Instant>,
    /// When the store last granted each term (candidate id, election, token), for models
    /// that report grants ([`Net::granted`](super::Net::granted)).
    pub(crate) granted_at: BTreeMap<(String, String, u64), Instant>,
    /// Dead terms seen valid again by a sample taken while an event was handled: a
    /// violation at the next park unless their `Elected` event shows a reissued token.
    pub(crate) suspects: BTreeSet<(usize, u64)>,
    /// Overlaps are not checked until then (after a data loss: every term is lost).
    pub(crate) excused_until: Option<Instant>,
    /// Terms an operator's change ended or edited in the store while they were granted,
    /// and until when an overlap with each is excused (its leader cannot know before its
    /// next renewal or event). Nothing else is excused: a waiter whose own record vanished
    /// before it was granted must never lead on it.
    /// By election and candidate id: the candidate's record is what the operator changed,
    /// whichever term of it the candidate still believes (a campaign of a leader may have
    /// replaced its term with a newer one of its own in the store).
    pub(crate) tampered: BTreeMap<(String, String), Instant>,
    /// Terms an operator ended in the store, and by when their leaders must have stepped
    /// down (their renewals fail from then on: the deadline of the last renewal before).
    pub(crate) ended: BTreeMap<Term, Instant>,
    /// Every term the store granted: (candidate id, election, token).
    pub(crate) grants: BTreeSet<(String, String, u64)>,
    /// The model reports every term its store grants ([`Model::exact_grants`]): a
    /// candidate elected to a term never granted to it is a violation.
    ///
    /// [`Model::exact_grants`]: super::Model::exact_grants
    pub(crate) exact_grants: bool,
    /// The store lost its data: tokens may start over once the excuse ends.
    pub(crate) tokens_reset: bool,
    /// How many times the store lost its data (and may have started its tokens over).
    pub(crate) losses: u64,
    pub(crate) elected: BTreeSet<Term>,
    pub(crate) quiet_at: Option<Instant>,
    /// The elections that had a leader after faults stopped.
    pub(crate) leaders_after_quiet: BTreeSet<String>,
    pub(crate) violations: Vec<(Duration, String)>,
}

/// One candidate the checker watches.
pub(crate) struct Believer {
    pub(crate) slot: usize,
    pub(crate) id: String,
    pub(crate) election: String,
    pub(crate) status: Status,
}

impl Checker {
    pub(crate) fn elapsed(&self) -> Duration {
        self.start
            .map_or(Duration::ZERO, |start| Instant::now().duration_since(start))
    }

    pub(crate) fn violation(&mut self, what: String) {
        let at = self.elapsed();
        self.violations.push((at, what));
    }

    /// The store just gave term `token` of `election` to candidate `id`.
    pub(crate) fn granted(&mut self, id: &str, election: &str, token: u64) {
        self.grants
            .insert((id.to_owned(), election.to_owned(), token));
        self.granted_at
            .insert((id.to_owned(), election.to_owned(), token), Instant::now());
        let believers: Vec<(usize, u64, String)> = self
            .statuses
            .iter()
            .filter(|b| b.id != id && b.election == election)
            .filter_map(|b| Some((b.slot, b.status.fencing_token()?, b.id.clone())))
            .collect();
        let believers: Vec<(usize, u64)> = believers
            .into_iter()
            .filter(|(_, _, id)| !self.term_excused(election, id))
            .map(|(slot, token, _)| (slot, token))
            .collect();
        if !believers.is_empty() {
            self.violation(format!(
                "the store granted term {token} of {election} while (slot, term) \
                 {believers:?} still led"
            ));
        }
    }

    /// An operator ended or edited term `token` of `election`, granted to `holder`, in the
    /// store now: its leader cannot know before its next renewal or event, so until
    /// `until` an overlap with a term of `holder` in `election` (not of anyone else) is
    /// excused. `ends`: that term must lead no more by `until`.
    pub(crate) fn tampered(
        &mut self,
        election: &str,
        token: u64,
        holder: &str,
        until: Instant,
        ends: bool,
    ) {
        if ends {
            self.ended
                .entry((election.to_owned(), token))
                .or_insert(until);
        }
        let entry = self
            .tampered
            .entry((election.to_owned(), holder.to_owned()))
            .or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Whether an overlap with a term of candidate `id` in `election` is excused now: the
    /// store lost its data, or an operator ended or edited that candidate's term a short
    /// while ago.
    pub(crate) fn term_excused(&mut self, election: &str, id: &str) -> bool {
        if self.excused() {
            return true;
        }
        let now = Instant::now();
        self.tampered.retain(|_, until| now < *until);
        self.tampered
            .contains_key(&(election.to_owned(), id.to_owned()))
    }

    /// The store lost its data (a restart without persistence: `tokens_reset`) now: no
    /// driver can promise more than that the terms confirmed before it end by their
    /// deadlines (DESIGN.md). So until `until` (every such deadline, and every campaign
    /// answer in flight, has passed) overlaps and the order of tokens are not checked;
    /// tokens may start over once it passes.
    pub(crate) fn excuse(&mut self, until: Instant, tokens_reset: bool) {
        self.excused_until = Some(self.excused_until.map_or(until, |u| u.max(until)));
        self.tokens_reset |= tokens_reset;
        self.losses += u64::from(tokens_reset);
    }

    /// Candidate `id` was just elected to term `token` of `election` (its `Elected`
    /// event). After a data loss the store may hand out a token number again, even to a
    /// candidate that had it before: that is a new term, not the old one leading again,
    /// if the store granted it (the model reports grants) after the old one stopped. An
    /// old term announced again with no such grant, or leading again with no new
    /// `Elected` event, is still caught.
    pub(crate) fn reissued(&mut self, id: &str, election: &str, token: u64) {
        if self.losses == 0 {
            return;
        }
        let Some(&granted) = self
            .granted_at
            .get(&(id.to_owned(), election.to_owned(), token))
        else {
            return;
        };
        let statuses = &self.statuses;
        let old = |i: usize, dead: u64| {
            dead == token && statuses[i].id == id && statuses[i].election == election
        };
        let mut forgiven = Vec::new();
        self.dead.retain(|&(i, dead), &mut stopped| {
            let reissued = old(i, dead) && granted >= stopped;
            if reissued {
                forgiven.push((i, dead));
            }
            !reissued
        });
        self.suspects.retain(|term| !forgiven.contains(term));
    }

    /// Whether every overlap is excused now (after a data loss).
    pub(crate) fn excused(&mut self) -> bool {
        match self.excused_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.excused_until = None;
                if std::mem::take(&mut self.tokens_reset) {
                    self.last_elected.clear();
                }
                false
            }
            None => false,
        }
    }

    /// Checks the candidates' statuses now. `parked`: the runtime parks (every event sent
    /// so far has been handled); otherwise a candidate's event is being handled.
    ///
    /// That every event sent has been handled at a park rests on: each subscriber's
    /// channel being unbounded (nothing dropped or lagging), leader-core storing a new
    /// term and sending its `Elected` in one locked step (a status that shows a term has
    /// its event queued), the task calling `on_event` running on this single-threaded
    /// runtime, and Tokio parking only when no task is ready (a task that used up its
    /// budget is polled again first). Were one to change, the result would be false
    /// alarms, not missed violations.
    pub(crate) fn sample(&mut self, parked: bool) {
        let mut leaders: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
        let mut ids: BTreeMap<(String, usize, u64), String> = BTreeMap::new();
        let mut now_valid = BTreeSet::new();
        for (i, b) in self.statuses.iter().enumerate() {
            if let Some(token) = b.status.fencing_token() {
                now_valid.insert((i, token));
                leaders
                    .entry(b.election.clone())
                    .or_default()
                    .push((b.slot, token));
                ids.insert((b.election.clone(), b.slot, token), b.id.clone());
            }
        }
        let mut found = Vec::new();
        for (election, leading) in &leaders {
            // Two leaders at once, unless all of them but one lead on terms an operator
            // ended or edited (or the store lost).
            let unexcused = leading
                .iter()
                .filter(|&&(slot, token)| {
                    let id = &ids[&(election.clone(), slot, token)];
                    !self.term_excused(election, id)
                })
                .count();
            if leading.len() > 1 && unexcused > 1 {
                found.push(format!(
                    "two leaders at once in {election} (slot, token): {leading:?}"
                ));
            }
        }
        if self.quiet_at.is_some() {
            let with_leader: Vec<String> = self
                .statuses
                .iter()
                .filter(|b| b.status.is_leader())
                .map(|b| b.election.clone())
                .collect();
            self.leaders_after_quiet.extend(with_leader);
        }
        let now = Instant::now();
        for (election, leading) in &leaders {
            for &(slot, token) in leading {
                let term = (election.clone(), token);
                if self.ended.get(&term).is_some_and(|due| now >= *due) {
                    self.ended.remove(&term);
                    found.push(format!(
                        "slot {slot}: term {token} of {election} still leads 2 x TTL after an \
                         operator ended it in the store (its renewals should have failed)"
                    ));
                }
            }
        }
        self.ended.retain(|_, due| now < *due);
        for what in found {
            self.violation(what);
        }
        for &(i, token) in &now_valid {
            if self.dead.contains_key(&(i, token)) {
                // After a data loss it may be a reissued token whose `Elected` event is
                // not handled yet (this sample is another candidate's event's): see
                // `reissued`, by the next park.
                self.suspects.insert((i, token));
            }
        }
        if parked {
            for (i, token) in std::mem::take(&mut self.suspects) {
                let b = &self.statuses[i];
                self.violation(format!(
                    "slot {}: term {token} of {} leads again after is_leader() was false",
                    b.slot, b.election
                ));
            }
        }
        let gone: Vec<(usize, u64)> = self.valid.difference(&now_valid).copied().collect();
        self.dead.extend(gone.into_iter().map(|term| (term, now)));
        self.valid = now_valid;
    }
}
