#![doc = include_str!("../README.md")]

// Modules import only downward: `io`, `keys`, `scripts`, `wire`, `topology` and the small
// state modules at the bottom; `client` (the real I/O) and `subscriber` over them; `driver` (the
// protocol's state), then `campaign` and `protocol` (the `Driver` contract); `builder` and
// `url` (the real constructors) on top.
mod builder;
mod campaign;
mod client;
mod driver;
mod failure;
mod fence;
pub mod io;
mod keys;
mod keyspace;
mod line;
mod protocol;
mod renewals;
mod scripts;
mod subscriber;
mod topology;
mod url;
pub mod wire;

pub use builder::{DEFAULT_REQUEST_TIMEOUT, RedisDriverBuilder};
pub use client::ACL_COMMANDS;
pub use driver::RedisDriver;
pub use fence::Fence;
pub use io::RedisIo;
pub use keys::ElectionKeys;
pub use redis;
pub use url::SCHEMES;
