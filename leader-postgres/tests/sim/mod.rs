//! A model of PostgreSQL for leader-postgres's protocol: the tables and statements
//! (`store.rs`), the server with its clock and `LISTEN` sessions, and the driver's I/O
//! trait on it (`server.rs`); [`PostgresModel`] puts them in the shared simulation
//! harness. Shared by `tests/simulation.rs` and `tests/differential.rs`.

#![allow(dead_code, unreachable_pub)]

pub mod server;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use leader_postgres::{DEFAULT_TABLE, PostgresDriver};
use leader_testkit::sim::{ClientId, Model, Net};

pub use server::{Server, SimIo};

/// PostgreSQL, modelled, with the drivers that talk to it.
pub struct PostgresModel {
    server: Arc<Server>,
}

impl PostgresModel {
    /// A fresh, empty server on `net`.
    pub fn new(net: &Net) -> Self {
        PostgresModel {
            server: Server::concurrent(net.clone()),
        }
    }

    /// The simulated server, for scripted scenarios (an operator's edits, dropped
    /// sessions).
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }
}

impl Model for PostgresModel {
    type Driver = PostgresDriver;

    fn name(&self) -> &'static str {
        "postgres"
    }

    fn driver(&self, _net: &Net, client: ClientId) -> PostgresDriver {
        let io = SimIo::new(Arc::clone(&self.server), client);
        PostgresDriver::with_io(Arc::new(io), DEFAULT_TABLE).expect("the default table is valid")
    }

    fn tamper(&self, net: &Net) -> Option<String> {
        if !net.chaos() {
            return None;
        }
        // An election the store knows (its row, or a place in line).
        let (tables, _) = self.server.snapshot();
        let names: Vec<String> = tables
            .elections
            .keys()
            .chain(tables.waiters.keys().map(|(name, _)| name))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if names.is_empty() {
            return None;
        }
        let (kind, which) = net.draw(|rng| {
            use rand::Rng;
            (rng.random_range(0..4u8), rng.random_range(0..names.len()))
        });
        let name = names[which].as_str();
        // The row's term, which its holder cannot know is ended or edited at once: excused.
        // A waiter's place deleted excuses nothing.
        if kind < 3
            && let Some(row) = tables.elections.get(name)
            && let Some(holder) = &row.holder
        {
            net.tampered(name, row.token as u64, holder, true);
        }
        let server = Arc::clone(&self.server);
        match kind {
            0 => server
                .statement(|t, _, notices| t.delete_row(name, notices))
                .then(|| format!("DELETE FROM leader_elections WHERE name = '{name}'")),
            1 => server
                .statement(|t, now, notices| t.expire_row(now, name, notices))
                .then(|| format!("UPDATE leader_elections SET expires_at = now() WHERE name = '{name}'")),
            2 => server
                .statement(|t, _, notices| t.bump_token(name, notices))
                .then(|| format!("UPDATE leader_elections SET fencing_token = fencing_token + 1 WHERE name = '{name}'")),
            _ => server.statement(|t, now, _| {
                let live: Vec<_> = t
                    .waiters
                    .iter()
                    .filter(|((n, _), w)| n == name && w.expires_at > now)
                    .map(|(k, _)| k.clone())
                    .collect();
                let victim = live.first()?.clone();
                t.waiters.remove(&victim);
                Some(format!(
                    "DELETE FROM leader_elections_waiters WHERE name = '{name}' AND candidate = '{}'",
                    victim.1
                ))
            }),
        }
    }

    fn end_term(&self, net: &Net, election: &str) -> Option<String> {
        let (tables, _) = self.server.snapshot();
        let row = tables.elections.get(election)?;
        net.tampered(election, row.token as u64, row.holder.as_ref()?, true);
        self.server
            .statement(|t, _, notices| t.delete_row(election, notices))
            .then(|| format!("DELETE FROM leader_elections WHERE name = '{election}'"))
    }

    fn notice_bound(&self, ttl: Duration) -> Option<Duration> {
        // The trigger's NOTIFY reaches the holder at once on a quiet network (0 ns on 2,000
        // seeds); without it the holder finds out at its next renewal (a third of the TTL).
        Some(ttl / 10)
    }

    fn exact_grants(&self) -> bool {
        true
    }

    fn restart(&self, _net: &Net, _kept: bool) {
        // The WAL keeps the tables; every session ends.
        self.server.drop_sessions();
    }

    fn leftovers(&self, _net: &Net) -> Vec<String> {
        let (tables, now) = self.server.snapshot();
        let mut left = Vec::new();
        for (name, row) in &tables.elections {
            if let Some(holder) = &row.holder
                && row.expires_at > now
            {
                left.push(format!("{name}: term {} of {holder}", row.token));
            }
            if let Some(nominee) = &row.nominee
                && row.nominated_until > now
            {
                left.push(format!("{name}: nomination of {nominee}"));
            }
        }
        for ((name, candidate), w) in &tables.waiters {
            if w.expires_at > now {
                left.push(format!("{name}: {candidate} in line"));
            }
        }
        left
    }

    fn terms_left(&self, _net: &Net) -> Option<Vec<String>> {
        let (tables, now) = self.server.snapshot();
        Some(
            tables
                .elections
                .iter()
                .filter_map(|(name, row)| {
                    let holder = row.holder.as_ref().filter(|_| row.expires_at > now)?;
                    Some(format!("{name}: term {} of {holder}", row.token))
                })
                .collect(),
        )
    }

    fn handoff_bound(&self, ttl: Duration) -> Option<Duration> {
        // The resignation's NOTIFY wakes the next waiter at once on a quiet network (0 ns
        // on 2,000 seeds); a lost wakeup waits for the waiter's own timer.
        Some(ttl / 10)
    }

    fn takeover_bound(&self, ttl: Duration) -> Option<Duration> {
        // The waiters' timers are at the row's expiry plus a jitter (at most 72 ms after
        // the old leader's deadline on 2,000 seeds).
        Some(ttl / 5)
    }

    fn orphan_bound(&self, ttl: Duration) -> Duration {
        // Expiry is exact (every statement compares expires_at with its clock); a
        // millisecond for the TTL's rounding to microseconds.
        ttl + Duration::from_millis(1)
    }
}
