//! [`PeerLinks`]: an etcd cluster's peer links through proxies that can cut one member off
//! from the others in both directions (a partition between members, not a crash).
//!
//! Every member advertises its proxy's address as its peer URL, so all raft traffic to it
//! comes through that proxy. Traffic *from* a member to the others goes through their
//! proxies; a proxy tells whose it is by the `X-Server-From` header etcd's raft transport
//! sends with every stream and pipeline request (and learns each member's id from the
//! `X-Raft-To` header of requests to it). Isolating member `i` drops every connection into
//! its proxy and every connection from it into the others', and refuses new ones, until
//! healed. Requests etcd sends without those headers (version probes; a follower forwarding
//! a lease keep-alive to the raft leader) still pass from an isolated member; it stops
//! sending them once it has lost its raft leader, one election timeout later.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The most a request head may take before the proxy gives up reading it.
const MAX_HEAD: usize = 16 * 1024;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Proxies in front of each member's peer port (see the module docs).
#[derive(Debug)]
pub(crate) struct PeerLinks {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
}

#[derive(Debug, Default)]
struct Shared {
    isolated: Mutex<BTreeSet<usize>>,
    /// Member ids (as etcd writes them in headers) by member index, as learned.
    ids: Mutex<BTreeMap<String, usize>>,
    links: Mutex<BTreeMap<u64, Link>>,
    next: AtomicU64,
    stopped: AtomicBool,
}

/// One proxied connection.
#[derive(Debug)]
struct Link {
    /// The member it goes to.
    to: usize,
    /// The member it comes from, when its requests said so.
    from: Option<usize>,
    /// The id its requests gave in `X-Server-From`: a link opened before the proxies
    /// learned that member's id (etcd opens its raft streams at once) is matched by it
    /// when the member is isolated later.
    from_id: Option<String>,
    client: TcpStream,
    upstream: TcpStream,
}

impl Link {
    fn cut(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

impl PeerLinks {
    /// Binds one proxy per member on a free loopback port (their addresses, in order, are
    /// [`addrs`](Self::addrs)); proxy `i` forwards to `upstreams[i]`.
    pub(crate) fn start(upstreams: &[SocketAddr]) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let mut addrs = Vec::new();
        for (member, &upstream) in upstreams.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            addrs.push(listener.local_addr()?);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("etcd-peer-proxy-{member}"))
                .spawn(move || accept(&listener, member, upstream, &shared))?;
        }
        Ok(PeerLinks { shared, addrs })
    }

    /// The proxies' addresses: member `i` advertises `http://{addrs()[i]}`.
    pub(crate) fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Cuts member `i` off from the others, both ways, until [`heal`](Self::heal).
    pub(crate) fn isolate(&self, member: usize) {
        lock(&self.shared.isolated).insert(member);
        let links = lock(&self.shared.links);
        let ids = lock(&self.shared.ids);
        for link in links.values() {
            let from = link
                .from
                .or_else(|| link.from_id.as_ref().and_then(|id| ids.get(id).copied()));
            if link.to == member || from == Some(member) {
                link.cut();
            }
        }
        tracing::info!(member, "etcd member isolated from its peers");
    }

    /// Lets member `i` reach the others again.
    pub(crate) fn heal(&self, member: usize) {
        lock(&self.shared.isolated).remove(&member);
        tracing::info!(member, "etcd member's peer links healed");
    }

    /// Whether the proxies know member `i`'s id (so that its own requests can be refused).
    pub(crate) fn knows(&self, member: usize) -> bool {
        lock(&self.shared.ids).values().any(|&m| m == member)
    }
}

impl Drop for PeerLinks {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        for addr in &self.addrs {
            // Wakes the accept loop, which then sees `stopped`.
            let _ = TcpStream::connect_timeout(addr, Duration::from_millis(100));
        }
        for link in lock(&self.shared.links).values() {
            link.cut();
        }
    }
}

fn accept(listener: &TcpListener, member: usize, upstream: SocketAddr, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("etcd-peer-link-{member}"))
            .spawn(move || {
                if let Err(err) = forward(client, member, upstream, &shared) {
                    tracing::debug!(member, %err, "etcd peer link ended");
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(member, %err, "cannot start a thread for an etcd peer link");
        }
    }
}

/// The value of header `name` in a request head (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Reads the first request's head (up to the blank line), without consuming more than it.
fn read_head(client: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = client.read(&mut byte)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&byte[..n]);
    }
    Ok(head)
}

fn forward(
    mut client: TcpStream,
    to: usize,
    upstream: SocketAddr,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let head = read_head(&mut client)?;
    client.set_read_timeout(None)?;
    let text = String::from_utf8_lossy(&head);
    if let Some(id) = header(&text, "X-Raft-To") {
        lock(&shared.ids).insert(id.to_owned(), to);
    }
    let from_id = header(&text, "X-Server-From").map(str::to_owned);
    let from = from_id
        .as_ref()
        .and_then(|id| lock(&shared.ids).get(id).copied());
    {
        let isolated = lock(&shared.isolated);
        if isolated.contains(&to) || from.is_some_and(|f| isolated.contains(&f)) {
            return Ok(());
        }
    }
    let mut server = TcpStream::connect(upstream)?;
    server.write_all(&head)?;
    let key = shared.next.fetch_add(1, Ordering::SeqCst);
    lock(&shared.links).insert(
        key,
        Link {
            to,
            from,
            from_id,
            client: client.try_clone()?,
            upstream: server.try_clone()?,
        },
    );
    // A partition that began while this link was being set up cuts it too.
    {
        let isolated = lock(&shared.isolated);
        if isolated.contains(&to) || from.is_some_and(|f| isolated.contains(&f)) {
            if let Some(link) = lock(&shared.links).remove(&key) {
                link.cut();
            }
            return Ok(());
        }
    }
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::Builder::new()
        .name(format!("etcd-peer-up-{to}"))
        .spawn(move || {
            let _ = io::copy(&mut client_read, &mut server_write);
            let _ = server_write.shutdown(Shutdown::Write);
        })?;
    let _ = io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = up.join();
    lock(&shared.links).remove(&key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::header;

    #[test]
    fn headers_are_found_whatever_their_case() {
        let head = "GET /raft/stream/msgapp/2 HTTP/1.1\r\nHost: x\r\nx-server-from: 8e9e05c52164694d\r\nX-Raft-To: 2\r\n\r\n";
        assert_eq!(header(head, "X-Server-From"), Some("8e9e05c52164694d"));
        assert_eq!(header(head, "x-raft-to"), Some("2"));
        assert_eq!(header(head, "X-Etcd-Cluster-ID"), None);
    }
}
