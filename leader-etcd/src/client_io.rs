//! [`EtcdIo`] on etcd-client: each method one request, its answer converted. Its only state
//! is per-lease keep-alive streams (etcd's keep-alive is a bidirectional stream), and each
//! watch stream's forwarding task.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp as EtcdCompareOp, DeleteOptions, EventType,
    GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget,
    Txn as EtcdTxn, TxnOp, TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions,
};
use leader_core::Result;
use tokio::sync::mpsc;

use crate::error::{from_etcd, is_lease_not_found, unexpected};
use crate::io::{
    Compare, CompareOp, EtcdIo, Kv, LeaseGrant, LeaseTtl, Op, OpResult, Range, RangeResult, Sort,
    Target, Txn, TxnResult, WatchCommand, WatchEvent, WatchMessage, WatchRequest, WatchStream,
};
use crate::lock;

/// The keep-alive stream of one lease, and whether a keep-alive on it waits for its answer.
#[derive(Default)]
struct Keeper {
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Set while a keep-alive waits for its answer; if still set at the next call, that one
    /// was cancelled and the stream may deliver its stale answer: start a new stream.
    in_flight: bool,
}

/// [`EtcdIo`] on an etcd-client [`Client`]: what [`EtcdDriver::new`](crate::EtcdDriver::new)
/// and the other constructors that take or make a client use.
#[derive(Clone)]
pub struct ClientIo {
    client: Client,
    keepers: Arc<Mutex<BTreeMap<i64, Arc<tokio::sync::Mutex<Keeper>>>>>,
}

impl std::fmt::Debug for ClientIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIo").finish_non_exhaustive()
    }
}

impl ClientIo {
    /// The I/O layer on `client`.
    pub fn new(client: Client) -> Self {
        ClientIo {
            client,
            keepers: Arc::default(),
        }
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn keeper(&self, id: i64) -> Arc<tokio::sync::Mutex<Keeper>> {
        Arc::clone(lock(&self.keepers).entry(id).or_default())
    }

    fn forget_keeper(&self, id: i64) {
        lock(&self.keepers).remove(&id);
    }
}

#[async_trait]
impl EtcdIo for ClientIo {
    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant> {
        let granted = self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(from_etcd)?;
        if !granted.error().is_empty() {
            return Err(unexpected(format!(
                "etcd granted lease {:x} with an error: {}",
                granted.id(),
                granted.error()
            )));
        }
        Ok(LeaseGrant {
            id: granted.id(),
            ttl: granted.ttl(),
        })
    }

    async fn lease_revoke(&self, id: i64) -> Result<bool> {
        self.forget_keeper(id);
        match self.client.clone().lease_revoke(id).await {
            Ok(_) => Ok(true),
            Err(err) if is_lease_not_found(&err) => Ok(false),
            Err(err) => Err(from_etcd(err)),
        }
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        let keeper = self.keeper(id);
        let mut keeper = keeper.lock().await;
        if keeper.in_flight {
            keeper.stream = None;
            keeper.in_flight = false;
        }
        let answer = match keeper.stream.as_mut() {
            None => match self.client.clone().lease_keep_alive(id).await {
                // The first keep-alive is sent and answered inside `lease_keep_alive`;
                // etcd-client fails it with "lease not found" for a lease it does not have.
                Ok(stream) => {
                    keeper.stream = Some(stream);
                    Ok(1)
                }
                Err(err) if is_lease_not_found(&err) => Ok(0),
                Err(err) => Err(from_etcd(err)),
            },
            Some(_) => {
                // Stays set if this future is dropped before the answer: see `Keeper`.
                keeper.in_flight = true;
                let answered = match keeper.stream.as_mut() {
                    Some((sender, stream)) => match sender.keep_alive().await {
                        Ok(()) => stream.message().await,
                        Err(err) => Err(err),
                    },
                    None => Ok(None),
                };
                keeper.in_flight = false;
                match answered {
                    Ok(Some(response)) => Ok(response.ttl().max(0)),
                    Ok(None) => Err(unexpected("etcd closed the keep-alive stream")),
                    Err(err) => Err(from_etcd(err)),
                }
            }
        };
        match answer {
            Ok(ttl) if ttl > 0 => Ok(ttl),
            Ok(_) => {
                keeper.stream = None;
                drop(keeper);
                self.forget_keeper(id);
                Ok(0)
            }
            Err(err) => {
                keeper.stream = None;
                Err(err)
            }
        }
    }

    async fn lease_time_to_live(&self, id: i64) -> Result<LeaseTtl> {
        match self.client.clone().lease_time_to_live(id, None).await {
            Ok(answer) => Ok(LeaseTtl {
                ttl: answer.ttl(),
                granted: if answer.ttl() < 0 {
                    0
                } else {
                    answer.granted_ttl()
                },
                raft_term: answer.header().map_or(0, |h| h.raft_term()),
            }),
            Err(err) if is_lease_not_found(&err) => Ok(LeaseTtl {
                ttl: -1,
                granted: 0,
                raft_term: 0,
            }),
            Err(err) => Err(from_etcd(err)),
        }
    }

    async fn raft_term(&self, key: &[u8]) -> Result<u64> {
        // Count only: linearizable (etcd-client's default), tiny.
        let response = self
            .client
            .clone()
            .get(key.to_vec(), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(from_etcd)?;
        response
            .header()
            .map(|h| h.raft_term())
            .ok_or_else(|| unexpected("etcd answered a read without a header"))
    }

    async fn range(&self, range: Range) -> Result<(RangeResult, i64)> {
        let key = range.key.clone();
        let response = self
            .client
            .kv_client()
            .get(key, Some(get_options(&range)))
            .await
            .map_err(from_etcd)?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((range_result(response), revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let request = EtcdTxn::new()
            .when(txn.compare.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
        // The KV client alone is copied, not the whole client (eight of them): one per
        // request, and renewals of thousands of elections send many.
        let response = self
            .client
            .kv_client()
            .txn(request)
            .await
            .map_err(from_etcd)?;
        Ok(txn_result(&response))
    }

    async fn watch(&self, first: WatchRequest) -> Result<WatchStream> {
        let key = first.key.clone();
        let (mut sender, mut responses) = self
            .client
            .clone()
            .watch(key, Some(watch_options(&first)))
            .await
            .map_err(from_etcd)?
            .split();
        let (commands, mut queued) = mpsc::unbounded_channel::<WatchCommand>();
        let (deliver, messages) = mpsc::unbounded_channel();
        // One task forwards the requests and the responses, so that neither waits on the
        // other; it ends (ending the messages) when the stream fails or every end is gone.
        tokio::spawn(async move {
            let mut commands_open = true;
            loop {
                tokio::select! {
                    // Biased: a fixed order keeps the simulation deterministic.
                    biased;
                    command = queued.recv(), if commands_open => {
                        let sent = match command {
                            Some(WatchCommand::Watch(request)) => {
                                let key = request.key.clone();
                                sender.watch(key, Some(watch_options(&request))).await
                            }
                            Some(WatchCommand::Cancel(id)) => sender.cancel(id).await,
                            None => {
                                commands_open = false;
                                Ok(())
                            }
                        };
                        if let Err(err) = sent {
                            let _ = deliver.send(Err(from_etcd(err)));
                            return;
                        }
                    }
                    response = responses.message() => {
                        let message = match response {
                            Ok(Some(response)) => Ok(watch_message(&response)),
                            Ok(None) => return,
                            Err(err) => Err(from_etcd(err)),
                        };
                        let failed = message.is_err();
                        if deliver.send(message).is_err() || failed {
                            return;
                        }
                    }
                    () = deliver.closed() => return,
                }
            }
        });
        Ok(WatchStream { commands, messages })
    }

    async fn client_txn(
        &self,
        key: &str,
        create_revision: i64,
        ops: Vec<TxnOp>,
    ) -> Result<Option<TxnResponse>> {
        let txn = EtcdTxn::new()
            .when([EtcdCompare::create_revision(
                key,
                EtcdCompareOp::Equal,
                create_revision,
            )])
            .and_then(ops);
        let response = self.client.clone().txn(txn).await.map_err(from_etcd)?;
        Ok(response.succeeded().then_some(response))
    }
}

fn kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

/// As [`kv`], moving the key and value out rather than copying them.
fn owned_kv(kv: etcd_client::KeyValue) -> Kv {
    let (create_revision, mod_revision, version, lease) = (
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let (key, value) = kv.into_key_value();
    Kv {
        key,
        value,
        create_revision,
        mod_revision,
        version,
        lease,
    }
}

fn get_options(range: &Range) -> GetOptions {
    let mut options = GetOptions::new();
    if let Some(end) = &range.end {
        options = options.with_range(end.clone());
    }
    if range.limit > 0 {
        options = options.with_limit(range.limit);
    }
    match range.sort {
        Sort::Key => {}
        Sort::CreateAscend => options = options.with_sort(SortTarget::Create, SortOrder::Ascend),
        Sort::CreateDescend => {
            options = options.with_sort(SortTarget::Create, SortOrder::Descend);
        }
    }
    if range.min_create_revision > 0 {
        options = options.with_min_create_revision(range.min_create_revision);
    }
    if range.max_create_revision > 0 {
        options = options.with_max_create_revision(range.max_create_revision);
    }
    if range.revision > 0 {
        options = options.with_revision(range.revision);
    }
    if range.keys_only {
        options = options.with_keys_only();
    }
    options
}

fn compare(compare: &Compare) -> EtcdCompare {
    let op = match compare.op {
        CompareOp::Equal => EtcdCompareOp::Equal,
        CompareOp::NotEqual => EtcdCompareOp::NotEqual,
        CompareOp::Less => EtcdCompareOp::Less,
        CompareOp::Greater => EtcdCompareOp::Greater,
    };
    let key = compare.key.clone();
    match &compare.target {
        Target::CreateRevision(revision) => EtcdCompare::create_revision(key, op, *revision),
        Target::ModRevision(revision) => EtcdCompare::mod_revision(key, op, *revision),
        Target::Version(version) => EtcdCompare::version(key, op, *version),
        Target::Value(value) => EtcdCompare::value(key, op, value.clone()),
        Target::Lease(lease) => EtcdCompare::lease(key, op, *lease),
    }
}

fn op(op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            TxnOp::put(key.clone(), value.clone(), options)
        }
        Op::Get(range) => TxnOp::get(range.key.clone(), Some(get_options(range))),
        Op::Delete { key, end } => {
            let options = end
                .as_ref()
                .map(|end| DeleteOptions::new().with_range(end.clone()));
            TxnOp::delete(key.clone(), options)
        }
        Op::Reads(ranges) => TxnOp::txn(
            EtcdTxn::new().and_then(
                ranges
                    .iter()
                    .map(|range| TxnOp::get(range.key.clone(), Some(get_options(range))))
                    .collect::<Vec<_>>(),
            ),
        ),
    }
}

fn txn_result(response: &TxnResponse) -> TxnResult {
    TxnResult {
        revision: response.header().map_or(0, |h| h.revision()),
        succeeded: response.succeeded(),
        results: response.op_responses().into_iter().map(op_result).collect(),
    }
}

fn op_result(answer: TxnOpResponse) -> OpResult {
    match answer {
        TxnOpResponse::Put(_) => OpResult::Put,
        TxnOpResponse::Get(get) => OpResult::Get(range_result(get)),
        TxnOpResponse::Delete(deleted) => OpResult::Delete(deleted.deleted()),
        // The protocol nests only reads ([`Op::Reads`]).
        TxnOpResponse::Txn(nested) => OpResult::Reads(
            nested
                .op_responses()
                .into_iter()
                .filter_map(|answer| match answer {
                    TxnOpResponse::Get(get) => Some(range_result(get)),
                    _ => None,
                })
                .collect(),
        ),
    }
}

/// Moves the answer's pairs out: etcd-client's `op_responses` already copied them (renewals'
/// reads of thousands of held keys allocate once less per key).
fn range_result(mut get: etcd_client::GetResponse) -> RangeResult {
    RangeResult {
        more: get.more(),
        kvs: get.take_kvs().into_iter().map(owned_kv).collect(),
    }
}

fn watch_options(request: &WatchRequest) -> WatchOptions {
    let mut options = WatchOptions::new()
        .with_watch_id(request.id)
        .with_start_revision(request.start_revision);
    if let Some(end) = &request.end {
        options = options.with_range(end.clone());
    }
    if request.no_put {
        options = options.with_filters([WatchFilterType::NoPut]);
    }
    options
}

fn watch_message(response: &etcd_client::WatchResponse) -> WatchMessage {
    WatchMessage {
        watch_id: response.watch_id(),
        created: response.created(),
        canceled: response.canceled(),
        compact_revision: response.compact_revision(),
        cancel_reason: response.cancel_reason().to_owned(),
        events: response
            .events()
            .iter()
            .filter_map(|event| {
                Some(WatchEvent {
                    deleted: event.event_type() == EventType::Delete,
                    kv: kv(event.kv()?),
                })
            })
            .collect(),
    }
}
