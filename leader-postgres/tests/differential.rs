//! The model of `tests/sim` cannot drift from PostgreSQL: scripted sequences of the I/O
//! trait's calls run against a real server (through the driver's real I/O layer) and
//! against the model (straight through, no faults), and every answer and every
//! notification heard after each step must be the same on both, once what legitimately
//! differs is normalised (fencing tokens' absolute values: the first one seen in an
//! election is its base; remaining leases: their sign).

mod sim;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use leader_postgres::PostgresDriver;
use leader_postgres::io::{
    AcquireRequest, HandOverRequest, ListenConnection, Place, PostgresIo, Renewal,
};

/// One call of the I/O trait. Tokens are `Tok(election, k)`: the k-th token after the
/// first one this side saw in that election (`None`: a token no term has).
#[derive(Debug, Clone)]
enum Step {
    Acquire(&'static str, &'static str, u64),
    Renew(Vec<(&'static str, &'static str, Tok)>),
    Keep(Vec<(&'static str, &'static str)>),
    Resign(&'static str, &'static str, Option<Tok>),
    HandOver(&'static str, &'static str, Tok, &'static str),
    Proclaim(&'static str, &'static str, Tok, &'static str),
    Candidates(&'static str),
    Leader(&'static str),
    Unlisten(&'static str),
    Ping,
    /// Waits (real time) for leases to expire.
    Sleep(u64),
}

#[derive(Debug, Clone, Copy)]
enum Tok {
    K(u64),
    Bogus,
}

/// One side: an I/O layer, its LISTEN connection, and what it has seen.
struct Side {
    io: Arc<dyn PostgresIo>,
    listen: ListenConnection,
    /// The first token seen per election.
    base: BTreeMap<String, u64>,
    /// Run-unique prefix of names and channels.
    run: String,
    /// The last stamp given to a statement (the same sequence on both sides).
    stamp: u64,
}

const TTL_MS: u64 = 30_000;

impl Side {
    async fn new(io: Arc<dyn PostgresIo>, run: &str) -> Self {
        io.connect().await.expect("connect");
        let listen = io.listen_connection().await.expect("LISTEN connection");
        let mut side = Side {
            io,
            listen,
            base: BTreeMap::new(),
            run: run.to_owned(),
            stamp: 0,
        };
        let mut channels: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|c| side.driver_channel(c))
            .collect();
        channels.extend(["x", "y", "z"].iter().map(|e| side.election_channel(e)));
        side.listen.client.listen(&channels).await.expect("LISTEN");
        side.heard().await;
        side
    }

    fn election(&self, e: &str) -> String {
        format!("{}-{e}", self.run)
    }

    fn candidate(&self, c: &str) -> String {
        format!("{}-{c}", self.run)
    }

    fn driver_channel(&self, c: &str) -> String {
        format!("leader_d_{}_{c}", self.run)
    }

    fn election_channel(&self, e: &str) -> String {
        format!("leader_{}_{e}", self.run)
    }

    fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    fn token(&self, e: &str, tok: Tok) -> u64 {
        match tok {
            Tok::K(k) => self.base.get(&self.election(e)).copied().unwrap_or(1) + k,
            Tok::Bogus => 1,
        }
    }

    /// Normalises a token seen in `election`.
    fn seen(&mut self, election: &str, token: u64) -> String {
        let base = *self.base.entry(election.to_owned()).or_insert(token);
        format!("T+{}", token.wrapping_sub(base))
    }

    /// Replaces run-unique names and channels by their short forms.
    fn plain(&self, text: &str) -> String {
        text.replace(&format!("leader_d_{}_", self.run), "D:")
            .replace(&format!("leader_{}_", self.run), "E:")
            .replace(&format!("{}-", self.run), "")
    }

    /// The notifications heard since the last call, sorted (their order across channels
    /// is not part of the protocol), tokens normalised.
    async fn heard(&mut self) -> Vec<String> {
        // Notifications committed before the ping reach the connection before its answer.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.listen.client.ping().await.expect("ping");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut heard = Vec::new();
        while let Some(Some(n)) = self.listen.notifications.next().now_or_never() {
            heard.push(n);
        }
        let mut out = Vec::new();
        for n in heard {
            // A trigger's notice (`g<token>:<holder>`) and a grant (`G<token>:<stamp>:<id>`)
            // name the election only through the candidate: their tokens are normalised
            // against any election's base.
            let payload = match n.payload.split_at_checked(1) {
                Some((kind @ ("g" | "G"), rest)) => {
                    let (token, rest) = rest.split_once(':').expect("a token");
                    let token: u64 = token.parse().expect("a token");
                    let election = self
                        .base
                        .iter()
                        .filter(|(_, b)| token >= **b && token - **b < 1000)
                        .map(|(e, _)| e.clone())
                        .next()
                        .unwrap_or_default();
                    let t = self.seen(&election, token);
                    format!("{kind}{t}:{rest}")
                }
                _ => n.payload.clone(),
            };
            out.push(self.plain(&format!("{} {payload}", n.channel)));
        }
        out.sort();
        out
    }

    async fn step(&mut self, step: &Step) -> String {
        let io = Arc::clone(&self.io);
        let answer = match step {
            Step::Acquire(e, c, ttl) => {
                let request = AcquireRequest {
                    election: self.election(e),
                    candidate: self.candidate(c),
                    value: format!("v-{c}").into_bytes(),
                    ttl: Duration::from_millis(*ttl),
                    election_channel: self.election_channel(e),
                    driver_channel: self.driver_channel(c),
                    stamp: self.next_stamp(),
                };
                match io.acquire(&request).await {
                    Ok(a) => {
                        let token = a.token.map(|t| self.seen(&self.election(e), t));
                        format!(
                            "token {token:?} first {} remaining {}",
                            a.first,
                            sign(a.remaining_ms)
                        )
                    }
                    Err(err) => format!("error {err}"),
                }
            }
            Step::Renew(batch) => {
                let batch: Vec<Renewal> = batch
                    .iter()
                    .map(|(e, c, tok)| Renewal {
                        election: self.election(e),
                        holder: self.candidate(c),
                        token: self.token(e, *tok),
                        ttl: Duration::from_millis(TTL_MS),
                    })
                    .collect();
                let mut renewed = io.renew(&batch).await.expect("renew");
                renewed.sort();
                format!("renewed {renewed:?}")
            }
            Step::Keep(places) => {
                let stamp = self.next_stamp();
                let places: Vec<Place> = places
                    .iter()
                    .map(|(e, c)| Place {
                        election: self.election(e),
                        candidate: self.candidate(c),
                        ttl: Duration::from_millis(TTL_MS),
                        stamp,
                    })
                    .collect();
                let mut kept: Vec<String> = io
                    .keep(&places)
                    .await
                    .expect("keep")
                    .into_iter()
                    .map(|k| format!("{} first {} free {}", k.candidate, k.first, k.free))
                    .collect();
                kept.sort();
                format!("kept {kept:?}")
            }
            Step::Resign(e, c, tok) => {
                let token = tok.map(|t| self.token(e, t));
                let r = io
                    .resign(
                        &self.election(e),
                        &self.candidate(c),
                        token,
                        &self.election_channel(e),
                    )
                    .await
                    .expect("resign");
                format!("{r:?}")
            }
            Step::HandOver(e, c, tok, nominee) => {
                let request = HandOverRequest {
                    election: self.election(e),
                    holder: self.candidate(c),
                    token: self.token(e, *tok),
                    nominee: self.candidate(nominee),
                    ttl: Duration::from_millis(TTL_MS),
                    election_channel: self.election_channel(e),
                };
                format!("{:?}", io.hand_over(&request).await.expect("hand_over"))
            }
            Step::Proclaim(e, c, tok, value) => {
                let set = io
                    .proclaim(
                        &self.election(e),
                        &self.candidate(c),
                        self.token(e, *tok),
                        value.as_bytes(),
                        &self.election_channel(e),
                    )
                    .await
                    .expect("proclaim");
                format!("proclaimed {set}")
            }
            Step::Candidates(e) => {
                let list: Vec<String> = io
                    .candidates(&self.election(e))
                    .await
                    .expect("candidates")
                    .into_iter()
                    .map(|c| format!("{} {} {}", c.id, c.value_lossy(), c.is_leader))
                    .collect();
                format!("candidates {list:?}")
            }
            Step::Leader(e) => match io.leader(&self.election(e)).await.expect("leader") {
                Some(h) => {
                    let t = self.seen(&self.election(e), h.info.fencing_token);
                    format!(
                        "leader {} {} {t} remaining {}",
                        h.info.id,
                        h.info.value_lossy(),
                        sign(Some(h.remaining_ms))
                    )
                }
                None => "no leader".to_owned(),
            },
            Step::Unlisten(e) => {
                let channel = self.election_channel(e);
                self.listen
                    .client
                    .unlisten(&channel)
                    .await
                    .expect("UNLISTEN");
                "unlistened".to_owned()
            }
            Step::Ping => {
                self.listen.client.ping().await.expect("ping");
                "pong".to_owned()
            }
            Step::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                "slept".to_owned()
            }
        };
        let heard = self.heard().await;
        self.plain(&format!("{answer} | heard {heard:?}"))
    }
}

fn sign(ms: Option<f64>) -> &'static str {
    match ms {
        None => "none",
        Some(ms) if ms == f64::INFINITY => "+inf",
        Some(ms) if ms == f64::NEG_INFINITY => "-inf",
        Some(ms) if ms > 0.0 => "positive",
        Some(_) => "non-positive",
    }
}

/// Runs `script` on both sides, step by step (the model's step just after the server's,
/// so that waits line up), and compares each normalised transcript line.
async fn compare(name: &str, script: Vec<Step>) {
    let server = leader_testkit::postgres().await;
    let driver = PostgresDriver::connect_url(&server.url())
        .await
        .expect("connect");
    let run = format!("{name}{}", std::process::id());
    let mut real = Side::new(Arc::clone(driver.io()), &run).await;
    let model = sim::Server::new(leader_testkit::sim::Net::quiet());
    let mut modelled = Side::new(
        Arc::new(sim::SimIo::new(model, leader_testkit::sim::ClientId(0))),
        &run,
    )
    .await;
    for (i, step) in script.iter().enumerate() {
        let theirs = real.step(step).await;
        let ours = modelled.step(step).await;
        if std::env::var_os("DIFF_TRACE").is_some() {
            eprintln!("{name} {i}: {step:?} => {theirs}");
        }
        assert_eq!(
            ours, theirs,
            "{name}: step {i} ({step:?}): the model answered differently from PostgreSQL"
        );
    }
}

use Step::*;
use Tok::{Bogus, K};

const LONG: u64 = TTL_MS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_renewals_and_resignations_match_postgres() {
    compare(
        "line",
        vec![
            Acquire("x", "a", LONG),
            Acquire("x", "b", LONG),
            Acquire("x", "c", LONG),
            Acquire("x", "b", LONG),
            Keep(vec![("x", "b"), ("x", "c"), ("x", "d")]),
            Candidates("x"),
            Leader("x"),
            Proclaim("x", "a", K(0), "new"),
            Proclaim("x", "a", Bogus, "stale"),
            Proclaim("x", "b", K(0), "not-b"),
            Leader("x"),
            Renew(vec![("x", "a", K(0)), ("x", "b", K(0)), ("x", "c", Bogus)]),
            Resign("x", "a", Some(Bogus)),
            Resign("x", "a", Some(K(0))),
            Leader("x"),
            Candidates("x"),
            Acquire("x", "c", LONG),
            Acquire("x", "b", LONG),
            Renew(vec![("x", "a", K(0)), ("x", "b", K(1))]),
            Resign("x", "c", None),
            Candidates("x"),
            Resign("x", "b", Some(K(1))),
            Resign("x", "b", None),
            Candidates("x"),
            Leader("x"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handovers_and_nominations_match_postgres() {
    compare(
        "handover",
        vec![
            Acquire("y", "a", LONG),
            Acquire("y", "b", LONG),
            Acquire("y", "c", LONG),
            HandOver("y", "a", K(0), "d"),
            HandOver("y", "a", Bogus, "c"),
            HandOver("y", "a", K(0), "a"),
            HandOver("y", "a", K(0), "c"),
            Leader("y"),
            Candidates("y"),
            Keep(vec![("y", "b"), ("y", "c")]),
            Acquire("y", "b", LONG),
            Acquire("y", "c", LONG),
            Candidates("y"),
            HandOver("y", "c", K(1), "b"),
            Acquire("y", "a", LONG),
            Resign("y", "b", None),
            Candidates("y"),
            Keep(vec![("y", "a")]),
            Acquire("y", "a", LONG),
            Resign("y", "a", Some(K(3))),
            Resign("y", "a", Some(K(2))),
            Leader("y"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sweeps_and_the_trigger_match_postgres() {
    compare(
        "expiry",
        vec![
            Acquire("z", "a", 300),
            Acquire("z", "c", 300),
            Sleep(450),
            Leader("z"),
            Candidates("z"),
            Renew(vec![("z", "a", K(0))]),
            Acquire("z", "b", LONG),
            Acquire("z", "c", 300),
            Sleep(1400),
            Acquire("z", "d", LONG),
            Keep(vec![("z", "c"), ("z", "d")]),
            Candidates("z"),
            Renew(vec![("z", "b", K(1))]),
            Unlisten("z"),
            Resign("z", "b", Some(K(1))),
            Ping,
            Acquire("z", "d", LONG),
            Resign("z", "d", None),
            Leader("z"),
        ],
    )
    .await;
}
