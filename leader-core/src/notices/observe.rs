//! The `Driver::observe` loop of a store that pushes notices.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use super::Notices;
use crate::{LeaderInfo, Result};

/// One look at an election: what [`observe`] yields, and how long it then waits for a
/// notice before looking again.
pub type Look = (Result<Option<LeaderInfo>>, Duration);

/// An election as a driver observes it.
#[async_trait::async_trait]
pub trait Observed: Send + Sync + 'static {
    /// The watcher of the election's channel (subscribed once, when the stream is first
    /// polled).
    async fn notices(&self) -> Notices;
    /// Looks at the election once: its leader (or an error), and how long to wait for a
    /// notice before looking again (until the leader's lease ends, say).
    async fn look(&self) -> Look;
}

/// The stream of [`Driver::observe`](crate::Driver::observe) for a store that pushes
/// notices: subscribes, then looks at the election, yields what it saw, and waits for a
/// notice (a message on the channel or a reconnection) or for the time the look said,
/// whichever comes first, before looking again. Notices that come during a look are not
/// lost: the next wait ends at once.
pub fn observe<O: Observed>(observed: O) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
    futures::stream::unfold(
        (observed, None::<Notices>, None::<Duration>),
        |(observed, notices, next_check)| async move {
            let mut notices = match notices {
                Some(notices) => notices,
                None => observed.notices().await,
            };
            if let Some(wait) = next_check {
                tokio::select! {
                    () = notices.changed() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
            notices.mark_seen();
            let (item, next) = observed.look().await;
            Some((item, (observed, Some(notices), Some(next))))
        },
    )
    .boxed()
}
