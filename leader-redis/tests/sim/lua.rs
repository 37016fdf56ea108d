//! The driver's own Lua scripts, run on the model as Redis runs them: an embedded Lua 5.1
//! (the version Redis embeds) whose `redis.call` and `redis.pcall` run the model's
//! commands ([`Store::command`]), with Redis's conversions between its replies and Lua
//! values both ways. A script runs in one step, as scripts are atomic in Redis.

use std::cell::RefCell;
use std::collections::HashMap;

use leader_redis::redis::Value;
use leader_redis::wire::{Script, ScriptCall};
use mlua::{Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value as LuaValue};

use super::store::{Reply, Store};

/// The Lua state, with each script compiled once.
pub struct Scripts {
    lua: Lua,
    compiled: HashMap<Script, Function>,
}

impl Default for Scripts {
    fn default() -> Self {
        // As Redis: the base, table, string and math libraries only, and globals
        // protected (reading an undeclared one, or creating one, is an error: a typo in a
        // script fails there as it fails in Redis).
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH,
            LuaOptions::default(),
        )
        .unwrap_or_else(|err| panic!("a Lua state: {err}"));
        lua.load(
            r#"setmetatable(_G, {
  __index = function(_, name)
    error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
  end,
  __newindex = function(_, name)
    error("Script attempted to create global variable '" .. tostring(name) .. "'", 2)
  end,
})"#,
        )
        .exec()
        .unwrap_or_else(|err| panic!("protecting Lua's globals: {err}"));
        Scripts {
            lua,
            compiled: HashMap::new(),
        }
    }
}

impl Scripts {
    /// Runs `call` on `store`: the script's answer as Redis sends it, or the error Redis
    /// would answer (a script's own error, or a command's error raised by `redis.call`).
    pub fn eval(&mut self, store: &mut Store, call: &ScriptCall) -> Result<Value, String> {
        let function = match self.compiled.get(&call.script) {
            Some(function) => function.clone(),
            None => {
                let function = self
                    .lua
                    .load(call.script.source())
                    .set_name(format!("{:?}", call.script))
                    .into_function()
                    .map_err(|err| {
                        format!("the {:?} script does not compile: {err}", call.script)
                    })?;
                self.compiled.insert(call.script, function.clone());
                function
            }
        };
        let lua = &self.lua;
        let store = RefCell::new(store);
        let result = lua.scope(|scope| {
            let globals = lua.globals();
            let keys = lua.create_table()?;
            for (i, key) in call.keys.iter().enumerate() {
                keys.raw_set(i + 1, lua.create_string(key)?)?;
            }
            let argv = lua.create_table()?;
            for (i, arg) in call.args.iter().enumerate() {
                argv.raw_set(i + 1, lua.create_string(arg)?)?;
            }
            globals.raw_set("KEYS", keys)?;
            globals.raw_set("ARGV", argv)?;
            let redis = lua.create_table()?;
            let run = |lua: &Lua, args: MultiValue, protected: bool| -> mlua::Result<LuaValue> {
                let args = match arguments(args) {
                    Ok(args) => Ok(args),
                    Err(mlua::Error::RuntimeError(err)) => Err(err),
                    Err(other) => return Err(other),
                };
                match args
                    .and_then(|args| declared(call, &args).map(|()| args))
                    .and_then(|args| store.borrow_mut().command(&args))
                {
                    Ok(reply) => to_lua(lua, reply),
                    Err(err) if protected => {
                        let table = lua.create_table()?;
                        table.set("err", err)?;
                        Ok(LuaValue::Table(table))
                    }
                    Err(err) => Err(mlua::Error::RuntimeError(err)),
                }
            };
            redis.set(
                "call",
                scope.create_function(move |lua, args: MultiValue| run(lua, args, false))?,
            )?;
            redis.set(
                "pcall",
                scope.create_function(move |lua, args: MultiValue| run(lua, args, true))?,
            )?;
            redis.set("replicate_commands", lua.create_function(|_, ()| Ok(true))?)?;
            for (name, field) in [("error_reply", "err"), ("status_reply", "ok")] {
                redis.set(
                    name,
                    lua.create_function(move |lua, message: mlua::LuaString| {
                        let table = lua.create_table()?;
                        table.set(field, message)?;
                        Ok(table)
                    })?,
                )?;
            }
            globals.raw_set("redis", redis)?;
            let answer: LuaValue = function.call(())?;
            from_lua(answer)
        });
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err),
            Err(err) => Err(format!("the {:?} script failed: {err}", call.script)),
        }
    }
}

/// Refuses a command on a key the call did not declare in `KEYS` (Redis Cluster refuses
/// those that hash elsewhere; a least-privilege user's ACL may too), and a command the
/// driver's ACL ([`leader_redis::ACL_COMMANDS`]) does not list.
fn declared(call: &ScriptCall, args: &[Vec<u8>]) -> Result<(), String> {
    let Some((name, rest)) = args.split_first() else {
        return Ok(());
    };
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let permitted = leader_redis::ACL_COMMANDS
        .split_whitespace()
        .any(|command| command.strip_prefix('+') == Some(name.as_str()));
    if !permitted {
        return Err(format!(
            "NOPERM the driver's ACL (ACL_COMMANDS) does not list '{name}'"
        ));
    }
    let keys: &[Vec<u8>] = match name.as_str() {
        "time" | "publish" => &[],
        "del" => rest,
        _ => rest.get(..1).unwrap_or_default(),
    };
    for key in keys {
        if !call
            .keys
            .iter()
            .any(|declared| declared.as_bytes() == key.as_slice())
        {
            return Err(format!(
                "ERR the script touched {:?}, which its call did not declare in KEYS",
                String::from_utf8_lossy(key)
            ));
        }
    }
    Ok(())
}

/// A command's arguments: strings as they are, numbers as Redis formats them (`%.17g`;
/// whole numbers without a fraction), anything else refused as Redis refuses it.
fn arguments(args: MultiValue) -> mlua::Result<Vec<Vec<u8>>> {
    if args.is_empty() {
        return Err(mlua::Error::RuntimeError(
            "Please specify at least one argument for this redis lib call".into(),
        ));
    }
    args.into_iter()
        .map(|arg| match arg {
            LuaValue::String(s) => Ok(s.as_bytes().to_vec()),
            LuaValue::Integer(i) => Ok(i.to_string().into_bytes()),
            LuaValue::Number(n) if n.fract() == 0.0 && n.abs() < 1e17 => {
                Ok(format!("{}", n as i64).into_bytes())
            }
            LuaValue::Number(n) => Ok(format!("{n}").into_bytes()),
            _ => Err(mlua::Error::RuntimeError(
                "Lua redis lib command arguments must be strings or integers".into(),
            )),
        })
        .collect()
}

/// A command's reply as a Lua value, as Redis converts it: integers to numbers, bulk
/// strings to strings, a nil bulk to `false`, arrays to tables, a status to `{ok = ...}`.
fn to_lua(lua: &Lua, reply: Reply) -> mlua::Result<LuaValue> {
    Ok(match reply {
        Reply::Nil => LuaValue::Boolean(false),
        Reply::Int(i) => LuaValue::Integer(i),
        Reply::Bulk(bytes) => LuaValue::String(lua.create_string(bytes)?),
        Reply::Status(status) => {
            let table = lua.create_table()?;
            table.set("ok", status)?;
            LuaValue::Table(table)
        }
        Reply::Array(items) => {
            let table = lua.create_table()?;
            for (i, item) in items.into_iter().enumerate() {
                table.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(table)
        }
    })
}

/// A script's answer as Redis sends it: numbers truncated to integers, strings as bulk
/// strings, `true` as 1, `false` and `nil` as a nil bulk, a table with `err` as an error,
/// one with `ok` as a status, any other table as an array up to its first `nil`.
fn from_lua(value: LuaValue) -> mlua::Result<Result<Value, String>> {
    Ok(Ok(match value {
        LuaValue::Nil | LuaValue::Boolean(false) => Value::Nil,
        LuaValue::Boolean(true) => Value::Int(1),
        LuaValue::Integer(i) => Value::Int(i),
        LuaValue::Number(n) => Value::Int(n as i64),
        LuaValue::String(s) => Value::BulkString(s.as_bytes().to_vec()),
        LuaValue::Table(table) => return table_reply(table),
        // Functions, userdata and the like: Redis answers nil.
        _ => Value::Nil,
    }))
}

fn table_reply(table: Table) -> mlua::Result<Result<Value, String>> {
    if let LuaValue::String(err) = table.raw_get::<LuaValue>("err")? {
        return Ok(Err(err.to_string_lossy()));
    }
    if let LuaValue::String(ok) = table.raw_get::<LuaValue>("ok")? {
        return Ok(Ok(Value::SimpleString(ok.to_string_lossy())));
    }
    let mut items = Vec::new();
    for i in 1.. {
        let item: LuaValue = table.raw_get(i)?;
        if item.is_nil() {
            break;
        }
        match from_lua(item)? {
            Ok(value) => items.push(value),
            Err(err) => return Ok(Err(err)),
        }
    }
    Ok(Ok(Value::Array(items)))
}
