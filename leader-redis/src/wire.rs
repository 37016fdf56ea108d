//! Each request of [`RedisIo`](crate::RedisIo) as Redis sees it: which script, its keys
//! and arguments ([`ScriptCall`]), and how its answer is read (the `*_reply` functions).
//!
//! The real I/O layer sends these calls and reads the answers with these functions. The
//! crate's simulation runs the very same scripts ([`Script::source`]) with the very same
//! arguments on its model of Redis (an embedded Lua 5.1, as Redis embeds), and reads the
//! answers with the same functions: a change to a script, to an argument or to the reading
//! of an answer is exercised there too, with no server.

use leader_core::{Error, Result};
use redis::{FromRedisValue, ToRedisArgs, Value};

use crate::io::{
    Acquire, AcquireReply, Candidates, HandOver, HandOverReply, LeaderReply, Proclaim, Refresh,
    RefreshReply, Renewal, Resign,
};
use crate::scripts::{
    ACQUIRE, CANDIDATES, HAND_OVER, HOLDS, LEADER, PROCLAIM, REFRESH, RENEW, RESIGN,
};

/// One of the driver's Lua scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Script {
    /// Takes the lead, or stands in line.
    Acquire,
    /// Renews every given term still held.
    Renew,
    /// Ends a term or a nomination, or leaves the line; wakes the head.
    Resign,
    /// Refreshes places in line; prunes; wakes the head when nobody leads.
    Refresh,
    /// The leader and its remaining lease.
    Leader,
    /// The leader and the live places in line.
    Candidates,
    /// Ends a term and nominates a waiting candidate.
    HandOver,
    /// Sets a held term's value.
    Proclaim,
    /// Whether a term still holds the key.
    Holds,
}

impl Script {
    /// Every script.
    pub const ALL: [Script; 9] = [
        Script::Acquire,
        Script::Renew,
        Script::Resign,
        Script::Refresh,
        Script::Leader,
        Script::Candidates,
        Script::HandOver,
        Script::Proclaim,
        Script::Holds,
    ];

    /// The script's Lua source, as sent to Redis.
    pub fn source(self) -> &'static str {
        match self {
            Script::Acquire => ACQUIRE,
            Script::Renew => RENEW,
            Script::Resign => RESIGN,
            Script::Refresh => REFRESH,
            Script::Leader => LEADER,
            Script::Candidates => CANDIDATES,
            Script::HandOver => HAND_OVER,
            Script::Proclaim => PROCLAIM,
            Script::Holds => HOLDS,
        }
    }
}

/// One call of a script: `EVALSHA <sha> <number of keys> <keys> <args>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall {
    /// The script.
    pub script: Script,
    /// Its `KEYS`.
    pub keys: Vec<String>,
    /// Its `ARGV`.
    pub args: Vec<Vec<u8>>,
    /// Whether it may write (a `WAIT` follows it when the driver waits for replicas).
    pub writes: bool,
}

impl ScriptCall {
    fn new(script: Script, keys: &[&str], writes: bool) -> Self {
        ScriptCall {
            script,
            keys: keys.iter().map(|key| (*key).to_owned()).collect(),
            args: Vec::new(),
            writes,
        }
    }

    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

fn unexpected(what: &str, answer: impl std::fmt::Debug) -> Error {
    Error::store(std::io::Error::other(format!(
        "unexpected answer from the {what} script: {answer:?}"
    )))
}

/// `value` read as a `T`, or an error naming the script (and showing the answer).
fn read<T: FromRedisValue>(what: &str, value: Value) -> Result<T> {
    T::from_redis_value_ref(&value).map_err(|_| unexpected(what, value))
}

/// [`RedisIo::acquire`](crate::RedisIo::acquire).
pub fn acquire(r: &Acquire) -> ScriptCall {
    ScriptCall::new(Script::Acquire, &[&r.leader, &r.fence, &r.line], true)
        .arg(&r.owner)
        .arg(r.value.as_slice())
        .arg(r.ttl_ms)
        .arg(&r.channel)
        .arg(r.place.as_slice())
        .arg(flag(r.in_line))
        .arg(flag(r.stand))
        .arg(flag(r.ask_pttl))
}

/// The answer to [`acquire`].
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn acquire_reply(value: Value) -> Result<AcquireReply> {
    let answer: Vec<i64> = read("acquire", value)?;
    match answer.as_slice() {
        [1, token] => Ok(AcquireReply::Elected(*token)),
        [0, pttl] => Ok(AcquireReply::Held(Some(*pttl))),
        [0] => Ok(AcquireReply::Held(None)),
        other => Err(unexpected("acquire", other)),
    }
}

/// [`RedisIo::renew`](crate::RedisIo::renew): one call for all `terms`.
pub fn renew(terms: &[Renewal]) -> ScriptCall {
    let keys: Vec<&str> = terms.iter().map(|term| term.leader.as_str()).collect();
    let mut call = ScriptCall::new(Script::Renew, &keys, true);
    for term in terms {
        call = call.arg(&term.owner).arg(term.token).arg(term.ttl_ms);
    }
    call
}

/// The answer to [`renew`]: per term, whether it was renewed.
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn renew_reply(value: Value) -> Result<Vec<bool>> {
    let values: Vec<i64> = read("renew", value)?;
    Ok(values.iter().map(|v| *v == 1).collect())
}

/// [`RedisIo::resign`](crate::RedisIo::resign).
pub fn resign(r: &Resign) -> ScriptCall {
    let token = r.token.map_or_else(|| "-".to_owned(), |t| t.to_string());
    ScriptCall::new(Script::Resign, &[&r.leader, &r.line, &r.line_until], true)
        .arg(&r.owner)
        .arg(r.place.as_slice())
        .arg(token)
        .arg(&r.channel)
        .arg(&r.wake_prefix)
        .arg(r.keep_ms)
}

/// The answer to [`resign`]: whether a term or nomination was removed.
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn resign_reply(value: Value) -> Result<bool> {
    Ok(read::<i64>("resign", value)? == 1)
}

/// [`RedisIo::refresh`](crate::RedisIo::refresh).
pub fn refresh(r: &Refresh) -> ScriptCall {
    let mut call = ScriptCall::new(
        Script::Refresh,
        &[&r.leader, &r.line, &r.line_until, &r.line_maintained],
        true,
    )
    .arg(r.keep_ms)
    .arg(r.period_ms)
    .arg(&r.wake_prefix);
    for place in &r.places {
        call = call.arg(place.as_slice());
    }
    call
}

/// The answer to [`refresh`].
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn refresh_reply(value: Value) -> Result<RefreshReply> {
    let (missing, head, pttl): (Vec<usize>, Vec<u8>, i64) = read("refresh", value)?;
    Ok(RefreshReply {
        missing,
        head,
        pttl,
    })
}

/// [`RedisIo::leader`](crate::RedisIo::leader).
pub fn leader(leader: &str) -> ScriptCall {
    ScriptCall::new(Script::Leader, &[leader], false)
}

/// The answer to [`leader`].
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn leader_reply(value: Value) -> Result<Option<LeaderReply>> {
    let raw: Vec<Value> = read("leader", value)?;
    if raw.is_empty() {
        return Ok(None);
    }
    let (owner, value, token, pttl): (String, Vec<u8>, u64, i64) =
        read("leader", Value::Array(raw))?;
    Ok(Some(LeaderReply {
        owner,
        value,
        token,
        pttl,
    }))
}

/// [`RedisIo::candidates`](crate::RedisIo::candidates).
pub fn candidates(r: &Candidates) -> ScriptCall {
    ScriptCall::new(
        Script::Candidates,
        &[&r.leader, &r.line, &r.line_until],
        false,
    )
    .arg(r.keep_ms)
}

/// The answer to [`candidates`]: owner and value, the leader (or `-`) first.
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn candidates_reply(value: Value) -> Result<Vec<(String, Vec<u8>)>> {
    let flat: Vec<Vec<u8>> = read("candidates", value)?;
    Ok(flat
        .chunks_exact(2)
        .map(|pair| {
            (
                String::from_utf8_lossy(&pair[0]).into_owned(),
                pair[1].clone(),
            )
        })
        .collect())
}

/// [`RedisIo::hand_over`](crate::RedisIo::hand_over).
pub fn hand_over(r: &HandOver) -> ScriptCall {
    ScriptCall::new(Script::HandOver, &[&r.leader, &r.line, &r.line_until], true)
        .arg(&r.owner)
        .arg(r.token.to_string())
        .arg(&r.nominee)
        .arg(r.ttl_ms)
        .arg(&r.wake_prefix)
        .arg(&r.channel)
}

/// The answer to [`hand_over`].
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn hand_over_reply(value: Value) -> Result<HandOverReply> {
    let answer: String = read("handover", value)?;
    match answer.as_str() {
        "ok" => Ok(HandOverReply::Done),
        "gone" => Ok(HandOverReply::Gone),
        "absent" => Ok(HandOverReply::Absent),
        other => Err(unexpected("handover", other)),
    }
}

/// [`RedisIo::proclaim`](crate::RedisIo::proclaim).
pub fn proclaim(r: &Proclaim) -> ScriptCall {
    ScriptCall::new(Script::Proclaim, &[&r.leader], true)
        .arg(&r.owner)
        .arg(r.token.to_string())
        .arg(r.value.as_slice())
        .arg(&r.channel)
}

/// The answer to [`proclaim`]: whether the term was held.
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn proclaim_reply(value: Value) -> Result<bool> {
    Ok(read::<i64>("proclaim", value)? == 1)
}

/// [`RedisIo::holds`](crate::RedisIo::holds).
pub fn holds(leader: &str, owner: &str, token: u64) -> ScriptCall {
    ScriptCall::new(Script::Holds, &[leader], false)
        .arg(owner)
        .arg(token.to_string())
}

/// The answer to [`holds`].
///
/// # Errors
///
/// [`Error::Store`] if the answer is not one the script gives.
pub fn holds_reply(value: Value) -> Result<bool> {
    Ok(read::<i64>("holds", value)? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_is_listed_in_its_order_of_declaration() {
        for (at, script) in Script::ALL.iter().enumerate() {
            assert_eq!(*script as usize, at);
        }
    }

    #[test]
    fn answers_the_scripts_do_not_give_are_errors() {
        assert!(acquire_reply(Value::Array(vec![Value::Int(2)])).is_err());
        assert!(acquire_reply(Value::Nil).is_err());
        assert!(hand_over_reply(Value::BulkString(b"maybe".to_vec())).is_err());
        assert_eq!(
            acquire_reply(Value::Array(vec![Value::Int(1), Value::Int(7)])).ok(),
            Some(AcquireReply::Elected(7))
        );
        assert_eq!(leader_reply(Value::Array(vec![])).ok(), Some(None));
    }
}
