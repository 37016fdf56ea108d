//! A model of the part of Redis the driver's scripts use: strings and sorted sets with
//! millisecond expiry on the store's clock, `TIME`, pub/sub connections that lose what is
//! published while they are cut off, and keyspace notifications (`K` + `A`) for string
//! keys. Each script of the driver is written here in Rust, applied in one step (scripts
//! are atomic in Redis); `tests/differential.rs` keeps them equal to the real scripts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use leader_redis::io::{
    Acquire, AcquireReply, Candidates, HandOver, HandOverReply, LeaderReply, Message, Proclaim,
    Refresh, RefreshReply, Renewal, Resign,
};
use leader_testkit::sim::{ClientId, Net};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Server time in µs at the model's start (a Unix time of late 2023, as `TIME` returns).
const EPOCH_US: u64 = 1_700_000_000_000_000;

#[derive(Debug, Clone)]
pub enum Val {
    Str(Vec<u8>),
    /// A sorted set: member to score.
    Zset(BTreeMap<Vec<u8>, f64>),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub val: Val,
    /// On the store's clock.
    pub expires: Option<Instant>,
}

/// A pub/sub connection of one client.
pub struct Conn {
    pub client: ClientId,
    pub channels: BTreeSet<String>,
    /// To the connection's delivery task: when to deliver, and what.
    pub tx: mpsc::UnboundedSender<(Instant, Message)>,
    /// The client's link when the connection was made: it is gone once that changes.
    pub link: watch::Receiver<u64>,
    pub generation: u64,
    /// The latest delivery scheduled (messages keep their order).
    pub last: Instant,
}

impl Conn {
    pub fn alive(&self) -> bool {
        *self.link.borrow() == self.generation && !self.tx.is_closed()
    }
}

/// What a leader key holds, as the scripts' `parse` reads it.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    None,
    Other,
    Term {
        token: Vec<u8>,
        owner: Vec<u8>,
        value: Vec<u8>,
    },
    Nomination {
        nominee: Vec<u8>,
    },
}

pub struct Store {
    pub net: Net,
    pub keys: BTreeMap<String, Entry>,
    /// The store's clock at the model's start.
    base: Instant,
    /// The store's clock during the current request.
    now: Instant,
    /// The last `TIME` given (µs): a server's clock moves on between two commands, so two
    /// requests never read the same microsecond (ties would order places by their owners'
    /// random ids, and a seed would not replay).
    last_us: u64,
    pub conns: BTreeMap<u64, Conn>,
    pub next_conn: u64,
    /// `__keyspace@0__:` when the server publishes keyspace notifications.
    pub keyspace: Option<String>,
    /// How many `RESIGN`s landed, per candidate (for scripted scenarios).
    pub resigns: BTreeMap<String, u32>,
}

fn find(hay: &[u8], from: usize, byte: u8) -> Option<usize> {
    hay.get(from..)?
        .iter()
        .position(|b| *b == byte)
        .map(|i| i + from)
}

fn owner_of(place: &[u8]) -> &[u8] {
    match find(place, 0, b'\n') {
        Some(at) => &place[..at],
        None => place,
    }
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

impl Store {
    pub fn new(net: Net, keyspace: bool) -> Self {
        let now = net.store_now();
        Store {
            net,
            keys: BTreeMap::new(),
            base: now,
            now,
            last_us: 0,
            conns: BTreeMap::new(),
            next_conn: 0,
            keyspace: keyspace.then(|| "__keyspace@0__:".to_owned()),
            resigns: BTreeMap::new(),
        }
    }

    /// A request lands now: the store's clock is read, and expired keys go (each with its
    /// `expired` notification: the model expires keys at every request, where Redis
    /// expires them on access and in a sweep ten times a second).
    pub fn begin(&mut self) {
        self.now = self.net.store_now();
        let now = self.now;
        let us = EPOCH_US + u64::try_from(now.duration_since(self.base).as_micros()).unwrap_or(0);
        self.last_us = us.max(self.last_us + 1);
        let expired: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.expires.is_some_and(|at| now > at))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.keys.remove(&key);
            self.notify(&key, "expired");
        }
    }

    fn now_us(&self) -> u64 {
        self.last_us
    }

    fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }

    // Pub/sub.

    pub fn publish(&mut self, channel: &str, payload: &[u8]) {
        for conn in self.conns.values_mut() {
            if !conn.alive() || !conn.channels.contains(channel) {
                continue;
            }
            let Some(delay) = self.net.push_delay(conn.client) else {
                continue;
            };
            let at = (Instant::now() + delay).max(conn.last);
            conn.last = at;
            let _ = conn.tx.send((
                at,
                Message {
                    channel: channel.to_owned(),
                    payload: payload.to_vec(),
                },
            ));
        }
    }

    fn notify(&mut self, key: &str, event: &str) {
        if let Some(prefix) = &self.keyspace {
            let channel = format!("{prefix}{key}");
            self.publish(&channel, event.as_bytes());
        }
    }

    // Strings and generic commands.

    /// The election, token and owner of the term leader key `key` holds
    /// (`p:{name}:leader`, a live term): what an operator's `DEL` of it ends.
    pub fn term_of(&self, key: &str) -> Option<(String, u64, String)> {
        let Parsed::Term { token, owner, .. } = self.get(key) else {
            return None;
        };
        let owner = String::from_utf8_lossy(&owner).into_owned();
        let (_, rest) = key.split_once('{')?;
        let (election, _) = rest.split_once('}')?;
        let token = std::str::from_utf8(&token).ok()?.parse().ok()?;
        Some((election.to_owned(), token, owner))
    }

    fn get(&self, key: &str) -> Parsed {
        let Some(entry) = self.keys.get(key) else {
            return Parsed::None;
        };
        let Val::Str(raw) = &entry.val else {
            return Parsed::Other;
        };
        if raw.starts_with(b"N\n") {
            return Parsed::Nomination {
                nominee: raw[2..].to_vec(),
            };
        }
        if raw.starts_with(b"L\n")
            && let Some(a) = find(raw, 2, b'\n')
            && let Some(b) = find(raw, a + 1, b'\n')
        {
            return Parsed::Term {
                token: raw[2..a].to_vec(),
                owner: raw[a + 1..b].to_vec(),
                value: raw[b + 1..].to_vec(),
            };
        }
        Parsed::Other
    }

    fn set(&mut self, key: &str, raw: Vec<u8>, px: Option<u64>, keep_ttl: bool) {
        let expires = match px {
            Some(ms) => Some(self.now + Duration::from_millis(ms)),
            None if keep_ttl => self.keys.get(key).and_then(|e| e.expires),
            None => None,
        };
        self.keys.insert(
            key.to_owned(),
            Entry {
                val: Val::Str(raw),
                expires,
            },
        );
        self.notify(key, "set");
        if px.is_some() {
            self.notify(key, "expire");
        }
    }

    /// `SET key 1 PX ms NX`: whether it was set.
    fn set_nx(&mut self, key: &str, ms: u64) -> bool {
        if self.keys.contains_key(key) {
            return false;
        }
        self.set(key, b"1".to_vec(), Some(ms), false);
        true
    }

    pub fn del(&mut self, key: &str) -> bool {
        let gone = self.keys.remove(key).is_some();
        if gone {
            self.notify(key, "del");
        }
        gone
    }

    fn incr(&mut self, key: &str) -> i64 {
        let (n, expires) = match self.keys.get(key) {
            Some(Entry {
                val: Val::Str(raw),
                expires,
            }) => (
                std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0),
                *expires,
            ),
            _ => (0, None),
        };
        let n = n + 1;
        self.keys.insert(
            key.to_owned(),
            Entry {
                val: Val::Str(n.to_string().into_bytes()),
                expires,
            },
        );
        n
    }

    fn pexpire(&mut self, key: &str, ms: u64) -> bool {
        let at = self.now + Duration::from_millis(ms);
        let Some(entry) = self.keys.get_mut(key) else {
            return false;
        };
        entry.expires = Some(at);
        let string = matches!(entry.val, Val::Str(_));
        if string {
            self.notify(key, "expire");
        }
        true
    }

    fn pttl(&self, key: &str) -> i64 {
        match self.keys.get(key) {
            None => -2,
            Some(Entry { expires: None, .. }) => -1,
            Some(Entry {
                expires: Some(at), ..
            }) => i64::try_from(at.saturating_duration_since(self.now).as_millis()).unwrap_or(0),
        }
    }

    // Sorted sets (a key emptied is deleted, as in Redis).

    fn zset(&self, key: &str) -> Option<&BTreeMap<Vec<u8>, f64>> {
        match &self.keys.get(key)?.val {
            Val::Zset(z) => Some(z),
            Val::Str(_) => None,
        }
    }

    fn zset_mut(&mut self, key: &str) -> &mut BTreeMap<Vec<u8>, f64> {
        let entry = self.keys.entry(key.to_owned()).or_insert(Entry {
            val: Val::Zset(BTreeMap::new()),
            expires: None,
        });
        if !matches!(entry.val, Val::Zset(_)) {
            *entry = Entry {
                val: Val::Zset(BTreeMap::new()),
                expires: None,
            };
        }
        match &mut entry.val {
            Val::Zset(z) => z,
            Val::Str(_) => unreachable!("made a sorted set above"),
        }
    }

    fn zadd(&mut self, key: &str, score: f64, member: &[u8], nx: bool) {
        let z = self.zset_mut(key);
        if nx && z.contains_key(member) {
            return;
        }
        z.insert(member.to_vec(), score);
    }

    fn drop_if_empty(&mut self, key: &str) {
        if self.zset(key).is_some_and(BTreeMap::is_empty) {
            self.keys.remove(key);
        }
    }

    fn zrem(&mut self, key: &str, member: &[u8]) -> bool {
        let removed = match self.keys.get_mut(key) {
            Some(Entry {
                val: Val::Zset(z), ..
            }) => z.remove(member).is_some(),
            _ => false,
        };
        self.drop_if_empty(key);
        removed
    }

    fn zscore(&self, key: &str, member: &[u8]) -> Option<f64> {
        self.zset(key)?.get(member).copied()
    }

    /// Members by (score, member), as `ZRANGE key 0 -1`.
    fn zrange(&self, key: &str) -> Vec<(Vec<u8>, f64)> {
        let mut all: Vec<(Vec<u8>, f64)> = self
            .zset(key)
            .map(|z| z.iter().map(|(m, s)| (m.clone(), *s)).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        all
    }

    fn zpopmin(&mut self, key: &str) -> Option<Vec<u8>> {
        let (head, _) = self.zrange(key).into_iter().next()?;
        self.zrem(key, &head);
        Some(head)
    }

    pub fn zrangebyscore(&self, key: &str, min: f64, max: f64, limit: usize) -> Vec<Vec<u8>> {
        self.zrange(key)
            .into_iter()
            .filter(|(_, s)| *s >= min && *s <= max)
            .take(limit)
            .map(|(m, _)| m)
            .collect()
    }

    // The driver's scripts.

    pub fn acquire(&mut self, r: &Acquire) -> AcquireReply {
        let held = match self.get(&r.leader) {
            Parsed::None => false,
            Parsed::Other => true,
            Parsed::Term { owner, .. } => owner != r.owner.as_bytes(),
            Parsed::Nomination { nominee } => nominee != r.owner.as_bytes(),
        };
        if held {
            if r.stand {
                let now = self.now_us() as f64;
                self.zadd(&r.line, now, &r.place, true);
            }
            if r.ask_pttl {
                return AcquireReply::Held(Some(self.pttl(&r.leader)));
            }
            return AcquireReply::Held(None);
        }
        let token = self.incr(&r.fence);
        let raw = concat(&[
            b"L\n",
            token.to_string().as_bytes(),
            b"\n",
            r.owner.as_bytes(),
            b"\n",
            &r.value,
        ]);
        self.set(&r.leader, raw, Some(r.ttl_ms), false);
        if r.in_line {
            self.zrem(&r.line, &r.place);
        }
        self.publish(&r.channel, b"elected");
        AcquireReply::Elected(token)
    }

    pub fn renew(&mut self, terms: &[Renewal]) -> Vec<bool> {
        terms
            .iter()
            .map(|t| match self.get(&t.leader) {
                Parsed::Term { token, owner, .. }
                    if owner == t.owner.as_bytes() && token == t.token.to_string().as_bytes() =>
                {
                    self.pexpire(&t.leader, t.ttl_ms)
                }
                _ => false,
            })
            .collect()
    }

    pub fn resign(&mut self, r: &Resign) -> bool {
        let token_arg = r.token.map_or_else(|| "-".to_owned(), |t| t.to_string());
        let parsed = self.get(&r.leader);
        let mut removed = false;
        let free;
        match &parsed {
            Parsed::Term { token, owner, .. }
                if owner == r.owner.as_bytes() && token == token_arg.as_bytes() =>
            {
                self.del(&r.leader);
                removed = true;
                free = true;
            }
            Parsed::Nomination { nominee } if nominee == r.owner.as_bytes() => {
                self.del(&r.leader);
                removed = true;
                free = true;
            }
            _ => {
                if self.zrem(&r.line, &r.place) {
                    self.zrem(&r.line_until, &r.place);
                }
                if self.pttl(&r.line) == -1 {
                    self.pexpire(&r.line, r.keep_ms);
                    self.pexpire(&r.line_until, r.keep_ms);
                }
                // A waiter woken for a free key that leaves instead passes the wakeup on.
                free = parsed == Parsed::None;
            }
        }
        if free {
            if let Some(head) = self.zpopmin(&r.line) {
                let channel = format!(
                    "{}{}",
                    r.wake_prefix,
                    String::from_utf8_lossy(owner_of(&head))
                );
                self.publish(&channel, b"turn");
            } else if removed {
                self.publish(&r.channel, b"resigned");
            }
        }
        removed
    }

    pub fn refresh(&mut self, r: &Refresh) -> RefreshReply {
        let now = self.now_ms();
        let mut missing = Vec::new();
        let mut refreshed = Vec::new();
        for (i, place) in r.places.iter().enumerate() {
            if self.zscore(&r.line, place).is_some() {
                refreshed.push(place.clone());
            } else {
                missing.push(i);
            }
        }
        let any = !refreshed.is_empty();
        for place in refreshed {
            self.zadd(&r.line_until, (now + r.keep_ms) as f64, &place, false);
        }
        if any {
            // The line lives while a place in it is refreshed (REFRESH).
            if self.pttl(&r.line) < r.keep_ms as i64 {
                self.pexpire(&r.line, r.keep_ms);
            }
            if self.pttl(&r.line_until) < r.keep_ms as i64 {
                self.pexpire(&r.line_until, r.keep_ms);
            }
        }
        if self.set_nx(&r.line_maintained, r.period_ms) {
            let stale = self.zrangebyscore(&r.line_until, f64::NEG_INFINITY, now as f64, 64);
            for place in &stale {
                self.zrem(&r.line, place);
            }
            for place in &stale {
                self.zrem(&r.line_until, place);
            }
            let high = (now as f64 - r.keep_ms as f64) * 1000.0;
            let old = self.zrangebyscore(&r.line, f64::NEG_INFINITY, high, 64);
            let gone: Vec<Vec<u8>> = old
                .into_iter()
                .filter(|place| self.zscore(&r.line_until, place).is_none())
                .collect();
            for place in &gone {
                self.zrem(&r.line, place);
            }
            if self.pttl(&r.line) < r.keep_ms as i64 {
                self.pexpire(&r.line, r.keep_ms);
                self.pexpire(&r.line_until, r.keep_ms);
            }
        }
        let pttl = self.pttl(&r.leader);
        if pttl == -2 {
            if let Some(head) = self.zpopmin(&r.line) {
                let channel = format!(
                    "{}{}",
                    r.wake_prefix,
                    String::from_utf8_lossy(owner_of(&head))
                );
                self.publish(&channel, b"turn");
            }
            return RefreshReply {
                missing,
                head: Vec::new(),
                pttl,
            };
        }
        let head = self
            .zrange(&r.line)
            .into_iter()
            .next()
            .map(|(m, _)| m)
            .unwrap_or_default();
        RefreshReply {
            missing,
            head,
            pttl,
        }
    }

    pub fn leader(&self, key: &str) -> Option<LeaderReply> {
        match self.get(key) {
            Parsed::Term {
                token,
                owner,
                value,
            } => Some(LeaderReply {
                owner: String::from_utf8_lossy(&owner).into_owned(),
                value,
                // The real driver fails to read a token that is not a number: so does this.
                token: String::from_utf8_lossy(&token).parse().unwrap_or(u64::MAX),
                pttl: self.pttl(key),
            }),
            _ => None,
        }
    }

    pub fn candidates(&self, r: &Candidates) -> Vec<(String, Vec<u8>)> {
        let now = self.now_ms() as f64;
        let keep = r.keep_ms as f64;
        let mut out = match self.get(&r.leader) {
            Parsed::Term { owner, value, .. } => {
                vec![(String::from_utf8_lossy(&owner).into_owned(), value)]
            }
            _ => vec![("-".to_owned(), Vec::new())],
        };
        let first = out[0].0.clone();
        for (place, score) in self.zrange(&r.line) {
            let arrived = score / 1000.0;
            let live = match self.zscore(&r.line_until, &place) {
                Some(until) => until > now,
                None => arrived > now - keep,
            };
            if let Some(at) = find(&place, 0, b'\n')
                && live
            {
                let who = String::from_utf8_lossy(&place[..at]).into_owned();
                if who != first {
                    out.push((who, place[at + 1..].to_vec()));
                }
            }
        }
        out
    }

    pub fn hand_over(&mut self, r: &HandOver) -> HandOverReply {
        match self.get(&r.leader) {
            Parsed::Term { token, owner, .. }
                if owner == r.owner.as_bytes() && token == r.token.to_string().as_bytes() => {}
            _ => return HandOverReply::Gone,
        }
        let now = self.now_ms() as f64;
        let prefix = concat(&[r.nominee.as_bytes(), b"\n"]);
        let mut place = self
            .zrange(&r.line)
            .into_iter()
            .map(|(m, _)| m)
            .find(|m| m.starts_with(&prefix));
        if let Some(p) = &place
            && self
                .zscore(&r.line_until, p)
                .is_some_and(|until| until <= now)
        {
            place = None;
        }
        let Some(place) = place else {
            return HandOverReply::Absent;
        };
        self.set(
            &r.leader,
            concat(&[b"N\n", r.nominee.as_bytes()]),
            Some(r.ttl_ms),
            false,
        );
        self.zrem(&r.line, &place);
        self.zrem(&r.line_until, &place);
        self.publish(&format!("{}{}", r.wake_prefix, r.nominee), b"turn");
        self.publish(&r.channel, b"resigned");
        HandOverReply::Done
    }

    pub fn proclaim(&mut self, r: &Proclaim) -> bool {
        match self.get(&r.leader) {
            Parsed::Term { token, owner, .. }
                if owner == r.owner.as_bytes() && token == r.token.to_string().as_bytes() =>
            {
                let raw = concat(&[b"L\n", &token, b"\n", &owner, b"\n", &r.value]);
                self.set(&r.leader, raw, None, true);
                self.publish(&r.channel, b"proclaimed");
                true
            }
            _ => false,
        }
    }

    pub fn holds(&self, key: &str, owner: &str, token: u64) -> bool {
        matches!(self.get(key), Parsed::Term { token: t, owner: o, .. }
            if o == owner.as_bytes() && t == token.to_string().as_bytes())
    }
}
