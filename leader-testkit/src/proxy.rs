//! [`FaultProxy`]: a TCP proxy between a candidate and its store that can partition,
//! heal and cut the connection; the conformance suite's [`Fault`] for real stores.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use leader_core::async_trait;
use leader_core::testing::Fault;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Keep connections open but forward nothing (a partition: requests hang, nothing is
    /// refused). Bytes already read wait and flow again on [`FaultProxy::pass`].
    Hold,
    /// Forward requests to the store but hold its answers: requests take effect, their
    /// answers are late (or, if the client gives up, lost).
    HoldAnswers,
    /// Forward everything, each chunk at its arrival plus this delay (in order).
    Delay(std::time::Duration),
    /// Forward everything; each answer at its arrival plus this delay (in order), requests
    /// at once.
    DelayAnswers(std::time::Duration),
}

/// Which way a pump copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to store: requests.
    Requests,
    /// Store to client: answers.
    Answers,
}

impl Mode {
    fn flows(self, direction: Direction) -> bool {
        match self {
            Mode::Pass | Mode::Delay(_) | Mode::DelayAnswers(_) => true,
            Mode::Hold => false,
            Mode::HoldAnswers => direction == Direction::Requests,
        }
    }

    /// How late a chunk read now in `direction` is forwarded.
    fn delay(self, direction: Direction) -> std::time::Duration {
        match self {
            Mode::Delay(latency) => latency,
            Mode::DelayAnswers(latency) if direction == Direction::Answers => latency,
            _ => std::time::Duration::ZERO,
        }
    }
}

/// A loopback TCP proxy to one upstream address, for fault tests.
///
/// Point a driver at [`addr`](Self::addr) instead of the store. Then
/// [`hold`](Self::hold) partitions it (connections stay open, nothing flows),
/// [`pass`](Self::pass) heals the partition, and [`cut`](Self::cut) closes every
/// connection (new ones are accepted). Dropping the proxy closes everything.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    generation: Arc<watch::Sender<CancellationToken>>,
    stalls: Arc<watch::Sender<CancellationToken>>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let generation = Arc::new(watch::Sender::new(CancellationToken::new()));
        let stalls = Arc::new(watch::Sender::new(CancellationToken::new()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            Connections {
                generation: Arc::clone(&generation),
                stalls: Arc::clone(&stalls),
            },
            shutdown.clone(),
        ));
        Ok(FaultProxy {
            addr,
            mode,
            generation,
            stalls,
            shutdown,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Partitions: every connection stays open and nothing flows either way.
    pub fn hold(&self) {
        self.mode.send_replace(Mode::Hold);
    }

    /// Heals a partition: traffic flows again.
    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Requests still reach the store and take effect, but its answers are held until
    /// [`pass`](Self::pass): the client sees timeouts for requests that succeeded.
    pub fn hold_answers(&self) {
        self.mode.send_replace(Mode::HoldAnswers);
    }

    /// Every chunk of traffic, both ways, is forwarded `latency` after it arrived, in
    /// order (a slow link, not a throttle: chunks in flight overlap), until
    /// [`pass`](Self::pass). Chunks that arrived before keep the delay they were given.
    pub fn delay(&self, latency: std::time::Duration) {
        self.mode.send_replace(Mode::Delay(latency));
    }

    /// Requests flow at once; every answer is forwarded `latency` after it arrived, in
    /// order, until [`pass`](Self::pass) (or another mode). A driver that counts its lease
    /// from an answer's arrival instead of its request's sending believes `latency` too
    /// long.
    pub fn delay_answers(&self, latency: std::time::Duration) {
        self.mode.send_replace(Mode::DelayAnswers(latency));
    }

    /// Closes every open connection now; new connections are accepted as usual.
    pub fn cut(&self) {
        let old = self.generation.send_replace(CancellationToken::new());
        old.cancel();
    }

    /// Every open connection goes silent for good without being closed, as when the peer
    /// vanished without a FIN (a half-open socket); new connections pass as usual.
    pub fn stall(&self) {
        let old = self.stalls.send_replace(CancellationToken::new());
        old.cancel();
    }
}

/// The tokens that end (cut) or silence (stall) the connections open now.
struct Connections {
    generation: Arc<watch::Sender<CancellationToken>>,
    stalls: Arc<watch::Sender<CancellationToken>>,
}

#[async_trait]
impl Fault for FaultProxy {
    async fn partition(&self) {
        self.hold();
    }

    async fn heal(&self) {
        self.pass();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.generation.borrow().cancel();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    connections: Connections,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let cut = connections.generation.borrow().clone();
        let stalled = connections.stalls.borrow().clone();
        let mode = mode.subscribe();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let server = tokio::select! {
                () = cut.cancelled() => return,
                server = TcpStream::connect(upstream) => server,
            };
            let Ok(server) = server else {
                debug!(%upstream, "fault proxy: upstream refused");
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::select! {
                () = cut.cancelled() => return,
                () = shutdown.cancelled() => return,
                () = stalled.cancelled() => {}
                () = pump(&mut client_read, &mut server_write, mode.clone(), Direction::Requests) => return,
                () = pump(&mut server_read, &mut client_write, mode, Direction::Answers) => return,
            }
            // Stalled: the sockets stay open, and nothing flows, until cut or shutdown.
            tokio::select! {
                () = cut.cancelled() => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// Copies bytes from `from` to `to`, pausing while the mode holds this direction. Each
/// chunk is due at its arrival plus the delay the mode gives it then, and is written in
/// order once due: a reader stamps and queues chunks, a writer sends them.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
    direction: Direction,
) {
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut reading = mode.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if reading.wait_for(|m| m.flows(direction)).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = Instant::now() + reading.borrow().delay(direction);
            if queue.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let mut writing = mode;
    let writer = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            // A chunk read just before a partition waits for the partition to heal.
            if writing.wait_for(|m| m.flows(direction)).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The reader's end (end of stream) lets the writer send what is queued, then stop;
    // the writer's end (the peer is gone) ends the reader too.
    tokio::select! {
        () = async {
            reader.await;
            std::future::pending::<()>().await
        } => {}
        () = writer => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::Instant;

    use super::FaultProxy;

    /// An echo server; returns its address.
    async fn echo() -> std::net::SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Sends a byte every 30 ms and returns when each echo came back, from the start.
    async fn echoes(proxy: &FaultProxy) -> Vec<Duration> {
        let client = TcpStream::connect(proxy.addr()).await.expect("connect");
        client.set_nodelay(true).expect("nodelay");
        let start = Instant::now();
        let (mut read, mut write) = client.into_split();
        let sender = tokio::spawn(async move {
            for byte in [b'a', b'b', b'c'] {
                write.write_all(&[byte]).await.expect("write");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            write
        });
        let mut back = Vec::new();
        let mut buf = [0u8; 1];
        while back.len() < 3 {
            read.read_exact(&mut buf).await.expect("echo");
            back.push(start.elapsed());
        }
        drop(sender.await.expect("sender"));
        back
    }

    #[tokio::test]
    async fn a_delay_shifts_every_chunk_by_itself_in_order_without_throttling() {
        let proxy = FaultProxy::start(echo().await).await.expect("proxy");
        proxy.delay(Duration::from_millis(100));
        // Each byte crosses the proxy twice: back 200 ms after it was sent (0, 30, 60 ms),
        // not one chunk per delay (a throttle would return the third after 400 ms or more).
        let back = echoes(&proxy).await;
        for (i, at) in back.iter().enumerate() {
            let sent = Duration::from_millis(30 * i as u64);
            assert!(*at >= sent + Duration::from_millis(200), "{back:?}");
        }
        assert!(back[2] < Duration::from_millis(380), "throttled: {back:?}");

        // Answers only: 100 ms.
        proxy.delay_answers(Duration::from_millis(100));
        let back = echoes(&proxy).await;
        assert!(back[0] >= Duration::from_millis(100), "{back:?}");
        assert!(back[2] < Duration::from_millis(280), "{back:?}");
    }
}
