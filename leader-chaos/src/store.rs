//! The stores a chaos run starts ([`StoreKind`]), and what the orchestrator does to them.

use std::io;
use std::net::SocketAddr;

use leader_testkit::{EtcdServer, PostgresServer, RedisCluster, RedisSentinel, RedisServer};

use crate::BoxResult;

/// A store the election runs on: the one list of stores the chaos suite and the bench
/// share (their candidates reach it by URL, through `leader::connect`).
///
/// In a chaos [`run`](crate::run), etcd is a 3-member cluster with its peer links through
/// proxies (so members can be partitioned; candidate `i` talks to member
/// `i`), Redis one redis-server with `appendonly yes` + `appendfsync always`, PostgreSQL one
/// server with `fsync=on` (its durable default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StoreKind {
    /// etcd, through `leader-etcd`.
    Etcd,
    /// Redis, through `leader-redis`.
    Redis,
    /// PostgreSQL, through `leader-postgres`.
    Postgres,
}

impl StoreKind {
    /// Every store, in the order reports list them.
    pub const ALL: [StoreKind; 3] = [StoreKind::Etcd, StoreKind::Redis, StoreKind::Postgres];

    /// `etcd`, `redis` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Etcd => "etcd",
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        StoreKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| format!("unknown store {s:?}: etcd, redis or postgres"))
    }
}

/// The store processes of one run.
pub(crate) enum Store {
    Etcd(EtcdServer),
    Redis(RedisServer),
    Postgres(PostgresServer),
    /// Redis under Sentinel: a master, a replica, three sentinels.
    Sentinel(RedisSentinel),
    /// A Redis Cluster of three masters with a replica each.
    Cluster(RedisCluster),
    /// Redis or PostgreSQL started by a `chaos-store` process under a clock-stepping
    /// preload library (see [`Store::start_faked`]), its wall
    /// clock offset by what `offset_file` says (moved by [`Store::step_clock`]).
    Faked(Faked),
}

/// A store whose wall clock the orchestrator steps (see [`Store::Faked`]).
pub(crate) struct Faked {
    kind: StoreKind,
    child: tokio::process::Child,
    addr: SocketAddr,
    url: String,
    offset_file: std::path::PathBuf,
    /// The offset now, in nanoseconds (negative: behind).
    offset_ns: i128,
}

/// The preload library that steps redis-server's wall clock (see `clockshift.c`).
const CLOCKSHIFT_C: &str = include_str!("clockshift.c");

/// Builds `clockshift.c` into `dir` with the C compiler (`cc`, which Rust's own linking
/// needs anyway): the path of the shared library.
async fn build_clockshift(dir: &std::path::Path) -> BoxResult<std::path::PathBuf> {
    let source = dir.join("clockshift.c");
    let library = dir.join("libclockshift.so");
    std::fs::write(&source, CLOCKSHIFT_C)?;
    let output = tokio::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .await
        .map_err(|err| format!("cannot run cc to build clockshift.c (install gcc): {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "cc could not build clockshift.c: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    // The library is loaded by processes of other users too (redis-server runs as us, but
    // keep it readable like the offset file).
    let mut permissions = std::fs::metadata(&library)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&library, permissions)?;
    Ok(library)
}

/// Where Debian's `faketime` package puts the library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

impl Store {
    /// Starts `kind` (Redis or PostgreSQL) through the `chaos-store` binary `helper`, its
    /// wall clock offset by a file of `dir` (readable by the postgres user): PostgreSQL
    /// under libfaketime, Redis under this crate's `clockshift.c` (redis-server's jemalloc
    /// hangs under libfaketime), built here with `cc`.
    pub(crate) async fn start_faked(
        kind: StoreKind,
        helper: &std::path::Path,
        dir: &std::path::Path,
    ) -> BoxResult<Store> {
        use tokio::io::AsyncBufReadExt;
        let offset_file = dir.join("faketime-offset");
        std::fs::write(&offset_file, "+0\n")?;
        let mut permissions = std::fs::metadata(dir)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(dir, permissions)?;
        let mut command = tokio::process::Command::new(helper);
        command.arg(kind.name());
        if kind == StoreKind::Redis {
            let library = build_clockshift(dir).await?;
            command
                .env("LD_PRELOAD", library)
                .env("LEADER_CLOCKSHIFT_FILE", &offset_file);
        } else {
            if !std::path::Path::new(LIBFAKETIME).is_file() {
                return Err(format!(
                    "{LIBFAKETIME} is missing: install the faketime package (ci/lib.sh does)"
                )
                .into());
            }
            command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", &offset_file)
                .env("FAKETIME_NO_CACHE", "1")
                // The stores' timers and the candidates' clock stay true: only wall time
                // moves.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let line = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await?
            .ok_or("chaos-store exited before its store was up")?;
        let (addr, url) = line.split_once(' ').ok_or("chaos-store: a bad line")?;
        Ok(Store::Faked(Faked {
            kind,
            child,
            addr: addr.parse()?,
            url: url.to_owned(),
            offset_file,
            offset_ns: 0,
        }))
    }

    /// Steps the faked store's wall clock by `delta` (back if `back`); an error for a
    /// store not under libfaketime.
    pub(crate) fn step_clock(&mut self, delta: std::time::Duration, back: bool) -> BoxResult<()> {
        let Store::Faked(faked) = self else {
            return Err("only a store started with a steppable clock (clock_store) can have its clock stepped".into());
        };
        let delta = i128::try_from(delta.as_nanos())?;
        faked.offset_ns += if back { -delta } else { delta };
        let seconds = faked.offset_ns as f64 / 1e9;
        std::fs::write(&faked.offset_file, format!("{seconds:+.6}\n"))?;
        Ok(())
    }

    /// Stops a `chaos-store` process (closing its stdin lets it stop its store).
    pub(crate) async fn stop(self) {
        if let Store::Faked(mut faked) = self {
            drop(faked.child.stdin.take());
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(20), faked.child.wait()).await;
        }
    }

    /// Starts Redis in `topology`, every server with `appendfsync always`.
    pub(crate) fn start_topology(topology: crate::RedisTopology) -> io::Result<Store> {
        let durable = vec!["appendonly yes".to_owned(), "appendfsync always".to_owned()];
        Ok(match topology {
            crate::RedisTopology::Sentinel => Store::Sentinel(RedisSentinel::start_with(durable)?),
            crate::RedisTopology::Cluster => {
                Store::Cluster(RedisCluster::start_with_replicas(3, durable)?)
            }
        })
    }

    /// Redis under Sentinel or as a Cluster only: kills the master (on a Cluster, the one
    /// that serves election `election`'s keys), waits until its replica took over, starts
    /// the old master again and waits until it is a replica in sync (under Sentinel with
    /// `replicas=1` no term is granted or renewed before: WAIT needs a replica).
    pub(crate) fn fail_over_master(&mut self, election: &str) -> io::Result<()> {
        match self {
            Store::Sentinel(setup) => {
                let old = setup.master()?;
                setup.servers[old].kill();
                setup.wait_for_failover(old)?;
                setup.servers[old].restart()?;
                setup.wait_for_replica(old)
            }
            Store::Cluster(cluster) => {
                let key = format!("leader:{{{election}}}:leader");
                let old = cluster.node_of(&key)?;
                cluster.nodes[old].kill();
                cluster.wait_for_failover(old, &key)?;
                cluster.nodes[old].restart()?;
                cluster.wait_until_ok()
            }
            _ => Err(io::Error::other(
                "only Redis under Sentinel or as a Cluster fails over",
            )),
        }
    }

    /// The URL candidates use without a proxy in front (Sentinel finds the master itself),
    /// if the store is reached that way.
    pub(crate) fn direct_url(&self) -> Option<String> {
        match self {
            Store::Sentinel(setup) => Some(format!("{}?replicas=1", setup.url())),
            Store::Cluster(cluster) => Some(cluster.url()),
            _ => None,
        }
    }

    /// Starts `kind` as a run uses it.
    pub(crate) fn start(kind: StoreKind) -> io::Result<Store> {
        Ok(match kind {
            StoreKind::Etcd => Store::Etcd(EtcdServer::start_cluster_with_peer_proxies(3)?),
            StoreKind::Redis => Store::Redis(RedisServer::start_persistent()?),
            // The testkit's default is fsync=off (fast tests); a run tests durability.
            StoreKind::Postgres => Store::Postgres(PostgresServer::start_with(&["fsync=on"])?),
        })
    }

    /// Where candidate `slot`'s proxy forwards to.
    pub(crate) fn upstream(&self, slot: usize) -> SocketAddr {
        match self {
            Store::Etcd(server) => server.client_addr(slot % 3),
            Store::Redis(server) => server.addr(),
            Store::Postgres(server) => server.addr(),
            // Unused: the candidates use the direct URL.
            Store::Sentinel(setup) => setup.sentinels[0].addr(),
            Store::Cluster(cluster) => cluster.nodes[0].addr(),
            Store::Faked(faked) => faked.addr,
        }
    }

    /// The URL the observer uses (every etcd member, no proxy).
    pub(crate) fn url(&self) -> String {
        match self {
            Store::Etcd(server) => format!(
                "etcd://{}",
                (0..3)
                    .map(|member| server.client_addr(member).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Store::Redis(server) => server.url(),
            Store::Postgres(server) => server.url(),
            Store::Sentinel(_) | Store::Cluster(_) => self.direct_url().unwrap_or_default(),
            Store::Faked(faked) => faked.url.clone(),
        }
    }

    /// Kills every process of the store and starts it again on its data.
    pub(crate) fn restart(&mut self) -> io::Result<()> {
        match self {
            Store::Etcd(server) => {
                for member in 0..3 {
                    server.kill(member);
                }
                for member in 0..3 {
                    server.restart(member)?;
                }
            }
            Store::Redis(server) => {
                server.kill();
                server.restart()?;
            }
            Store::Postgres(server) => {
                server.kill();
                server.restart()?;
            }
            Store::Faked(_) => {
                return Err(io::Error::other(
                    "a store with a stepped clock is not restarted by the chaos suite",
                ));
            }
            Store::Sentinel(_) | Store::Cluster(_) => {
                return Err(io::Error::other(
                    "Redis under Sentinel or as a Cluster fails over instead \
                     (Fault::MasterFailover)",
                ));
            }
        }
        Ok(())
    }

    /// Deletes the leader's key (`revoke`: revokes its lease instead, etcd only), as an
    /// operator would, bypassing the candidates. Returns when the deleting request was
    /// sent and when the store answered it (CLOCK_MONOTONIC).
    pub(crate) async fn tamper(&self, election: &str, revoke: bool) -> BoxResult<(u64, u64)> {
        let (sent, answered);
        match self {
            Store::Etcd(server) => {
                use leader_etcd::etcd_client::{Client, GetOptions, SortOrder, SortTarget};
                let endpoints = server.endpoints();
                let mut client = Client::connect(endpoints, None).await?;
                let prefix = format!("{election}/");
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1);
                let response = client.get(prefix.as_str(), Some(options)).await?;
                let kv = response
                    .kvs()
                    .first()
                    .ok_or("no leader key to tamper with")?;
                sent = crate::monotonic_ns();
                if revoke {
                    client.lease_revoke(kv.lease()).await?;
                } else {
                    client.delete(kv.key(), None).await?;
                }
                answered = crate::monotonic_ns();
            }
            Store::Redis(_)
            | Store::Faked(Faked {
                kind: StoreKind::Redis,
                ..
            }) => {
                let client = leader_redis::redis::Client::open(self.url())?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                let key = format!("leader:{{{election}}}:leader");
                sent = crate::monotonic_ns();
                let _: i64 = leader_redis::redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await?;
                answered = crate::monotonic_ns();
            }
            Store::Postgres(_) | Store::Faked(_) => {
                use leader_postgres::tokio_postgres;
                let (client, connection) =
                    tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
                let driving = tokio::spawn(connection);
                let statement = client
                    .prepare("DELETE FROM leader_elections WHERE name = $1")
                    .await?;
                sent = crate::monotonic_ns();
                client.execute(&statement, &[&election]).await?;
                answered = crate::monotonic_ns();
                drop(client);
                let _ = driving.await;
            }
            Store::Sentinel(_) | Store::Cluster(_) => {
                return Err(
                    "no tampering under Sentinel or on a Cluster (Fault::MasterFailover only)"
                        .into(),
                );
            }
        }
        Ok((sent, answered))
    }

    /// etcd only: kills member `member`.
    pub(crate) fn kill_member(&mut self, member: usize) {
        if let Store::Etcd(server) = self {
            server.kill(member);
        }
    }

    /// etcd only: cuts member `member` off from the other members (see
    /// [`EtcdServer::isolate_member`]).
    pub(crate) fn isolate_member(&self, member: usize) -> io::Result<()> {
        match self {
            Store::Etcd(server) => server.isolate_member(member),
            _ => Err(io::Error::other("only etcd has members to partition")),
        }
    }

    /// etcd only: lets member `member` reach the others again.
    pub(crate) fn heal_member(&self, member: usize) -> io::Result<()> {
        match self {
            Store::Etcd(server) => server.heal_member(member),
            _ => Err(io::Error::other("only etcd has members to partition")),
        }
    }

    /// etcd only: starts member `member` again.
    pub(crate) fn restart_member(&mut self, member: usize) -> io::Result<()> {
        if let Store::Etcd(server) = self {
            server.restart(member)?;
        }
        Ok(())
    }
}
