//! Who leads an election, as a stream (see `Inner::leader_of`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use leader_core::{LeaderInfo, Result};
use tokio::sync::mpsc;
use tokio::time::sleep;

use crate::Inner;
use crate::error::unexpected;
use crate::io::WatchRequest;

/// Pause after an error of the observe stream before it looks again.
const OBSERVE_RETRY: Duration = Duration::from_millis(500);

/// A stream of the leader of the election whose keys start with `prefix`, fed by a task
/// that ends when the stream is dropped.
pub(crate) fn observe(
    inner: Arc<Inner>,
    prefix: String,
) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move {
        tokio::select! {
            // Biased: a fixed order keeps the simulation deterministic.
            biased;
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
            // The election's keys (`<election>/…`) and its nomination and marker
            // (`<election>\0…`), on the driver's shared watch stream.
            let election = prefix.strip_suffix('/').unwrap_or(prefix);
            let from = revision + 1;
            let mut watch = inner.watches.subscribe(
                &inner.io,
                inner.request_timeout,
                vec![
                    WatchRequest::prefix(0, prefix, from),
                    WatchRequest::prefix(0, format!("{election}\0"), from),
                ],
            );
            loop {
                let Some(message) = watch.message().await? else {
                    return Err(unexpected("etcd closed the watch stream"));
                };
                if message.canceled {
                    return Err(unexpected(format!(
                        "etcd cancelled the watch: {}",
                        message.cancel_reason
                    )));
                }
                if message.events.is_empty() {
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
