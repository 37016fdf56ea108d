//! The stores the bench starts, and how it counts the work they do. Which stores there
//! are is leader-chaos's [`StoreKind`], shared with the chaos suite.

use std::sync::Arc;
use std::time::Duration;

use leader::postgres::tokio_postgres;
use leader_chaos::StoreKind;
use leader_core::Driver;
use leader_testkit::{EtcdServer, PostgresServer, RedisServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::BoxResult;

/// The store processes of one run.
pub(crate) struct Stores {
    pub(crate) etcd: EtcdServer,
    pub(crate) redis: RedisServer,
    /// A second Redis with `appendonly yes` + `appendfsync always`, as the README asks
    /// for safety: handoffs are measured on both.
    pub(crate) redis_fsync: RedisServer,
    /// PostgreSQL with its durable defaults (`fsync = on`, `synchronous_commit = on`) and
    /// `pg_stat_statements`, which counts every statement.
    pub(crate) postgres: PostgresServer,
    /// A connection for reading `pg_stat_statements` and the floor's writes.
    pub(crate) postgres_admin: tokio_postgres::Client,
}

impl Stores {
    /// Starts etcd, two Redis servers and PostgreSQL on free loopback ports.
    pub(crate) async fn start() -> BoxResult<Stores> {
        let (etcd, redis, redis_fsync, postgres) = tokio::task::spawn_blocking(|| {
            Ok::<_, std::io::Error>((
                EtcdServer::start()?,
                RedisServer::start()?,
                RedisServer::start_persistent()?,
                PostgresServer::start_with(&[
                    "fsync=on",
                    "shared_preload_libraries=pg_stat_statements",
                    "pg_stat_statements.track_utility=on",
                ])?,
            ))
        })
        .await??;
        let postgres_admin = postgres_client(&postgres.url()).await?;
        postgres_admin
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
        Ok(Stores {
            etcd,
            redis,
            redis_fsync,
            postgres,
            postgres_admin,
        })
    }

    /// etcd's client endpoint (for etcdctl), Redis's and PostgreSQL's URL.
    pub(crate) fn endpoint(&self, store: StoreKind) -> String {
        match store {
            StoreKind::Etcd => self.etcd.endpoints()[0].clone(),
            StoreKind::Redis => self.redis.url(),
            StoreKind::Postgres => self.postgres.url(),
        }
    }

    /// The store URL, for `leader::connect` and the candidate processes.
    pub(crate) fn url(&self, store: StoreKind) -> String {
        match store {
            StoreKind::Etcd => format!("etcd://{}", self.etcd.client_addr(0)),
            StoreKind::Redis => self.redis.url(),
            StoreKind::Postgres => self.postgres.url(),
        }
    }

    /// A new driver (its own connections) for `store`.
    pub(crate) async fn driver(&self, store: StoreKind) -> BoxResult<Arc<dyn Driver>> {
        Ok(leader::connect(&self.url(store)).await?)
    }

    /// Requests the store has served so far. etcd: gRPC messages received, from
    /// `/metrics`. Redis: every command from `INFO commandstats`, the commands run inside
    /// scripts included (see [`Stores::redis_store_work`]). PostgreSQL: every statement of
    /// every connection (utility ones, LISTEN, included), from `pg_stat_statements`.
    pub(crate) async fn requests(&self, store: StoreKind) -> BoxResult<u64> {
        match store {
            StoreKind::Etcd => {
                self.etcd_metric("grpc_server_msg_received_total", None)
                    .await
            }
            StoreKind::Redis => self.redis_store_work().await,
            StoreKind::Postgres => {
                // Less this measurement's own statements.
                let row = self
                    .postgres_admin
                    .query_one(
                        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                         WHERE query NOT LIKE '%pg_stat_statements%'",
                        &[],
                    )
                    .await?;
                Ok(u64::try_from(row.try_get::<_, i64>(0)?)?)
            }
        }
    }

    /// Every command the (non-fsync) Redis has run, from `INFO commandstats`: the
    /// commands clients sent and the `redis.call`s inside scripts alike (Redis counts
    /// both), nothing excluded by name, so that a regression that polls shows; less the
    /// bench's own `INFO`, `MONITOR` and `ECHO` (its markers) calls.
    pub(crate) async fn redis_store_work(&self) -> BoxResult<u64> {
        let stats = redis_commandstats(&self.redis.url()).await?;
        Ok(stats
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "info" | "monitor" | "echo"))
            .map(|(_, calls)| calls)
            .sum())
    }

    /// The sum of an etcd metric's samples, optionally only those whose labels contain
    /// `label`.
    pub(crate) async fn etcd_metric(&self, metric: &str, label: Option<&str>) -> BoxResult<u64> {
        let body = http_get(self.etcd.client_addr(0), "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(metric))
            .filter(|l| label.is_none_or(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// The servers' versions: etcd, redis, postgres.
    pub(crate) async fn versions(&self) -> BoxResult<[(StoreKind, String); 3]> {
        let body = http_get(self.etcd.client_addr(0), "/version").await?;
        let json = body.split("\r\n\r\n").nth(1).unwrap_or("{}");
        let etcd = serde_json::from_str::<serde_json::Value>(json)?["etcdserver"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned();
        let client = redis::Client::open(self.redis.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        let redis = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let postgres: String = self
            .postgres_admin
            .query_one("SHOW server_version", &[])
            .await?
            .try_get(0)?;
        Ok([
            (StoreKind::Etcd, etcd),
            (StoreKind::Redis, redis),
            (StoreKind::Postgres, postgres),
        ])
    }
}

/// A PostgreSQL session of the bench's own (no TLS: the server is on loopback).
pub(crate) async fn postgres_client(url: &str) -> BoxResult<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// `(command, calls)` from a Redis's `INFO commandstats`.
async fn redis_commandstats(url: &str) -> BoxResult<Vec<(String, u64)>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    Ok(parse_commandstats(&info))
}

fn parse_commandstats(info: &str) -> Vec<(String, u64)> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// What MONITOR saw while some work ran.
pub(crate) struct Monitored {
    /// Commands sent by clients.
    pub(crate) requests: u64,
    /// Commands run inside Lua scripts (`redis.call`).
    pub(crate) in_scripts: u64,
}

/// Counts a Redis's commands with MONITOR while `work` runs: exactly those between two
/// `ECHO` markers sent just before and just after it (MONITOR shows commands in the order
/// the server ran them), whatever the commands are named.
pub(crate) async fn redis_monitored<T>(
    server: &RedisServer,
    work: impl std::future::Future<Output = BoxResult<T>>,
) -> BoxResult<(T, Monitored)> {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await?;
    stream.write_all(b"MONITOR\r\n").await?;
    let (read, _write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    // "+OK" first, then one line per command.
    lines.next_line().await?.ok_or("MONITOR refused")?;
    let marker = format!("leader-bench-{}", std::process::id());
    let (start, end) = (format!("\"{marker}-start\""), format!("\"{marker}-end\""));
    // LEADER_BENCH_MONITOR=FILE: the counted lines go there too (to see what the work is).
    let mut dump = match std::env::var_os("LEADER_BENCH_MONITOR") {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };
    let counter = tokio::spawn(async move {
        let (mut requests, mut in_scripts) = (0u64, 0u64);
        let mut counting = false;
        while let Some(line) = lines.next_line().await? {
            if let Some(file) = dump.as_mut().filter(|_| counting) {
                use std::io::Write;
                writeln!(file, "{line}")?;
            }
            if line.ends_with(&start) {
                counting = true;
            } else if line.ends_with(&end) {
                return Ok::<_, std::io::Error>(Monitored {
                    requests,
                    in_scripts,
                });
            } else if is_info(&line) {
                // The bench's own commandstats reads.
            } else if counting && line.contains(" lua] ") {
                in_scripts += 1;
            } else if counting {
                requests += 1;
            }
        }
        Err(std::io::Error::other("MONITOR ended before the end marker"))
    });
    let client = redis::Client::open(server.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut mark = async |suffix: &str| -> BoxResult<()> {
        let _: String = redis::cmd("ECHO")
            .arg(format!("{marker}-{suffix}"))
            .query_async(&mut conn)
            .await?;
        Ok(())
    };
    mark("start").await?;
    let result = work.await;
    mark("end").await?;
    let counted = tokio::time::timeout(Duration::from_secs(30), counter)
        .await
        .map_err(|_| "MONITOR did not show the end marker within 30s")???;
    Ok((result?, counted))
}

/// Whether a MONITOR line shows an `INFO` command.
fn is_info(line: &str) -> bool {
    line.split_once("] ")
        .is_some_and(|(_, command)| command.to_ascii_lowercase().starts_with("\"info\""))
}

/// A plain HTTP/1.0 GET; the whole response, headers included.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> BoxResult<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_of_info_are_recognised() {
        assert!(is_info(
            r#"1700000000.1 [0 127.0.0.1:5555] "INFO" "commandstats""#
        ));
        assert!(!is_info(r#"1700000000.1 [0 lua] "get" "info""#));
    }

    #[test]
    fn commandstats_parse() {
        let info = "# Commandstats\r\n\
            cmdstat_set:calls=1,usec=10,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_evalsha:calls=12,usec=108,usec_per_call=9.00\r\n";
        assert_eq!(
            parse_commandstats(info),
            vec![("set".to_owned(), 1), ("evalsha".to_owned(), 12)]
        );
    }
}
