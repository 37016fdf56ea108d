//! Who leads an election: the key with the lowest create revision, once or as a stream.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, SortOrder, SortTarget, WatchOptions};
use futures::StreamExt;
use futures::stream::BoxStream;
use leader_core::{LeaderInfo, Result};
use tokio::sync::mpsc;
use tokio::time::sleep;

use crate::Inner;
use crate::error::{from_etcd, unexpected};

/// Pause after an error of the observe stream before it looks again.
const OBSERVE_RETRY: Duration = Duration::from_millis(500);

impl Inner {
    /// The leader of the election whose keys start with `prefix`, and the revision of the
    /// answer.
    pub(crate) async fn leader_of(&self, prefix: &str) -> Result<(Option<LeaderInfo>, i64)> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let response = self
            .request(self.client.clone().get(prefix, Some(options)))
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let leader = response.kvs().first().map(|kv| {
            LeaderInfo::new(
                String::from_utf8_lossy(&kv.key()[prefix.len().min(kv.key().len())..]),
                kv.value(),
                u64::try_from(kv.create_revision()).unwrap_or(0),
            )
        });
        Ok((leader, revision))
    }
}

/// A stream of the leader of the election whose keys start with `prefix`, fed by a task
/// that ends when the stream is dropped.
pub(crate) fn observe(
    inner: Arc<Inner>,
    prefix: String,
) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move {
        tokio::select! {
            () = observe_loop(&inner, &prefix, &tx) => {}
            () = tx.closed() => {}
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Sends the leader, then again after every change under `prefix`; on errors, sends the
/// error and starts over after a pause.
async fn observe_loop(inner: &Inner, prefix: &str, tx: &mpsc::Sender<Result<Option<LeaderInfo>>>) {
    loop {
        let result: Result<()> = async {
            let (leader, revision) = inner.leader_of(prefix).await?;
            if tx.send(Ok(leader)).await.is_err() {
                return Ok(());
            }
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut watch = inner
                .request(inner.client.clone().watch(prefix, Some(options)))
                .await?;
            loop {
                let Some(message) = watch.message().await.map_err(from_etcd)? else {
                    return Err(unexpected("etcd closed the watch stream"));
                };
                if message.canceled() {
                    return Err(unexpected(format!(
                        "etcd cancelled the watch: {}",
                        message.cancel_reason()
                    )));
                }
                if message.events().is_empty() {
                    continue;
                }
                let (leader, _) = inner.leader_of(prefix).await?;
                if tx.send(Ok(leader)).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(err) => {
                if tx.send(Err(err)).await.is_err() {
                    return;
                }
                sleep(OBSERVE_RETRY).await;
            }
        }
    }
}
