//! A model of the part of Redis the driver's scripts use: strings and sorted sets with
//! millisecond expiry on the store's clock, `TIME`, pub/sub connections that lose what is
//! published while they are cut off, and keyspace notifications (`K` + `A`) for string
//! keys. The driver's own Lua scripts run on it (`lua.rs`: an embedded Lua 5.1 whose
//! `redis.call` runs [`Store::command`]), each in one step (scripts are atomic in Redis);
//! `tests/differential.rs` keeps the commands equal to the real server's.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use leader_redis::io::Message;
use leader_redis::redis::Value;
use leader_redis::wire::ScriptCall;
use leader_testkit::sim::{ClientId, Net};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::lua::Scripts;

/// Server time in µs at the model's start (a Unix time of late 2023, as `TIME` returns).
const EPOCH_US: u64 = 1_700_000_000_000_000;

#[derive(Debug, Clone, PartialEq)]
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
    /// The driver's scripts in Lua (taken out while one runs).
    scripts: Option<Scripts>,
    /// What failed that cannot fail on Redis (see [`Store::fault`]); scripted scenarios
    /// check that it stays empty.
    pub faults: Vec<String>,
    /// The asynchronous replica a Sentinel would promote: the data as of the last write
    /// it acknowledged.
    pub replica: BTreeMap<String, Entry>,
    /// Until when (the store's clock) the replica's link is down: writes land on the
    /// master, `WAIT` after them times out (the caller gets an error), and the replica
    /// catches up when the link returns.
    pub replica_down_until: Option<Instant>,
    /// An operator's write the replica has not had yet. A failover that lost it would
    /// bring back a term the harness was told had ended (and must stop leading), which
    /// Redis may do but the harness cannot excuse precisely: the model does not fail over
    /// then.
    pub operator_unreplicated: bool,
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
            scripts: Some(Scripts::default()),
            faults: Vec::new(),
            replica: BTreeMap::new(),
            replica_down_until: None,
            operator_unreplicated: false,
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
        if self.replica_down_until.is_some_and(|until| now >= until) {
            // The replica's link is back: it catches up with the master.
            self.replica_down_until = None;
            self.replica = self.keys.clone();
            self.operator_unreplicated = false;
        }
    }

    /// A write just ran; `WAIT 1` follows it. Returns whether the replica acknowledged
    /// it (it then has every write so far); `down_for`: its link goes down now for that
    /// long (unless it is already).
    pub fn replicate(&mut self, down_for: Option<std::time::Duration>) -> bool {
        if self.replica_down_until.is_none()
            && let Some(down_for) = down_for
        {
            self.replica_down_until = Some(self.now + down_for);
        }
        if self.replica_down_until.is_some() {
            return false;
        }
        self.replica = self.keys.clone();
        true
    }

    /// Sentinel promotes the replica: the writes it did not acknowledge are lost.
    pub fn fail_over(&mut self) {
        self.keys = std::mem::take(&mut self.replica);
        self.replica = self.keys.clone();
        self.replica_down_until = None;
        self.operator_unreplicated = false;
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

    /// Runs one of the driver's scripts (the request has begun: see [`Store::begin`]). A
    /// script that fails is a violation (the driver's scripts never fail on Redis): the
    /// seed fails, and the caller gets the error reply Redis would send.
    pub fn eval(&mut self, call: &ScriptCall) -> leader_core::Result<Value> {
        let mut scripts = self.scripts.take().unwrap_or_default();
        let answer =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scripts.eval(self, call)))
                .unwrap_or_else(|_| Err("the model panicked".to_owned()));
        self.scripts = Some(scripts);
        answer.map_err(|err| {
            self.fault(format!("{:?} failed in the model: {err}", call.script));
            leader_core::Error::store(std::io::Error::other(err))
        })
    }

    /// Something that cannot happen with Redis and the driver's scripts (a script that
    /// fails, an answer the driver cannot read): a violation of the seed, and kept for
    /// scripted scenarios (see [`Store::faults`]).
    pub fn fault(&mut self, what: String) {
        self.net.violation(what.clone());
        self.faults.push(what);
    }

    // Commands, as `redis.call` runs them inside the driver's scripts (see `lua.rs`).

    /// Runs one command (the scripts' subset of Redis, with its replies and errors).
    pub fn command(&mut self, args: &[Vec<u8>]) -> Result<Reply, String> {
        let Some((name, args)) = args.split_first() else {
            return Err("ERR wrong number of arguments".into());
        };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        // Redis's arity of each command (the name counted; negative: at least).
        let arity: i64 = match name.as_str() {
            "TIME" => 1,
            "GET" | "INCR" | "PTTL" => 2,
            "PUBLISH" | "ZSCORE" => 3,
            "SET" | "PEXPIRE" | "ZREM" | "ZMSCORE" => -3,
            "DEL" | "ZPOPMIN" => -2,
            "ZADD" | "ZRANGE" | "ZRANGEBYSCORE" => -4,
            _ => return Err(format!("ERR unknown command '{name}' (not in the model)")),
        };
        let given = i64::try_from(args.len() + 1).unwrap_or(i64::MAX);
        if (arity > 0 && given != arity) || (arity < 0 && given < -arity) {
            return Err(format!(
                "ERR wrong number of arguments for '{}' command",
                name.to_ascii_lowercase()
            ));
        }
        let text = |i: usize| -> Result<String, String> {
            args.get(i)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .ok_or_else(|| format!("ERR wrong number of arguments for '{name}'"))
        };
        let int = |i: usize| -> Result<i64, String> {
            text(i)?
                .parse::<i64>()
                .map_err(|_| "ERR value is not an integer or out of range".to_owned())
        };
        let wrong_type =
            || "WRONGTYPE Operation against a key holding the wrong kind of value".to_owned();
        let is_zset = |s: &Self, key: &str| match s.keys.get(key) {
            None => Ok(()),
            Some(Entry {
                val: Val::Zset(_), ..
            }) => Ok(()),
            Some(_) => Err(wrong_type()),
        };
        match name.as_str() {
            "TIME" => {
                let us = self.now_us();
                Ok(Reply::Array(vec![
                    Reply::Bulk((us / 1_000_000).to_string().into_bytes()),
                    Reply::Bulk((us % 1_000_000).to_string().into_bytes()),
                ]))
            }
            "GET" => match self.keys.get(&text(0)?) {
                None => Ok(Reply::Nil),
                Some(Entry {
                    val: Val::Str(raw), ..
                }) => Ok(Reply::Bulk(raw.clone())),
                Some(_) => Err(wrong_type()),
            },
            "SET" => {
                let (key, raw) = (text(0)?, args.get(1).cloned().ok_or("ERR syntax error")?);
                let (mut px, mut nx, mut keep_ttl, mut at) = (None, false, false, 2);
                while at < args.len() {
                    match text(at)?.to_ascii_uppercase().as_str() {
                        "PX" => {
                            let ms = int(at + 1)?;
                            px =
                                Some(u64::try_from(ms).ok().filter(|ms| *ms > 0).ok_or(
                                    "ERR invalid expire time in 'set' command".to_owned(),
                                )?);
                            at += 2;
                        }
                        "NX" => (nx, at) = (true, at + 1),
                        "KEEPTTL" => (keep_ttl, at) = (true, at + 1),
                        _ => return Err("ERR syntax error".into()),
                    }
                }
                if nx && self.keys.contains_key(&key) {
                    return Ok(Reply::Nil);
                }
                self.set(&key, raw, px, keep_ttl);
                Ok(Reply::Status("OK".into()))
            }
            "DEL" => {
                let mut gone = 0;
                for key in args {
                    gone += i64::from(self.del(&String::from_utf8_lossy(key)));
                }
                Ok(Reply::Int(gone))
            }
            "INCR" => {
                let key = text(0)?;
                match self.keys.get(&key) {
                    Some(Entry {
                        val: Val::Str(raw), ..
                    }) if std::str::from_utf8(raw)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .is_none() =>
                    {
                        Err("ERR value is not an integer or out of range".into())
                    }
                    Some(Entry {
                        val: Val::Zset(_), ..
                    }) => Err(wrong_type()),
                    _ => Ok(Reply::Int(self.incr(&key))),
                }
            }
            "PEXPIRE" => {
                if args.len() > 2 {
                    return Err("ERR the model knows PEXPIRE key ms only".into());
                }
                let (key, ms) = (text(0)?, int(1)?);
                // A time not in the future deletes the key (with `del`), as in Redis.
                match u64::try_from(ms) {
                    Ok(ms) if ms > 0 => Ok(Reply::Int(i64::from(self.pexpire(&key, ms)))),
                    _ => Ok(Reply::Int(i64::from(self.del(&key)))),
                }
            }
            "PTTL" => Ok(Reply::Int(self.pttl(&text(0)?))),
            "PUBLISH" => {
                let payload = args.get(1).ok_or("ERR wrong number of arguments")?;
                self.publish(&text(0)?, payload);
                Ok(Reply::Int(0))
            }
            "ZADD" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                let nx = text(1)?.eq_ignore_ascii_case("NX");
                let pairs = &args[1 + usize::from(nx)..];
                if pairs.is_empty() || pairs.len() % 2 != 0 {
                    return Err("ERR syntax error".into());
                }
                let mut added = 0;
                for pair in pairs.chunks(2) {
                    let at = score(&String::from_utf8_lossy(&pair[0]))?;
                    let new = self.zscore(&key, &pair[1]).is_none();
                    self.zadd(&key, at, &pair[1], nx);
                    added += i64::from(new);
                }
                Ok(Reply::Int(added))
            }
            "ZREM" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                let removed = args[1..].iter().filter(|m| self.zrem(&key, m)).count();
                Ok(Reply::Int(i64::try_from(removed).unwrap_or(i64::MAX)))
            }
            "ZSCORE" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                let member = args.get(1).ok_or("ERR wrong number of arguments")?;
                Ok(self
                    .zscore(&key, member)
                    .map_or(Reply::Nil, |s| Reply::Bulk(shown(s))))
            }
            "ZMSCORE" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                if args.len() < 2 {
                    return Err("ERR wrong number of arguments for 'zmscore' command".into());
                }
                Ok(Reply::Array(
                    args[1..]
                        .iter()
                        .map(|m| {
                            self.zscore(&key, m)
                                .map_or(Reply::Nil, |s| Reply::Bulk(shown(s)))
                        })
                        .collect(),
                ))
            }
            "ZRANGE" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                let (start, stop) = (int(1)?, int(2)?);
                let scores = match args.len() {
                    3 => false,
                    4 if text(3)?.eq_ignore_ascii_case("WITHSCORES") => true,
                    _ => return Err("ERR syntax error".into()),
                };
                let all = self.zrange(&key);
                let len = i64::try_from(all.len()).unwrap_or(i64::MAX);
                let from = if start < 0 {
                    (len + start).max(0)
                } else {
                    start
                };
                let to = if stop < 0 {
                    len + stop
                } else {
                    stop.min(len - 1)
                };
                let mut out = Vec::new();
                if from <= to {
                    for (member, at) in
                        &all[usize::try_from(from).unwrap_or(0)..=usize::try_from(to).unwrap_or(0)]
                    {
                        out.push(Reply::Bulk(member.clone()));
                        if scores {
                            out.push(Reply::Bulk(shown(*at)));
                        }
                    }
                }
                Ok(Reply::Array(out))
            }
            "ZRANGEBYSCORE" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                let (min, max) = (text(1)?, text(2)?);
                let limit = match args.len() {
                    3 => usize::MAX,
                    6 if text(3)?.eq_ignore_ascii_case("LIMIT") && int(4)? == 0 => {
                        usize::try_from(int(5)?).unwrap_or(usize::MAX)
                    }
                    _ => return Err("ERR syntax error (the model knows LIMIT 0 n only)".into()),
                };
                let (low, low_open) = bound(&min)?;
                let (high, high_open) = bound(&max)?;
                Ok(Reply::Array(
                    self.zrange(&key)
                        .into_iter()
                        .filter(|(_, s)| {
                            (if low_open { *s > low } else { *s >= low })
                                && (if high_open { *s < high } else { *s <= high })
                        })
                        .take(limit)
                        .map(|(m, _)| Reply::Bulk(m))
                        .collect(),
                ))
            }
            "ZPOPMIN" => {
                let key = text(0)?;
                is_zset(self, &key)?;
                if args.len() != 1 {
                    return Err("ERR the model knows ZPOPMIN key only".into());
                }
                let head = self.zrange(&key).into_iter().next();
                Ok(Reply::Array(match head {
                    Some((member, at)) => {
                        self.zrem(&key, &member);
                        vec![Reply::Bulk(member), Reply::Bulk(shown(at))]
                    }
                    None => Vec::new(),
                }))
            }
            _ => Err(format!("ERR unknown command '{name}' (not in the model)")),
        }
    }
}

/// A reply of a command, as `redis.call` hands it to a script.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Status(String),
    Array(Vec<Reply>),
}

/// A score as Redis parses it (`-inf`, `+inf`, a number).
fn score(text: &str) -> Result<f64, String> {
    match text.to_ascii_lowercase().as_str() {
        "-inf" => Ok(f64::NEG_INFINITY),
        "+inf" | "inf" => Ok(f64::INFINITY),
        other => other
            .parse::<f64>()
            .ok()
            .filter(|f| !f.is_nan())
            .ok_or_else(|| "ERR value is not a valid float".to_owned()),
    }
}

/// A range bound of `ZRANGEBYSCORE`: the score, and whether it is exclusive (`(`).
fn bound(text: &str) -> Result<(f64, bool), String> {
    match text.strip_prefix('(') {
        Some(rest) => Ok((score(rest)?, true)),
        None => Ok((score(text)?, false)),
    }
}

/// A score as Redis shows it (`%.17g`: whole numbers without a fraction).
fn shown(score: f64) -> Vec<u8> {
    if score.fract() == 0.0 && score.abs() < 1e17 {
        format!("{}", score as i64).into_bytes()
    } else {
        format!("{score}").into_bytes()
    }
}
