//! `leader-bench`: handoff, failover, idle cost and scale of the election on etcd, Redis
//! and PostgreSQL, with `etcdctl elect` and the stores' own round trip measured in the same
//! run for context. Starts its own etcd, redis-server and postgres on free loopback ports. Run it through
//! `ci/bench`, which builds it and the `chaos-candidate` process it drives.

mod charts;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hdrhistogram::Histogram;
use leader::postgres::tokio_postgres;
use leader_core::{Driver, Election};
use leader_testkit::{EtcdServer, LineProcess, PostgresServer, RedisServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HANDOFFS: usize = 50;
/// Time a freshly started waiter gets to enter the election before it is needed.
const SETTLE: Duration = Duration::from_millis(150);

#[derive(Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Etcd,
    Redis,
    Postgres,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Etcd => "etcd",
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

struct Stores {
    etcd: EtcdServer,
    redis: RedisServer,
    /// A second Redis with `appendonly yes` + `appendfsync always`, as the README asks
    /// for safety: handoffs are measured on both.
    redis_fsync: RedisServer,
    /// PostgreSQL with its durable defaults (`fsync = on`, `synchronous_commit = on`) and
    /// `pg_stat_statements`, which counts every statement.
    postgres: PostgresServer,
    /// A connection for reading `pg_stat_statements`.
    postgres_admin: tokio_postgres::Client,
}

impl Stores {
    fn endpoint(&self, backend: StoreKind) -> String {
        match backend {
            StoreKind::Etcd => self.etcd.endpoints()[0].clone(),
            StoreKind::Redis => self.redis.url(),
            StoreKind::Postgres => self.postgres.url(),
        }
    }

    /// The store URL, for `leader::connect` and the candidate processes.
    fn url(&self, backend: StoreKind) -> String {
        match backend {
            StoreKind::Etcd => format!("etcd://{}", self.etcd.client_addr(0)),
            StoreKind::Redis => self.redis.url(),
            StoreKind::Postgres => self.postgres.url(),
        }
    }

    async fn driver(&self, backend: StoreKind) -> BoxResult<Arc<dyn Driver>> {
        Ok(leader::connect(&self.url(backend)).await?)
    }

    /// Requests the store has served so far. etcd: gRPC messages received, from
    /// `/metrics`. Redis: every command from `INFO commandstats` (nothing excluded by name,
    /// so a regression that polls shows), less this measurement's own INFO calls; the
    /// commands run inside scripts are included (MONITOR, in [`redis_monitored`], tells
    /// them apart where that matters).
    async fn requests(&self, backend: StoreKind) -> BoxResult<u64> {
        match backend {
            StoreKind::Etcd => {
                self.etcd_metric("grpc_server_msg_received_total", None)
                    .await
            }
            StoreKind::Redis => {
                let stats = redis_commandstats(&self.redis.url()).await?;
                let all: u64 = stats.iter().map(|(_, calls)| calls).sum();
                let info = stats
                    .iter()
                    .find(|(name, _)| name == "info")
                    .map_or(0, |(_, calls)| *calls);
                Ok(all.saturating_sub(info))
            }
            StoreKind::Postgres => {
                // Every statement of every connection (utility ones, LISTEN, included),
                // less this measurement's own.
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

    /// The sum of an etcd metric's samples, optionally only those whose labels contain
    /// `label`.
    async fn etcd_metric(&self, metric: &str, label: Option<&str>) -> BoxResult<u64> {
        let body = http_get(self.etcd.client_addr(0), "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(metric))
            .filter(|l| label.is_none_or(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }
}

/// `(command, calls)` from a Redis's `INFO commandstats`.
async fn redis_commandstats(url: &str) -> BoxResult<Vec<(String, u64)>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    Ok(info
        .lines()
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
        .collect())
}

/// Counts a Redis's commands with MONITOR while `work` runs: (client requests, commands
/// run inside Lua scripts). Exact, whatever the commands are named.
async fn redis_monitored<T>(
    addr: std::net::SocketAddr,
    work: impl std::future::Future<Output = BoxResult<T>>,
) -> BoxResult<(T, u64, u64)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"MONITOR\r\n").await?;
    let (read, _write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    // "+OK" first, then one line per command.
    lines.next_line().await?.ok_or("MONITOR refused")?;
    let stop = leader_core::CancellationToken::new();
    let counter = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut requests, mut in_scripts) = (0u64, 0u64);
            loop {
                let line = tokio::select! {
                    () = stop.cancelled() => break,
                    line = lines.next_line() => line,
                };
                match line {
                    Ok(Some(line)) if line.contains(" lua] ") => in_scripts += 1,
                    Ok(Some(_)) => requests += 1,
                    _ => break,
                }
            }
            (requests, in_scripts)
        }
    });
    let result = work.await;
    // Let the last commands' lines arrive.
    sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (requests, in_scripts) = counter.await?;
    Ok((result?, requests, in_scripts))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> BoxResult<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
}

/// Samples that a histogram could not record (out of its range): printed with the report.
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn record(h: &mut Histogram<u64>, d: Duration) {
    if h.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))
        .is_err()
    {
        DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// Whether line `.0` says that process number `.1` leads.
type ElectedLine = Box<dyn Fn(&str, usize) -> bool + Send + Sync>;

/// How to start a candidate process and recognise that it leads.
struct Contender {
    spawn: Box<dyn Fn(usize) -> Command + Send>,
    elected: ElectedLine,
}

fn spawn(contender: &Contender, i: usize) -> BoxResult<LineProcess> {
    Ok(LineProcess::spawn(
        (contender.spawn)(i).stderr(Stdio::null()),
    )?)
}

/// Repeats: signal the leader, time until the waiter says it leads, start a new waiter.
/// Returns the time from the signal to the new leader's line, as the orchestrator sees it,
/// and, when the candidates report CLOCK_MONOTONIC times, from the start of the
/// resignation to the new leader's election event.
async fn handoffs(
    contender: &Contender,
    signal: &str,
    count: usize,
    phase: impl Fn(usize) -> Duration,
) -> BoxResult<(Histogram<u64>, Histogram<u64>)> {
    let mut h = histogram();
    let mut internal = histogram();
    let mut procs: VecDeque<(usize, LineProcess)> = VecDeque::new();
    let mut first = spawn(contender, 0)?;
    first
        .wait_for_line(Duration::from_secs(20), |l| (contender.elected)(l, 0))
        .await
        .map_err(|err| format!("the first candidate was not elected: {err}"))?;
    procs.push_back((0, first));
    procs.push_back((1, spawn(contender, 1)?));
    sleep(SETTLE).await;
    for i in 0..count {
        let (_, mut leader) = procs.pop_front().ok_or("no leader")?;
        let (id, mut waiter) = procs.pop_front().ok_or("no waiter")?;
        sleep(phase(i)).await;
        let started = Instant::now();
        leader.signal(signal)?;
        let elected = waiter
            .wait_for_line(Duration::from_secs(60), |l| (contender.elected)(l, id))
            .await?;
        record(&mut h, started.elapsed());
        // Our candidates also print CLOCK_MONOTONIC times: resignation start to election.
        if let (Some(elected_ns), Ok(resigning)) = (
            last_number(&elected),
            leader
                .wait_for_line(Duration::from_secs(2), |l| l.starts_with("resigning"))
                .await,
        ) && let Some(resigning_ns) = last_number(&resigning)
        {
            record(
                &mut internal,
                Duration::from_nanos(elected_ns.saturating_sub(resigning_ns)),
            );
        }
        let _ = leader.wait(Duration::from_secs(10)).await;
        procs.push_back((id, waiter));
        let next = i + 2;
        procs.push_back((next, spawn(contender, next)?));
        sleep(SETTLE).await;
    }
    // Gone before the next measurement: a candidate still in line would be led first.
    for (_, p) in &mut procs {
        let _ = p.signal(signal);
        let _ = p.wait(Duration::from_secs(10)).await;
    }
    Ok((h, internal))
}

/// A fraction in [0, 1) spread evenly over successive `i` (the golden ratio's fractional
/// part), so that kills land at every phase of the renewal interval.
fn spread(i: usize) -> f64 {
    (i as f64 * 0.618_033_988_749_895).fract()
}

/// The last whitespace-separated number of a line.
fn last_number(line: &str) -> Option<u64> {
    line.rsplit(' ').next()?.parse().ok()
}

fn ours(candidate: &Path, url: String, ttl: Duration, election: String) -> Contender {
    let candidate = candidate.to_owned();
    Contender {
        spawn: Box::new(move |_| {
            let mut c = Command::new(&candidate);
            c.arg(&url)
                .arg(&election)
                .arg(ttl.as_millis().to_string())
                .arg("/dev/null");
            c
        }),
        elected: Box::new(|line, _| line.starts_with("elected")),
    }
}

fn etcdctl(endpoint: String, election: String) -> Contender {
    Contender {
        spawn: Box::new(move |i| {
            let mut c = Command::new("etcdctl");
            c.env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(["elect", &election, &format!("proposal-{i}")]);
            c
        }),
        elected: Box::new(|line, i| line == format!("proposal-{i}")),
    }
}

/// Store requests per second over `window` (Redis: client commands counted by MONITOR,
/// not the commands inside scripts).
async fn rate(stores: &Stores, backend: StoreKind, window: Duration) -> BoxResult<f64> {
    let requests = match backend {
        StoreKind::Etcd | StoreKind::Postgres => {
            let before = stores.requests(backend).await?;
            sleep(window).await;
            stores.requests(backend).await?.saturating_sub(before)
        }
        StoreKind::Redis => {
            let waited = async {
                sleep(window).await;
                Ok(())
            };
            redis_monitored(stores.redis.addr(), waited).await?.1
        }
    };
    Ok(requests as f64 / window.as_secs_f64())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn hold_elections(
    driver: &Arc<dyn Driver>,
    prefix: &str,
    n: usize,
    ttl: Duration,
) -> BoxResult<Vec<Election>> {
    let mut elections = Vec::with_capacity(n);
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let e = Election::builder(Arc::clone(driver), format!("{prefix}-{i}"))
            .ttl(ttl)
            .build()?;
        elections.push(e.clone());
        pending.push(async move { e.campaign().await });
        if pending.len() >= 64 {
            pending.next().await.ok_or("campaign")??;
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    Ok(elections)
}

/// What the store did per handoff in [`scale_handoffs`].
struct PerHandoff {
    /// Client requests (etcd: gRPC messages received; Redis: commands, counted by
    /// MONITOR).
    requests: f64,
    /// Redis: commands run inside the election's Lua scripts. etcd: watch messages sent
    /// (to waiters, observers and leaders), the herd's cost.
    other: f64,
    /// Campaigns that failed and were retried (none expected).
    retried: u64,
}

/// In-process handoffs with `waiting` candidates queued behind the leader, on `drivers`
/// drivers shared round-robin. Returns the histogram and the store's work per handoff.
async fn scale_handoffs(
    stores: &Stores,
    backend: StoreKind,
    waiting: usize,
    count: usize,
) -> BoxResult<(Histogram<u64>, PerHandoff)> {
    let ttl = Duration::from_secs(10);
    let drivers_n = waiting.clamp(1, 20);
    let mut drivers = Vec::new();
    for _ in 0..drivers_n {
        drivers.push(stores.driver(backend).await?);
    }
    let name = format!("scale-{}-{waiting}-{}", backend.name(), std::process::id());
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, Instant)>();
    let stop = leader_core::CancellationToken::new();
    let retried = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..=waiting {
        let e = Election::builder(Arc::clone(&drivers[i % drivers_n]), name.clone())
            .ttl(ttl)
            .build()?;
        let (tx, stop, retried) = (tx.clone(), stop.clone(), Arc::clone(&retried));
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let term = tokio::select! {
                    () = stop.cancelled() => break,
                    term = e.campaign() => term,
                };
                if term.is_err() {
                    retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let _ = tx.send((true, Instant::now()));
                // Lead long enough for the previous leader to queue up again behind us.
                sleep(Duration::from_millis(30)).await;
                let _ = tx.send((false, Instant::now()));
                let _ = e.resign().await;
                // Go to the back of the line, behind the candidates just woken.
                sleep(Duration::from_millis(5)).await;
            }
        }));
        if i == 0 {
            // The first leads before the others queue up.
            sleep(Duration::from_millis(50)).await;
        }
    }
    drop(tx);
    // Let every candidate enter the line before measuring.
    sleep(Duration::from_millis(500) + Duration::from_millis(3) * u32::try_from(waiting)?).await;
    while rx.try_recv().is_ok() {}
    let measure = async {
        let mut h = histogram();
        let mut resigned_at = None;
        let mut handoffs = 0;
        while handoffs < count {
            let (elected, at) = timeout(Duration::from_secs(60), rx.recv())
                .await?
                .ok_or("candidates gone")?;
            match (elected, resigned_at.take()) {
                (true, Some(resigned)) => {
                    record(&mut h, at.duration_since(resigned));
                    handoffs += 1;
                }
                (false, _) => resigned_at = Some(at),
                (true, None) => {}
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(h)
    };
    let per = |n: u64| n as f64 / count as f64;
    let (h, counts) = match backend {
        StoreKind::Etcd => {
            let watch = "grpc_method=\"Watch\"";
            let before = stores.requests(backend).await?;
            let sent_before = stores
                .etcd_metric("grpc_server_msg_sent_total", Some(watch))
                .await?;
            let h = measure.await?;
            let requests = stores.requests(backend).await?.saturating_sub(before);
            let sent = stores
                .etcd_metric("grpc_server_msg_sent_total", Some(watch))
                .await?
                .saturating_sub(sent_before);
            (h, (per(requests), per(sent)))
        }
        StoreKind::Redis => {
            let (h, requests, in_scripts) = redis_monitored(stores.redis.addr(), measure).await?;
            (h, (per(requests), per(in_scripts)))
        }
        StoreKind::Postgres => {
            let before = stores.requests(backend).await?;
            let h = measure.await?;
            let requests = stores.requests(backend).await?.saturating_sub(before);
            (h, (per(requests), 0.0))
        }
    };
    stop.cancel();
    for task in tasks {
        let _ = timeout(Duration::from_secs(20), task).await;
    }
    Ok((
        h,
        PerHandoff {
            requests: counts.0,
            other: counts.1,
            retried: retried.load(std::sync::atomic::Ordering::Relaxed),
        },
    ))
}

/// p50/p99 of one store write, sequential.
async fn floor(stores: &Stores, backend: StoreKind, n: usize) -> BoxResult<Histogram<u64>> {
    let mut h = histogram();
    match backend {
        StoreKind::Etcd => {
            let mut client = etcd_client::Client::connect([stores.endpoint(backend)], None).await?;
            for i in 0..n {
                let started = Instant::now();
                client.put("bench-floor", i.to_string(), None).await?;
                record(&mut h, started.elapsed());
            }
        }
        StoreKind::Redis => {
            let client = redis::Client::open(stores.endpoint(backend))?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            for i in 0..n {
                let started = Instant::now();
                let _: () = redis::cmd("SET")
                    .arg("bench-floor")
                    .arg(i)
                    .query_async(&mut conn)
                    .await?;
                record(&mut h, started.elapsed());
            }
        }
        StoreKind::Postgres => {
            let client = &stores.postgres_admin;
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS bench_floor (id int PRIMARY KEY, v bigint)",
                )
                .await?;
            let upsert = client
                .prepare(
                    "INSERT INTO bench_floor VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET v = excluded.v",
                )
                .await?;
            for i in 0..n {
                let started = Instant::now();
                client.execute(&upsert, &[&i64::try_from(i)?]).await?;
                record(&mut h, started.elapsed());
            }
        }
    }
    Ok(h)
}

/// `leader-bench hold etcd|redis|postgres STORE_URL N`: holds N elections on one driver, then
/// prints `ready <RSS added in KiB>` and waits to be killed.
async fn hold(args: &[String]) -> BoxResult<()> {
    let [backend, endpoint, n] = args else {
        return Err("usage: leader-bench hold etcd|redis|postgres ENDPOINT N".into());
    };
    let n: usize = n.parse()?;
    let before = rss_kib();
    let _ = backend;
    let driver = leader::connect(endpoint).await?;
    let elections = hold_elections(
        &driver,
        &format!("many-{}", std::process::id()),
        n,
        Duration::from_secs(10),
    )
    .await?;
    println!("ready {}", rss_kib().saturating_sub(before));
    std::future::pending::<()>().await;
    drop(elections);
    Ok(())
}

fn candidate_binary() -> BoxResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("chaos-candidate");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p leader-chaos` (ci/bench does)",
            path.display()
        )
        .into())
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = if args.get(1).map(String::as_str) == Some("hold") {
        hold(&args[2..]).await
    } else {
        run().await
    };
    if let Err(err) = result {
        eprintln!("leader-bench: {err}");
        std::process::exit(1);
    }
}

async fn run() -> BoxResult<()> {
    let candidate = candidate_binary()?;
    leader_testkit::require_binary("etcdctl", "etcd-client")?;
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
    let (postgres_admin, connection) =
        tokio_postgres::connect(&postgres.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    postgres_admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    let stores = Stores {
        etcd,
        redis,
        redis_fsync,
        postgres,
        postgres_admin,
    };
    let pid = std::process::id();
    let mut report = String::new();
    let mut goals = Vec::new();
    let backends = [StoreKind::Etcd, StoreKind::Redis, StoreKind::Postgres];

    eprintln!("[1/5] store round trip (floor)");
    writeln!(
        report,
        "| measurement | etcd | redis | postgres |\n|---|---|---|---|"
    )?;
    let mut row = String::from(
        "| floor: one write (etcd put / redis SET / postgres upsert, fsync on), p50 / p99 |",
    );
    for backend in backends {
        let h = floor(&stores, backend, 1000).await?;
        write!(
            row,
            " {} / {} |",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        )?;
    }
    writeln!(report, "{row}")?;

    eprintln!("[2/5] graceful handoff between processes ({HANDOFFS} each)");
    let ttl = Duration::from_secs(5);
    let mut signal_p50 = [0u64; 3];
    let mut internal_p50 = [0u64; 3];
    let mut handoff_series: Vec<(String, Vec<f64>)> = Vec::new();
    let mut signal_row = format!(
        "| graceful handoff, SIGTERM to new leader's line, separate processes, p50 / p99 (n={HANDOFFS}) |"
    );
    let mut internal_row = String::from(
        "| graceful handoff, resign() call to the next candidate's Elected event (CLOCK_MONOTONIC), p50 / p99 |",
    );
    for (i, backend) in backends.into_iter().enumerate() {
        eprintln!("  {}", backend.name());
        let c = ours(
            &candidate,
            stores.url(backend),
            ttl,
            format!("handoff-{pid}"),
        );
        let (by_signal, internal) = handoffs(&c, "TERM", HANDOFFS, |_| Duration::ZERO).await?;
        signal_p50[i] = by_signal.value_at_quantile(0.5);
        internal_p50[i] = internal.value_at_quantile(0.5);
        handoff_series.push((
            format!("ours on {}", backend.name()),
            charts::histogram_ms(&by_signal),
        ));
        write!(
            signal_row,
            " {} / {} |",
            ms(signal_p50[i]),
            ms(by_signal.value_at_quantile(0.99))
        )?;
        write!(
            internal_row,
            " {} / {} |",
            ms(internal_p50[i]),
            ms(internal.value_at_quantile(0.99))
        )?;
    }
    writeln!(report, "{signal_row}")?;
    // Ours on etcd and `etcdctl elect`, interleaved in blocks on the same etcd, so that
    // the machine's drift over the run weighs on both alike.
    let (mut side_ours, mut side_theirs) = (histogram(), histogram());
    eprintln!("  etcd beside etcdctl elect, interleaved");
    for block in 0..5 {
        // An election of its own per block: nothing left of one block can lead the next.
        let ours_etcd = ours(
            &candidate,
            stores.url(StoreKind::Etcd),
            ttl,
            format!("handoff-side-{pid}-{block}"),
        );
        let ours_block = handoffs(&ours_etcd, "TERM", HANDOFFS / 5, |_| Duration::ZERO)
            .await
            .map_err(|err| format!("ours on etcd, block {block}: {err}"))?;
        side_ours.add(ours_block.0)?;
        let theirs = etcdctl(
            stores.endpoint(StoreKind::Etcd),
            format!("etcdctl-{pid}-{block}"),
        );
        let theirs_block = handoffs(&theirs, "INT", HANDOFFS / 5, |_| Duration::ZERO)
            .await
            .map_err(|err| format!("etcdctl elect, block {block}: {err}"))?;
        side_theirs.add(theirs_block.0)?;
    }
    let baseline = side_theirs.value_at_quantile(0.5);
    let ratio = side_ours.value_at_quantile(0.5) as f64 / baseline as f64;
    handoff_series.push((
        "etcdctl elect".to_owned(),
        charts::histogram_ms(&side_theirs),
    ));
    writeln!(
        report,
        "| `etcdctl elect` handoff, SIGINT to new leader's line, same etcd, p50 / p99; in brackets ours / etcdctl, medians of {HANDOFFS} each, interleaved in 5 blocks | {} / {} ({ratio:.2}) | | |",
        ms(baseline),
        ms(side_theirs.value_at_quantile(0.99))
    )?;
    writeln!(report, "{internal_row}")?;
    let c = ours(
        &candidate,
        stores.redis_fsync.url(),
        ttl,
        format!("handoff-fsync-{pid}"),
    );
    let (_, fsync) = handoffs(&c, "TERM", HANDOFFS, |_| Duration::ZERO).await?;
    writeln!(
        report,
        "| graceful handoff on Redis with `appendfsync always` (as the README asks), resign() to Elected, p50 / p99 | | {} / {} | |",
        ms(fsync.value_at_quantile(0.5)),
        ms(fsync.value_at_quantile(0.99))
    )?;
    goals.push(format!(
        "etcd graceful handoff median <= 0.8x etcdctl elect (same method, interleaved): ratio {ratio:.2} -> {}",
        if ratio <= 0.8 { "met" } else { "MISSED" }
    ));
    let series: Vec<(&str, Vec<f64>)> = handoff_series
        .iter()
        .map(|(name, values)| (name.as_str(), values.clone()))
        .collect();
    let charts_dir = charts::out_dir();
    charts::handoff_distributions(&charts_dir.join(charts::HANDOFF_SVG), &series)?;
    goals.push(format!(
        "redis handoff p50 under 2 ms (resign() to Elected): {} -> {}",
        ms(internal_p50[1]),
        if internal_p50[1] < 2000 {
            "met"
        } else {
            "MISSED"
        }
    ));

    eprintln!("[3/5] crash failover (SIGKILL) at TTL 1s, 2s, 5s, 20 each");
    const CRASHES: usize = 20;
    let mut failovers: Vec<(&str, f64, Vec<f64>)> = Vec::new();
    for secs in [1u64, 2, 5] {
        let ttl = Duration::from_secs(secs);
        let mut row = format!(
            "| crash failover at TTL {secs}s, killed at a random phase after the first renewal, median / max as x TTL (n={CRASHES}) |"
        );
        for backend in backends {
            let c = ours(
                &candidate,
                stores.url(backend),
                ttl,
                format!("crash-{secs}-{pid}"),
            );
            // The leader was elected about SETTLE ago: kill it past its first renewal (a
            // third of the TTL), at a phase spread over the next renewal interval.
            let renewal = ttl / 3;
            let phase =
                move |i: usize| (renewal + renewal.mul_f64(spread(i))).saturating_sub(SETTLE);
            let (h, _) = handoffs(&c, "KILL", CRASHES, phase).await?;
            let median = h.value_at_quantile(0.5) as f64 / 1e6 / secs as f64;
            let max = h.max() as f64 / 1e6 / secs as f64;
            failovers.push((
                backend.name(),
                secs as f64,
                charts::histogram_ms(&h)
                    .iter()
                    .map(|ms| ms / 1000.0 / secs as f64)
                    .collect(),
            ));
            write!(row, " {median:.2} / {max:.2} |")?;
            goals.push(format!(
                "{} crash failover within TTL + 10% at TTL {secs}s: max {max:.2} x TTL over {} kills -> {}",
                backend.name(),
                h.len(),
                if max <= 1.1 { "met" } else { "MISSED" }
            ));
        }
        writeln!(report, "{row}")?;
    }

    charts::failover_multiples(&charts_dir.join(charts::FAILOVER_SVG), &failovers)?;

    eprintln!("[4/5] idle cost (store requests per second, TTL 3s)");
    let ttl = Duration::from_secs(3);
    let window = Duration::from_secs(9);
    let mut rows = [
        String::from("| idle: one leader, requests/s |"),
        String::from("| idle: one follower (added to the leader), requests/s |"),
        String::from("| idle: one process, 1,000 elections on one driver, requests/s |"),
    ];
    for backend in backends {
        let leader = Election::builder(stores.driver(backend).await?, format!("idle-{pid}"))
            .ttl(ttl)
            .build()?;
        leader.campaign().await?;
        sleep(Duration::from_secs(1)).await;
        let alone = rate(&stores, backend, window).await?;
        let follower = Election::builder(stores.driver(backend).await?, format!("idle-{pid}"))
            .ttl(ttl)
            .build()?;
        let waiting = tokio::spawn({
            let follower = follower.clone();
            async move { follower.campaign().await }
        });
        sleep(Duration::from_secs(1)).await;
        let both = rate(&stores, backend, window).await?;
        waiting.abort();
        let _ = leader.resign().await;
        drop((leader, follower));
        let driver = stores.driver(backend).await?;
        let many = hold_elections(&driver, &format!("idle-many-{pid}"), 1000, ttl).await?;
        sleep(Duration::from_secs(1)).await;
        let thousand = rate(&stores, backend, window).await?;
        for e in &many {
            let _ = e.resign().await;
        }
        write!(rows[0], " {alone:.2} |")?;
        write!(rows[1], " {:.2} |", (both - alone).max(0.0))?;
        write!(rows[2], " {thousand:.1} |")?;
        if backend == StoreKind::Etcd {
            goals.push(format!(
                "etcd followers make no periodic requests: a follower adds {:.2}/s -> {}",
                (both - alone).max(0.0),
                if both - alone < 0.2 {
                    "met"
                } else {
                    "MISSED (its lease keep-alive, see README)"
                }
            ));
        }
        goals.push(format!(
            "{} keep-alive per process, not per election: 1,000 elections cost {thousand:.1}/s vs {alone:.2}/s for one -> {}",
            backend.name(),
            if thousand < alone * 5.0 + 1.0 { "met" } else { "MISSED (per-election renewals, see README)" }
        ));
        if backend == StoreKind::Redis {
            goals.push(format!(
                "redis: 1,000 elections held by one process cost <= 5 requests/s at TTL 3s: {thousand:.1}/s -> {}",
                if thousand <= 5.0 { "met" } else { "MISSED" }
            ));
        }
    }
    for row in rows {
        writeln!(report, "{row}")?;
    }

    eprintln!("[5/5] scale: waiting candidates, and 10,000 elections in one process");
    let mut per_handoff: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    let mut redis_p50 = Vec::new();
    for waiting in [1usize, 10, 100, 1000] {
        let mut row = format!(
            "| handoff p50 with {waiting} waiting (etcd: requests, watch messages sent; redis: commands, commands inside scripts; postgres: statements, -; per handoff) |"
        );
        for backend in backends {
            let (h, per) = scale_handoffs(&stores, backend, waiting, 30).await?;
            let mut point =
                |name: String, value: f64| match per_handoff.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, points)) => points.push((waiting, value)),
                    None => per_handoff.push((name, vec![(waiting, value)])),
                };
            match backend {
                StoreKind::Etcd => {
                    point("etcd: requests".into(), per.requests);
                    point("etcd: watch messages sent".into(), per.other);
                }
                StoreKind::Redis => {
                    point("redis: commands".into(), per.requests);
                    point("redis: commands inside scripts".into(), per.other);
                    redis_p50.push((waiting, h.value_at_quantile(0.5), per.requests));
                }
                StoreKind::Postgres => point("postgres: statements".into(), per.requests),
            }
            write!(
                row,
                " {} ({:.1}, {:.1}) |",
                ms(h.value_at_quantile(0.5)),
                per.requests,
                per.other
            )?;
            if per.retried > 0 {
                goals.push(format!(
                    "{} with {waiting} waiting: {} campaigns failed and were retried -> MISSED",
                    backend.name(),
                    per.retried
                ));
            }
        }
        writeln!(report, "{row}")?;
    }
    let series: Vec<(&str, Vec<(usize, f64)>)> = per_handoff
        .iter()
        .map(|(name, points)| (name.as_str(), points.clone()))
        .collect();
    charts::requests_per_handoff(&charts_dir.join(charts::REQUESTS_SVG), &series)?;
    eprintln!("charts: {}", charts_dir.display());
    if let (Some((_, one, _)), Some((_, thousand_p50, requests))) =
        (redis_p50.first(), redis_p50.last())
    {
        goals.push(format!(
            "redis: <= 10 store requests per handoff with 1,000 waiting: {requests:.1} -> {}",
            if *requests <= 10.0 { "met" } else { "MISSED" }
        ));
        let ratio = *thousand_p50 as f64 / (*one).max(1) as f64;
        goals.push(format!(
            "redis: handoff p50 with 1,000 waiting unchanged (within 1.5x of 1 waiting, same run): {} vs {} ({ratio:.2}x) -> {}",
            ms(*thousand_p50),
            ms(*one),
            if ratio <= 1.5 { "met" } else { "MISSED" }
        ));
    }
    let mut row = String::from(
        "| 10,000 elections on one driver in one process: RSS added; requests/s (TTL 10s) |",
    );
    for backend in backends {
        let exe = std::env::current_exe()?;
        let mut holder = LineProcess::spawn(
            Command::new(exe)
                .args(["hold", backend.name(), &stores.url(backend), "10000"])
                .stderr(Stdio::inherit()),
        )?;
        let ready = holder
            .wait_for_line(Duration::from_secs(600), |l| l.starts_with("ready"))
            .await?;
        sleep(Duration::from_secs(1)).await;
        let per_second = rate(&stores, backend, Duration::from_secs(10)).await?;
        let added_kib = last_number(&ready).unwrap_or(0);
        let _ = holder.signal("KILL");
        write!(
            row,
            " {:.1} MiB; {per_second:.1}/s |",
            added_kib as f64 / 1024.0
        )?;
    }
    writeln!(report, "{row}")?;

    println!("{report}");
    println!(
        "Samples that fell outside a histogram's range (dropped): {}",
        DROPPED.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("Goals:");
    for goal in goals {
        println!("- {goal}");
    }
    Ok(())
}
