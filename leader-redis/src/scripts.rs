//! The Lua scripts: every step of an election is one of them, atomic in Redis, and each
//! compares the owner's unique token (and the term's fencing token) before it touches a
//! term.

/// The server's time in milliseconds, as a Lua expression's prelude (`now`). Scripts that
/// read the clock and then write are replicated by their effects: the default since Redis
/// 5, asked for explicitly for older servers.
macro_rules! now_ms {
    () => {
        "redis.replicate_commands()\n\
         local clock = redis.call('TIME')\n\
         local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)\n"
    };
}

/// Takes the lead if the key is free (or already this candidate's, from an ended term),
/// with a fresh fencing token, and leaves the line; otherwise stands in line (arrival
/// order kept; the entry lives until after this waiter's next try) and returns the
/// holder's remaining PTTL.
/// KEYS: leader, fence, line (sorted set: owner by arrival), line entries' expiries (hash).
/// ARGV: owner token, value, ttl in ms, events channel.
pub(crate) const ACQUIRE: &str = concat!(
    now_ms!(),
    r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  local pttl = redis.call('PTTL', KEYS[1])
  local keep = math.max(pttl, 0) + 2 * tonumber(ARGV[3])
  redis.call('ZADD', KEYS[3], 'NX', now, ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], now + keep)
  for i = 3, 4 do
    local left = redis.call('PTTL', KEYS[i])
    if left < keep then
      redis.call('PEXPIRE', KEYS[i], keep)
    end
  end
  return {0, pttl}
end
local token = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'value', ARGV[2], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[4], 'elected')
return {1, token}
"
);

/// Extends the lease of every given term that its candidate still owns: one call renews
/// all the terms a driver holds on one server.
/// KEYS: leader keys. ARGV: per key, owner token, fencing token, ttl in ms.
/// Returns, per key, 1 if renewed, 0 if the term is gone.
pub(crate) const RENEW: &str = r"
local renewed = {}
for i = 1, #KEYS do
  local at = (i - 1) * 3
  local held = redis.call('HMGET', KEYS[i], 'owner', 'token')
  if held[1] == ARGV[at + 1] and held[2] == ARGV[at + 2] then
    renewed[i] = redis.call('PEXPIRE', KEYS[i], ARGV[at + 3])
  else
    renewed[i] = 0
  end
end
return renewed
";

/// Leaves the line; and if this candidate owns the key in the given term, deletes it and
/// announces it. Then, if nobody leads, wakes the head of the line only (skipping entries
/// that expired: a waiter gone without a word), so that a woken waiter that leaves instead
/// of taking the lead passes the wakeup on.
/// KEYS: leader, line, line entries' expiries. ARGV: owner token, events channel, fencing
/// token (`-` to leave the line only), wake channel prefix.
pub(crate) const RESIGN: &str = concat!(
    now_ms!(),
    r"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
local resigned = 0
if held[1] == ARGV[1] and held[2] == ARGV[3] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'resigned')
  resigned = 1
elseif held[1] then
  -- Someone else leads: nothing to hand over.
  return 0
end
-- No leader now (this one resigned, or a waiter woken for a free key left the line
-- instead): wake the next in line.
for i = 1, 64 do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then
    break
  end
  local expires = tonumber(redis.call('HGET', KEYS[3], head[1]) or '0')
  if expires > now then
    redis.call('PUBLISH', ARGV[4] .. head[1], 'your turn')
    break
  end
  redis.call('ZREM', KEYS[2], head[1])
  redis.call('HDEL', KEYS[3], head[1])
end
return resigned
"
);

/// The leader and the remaining lease, read at one instant. KEYS: leader.
pub(crate) const LEADER: &str = r"
local held = redis.call('HMGET', KEYS[1], 'owner', 'value', 'token')
if not held[1] then
  return {}
end
return {held[1], held[2], held[3], redis.call('PTTL', KEYS[1])}
";
