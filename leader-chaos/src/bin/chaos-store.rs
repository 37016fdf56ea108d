//! Starts one store for a chaos run in a process of its own, so that the orchestrator can
//! give it an environment (libfaketime's `LD_PRELOAD` and offset file, for store clock
//! steps) without giving it to itself: prints `ADDR URL` once the store accepts
//! connections, then keeps it until SIGTERM or until its stdin closes.
//!
//! ```text
//! chaos-store redis|postgres
//! ```

use std::io::{Read, Write};

use clap::Parser;
use leader_chaos::StoreKind;
use leader_testkit::{PostgresServer, RedisServer};

/// Starts a store and keeps it.
#[derive(Debug, Parser)]
#[command(name = "chaos-store")]
struct Args {
    /// `redis` (appendfsync always) or `postgres` (fsync on).
    store: StoreKind,
}

fn main() {
    let args = Args::parse();
    let started = match args.store {
        StoreKind::Redis => RedisServer::start_persistent().map(|s| {
            let line = format!("{} {}", s.addr(), s.url());
            (line, Box::new(s) as Box<dyn std::any::Any>)
        }),
        StoreKind::Postgres => PostgresServer::start_with(&["fsync=on"]).map(|s| {
            let line = format!("{} {}", s.addr(), s.url());
            (line, Box::new(s) as Box<dyn std::any::Any>)
        }),
        StoreKind::Etcd => {
            eprintln!("chaos-store: etcd's leases run on its monotonic clock: not offered");
            std::process::exit(2);
        }
    };
    let (line, server) = match started {
        Ok(started) => started,
        Err(err) => {
            eprintln!("chaos-store: {err}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
    // Until stdin closes (the orchestrator's end of the pipe is dropped, or it exits).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(server);
}
