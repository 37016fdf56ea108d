//! [`EtcdIo`] on the modelled etcd: every request through [`Net::call`], every watch
//! message through the stream's delivery, which ends the stream when its client is cut off.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use leader_core::{Error, Result};
use leader_etcd::io::{
    EtcdIo, LeaseGrant, LeaseNotFound, LeaseTtl, Range, RangeResult, Txn, TxnResult, WatchCommand,
    WatchMessage, WatchRequest, WatchStream,
};
use leader_testkit::sim::{ClientId, Net};
use tokio::sync::mpsc;
use tokio::time::sleep;

use super::store::{Refusal, Store};

/// Runs `f` on the store, then tells the checker of the terms it handed.
pub fn apply<T>(store: &Mutex<Store>, net: &Net, f: impl FnOnce(&mut Store) -> T) -> T {
    let (out, grants) = {
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut store);
        (out, std::mem::take(&mut store.grants))
    };
    for (id, election, token) in grants {
        net.granted(&id, &election, token);
    }
    out
}

fn refused(refusal: Refusal) -> Error {
    match refusal {
        Refusal::LeaseNotFound => Error::store(LeaseNotFound),
        Refusal::Compacted => Error::store(std::io::Error::other(
            "etcdserver: mvcc: required revision has been compacted",
        )),
        Refusal::FutureRevision => Error::store(std::io::Error::other(
            "etcdserver: mvcc: required revision is a future revision",
        )),
        Refusal::DuplicateKey => Error::store(std::io::Error::other(
            "etcdserver: duplicate key given in txn request",
        )),
        Refusal::TooManyOps => Error::store(std::io::Error::other(
            "etcdserver: too many operations in txn request",
        )),
    }
}

/// One simulated process's connection to the modelled etcd.
pub struct SimIo {
    pub net: Net,
    pub client: ClientId,
    pub store: Arc<Mutex<Store>>,
    pub limit: Duration,
}

impl SimIo {
    async fn call<T: Send + std::fmt::Debug + 'static>(
        &self,
        label: String,
        effect: impl FnOnce(&mut Store, &Net) -> T + Send + 'static,
    ) -> Result<T> {
        let store = Arc::clone(&self.store);
        let net = self.net.clone();
        self.net
            .call(self.client, self.limit, label, move || {
                apply(&store, &net, |s| effect(s, &net))
            })
            .await
            .map_err(|fault| fault.into_error())
    }

    /// [`call`](Self::call) for a request that needs etcd's raft (or a linearizable
    /// read): one that reaches a deposed leader fails.
    async fn call_leader<T: Send + std::fmt::Debug + 'static>(
        &self,
        label: String,
        effect: impl FnOnce(&mut Store, &Net) -> T + Send + 'static,
    ) -> Result<T> {
        let client = self.client.0;
        self.call(label, move |s, net| {
            if on_deposed(s, net, client) {
                net.trace(|| format!("c{client}: the deposed etcd leader cannot serve it"));
                return Err(Error::store(std::io::Error::other(
                    "etcdserver: request timed out",
                )));
            }
            Ok(effect(s, net))
        })
        .await?
    }
}

/// Whether `client`'s request now reaches a deposed etcd leader it is connected to (a
/// quarter of the clients that make a request within its time, drawn at the first).
fn on_deposed(s: &mut Store, net: &Net, client: usize) -> bool {
    let now = net.store_now();
    s.on_deposed(client, now, || {
        net.draw(|rng| rand::Rng::random_bool(rng, 0.25))
    })
}

#[async_trait]
impl EtcdIo for SimIo {
    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant> {
        self.call_leader(format!("lease grant {ttl}s"), move |s, net| {
            s.grant(ttl, net.store_now())
        })
        .await
    }

    async fn lease_revoke(&self, id: i64) -> Result<bool> {
        self.call_leader(format!("lease revoke {id:x}"), move |s, _| s.revoke(id))
            .await
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        let client = self.client.0;
        self.call(format!("keep-alive {id:x}"), move |s, net| {
            if on_deposed(s, net, client) {
                net.model_event();
                return s.keep_alive_deposed(id, net.store_now());
            }
            s.keep_alive(id, net.store_now())
        })
        .await
    }

    async fn lease_time_to_live(&self, id: i64) -> Result<LeaseTtl> {
        let client = self.client.0;
        self.call(format!("time-to-live {id:x}"), move |s, net| {
            let now = net.store_now();
            if on_deposed(s, net, client) {
                net.model_event();
                return s.time_to_live_deposed(id, now);
            }
            let deposed = s.may_reach_deposed(client, now)
                && net.draw(|rng| rand::Rng::random_bool(rng, 0.5));
            if deposed {
                net.model_event();
                net.trace(|| format!("c{client}: the deposed etcd leader's lessor answers"));
            }
            s.time_to_live_of(client, id, now, deposed)
        })
        .await
    }

    async fn raft_term(&self, _key: &[u8]) -> Result<u64> {
        self.call_leader("raft term".to_owned(), move |s, _| s.raft_term)
            .await
    }

    async fn range(&self, range: Range) -> Result<(RangeResult, i64)> {
        let label = format!("range {:?}", String::from_utf8_lossy(&range.key));
        self.call_leader(label, move |s, _| s.range(&range).map(|r| (r, s.revision)))
            .await?
            .map_err(refused)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let label = format!("txn {}", describe(&txn));
        self.call_leader(label, move |s, _| s.txn(&txn))
            .await?
            .map_err(refused)
    }

    async fn watch(&self, first: WatchRequest) -> Result<WatchStream> {
        let client = self.client;
        let label = format!("watch {:?}", String::from_utf8_lossy(&first.key));
        let store = Arc::clone(&self.store);
        self.call_leader(label, move |s, net| {
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let (deliver, messages) = mpsc::unbounded_channel();
            let (out, raw) = mpsc::unbounded_channel();
            let id = s.open_stream(client.0, out);
            s.add_watch(id, first);
            // Before the answer leaves: a cut from now on ends the stream.
            let link = net.link(client);
            tokio::spawn(serve(
                net.clone(),
                client,
                store,
                id,
                link,
                raw,
                commands_rx,
                deliver,
            ));
            WatchStream { commands, messages }
        })
        .await
    }

    async fn client_txn(
        &self,
        _key: &str,
        _create_revision: i64,
        _ops: Vec<leader_etcd::etcd_client::TxnOp>,
    ) -> Result<Option<leader_etcd::etcd_client::TxnResponse>> {
        Err(Error::Unsupported {
            operation: "etcd-client transactions on the modelled etcd",
        })
    }
}

/// A short description of a transaction, for the trace.
fn describe(txn: &Txn) -> String {
    let keys: Vec<String> = txn
        .compare
        .iter()
        .map(|c| String::from_utf8_lossy(&c.key).replace('\0', "\\0"))
        .collect();
    format!(
        "if {keys:?}: {} ops, else {}",
        txn.success.len(),
        txn.failure.len()
    )
}

/// Serves one watch stream: the client's commands land after a push delay, in order; the
/// store's messages reach the client after one, in order; the stream ends when the client
/// is cut off (its link drops), when a message finds it unreachable, or when either end
/// is dropped.
#[allow(clippy::too_many_arguments)]
async fn serve(
    net: Net,
    client: ClientId,
    store: Arc<Mutex<Store>>,
    id: u64,
    mut link: tokio::sync::watch::Receiver<u64>,
    mut raw: mpsc::UnboundedReceiver<WatchMessage>,
    mut commands: mpsc::UnboundedReceiver<WatchCommand>,
    deliver: mpsc::UnboundedSender<Result<WatchMessage>>,
) {
    loop {
        tokio::select! {
            biased;
            _ = link.changed() => break,
            () = deliver.closed() => break,
            command = commands.recv() => {
                let Some(command) = command else { break };
                let Some(delay) = net.push_delay(client) else { break };
                sleep(delay).await;
                if !net.reachable(client) {
                    break;
                }
                apply(&store, &net, |s| match command {
                    WatchCommand::Watch(request) => s.add_watch(id, request),
                    WatchCommand::Cancel(watch) => s.cancel_watch(id, watch),
                });
            }
            message = raw.recv() => {
                let Some(message) = message else { break };
                let Some(delay) = net.push_delay(client) else { break };
                sleep(delay).await;
                if !net.reachable(client) || deliver.send(Ok(message)).is_err() {
                    break;
                }
            }
        }
    }
    apply(&store, &net, |s| s.streams.remove(&id));
}
