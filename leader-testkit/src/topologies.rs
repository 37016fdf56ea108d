//! Redis topologies: a Cluster of masters, and a master with a replica under Sentinel.

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::require_binary;
use crate::redis::{RedisOptions, RedisServer};

/// How long a Cluster or a Sentinel setup may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `redis-cli -p port args…`, its standard output.
fn redis_cli(port: u16, args: &[&str]) -> io::Result<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "redis-cli -p {port} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// Polls `check` every 50 ms until it is true, or fails after [`SETTLE_TIMEOUT`].
fn settle(what: &str, mut check: impl FnMut() -> bool) -> io::Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > SETTLE_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not happen within {SETTLE_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A Redis Cluster made with `redis-cli --cluster create`: masters only, or each master
/// with one replica.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in the order given to `redis-cli --cluster create` (with replicas, the
    /// first half starts as masters).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3) nodes, joins them, and waits until every node says
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> io::Result<Self> {
        Self::start_nodes(masters, 0, Vec::new())
    }

    /// Starts `masters` (at least 3) masters, each with one replica that takes over when
    /// its master fails (after the 3 s node timeout), with `config` lines for every node
    /// (`appendfsync always`, say), and waits until every replica is in sync.
    pub fn start_with_replicas(masters: usize, config: Vec<String>) -> io::Result<Self> {
        Self::start_nodes(masters, 1, config)
    }

    fn start_nodes(masters: usize, replicas: usize, config: Vec<String>) -> io::Result<Self> {
        require_binary("redis-cli", "redis-tools")?;
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let mut lines = vec![
                "cluster-enabled yes".to_owned(),
                "cluster-config-file nodes.conf".to_owned(),
                // Long enough that a loaded machine does not mark a node as failing.
                "cluster-node-timeout 3000".to_owned(),
                // A slot whose master is down must not stop the others.
                "cluster-require-full-coverage no".to_owned(),
            ];
            lines.extend(config.iter().cloned());
            nodes.push(RedisServer::start_with(RedisOptions {
                config: lines,
                ..RedisOptions::default()
            })?);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let replicas = replicas.to_string();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", replicas.as_str(), "--cluster-yes"]);
        redis_cli(nodes[0].addr().port(), &args)?;
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok()?;
        Ok(cluster)
    }

    /// Waits until every running node says `cluster_state:ok` and every replica is in
    /// sync with its master.
    pub fn wait_until_ok(&self) -> io::Result<()> {
        settle(
            "cluster_state:ok and replicas in sync on every node",
            || {
                self.nodes.iter().all(|node| {
                    let port = node.addr().port();
                    redis_cli(port, &["cluster", "info"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                        && redis_cli(port, &["info", "replication"]).is_ok_and(|info| {
                            info.contains("role:master") || info.contains("master_link_status:up")
                        })
                })
            },
        )
    }

    /// Waits until a node other than `old` serves `key`'s slot, as a master.
    pub fn wait_for_failover(&self, old: usize, key: &str) -> io::Result<usize> {
        let mut new = old;
        settle("a cluster failover", || match self.node_of(key) {
            Ok(node) if node != old => {
                new = node;
                redis_cli(self.nodes[node].addr().port(), &["role"])
                    .is_ok_and(|role| role.starts_with("master"))
            }
            _ => false,
        })?;
        Ok(new)
    }

    /// `redis+cluster://host:port,host:port,…`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| n.addr().to_string()).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The index of the node that serves `key`'s slot (as the first node that answers
    /// says).
    pub fn node_of(&self, key: &str) -> io::Result<usize> {
        let port = self
            .nodes
            .iter()
            .map(|n| n.addr().port())
            .find(|&port| redis_cli(port, &["ping"]).is_ok_and(|pong| pong.contains("PONG")))
            .ok_or_else(|| io::Error::other("no cluster node answers"))?;
        let slot: u16 = redis_cli(port, &["cluster", "keyslot", key])?
            .trim()
            .parse()
            .map_err(io::Error::other)?;
        // Lines: id, ip:port@bus-port, flags, master, ping, pong, epoch, link, slots…
        let nodes = redis_cli(port, &["cluster", "nodes"])?;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|addr| addr.split('@').next())
                .and_then(|addr| addr.rsplit_once(':'))
                .and_then(|(_, port)| port.parse::<u16>().ok())
            else {
                continue;
            };
            let serves = fields.iter().skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                matches!(
                    (start.parse::<u16>(), end.parse::<u16>()),
                    (Ok(start), Ok(end)) if (start..=end).contains(&slot)
                )
            });
            if serves {
                return self
                    .nodes
                    .iter()
                    .position(|n| n.addr().port() == port)
                    .ok_or_else(|| io::Error::other("slot served by an unknown node"));
            }
        }
        Err(io::Error::other(format!("no node serves slot {slot}")))
    }
}

/// A master, one replica, and three Sentinels watching the master as `mymaster`
/// (down after 2 s, quorum 2).
#[derive(Debug)]
pub struct RedisSentinel {
    /// The master, then the replica (their roles swap on a failover).
    pub servers: Vec<RedisServer>,
    /// The sentinels.
    pub sentinels: Vec<RedisServer>,
}

/// The master's name in a [`RedisSentinel`].
pub const MASTER_NAME: &str = "mymaster";

impl RedisSentinel {
    /// Starts them, and waits until the master has its replica in sync and every
    /// sentinel knows the replica and the other sentinels.
    pub fn start() -> io::Result<Self> {
        Self::start_with(Vec::new())
    }

    /// [`start`](Self::start), with more `redis.conf` lines for the master and the replica
    /// (ACL users, say; the default user must stay on for replication and the sentinels).
    pub fn start_with(config: Vec<String>) -> io::Result<Self> {
        require_binary("redis-cli", "redis-tools")?;
        let master = RedisServer::start_with(RedisOptions {
            config: config.clone(),
            ..RedisOptions::default()
        })?;
        let port = master.addr().port();
        let mut replica_config = config;
        replica_config.push(format!("replicaof 127.0.0.1 {port}"));
        let replica = RedisServer::start_with(RedisOptions {
            config: replica_config,
            ..RedisOptions::default()
        })?;
        settle("the replica in sync", || {
            redis_cli(replica.addr().port(), &["info", "replication"])
                .is_ok_and(|info| info.contains("master_link_status:up"))
        })?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(RedisServer::start_with(RedisOptions {
                sentinel: true,
                config: vec![
                    format!("sentinel monitor {MASTER_NAME} 127.0.0.1 {port} 2"),
                    // Long enough that a loaded machine does not fail over by mistake.
                    format!("sentinel down-after-milliseconds {MASTER_NAME} 2000"),
                    format!("sentinel failover-timeout {MASTER_NAME} 5000"),
                    format!("sentinel parallel-syncs {MASTER_NAME} 1"),
                ],
                ..RedisOptions::default()
            })?);
        }
        let setup = RedisSentinel {
            servers: vec![master, replica],
            sentinels,
        };
        settle("the sentinels know the replica and each other", || {
            setup.sentinels.iter().all(|s| {
                redis_cli(s.addr().port(), &["sentinel", "master", MASTER_NAME]).is_ok_and(|info| {
                    let lines: Vec<&str> = info.lines().collect();
                    let field = |name: &str| {
                        lines
                            .iter()
                            .position(|l| *l == name)
                            .and_then(|i| lines.get(i + 1))
                            .and_then(|v| v.parse::<u32>().ok())
                    };
                    field("num-slaves") == Some(1) && field("num-other-sentinels") == Some(2)
                })
            })
        })?;
        Ok(setup)
    }

    /// `redis+sentinel://s1,s2,s3/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| s.addr().to_string())
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The port of the master the sentinels name now.
    pub fn master_port(&self) -> io::Result<u16> {
        for sentinel in &self.sentinels {
            if let Ok(answer) = redis_cli(
                sentinel.addr().port(),
                &["sentinel", "get-master-addr-by-name", MASTER_NAME],
            ) && let Some(port) = answer.lines().nth(1)
                && let Ok(port) = port.trim().parse()
            {
                return Ok(port);
            }
        }
        Err(io::Error::other("no sentinel names a master"))
    }

    /// Which of [`servers`](Self::servers) the sentinels name as master.
    pub fn master(&self) -> io::Result<usize> {
        let port = self.master_port()?;
        self.servers
            .iter()
            .position(|s| s.addr().port() == port)
            .ok_or_else(|| io::Error::other(format!("master on unknown port {port}")))
    }

    /// Waits until the sentinels name a master other than `old` (an index of
    /// [`servers`](Self::servers)), and it says it is a master.
    pub fn wait_for_failover(&self, old: usize) -> io::Result<usize> {
        let mut new = old;
        settle("a failover", || match self.master() {
            Ok(index) if index != old => {
                new = index;
                redis_cli(self.servers[index].addr().port(), &["role"])
                    .is_ok_and(|role| role.starts_with("master"))
            }
            _ => false,
        })?;
        Ok(new)
    }

    /// Waits until [`servers`](Self::servers)`[i]` is a replica in sync with its master
    /// (after a failover, once the sentinels have made the old master a replica).
    pub fn wait_for_replica(&self, i: usize) -> io::Result<()> {
        settle("a replica in sync", || {
            redis_cli(self.servers[i].addr().port(), &["info", "replication"]).is_ok_and(|info| {
                info.contains("role:slave") && info.contains("master_link_status:up")
            })
        })
    }
}
