//! The model of etcd (`tests/sim`) against a real etcd: the same scripted sequences of
//! `EtcdIo` calls run on the model (on a quiet network) and on [`ClientIo`] against an etcd
//! started by leader-testkit, and every answer and watch message is compared, with what
//! legitimately differs normalised (revisions relative to the script's start, lease ids by
//! order of grant).

mod sim;

use std::sync::Arc;
use std::time::Duration;

use leader_core::Error;
use leader_etcd::ClientIo;
use leader_etcd::io::{
    Compare, CompareOp, EtcdIo, Kv, Op, OpResult, Range, RangeResult, Sort, Target, Txn, TxnResult,
    WatchCommand, WatchMessage, WatchRequest, WatchStream, lease_not_found,
};
use leader_testkit::EtcdServer;
use leader_testkit::sim::{ClientId, Net};
use tokio::time::{Instant, sleep, timeout};

/// The longest wait for a real etcd's watch messages or expiry.
const DEADLINE: Duration = Duration::from_secs(10);

/// One side of the comparison.
struct Side {
    io: Arc<dyn EtcdIo>,
    /// The model's store, to compact it (etcd's compaction is an admin request the driver
    /// never sends); for the real side, a client.
    compact: Compactor,
    leases: Vec<i64>,
    base: i64,
    streams: Vec<WatchStream>,
    /// The model's message counts per step, which the real side waits for.
    expected: Option<Vec<usize>>,
    counts: Vec<usize>,
    log: Vec<String>,
}

enum Compactor {
    Model(Arc<std::sync::Mutex<sim::Store>>),
    Real(Box<etcd_client::Client>),
}

impl Side {
    fn lease(&self, id: i64) -> String {
        match self.leases.iter().position(|&l| l == id) {
            Some(i) => format!("L{i}"),
            None if id == 0 => "none".into(),
            None => "unknown lease".into(),
        }
    }

    fn rev(&self, revision: i64) -> i64 {
        if revision == 0 {
            0
        } else {
            revision - self.base
        }
    }

    fn kv(&self, kv: &Kv) -> String {
        format!(
            "{}={} c{} m{} v{} {}",
            String::from_utf8_lossy(&kv.key).replace('\0', "\\0"),
            String::from_utf8_lossy(&kv.value),
            self.rev(kv.create_revision),
            self.rev(kv.mod_revision),
            kv.version,
            self.lease(kv.lease)
        )
    }

    fn range_result(&self, range: &RangeResult) -> String {
        let kvs: Vec<String> = range.kvs.iter().map(|kv| self.kv(kv)).collect();
        format!("[{}] more={}", kvs.join(", "), range.more)
    }

    fn txn_result(&self, result: &TxnResult) -> String {
        let results: Vec<String> = result
            .results
            .iter()
            .map(|r| match r {
                OpResult::Put => "put".to_owned(),
                OpResult::Delete(n) => format!("deleted {n}"),
                OpResult::Get(range) => self.range_result(range),
                OpResult::Reads(reads) => {
                    let reads: Vec<String> = reads.iter().map(|r| self.range_result(r)).collect();
                    format!("reads {{{}}}", reads.join(", "))
                }
            })
            .collect();
        format!(
            "rev {} succeeded={} {}",
            self.rev(result.revision),
            result.succeeded,
            results.join("; ")
        )
    }

    fn message(&self, m: &WatchMessage) -> String {
        let events: Vec<String> = m
            .events
            .iter()
            .map(|e| {
                if e.deleted {
                    format!(
                        "DELETE {} m{}",
                        String::from_utf8_lossy(&e.kv.key),
                        self.rev(e.kv.mod_revision)
                    )
                } else {
                    format!("PUT {}", self.kv(&e.kv))
                }
            })
            .collect();
        format!(
            "watch {} created={} canceled={} compact={} [{}]",
            m.watch_id,
            m.created,
            m.canceled,
            self.rev(m.compact_revision),
            events.join(", ")
        )
    }

    fn error(err: &Error) -> String {
        if lease_not_found(err) {
            "error: lease not found".into()
        } else if format!("{err:?}").contains("compacted") {
            "error: compacted".into()
        } else if format!("{err:?}").contains("duplicate key") {
            "error: duplicate key".into()
        } else if format!("{err:?}").contains("too many operations") {
            "error: too many operations".into()
        } else {
            format!("error: {err}")
        }
    }

    fn record(&mut self, line: String) {
        self.log.push(line);
    }

    /// After each step: every watch message since the last, in order.
    async fn messages(&mut self) {
        let step = self.counts.len();
        let mut got = Vec::new();
        match self
            .expected
            .as_ref()
            .map(|e| e.get(step).copied().unwrap_or(0))
        {
            Some(expected) => {
                let until = Instant::now() + DEADLINE;
                while got.len() < expected && Instant::now() < until {
                    let mut any = false;
                    for stream in &mut self.streams {
                        if let Ok(Some(m)) =
                            timeout(Duration::from_millis(20), stream.messages.recv()).await
                        {
                            got.push(m);
                            any = true;
                            break;
                        }
                    }
                    if !any {
                        sleep(Duration::from_millis(10)).await;
                    }
                }
                // And whatever else is there already.
                for stream in &mut self.streams {
                    while let Ok(m) = stream.messages.try_recv() {
                        got.push(m);
                    }
                }
            }
            None => {
                // The model: its deliveries are tasks on this runtime, at once.
                for stream in &mut self.streams {
                    while let Ok(Some(m)) =
                        timeout(Duration::from_millis(30), stream.messages.recv()).await
                    {
                        got.push(m);
                    }
                }
            }
        }
        self.counts.push(got.len());
        let mut lines: Vec<String> = got
            .iter()
            .map(|m| match m {
                Ok(m) => self.message(m),
                Err(err) => Self::error(err),
            })
            .collect();
        // Messages of different streams may interleave differently: per stream order is
        // what etcd promises, and watch ids differ per stream.
        lines.sort();
        for line in lines {
            self.record(format!("  {line}"));
        }
    }

    async fn grant(&mut self, ttl: i64) {
        let line = match self.io.lease_grant(ttl).await {
            Ok(grant) => {
                self.leases.push(grant.id);
                format!("grant {} ttl {}", self.lease(grant.id), grant.ttl)
            }
            Err(err) => Self::error(&err),
        };
        self.record(line);
        self.messages().await;
    }

    async fn txn(&mut self, txn: Txn) {
        let line = match self.io.txn(txn).await {
            Ok(result) => self.txn_result(&result),
            Err(err) => Self::error(&err),
        };
        self.record(format!("txn: {line}"));
        self.messages().await;
    }

    async fn range(&mut self, range: Range) {
        let line = match self.io.range(range).await {
            Ok((result, revision)) => {
                format!("rev {} {}", self.rev(revision), self.range_result(&result))
            }
            Err(err) => Self::error(&err),
        };
        self.record(format!("range: {line}"));
        self.messages().await;
    }

    async fn keep_alive(&mut self, lease: usize) {
        let id = self.leases[lease];
        let line = match self.io.lease_keep_alive(id).await {
            // Alive or not: ClientIo's first keep-alive on a stream cannot tell the TTL
            // (etcd-client keeps that answer to itself) and says 1.
            Ok(ttl) => format!("alive={}", ttl > 0),
            Err(err) => Self::error(&err),
        };
        self.record(format!("keep-alive L{lease}: {line}"));
        self.messages().await;
    }

    async fn time_to_live(&mut self, lease: usize) {
        let id = self.leases[lease];
        let line = match self.io.lease_time_to_live(id).await {
            // Whole seconds left, truncated: a lease of `ttl` reads ttl - 1 or ttl. The raft
            // term is etcd's own (compared by its presence).
            Ok(answer) => format!(
                "alive={} granted={} term={}",
                answer.ttl >= 0,
                answer.granted,
                answer.raft_term > 0
            ),
            Err(err) => Self::error(&err),
        };
        self.record(format!("time-to-live L{lease}: {line}"));
        let line = match self.io.raft_term(b"differential").await {
            Ok(term) => format!("term={}", term > 0),
            Err(err) => Self::error(&err),
        };
        self.record(format!("raft term: {line}"));
        self.messages().await;
    }

    async fn revoke(&mut self, lease: usize) {
        let id = self.leases[lease];
        let line = match self.io.lease_revoke(id).await {
            Ok(found) => format!("found={found}"),
            Err(err) => Self::error(&err),
        };
        self.record(format!("revoke L{lease}: {line}"));
        self.messages().await;
    }

    async fn watch(&mut self, mut request: WatchRequest, relative_start: i64) {
        request.start_revision = if relative_start > 0 {
            relative_start + self.base
        } else {
            0
        };
        let line = match self.io.watch(request).await {
            Ok(stream) => {
                self.streams.push(stream);
                "watching".to_owned()
            }
            Err(err) => Self::error(&err),
        };
        self.record(format!("watch: {line}"));
        self.messages().await;
    }

    /// A second watch on stream `stream`, or a cancellation.
    async fn command(&mut self, stream: usize, mut command: WatchCommand) {
        if let WatchCommand::Watch(request) = &mut command
            && request.start_revision > 0
        {
            request.start_revision += self.base;
        }
        let _ = self.streams[stream].commands.send(command);
        self.record("command sent".into());
        self.messages().await;
    }

    /// The current revision, absolute.
    async fn current(&self) -> i64 {
        self.io
            .range(Range::key("differential-nothing"))
            .await
            .expect("a read")
            .1
    }

    async fn compact(&mut self, relative: i64) {
        let revision = relative + self.base;
        match &self.compact {
            Compactor::Model(store) => store.lock().expect("store").compact(revision),
            Compactor::Real(client) => {
                client
                    .clone()
                    .compact(revision, None)
                    .await
                    .expect("etcd compacts");
            }
        }
        self.record(format!("compacted at {relative}"));
        self.messages().await;
    }

    /// Waits until `key` is gone (lease expiry), with a deadline.
    async fn until_gone(&mut self, key: &str) {
        let until = Instant::now() + DEADLINE;
        let mut gone = false;
        while Instant::now() < until {
            let (result, _) = self.io.range(Range::key(key)).await.expect("a read");
            if result.kvs.is_empty() {
                gone = true;
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
        self.record(format!("{key} gone by expiry: {gone}"));
        self.messages().await;
    }
}

fn put(key: &str, value: &str, lease: i64) -> Op {
    Op::put(key, value, lease)
}

/// The script: every method of `EtcdIo` (but `client_txn`, which carries etcd-client's own
/// operations through unchanged), the compares, ranges and watches the protocol uses and
/// a few it does not.
async fn script(side: &mut Side, p: &str) {
    let k = |name: &str| format!("{p}{name}");
    side.base = side.current().await;
    side.grant(30).await;
    side.grant(30).await;
    let (l0, l1) = (side.leases[0], side.leases[1]);
    // A watch of the whole prefix, from the next revision; one of deletions only.
    side.watch(WatchRequest::prefix(1, p, 1), 1).await;
    side.command(
        0,
        WatchCommand::Watch(WatchRequest {
            no_put: true,
            ..WatchRequest::prefix(2, k("e/"), 0)
        }),
    )
    .await;
    // Creates if absent (the campaign's transaction), twice.
    for _ in 0..2 {
        side.txn(
            Txn::new()
                .when([Compare::create_revision(k("e/a"), 0)])
                .and_then([
                    put(&k("e/a"), "va", l0),
                    put(&k("e\0id\0a"), "id-a", l0),
                    put(&k("e\0try\0a"), "", l1),
                ])
                .or_else([Op::get(k("e/a"))]),
        )
        .await;
    }
    side.txn(Txn::new().and_then([put(&k("e/b"), "vb", l1), put(&k("e/c"), "vc", 0)]))
        .await;
    // Overwrite: version and mod revision move, create revision stays.
    side.txn(Txn::new().and_then([put(&k("e/c"), "vc2", l0)]))
        .await;
    // Reads: sorted, limited, bounded by create revision, at a revision.
    side.range(Range::prefix(k("e/")).sort(Sort::CreateAscend))
        .await;
    side.range(Range::prefix(k("e/")).sort(Sort::CreateDescend).limit(2))
        .await;
    side.range(
        Range::prefix(k("e/"))
            .max_create_revision(side.base + 3)
            .sort(Sort::CreateDescend),
    )
    .await;
    side.range(
        Range::prefix(k("e/"))
            .min_create_revision(side.base + 4)
            .limit(1),
    )
    .await;
    side.range(Range {
        revision: side.base + 4,
        ..Range::prefix(k("e/"))
    })
    .await;
    side.range(Range::prefix(k("e\0id\0"))).await;
    // Compares of each kind, holding and not.
    for target in [
        Target::CreateRevision(side.base + 3),
        Target::ModRevision(side.base + 6),
        Target::Version(2),
        Target::Value(b"vc2".to_vec()),
        Target::Lease(l0),
    ] {
        for op in [
            CompareOp::Equal,
            CompareOp::NotEqual,
            CompareOp::Less,
            CompareOp::Greater,
        ] {
            side.txn(
                Txn::new()
                    .when([Compare {
                        key: k("e/c").into_bytes(),
                        op,
                        target: target.clone(),
                    }])
                    .and_then([Op::get(k("e/c"))]),
            )
            .await;
        }
    }
    side.txn(
        Txn::new()
            .when([Compare::value(k("e/none"), "x")])
            .and_then([Op::get(k("e/none"))]),
    )
    .await;
    // A put on a lease etcd does not have: the whole transaction fails.
    side.txn(Txn::new().and_then([put(&k("e/d"), "vd", 0x7777), put(&k("e/e"), "ve", 0)]))
        .await;
    // Keep-alive and time to live.
    side.keep_alive(0).await;
    side.time_to_live(0).await;
    // A delete of nothing writes nothing; a delete by compare; a prefix delete.
    side.txn(Txn::new().and_then([Op::delete(k("e/none"))]))
        .await;
    side.txn(
        Txn::new()
            .when([Compare::create_revision(k("e/b"), side.base + 4)])
            .and_then([Op::delete(k("e/b"))])
            .or_else([Op::get(k("e/b"))]),
    )
    .await;
    // Revoking a lease deletes its keys at one revision.
    side.revoke(0).await;
    side.revoke(0).await;
    side.keep_alive(0).await;
    side.time_to_live(0).await;
    side.txn(Txn::new().and_then([put(&k("f/x"), "1", 0), put(&k("f/y"), "2", 0)]))
        .await;
    side.txn(Txn::new().and_then([Op::Delete {
        key: k("f/").into_bytes(),
        end: Some(leader_etcd::io::prefix_end(k("f/").as_bytes())),
    }]))
    .await;
    // A watch from the past replays the history; cancelled, it is confirmed.
    side.command(0, WatchCommand::Watch(WatchRequest::key(3, k("e/a"), 3)))
        .await;
    side.command(0, WatchCommand::Cancel(3)).await;
    // Compaction: reads and watches from before it are refused.
    let now = side.current().await - side.base;
    side.compact(now - 2).await;
    side.range(Range {
        revision: side.base + 2,
        ..Range::prefix(k("e/"))
    })
    .await;
    side.command(0, WatchCommand::Watch(WatchRequest::key(4, k("e/a"), 2)))
        .await;
    side.command(
        0,
        WatchCommand::Watch(WatchRequest::key(5, k("e/a"), now - 2)),
    )
    .await;
    // Expiry: a one-second lease not kept alive.
    side.grant(1).await;
    let short = side.leases[2];
    side.txn(Txn::new().and_then([put(&k("g/short"), "s", short)]))
        .await;
    side.until_gone(&k("g/short")).await;
    side.time_to_live(2).await;
}

/// A campaign as the protocol runs it: two candidates in line on two streams, the waiter's
/// range watch from the nomination to its own key, the leader's watch of its own key, a
/// handover's nomination, deletions by create revision (a stale one refused), and a
/// revocation ending both at one revision.
async fn line(side: &mut Side, p: &str) {
    let k = |name: &str| format!("{p}{name}");
    side.base = side.current().await;
    side.grant(30).await;
    side.grant(60).await;
    let (a, b) = (side.leases[0], side.leases[1]);
    let create = |key: String, lease: i64| {
        Txn::new()
            .when([Compare::create_revision(key.clone(), 0)])
            .and_then([put(&key, "v", lease)])
            .or_else([Op::get(key)])
    };
    side.txn(create(k("e/a"), a)).await;
    side.txn(create(k("e/b"), b)).await;
    // A create that reads the line in its own transaction (`Inner::create_key`): etcd's
    // reads inside a transaction see its writes, the new key the newest of the prefix.
    side.txn(
        Txn::new()
            .when([Compare::create_revision(k("e/c"), 0)])
            .and_then([
                put(&k("e/c"), "v", b),
                Op::Get(Range::prefix(k("e/")).sort(Sort::CreateDescend).limit(3)),
                Op::get(k("e/c")),
                Op::get(k("e\0nominee")),
            ])
            .or_else([Op::get(k("e/c"))]),
    )
    .await;
    side.txn(Txn::new().and_then([Op::delete(k("e/c"))])).await;
    // The waiter's read: the keys below it (two at most), its own, the nomination.
    side.txn(
        Txn::new().and_then([
            Op::Get(
                Range::prefix(k("e/"))
                    .max_create_revision(side.base + 1)
                    .sort(Sort::CreateDescend)
                    .limit(2),
            ),
            Op::get(k("e/b")),
            Op::get(k("e\0nominee")),
        ]),
    )
    .await;
    // The renewals' read of every held key: keys only, flat; etcd refuses a list of a
    // transaction longer than `--max-txn-ops` (128).
    let held = |n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| Op::Get(Range::key(k(["e/a", "e/b", "e/none"][i % 3])).keys_only()))
            .collect()
    };
    side.txn(Txn::new().and_then(held(128))).await;
    side.txn(Txn::new().and_then(held(129))).await;
    // Nested reads (many held terms): etcd's budget runs along the path, a nested list may
    // hold 128 less the longest list of the transactions it is nested in.
    let nested = |n: usize| {
        Op::Reads(
            held(n)
                .into_iter()
                .filter_map(|op| match op {
                    Op::Get(range) => Some(range),
                    _ => None,
                })
                .collect(),
        )
    };
    side.txn(Txn::new().and_then([nested(3), nested(126)]))
        .await;
    side.txn(Txn::new().and_then([nested(3), nested(127)]))
        .await;
    side.txn(Txn::new().and_then(vec![nested(64); 64])).await;
    side.txn(Txn::new().and_then(vec![nested(65); 64])).await;
    // The leader watches its key; the waiter the range from the nomination to its key.
    side.watch(WatchRequest::key(7, k("e/a"), 2), 2).await;
    let mut end = k("e/b").into_bytes();
    end.push(0);
    side.watch(
        WatchRequest {
            end: Some(end),
            ..WatchRequest::key(8, k("e\0nominee"), 3)
        },
        3,
    )
    .await;
    // A stale deletion (an older create revision) is refused; the right one deletes.
    for revision in [side.base, side.base + 1] {
        side.txn(
            Txn::new()
                .when([Compare::create_revision(k("e/a"), revision)])
                .and_then([Op::delete(k("e/a"))]),
        )
        .await;
    }
    // A nomination on a lease of its own, then both leases revoked.
    side.txn(Txn::new().and_then([put(&k("e\0nominee"), "x", a)]))
        .await;
    side.txn(Txn::new().and_then([put(&k("e/c"), "v", a)]))
        .await;
    side.revoke(0).await;
    side.revoke(1).await;
    side.range(Range::prefix(p)).await;
    // A closed stream: its watches end with it.
    side.streams.clear();
    side.txn(Txn::new().and_then([put(&k("e/d"), "v", 0), Op::delete(k("e/d"))]))
        .await;
}

async fn compare(run: &str) {
    let server = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("start task")
        .expect("etcd starts (install it with: sudo apt-get install -y etcd-server)");
    let client = etcd_client::Client::connect(server.endpoints(), None)
        .await
        .expect("connect to etcd");
    let prefix = format!("differential-{run}/");

    let net = Net::quiet();
    let model = sim::EtcdModel::new(&net);
    let mut modelled = Side {
        io: Arc::new(model.io(&net, ClientId(0), Duration::from_secs(5))),
        compact: Compactor::Model(Arc::clone(&model.store)),
        leases: Vec::new(),
        base: 0,
        streams: Vec::new(),
        expected: None,
        counts: Vec::new(),
        log: Vec::new(),
    };
    steps(&mut modelled, run, &prefix).await;

    let mut real = Side {
        io: Arc::new(ClientIo::new(client.clone())),
        compact: Compactor::Real(Box::new(client)),
        leases: Vec::new(),
        base: 0,
        streams: Vec::new(),
        expected: Some(modelled.counts.clone()),
        counts: Vec::new(),
        log: Vec::new(),
    };
    steps(&mut real, run, &prefix).await;

    let mut differences = Vec::new();
    for (i, (m, r)) in modelled.log.iter().zip(&real.log).enumerate() {
        if m != r {
            differences.push(format!("line {i}:\n  model: {m}\n  etcd:  {r}"));
        }
    }
    if modelled.log.len() != real.log.len() {
        differences.push(format!(
            "the model logged {} lines, etcd {}:\nmodel:\n{}\netcd:\n{}",
            modelled.log.len(),
            real.log.len(),
            modelled.log.join("\n"),
            real.log.join("\n")
        ));
    }
    assert!(
        differences.is_empty(),
        "the model of etcd differs from etcd:\n{}",
        differences.join("\n")
    );
}

async fn steps(side: &mut Side, run: &str, prefix: &str) {
    match run {
        "line" => line(side, prefix).await,
        _ => script(side, prefix).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_answers_as_etcd_does() {
    compare("script").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_runs_a_line_as_etcd_does() {
    compare("line").await;
}
