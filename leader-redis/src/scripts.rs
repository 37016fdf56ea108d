//! The Lua scripts: every step of an election is one of them, atomic in Redis, and each
//! compares the owner's unique token (and the term's fencing token) before it touches a
//! term.
//!
//! The leader key is a string, so that one `SET … PX` writes a term and one `GET` reads it:
//! `L\n<token>\n<owner>\n<value>` for a term, `N\n<nominee>` for a nomination (a
//! [`hand_over`](leader_core::Driver::hand_over) in progress: only the nominee may take it).
//! Anything else there (a key set by hand, of any type) counts as held by someone else.
//!
//! A place in line is the member `<owner>\n<value>` of the line (scored by arrival, server
//! time in µs) and, once its driver refreshed it, of `line-until` (scored by when it
//! expires). Each driver refreshes the places of its waiting candidates every two thirds of a TTL (one
//! call per election, whatever their number); places not refreshed are pruned, so nothing
//! of a candidate outlives its withdrawal by more than two TTLs.
//!
//! The scripts count their own commands: each `redis.call` is one more command for Redis
//! (`INFO commandstats` counts them), so the handoff path is kept to a few.

/// The prelude every script starts with: `parse(raw)` of the leader key into
/// `kind, token, owner, value` (`kind`: `L` a term, `N` a nomination whose nominee is in
/// `owner`, `?` anything else, `nil` no key), and `owner_of(entry)` for a place in line.
macro_rules! prelude {
    () => {
        r"
redis.replicate_commands()
local function parse(raw)
  if not raw then
    return nil
  end
  if type(raw) ~= 'string' then
    return '?'
  end
  local kind = string.sub(raw, 1, 2)
  if kind == 'N\n' then
    return 'N', nil, string.sub(raw, 3)
  end
  if kind == 'L\n' then
    local a = string.find(raw, '\n', 3, true)
    if a then
      local b = string.find(raw, '\n', a + 1, true)
      if b then
        return 'L', string.sub(raw, 3, a - 1), string.sub(raw, a + 1, b - 1), string.sub(raw, b + 1)
      end
    end
  end
  return '?'
end
local function owner_of(entry)
  local at = string.find(entry, '\n', 1, true)
  if at then
    return string.sub(entry, 1, at - 1)
  end
  return entry
end
local function now_us()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local function now_ms()
  return math.floor(now_us() / 1000)
end
"
    };
}

/// Takes the lead if the key is free, holds this candidate's own ended term, or names it
/// as nominee: a fresh fencing token, and `elected` announced. Otherwise stands in line
/// (the place of the first arrival kept; not with `peek`) and returns `{0}`.
/// KEYS: leader, fence, line. ARGV: owner, value, ttl in ms, events channel, this
/// candidate's place (`owner\nvalue`), `1` if the place may still be in line (the
/// candidate was not woken by a pop), `1` to stand in line (`0`: peek, for a candidate
/// not yet subscribed to its wake channel), `1` to learn the key's remaining lease (a
/// head whose timer fired early).
/// Returns `{1, token}` when elected, `{0}` (or `{0, pttl}` when asked) when in line.
pub(crate) const ACQUIRE: &str = concat!(
    prelude!(),
    r"
local kind, _, owner = parse(redis.pcall('GET', KEYS[1]))
if kind and owner ~= ARGV[1] then
  if ARGV[7] == '1' then
    -- Arrival in microseconds: candidates arriving within one millisecond keep their order.
    redis.call('ZADD', KEYS[3], 'NX', now_us(), ARGV[5])
  end
  if ARGV[8] == '1' then
    return {0, redis.call('PTTL', KEYS[1])}
  end
  return {0}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], 'L\n' .. token .. '\n' .. ARGV[1] .. '\n' .. ARGV[2], 'PX', ARGV[3])
if ARGV[6] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[5])
end
redis.call('PUBLISH', ARGV[4], 'elected')
return {1, token}
"
);

/// Extends the lease of every given term that its candidate still owns: one call renews
/// all the terms a driver holds on one server.
/// KEYS: leader keys. ARGV: per key, owner token, fencing token, ttl in ms.
/// Returns, per key, 1 if renewed, 0 if the term is gone.
pub(crate) const RENEW: &str = concat!(
    prelude!(),
    r"
local renewed = {}
for i = 1, #KEYS do
  local at = (i - 1) * 3
  local kind, token, owner = parse(redis.pcall('GET', KEYS[i]))
  if kind == 'L' and owner == ARGV[at + 1] and token == ARGV[at + 2] then
    renewed[i] = redis.call('PEXPIRE', KEYS[i], ARGV[at + 3])
  else
    renewed[i] = 0
  end
end
return renewed
"
);

/// Ends this candidate's term (if it holds the given one) or its nomination, or leaves the
/// line. When that leaves the key free, wakes the head of the line (popping it: it is
/// about to take the lead), or announces `resigned` when nobody waits.
/// Leaving the line also gives the line's keys an expiry if they have none (a place that
/// a campaign left after its withdrawal, in a line nobody refreshes, must not stay).
/// KEYS: leader, line, line-until. ARGV: owner, this candidate's place, fencing token
/// (`-`: none known), events channel, wake channel prefix, keep (ms).
/// Returns 1 if a term or nomination was removed, else 0.
pub(crate) const RESIGN: &str = concat!(
    prelude!(),
    r"
local kind, token, owner = parse(redis.pcall('GET', KEYS[1]))
local removed = 0
local free = false
if kind == 'L' and owner == ARGV[1] and token == ARGV[3] then
  redis.call('DEL', KEYS[1])
  removed = 1
  free = true
elseif kind == 'N' and owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  removed = 1
  free = true
else
  if redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
    redis.call('ZREM', KEYS[3], ARGV[2])
  end
  if redis.call('PTTL', KEYS[2]) == -1 then
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
  end
  -- A waiter woken for a free key that leaves instead passes the wakeup on.
  free = not kind
end
if free then
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head > 0 then
    redis.call('PUBLISH', ARGV[5] .. owner_of(head[1]), 'turn')
  elseif removed == 1 then
    redis.call('PUBLISH', ARGV[4], 'resigned')
  end
end
return removed
"
);

/// A driver's periodic call for the candidates it has waiting in one election: refreshes
/// their places (those still in line; the others are reported missing) and reports the
/// head of the line and the remaining lease it waits behind (so that only the head keeps
/// a timer at the leader's expiry). When nobody leads, wakes the head (popping it). Once
/// per refresh period and election, whichever driver comes first (the `line-maintained`
/// marker), also prunes places whose waiters stopped refreshing them and places never
/// refreshed that are older than keep, and keeps the line's keys alive.
/// KEYS: leader, line, line-until, line-maintained. ARGV: keep (ms), period (ms), wake
/// channel prefix, then the places.
/// Returns `{missing indexes (0-based), head place or '', leader pttl}`.
pub(crate) const REFRESH: &str = concat!(
    prelude!(),
    r"
local now = now_ms()
local keep = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local missing = {}
local places = {}
for i = 4, #ARGV do
  places[#places + 1] = ARGV[i]
end
if #places > 0 then
  local scores = redis.call('ZMSCORE', KEYS[2], unpack(places))
  local refresh = {}
  for i = 1, #places do
    if scores[i] then
      refresh[#refresh + 1] = now + keep
      refresh[#refresh + 1] = places[i]
    else
      missing[#missing + 1] = i - 1
    end
  end
  if #refresh > 0 then
    redis.call('ZADD', KEYS[3], unpack(refresh))
    -- The line lives while a place in it is refreshed, not only from one maintenance to
    -- the next: a refresh that comes a little before the period ends on the server's clock
    -- skips the maintenance, and the line expired under its waiters. A line-until made
    -- anew here (after it expired or emptied) gets the line's expiry too: else, once its
    -- waiters are elected or woken and nobody refreshes, it would stay forever.
    if redis.call('PTTL', KEYS[2]) < keep then
      redis.call('PEXPIRE', KEYS[2], keep)
    end
    if redis.call('PTTL', KEYS[3]) < keep then
      redis.call('PEXPIRE', KEYS[3], keep)
    end
  end
end
if redis.call('SET', KEYS[4], '1', 'PX', period, 'NX') then
  -- Places whose waiters stopped refreshing them.
  local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 64)
  if #stale > 0 then
    redis.call('ZREM', KEYS[2], unpack(stale))
    redis.call('ZREM', KEYS[3], unpack(stale))
  end
  -- Places never refreshed (a campaign that landed after its withdrawal, a driver gone
  -- before its first refresh): older than keep, with no expiry of their own. From the
  -- oldest on, however old: no maintenance may have run for a long while (nobody else
  -- waited, the server was away), and such a place heading the line takes every
  -- wakeup. The oldest 64 are looked at, so the head always is.
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', (now - keep) * 1000, 'LIMIT', 0, 64)
  if #old > 0 then
    local until_ = redis.call('ZMSCORE', KEYS[3], unpack(old))
    local gone = {}
    for i = 1, #old do
      if not until_[i] then
        gone[#gone + 1] = old[i]
      end
    end
    if #gone > 0 then
      redis.call('ZREM', KEYS[2], unpack(gone))
    end
  end
  if redis.call('PTTL', KEYS[2]) < keep then
    redis.call('PEXPIRE', KEYS[2], keep)
    redis.call('PEXPIRE', KEYS[3], keep)
  end
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -2 then
  -- Nobody leads and nobody took over (a woken head gone without a word): wake the next.
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head > 0 then
    redis.call('PUBLISH', ARGV[3] .. owner_of(head[1]), 'turn')
  end
  return {missing, '', pttl}
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)
return {missing, head[1] or '', pttl}
"
);

/// The leader and the remaining lease, read at one instant. KEYS: leader.
/// Returns `{owner, value, token, pttl}` or `{}` (no leader, or a nomination).
pub(crate) const LEADER: &str = concat!(
    prelude!(),
    r"
local kind, token, owner, value = parse(redis.pcall('GET', KEYS[1]))
if kind ~= 'L' then
  return {}
end
return {owner, value, token, redis.call('PTTL', KEYS[1])}
"
);

/// Every candidate: the leader (if any) and then the live places in line, in order.
/// KEYS: leader, line, line-until. ARGV: keep (ms).
/// Returns a flat list: leader owner, value (or two empty strings with `''` as the first
/// item's marker `-`), then owner, value per waiter.
pub(crate) const CANDIDATES: &str = concat!(
    prelude!(),
    r"
local now = now_ms()
local keep = tonumber(ARGV[1])
local out = {}
local kind, _, owner, value = parse(redis.pcall('GET', KEYS[1]))
if kind == 'L' then
  out[1] = owner
  out[2] = value
else
  out[1] = '-'
  out[2] = ''
end
local line = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
if #line > 0 then
  local places = {}
  for i = 1, #line, 2 do
    places[#places + 1] = line[i]
  end
  local until_ = redis.call('ZMSCORE', KEYS[3], unpack(places))
  for i = 1, #places do
    local arrived = tonumber(line[2 * i]) / 1000
    local live
    if until_[i] then
      live = tonumber(until_[i]) > now
    else
      live = arrived > now - keep
    end
    local at = string.find(places[i], '\n', 1, true)
    if live and at then
      local who = string.sub(places[i], 1, at - 1)
      if who ~= out[1] then
        out[#out + 1] = who
        out[#out + 1] = string.sub(places[i], at + 1)
      end
    end
  end
end
return out
"
);

/// Ends the term `token` of `owner` and nominates a waiting candidate: the key then names
/// the nominee for one TTL (only it may take the lead meanwhile), its place leaves the
/// line, and it is woken.
/// KEYS: leader, line, line-until. ARGV: owner, fencing token, nominee, ttl in ms, wake
/// channel prefix, events channel.
/// Returns `ok`, `gone` (the term is not held) or `absent` (the nominee does not wait).
pub(crate) const HAND_OVER: &str = concat!(
    prelude!(),
    r"
local kind, token, owner = parse(redis.pcall('GET', KEYS[1]))
if kind ~= 'L' or owner ~= ARGV[1] or token ~= ARGV[2] then
  return 'gone'
end
local now = now_ms()
local prefix = ARGV[3] .. '\n'
local place = nil
local line = redis.call('ZRANGE', KEYS[2], 0, -1)
for i = 1, #line do
  if string.sub(line[i], 1, #prefix) == prefix then
    place = line[i]
    break
  end
end
if place then
  local until_ = redis.call('ZSCORE', KEYS[3], place)
  if until_ and tonumber(until_) <= now then
    place = nil
  end
end
if not place then
  return 'absent'
end
redis.call('SET', KEYS[1], 'N\n' .. ARGV[3], 'PX', ARGV[4])
redis.call('ZREM', KEYS[2], place)
redis.call('ZREM', KEYS[3], place)
redis.call('PUBLISH', ARGV[5] .. ARGV[3], 'turn')
redis.call('PUBLISH', ARGV[6], 'resigned')
return 'ok'
"
);

/// Sets the value of the term `token` of `owner`, keeping its expiry.
/// KEYS: leader. ARGV: owner, fencing token, value, events channel.
/// Returns 1 if set, 0 if the term is not held.
pub(crate) const PROCLAIM: &str = concat!(
    prelude!(),
    r"
local kind, token, owner = parse(redis.pcall('GET', KEYS[1]))
if kind ~= 'L' or owner ~= ARGV[1] or token ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], 'L\n' .. token .. '\n' .. owner .. '\n' .. ARGV[3], 'KEEPTTL')
redis.call('PUBLISH', ARGV[4], 'proclaimed')
return 1
"
);

/// Whether the term `token` of `owner` still holds the key. KEYS: leader. ARGV: owner,
/// fencing token. Returns 1 or 0.
pub(crate) const HOLDS: &str = concat!(
    prelude!(),
    r"
local kind, token, owner = parse(redis.pcall('GET', KEYS[1]))
if kind == 'L' and owner == ARGV[1] and token == ARGV[2] then
  return 1
end
return 0
"
);

/// The fence: runs one command if `token` is at least the highest seen for the resource.
/// KEYS: the fence key (then the command's keys, for the record). ARGV: token, then the
/// command and its arguments. A lower token is refused with `FENCED <highest seen>`.
pub(crate) const FENCE: &str = r"
local seen = redis.call('GET', KEYS[1])
local token = tonumber(ARGV[1])
if seen and tonumber(seen) > token then
  return redis.error_reply('FENCED ' .. seen)
end
if not seen or tonumber(seen) < token then
  redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call(unpack(ARGV, 2))
";
