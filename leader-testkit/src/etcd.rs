//! [`EtcdServer`]: etcd, one member or a cluster.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{Process, free_port, require_binary, retry_taken_ports, wait_for_port};

/// One etcd member.
#[derive(Debug)]
struct EtcdMember {
    name: String,
    client_addr: SocketAddr,
    /// Where it listens for its peers.
    peer_url: String,
    /// What it tells its peers (its proxy's address, with peer proxies).
    advertised_peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    process: Process,
}

/// etcd, one member or a cluster, on free loopback ports with temporary data directories.
///
/// Started with a 10ms heartbeat and 100ms election timeout, so that leases as short as one
/// second are granted as asked (etcd's minimum lease TTL is 1.5 election timeouts).
#[derive(Debug)]
pub struct EtcdServer {
    members: Vec<EtcdMember>,
    initial_cluster: String,
    /// Extra command-line arguments of every member (TLS, auth-token options).
    extra: Vec<String>,
    /// `https` when the members serve clients over TLS.
    scheme: &'static str,
    /// The proxies on the peer links, when started with them.
    peers: Option<crate::peers::PeerLinks>,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts a single-member etcd.
    pub fn start() -> io::Result<Self> {
        Self::start_cluster(1)
    }

    /// Starts an etcd cluster of `size` members and waits until each accepts clients.
    pub fn start_cluster(size: usize) -> io::Result<Self> {
        Self::start_with(size, Vec::new(), "http")
    }

    /// Starts an etcd cluster of `size` members whose peer links run through proxies, so
    /// that [`isolate_member`](Self::isolate_member) can partition one member from the
    /// others (both ways) while its clients still reach it.
    pub fn start_cluster_with_peer_proxies(size: usize) -> io::Result<Self> {
        retry_taken_ports(|| Self::start_once(size, Vec::new(), "http", true))
    }

    /// Cuts member `i` off from the other members (raft traffic both ways) until
    /// [`heal_member`](Self::heal_member); its clients still reach it. Only with peer
    /// proxies ([`start_cluster_with_peer_proxies`](Self::start_cluster_with_peer_proxies)).
    ///
    /// # Errors
    ///
    /// Without peer proxies, or before the proxies learned the member's id from the
    /// traffic (right after the start).
    pub fn isolate_member(&self, i: usize) -> io::Result<()> {
        let peers = self.peer_links()?;
        if !peers.knows(i) {
            return Err(io::Error::other(format!(
                "the peer proxies have not seen member {i}'s id yet"
            )));
        }
        peers.isolate(i);
        Ok(())
    }

    /// Lets member `i` reach the others again.
    ///
    /// # Errors
    ///
    /// Without peer proxies.
    pub fn heal_member(&self, i: usize) -> io::Result<()> {
        self.peer_links()?.heal(i);
        Ok(())
    }

    fn peer_links(&self) -> io::Result<&crate::peers::PeerLinks> {
        self.peers
            .as_ref()
            .ok_or_else(|| io::Error::other("this cluster was started without peer proxies"))
    }

    /// Starts `size` members with `extra` arguments, serving clients with `scheme`; on
    /// free ports chosen again if another process took one first.
    pub(crate) fn start_with(
        size: usize,
        extra: Vec<String>,
        scheme: &'static str,
    ) -> io::Result<Self> {
        retry_taken_ports(|| Self::start_once(size, extra.clone(), scheme, false))
    }

    fn start_once(
        size: usize,
        extra: Vec<String>,
        scheme: &'static str,
        proxied: bool,
    ) -> io::Result<Self> {
        require_binary("etcd", "etcd-server")?;
        let dir = tempfile::Builder::new().prefix("leader-etcd-").tempdir()?;
        let mut specs = Vec::new();
        for i in 0..size {
            let name = format!("m{i}");
            let client_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            let peer_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            specs.push((name, client_addr, peer_addr));
        }
        let peers = if proxied {
            let upstreams: Vec<SocketAddr> = specs.iter().map(|(_, _, peer)| *peer).collect();
            Some(crate::peers::PeerLinks::start(&upstreams)?)
        } else {
            None
        };
        let advertised: Vec<String> = specs
            .iter()
            .enumerate()
            .map(|(i, (_, _, peer))| match &peers {
                Some(links) => format!("http://{}", links.addrs()[i]),
                None => format!("http://{peer}"),
            })
            .collect();
        let initial_cluster = specs
            .iter()
            .zip(&advertised)
            .map(|((name, _, _), url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for ((name, client_addr, peer_addr), advertised_peer_url) in
            specs.into_iter().zip(advertised)
        {
            let peer_url = format!("http://{peer_addr}");
            let data_dir = dir.path().join(&name);
            let log = dir.path().join(format!("{name}.log"));
            let process = Self::spawn_member(
                &name,
                client_addr,
                (&peer_url, &advertised_peer_url),
                &data_dir,
                &log,
                &initial_cluster,
                "new",
                (&extra, scheme),
            )?;
            members.push(EtcdMember {
                name,
                client_addr,
                peer_url,
                advertised_peer_url,
                data_dir,
                log,
                process,
            });
        }
        for member in &mut members {
            let child = member.process.child()?;
            wait_for_port(member.client_addr, child, "etcd", &member.log)?;
        }
        Ok(EtcdServer {
            members,
            initial_cluster,
            extra,
            scheme,
            peers,
            _dir: dir,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_member(
        name: &str,
        client_addr: SocketAddr,
        (peer_url, advertised_peer_url): (&str, &str),
        data_dir: &Path,
        log: &Path,
        initial_cluster: &str,
        state: &str,
        (extra, scheme): (&[String], &str),
    ) -> io::Result<Process> {
        let client_url = format!("{scheme}://{client_addr}");
        Process::spawn(
            Command::new("etcd")
                .args(extra)
                .args(["--name", name])
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", peer_url])
                .args(["--initial-advertise-peer-urls", advertised_peer_url])
                .args(["--initial-cluster", initial_cluster])
                .args(["--initial-cluster-state", state])
                .args(["--initial-cluster-token", "leader-testkit"])
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
                .args(["--log-level", "warn"]),
            log,
        )
    }

    /// Client endpoints (`127.0.0.1:port`), one per member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.client_addr.to_string())
            .collect()
    }

    /// Client address of member `i`.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client_addr
    }

    /// Process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].process.pid()
    }

    /// Kills member `i` (SIGKILL); its data directory stays for [`restart`](Self::restart).
    pub fn kill(&mut self, i: usize) {
        self.members[i].process.kill();
    }

    /// Stops member `i` gracefully (SIGTERM).
    pub fn stop(&mut self, i: usize) {
        self.members[i].process.terminate(Duration::from_secs(10));
    }

    /// Starts member `i` again on its data directory and ports, and waits until it listens.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let member = &mut self.members[i];
        let (extra, scheme) = (&self.extra, self.scheme);
        member.process.kill();
        member.process = Self::spawn_member(
            &member.name,
            member.client_addr,
            (&member.peer_url, &member.advertised_peer_url),
            &member.data_dir,
            &member.log,
            &initial_cluster,
            "existing",
            (extra, scheme),
        )?;
        let child = member.process.child()?;
        wait_for_port(member.client_addr, child, "etcd", &member.log)
    }
}
