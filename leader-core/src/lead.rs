//! The leader's work inside [`Election::lead`](crate::Election::lead): one task per term,
//! asked to stop when the term ends or at shutdown, and aborted at the term's deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Error;
use crate::error::ErrorChain;
use crate::machinery::{TermState, Work};
use crate::term::Term;

/// How the holding of one term ended, for the campaign loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// `shutdown` resolved, and the work (if any) has stopped: resign now.
    Shutdown,
    /// The term ended, or the work returned and the term was resigned: campaign again.
    Ended,
}

/// Why the work was asked to stop, or that it did not wait to be asked.
enum Why {
    Shutdown,
    TermEnded,
    Returned(Result<(), JoinError>),
}

/// Holds `term` with `work(term)` running in a task until the term ends, `shutdown`
/// resolves or the work returns; returns once the work's task is gone.
pub(crate) async fn hold<W, Fut>(
    term: &Term,
    work: &mut W,
    shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Held
where
    W: FnMut(Term) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if !term.is_valid() {
        // Ended before the work could start: nothing to start.
        return Held::Ended;
    }
    let election = term.core.candidate.election.as_str();
    let fencing_token = term.fencing_token();
    let stop = term.state.token().child_token();
    let handed = Term {
        state: Arc::clone(&term.state),
        core: Arc::clone(&term.core),
        stop: Some(stop.clone()),
    };
    // `gone` is cancelled when the task is gone, however it ends (its future dropped).
    let gone = CancellationToken::new();
    let running = work(handed);
    let mut task = WorkTask {
        handle: tokio::spawn({
            let gone = gone.clone();
            async move {
                let _gone = gone.drop_guard();
                running.await;
            }
        }),
        stop: stop.clone(),
    };
    // A resign() or hand_over() of this term asks the work to stop through this record and
    // waits until it is gone before the store is asked.
    term.core.shared.set_work(Some(Work {
        term: Arc::clone(&term.state),
        stop,
        gone,
    }));
    let _forget = ForgetWork(term);
    let why = tokio::select! {
        biased;
        () = shutdown => Why::Shutdown,
        () = term.ended() => Why::TermEnded,
        joined = &mut task.handle => Why::Returned(joined),
    };
    let (held, stopped) = match why {
        // Asked to stop by a resign() or hand_over() of this term, which ends it next.
        Why::Returned(joined) if task.stop.is_cancelled() => {
            term.ended().await;
            (Some(Held::Ended), Stopped::Returned(joined))
        }
        Why::Returned(joined) => (None, Stopped::Returned(joined)),
        Why::Shutdown => (Some(Held::Shutdown), task.stop(&term.state).await),
        Why::TermEnded => (Some(Held::Ended), task.stop(&term.state).await),
    };
    match stopped {
        Stopped::Returned(Ok(())) if held.is_none() => {
            info!(%election, fencing_token, "the leader's work returned; resigning");
        }
        Stopped::Returned(Ok(())) => {
            debug!(%election, fencing_token, "the leader's work stopped");
        }
        Stopped::Returned(Err(err)) => log_failure(election, fencing_token, err),
        Stopped::Aborted => warn!(
            %election,
            fencing_token,
            "the leader's work did not stop by the term's deadline; aborted"
        ),
    }
    if let Some(held) = held {
        return held;
    }
    match term.resign().await {
        Ok(()) | Err(Error::NotALeader) => {}
        Err(err) => warn!(
            %election,
            fencing_token,
            error = %ErrorChain(&err),
            "could not resign after the leader's work ended; retrying in the background"
        ),
    }
    Held::Ended
}

fn log_failure(election: &str, fencing_token: u64, err: JoinError) {
    if err.is_panic() {
        let payload = err.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(not a string)");
        error!(%election, fencing_token, panic = message, "the leader's work panicked; its term ends");
    } else {
        warn!(%election, fencing_token, error = %err, "the leader's work was cancelled");
    }
}

/// How a work asked to stop ended.
/// Forgets the work's record when `hold` returns.
struct ForgetWork<'a>(&'a Term);

impl Drop for ForgetWork<'_> {
    fn drop(&mut self) {
        self.0.core.shared.clear_work(&self.0.state);
    }
}

enum Stopped {
    Returned(Result<(), JoinError>),
    Aborted,
}

/// The work's task: asked to stop and aborted if the future holding it is dropped.
struct WorkTask {
    handle: JoinHandle<()>,
    stop: CancellationToken,
}

impl WorkTask {
    /// Cancels the work's token and waits for it to return, until `deadline`; then aborts
    /// it and waits until the task is gone.
    /// Asks the work to stop, and aborts it at the term's deadline as it is now (counting
    /// a suspension of the machine: at once if it has passed).
    async fn stop(&mut self, term: &TermState) -> Stopped {
        self.stop.cancel();
        let deadline = term.deadline();
        tokio::select! {
            biased;
            joined = &mut self.handle => return Stopped::Returned(joined),
            () = term.expired(Some(deadline)) => {}
        }
        self.handle.abort();
        match (&mut self.handle).await {
            // It returned (or panicked) just as it was aborted.
            Ok(()) => Stopped::Returned(Ok(())),
            Err(err) if err.is_panic() => Stopped::Returned(Err(err)),
            Err(_) => Stopped::Aborted,
        }
    }
}

impl Drop for WorkTask {
    fn drop(&mut self) {
        self.stop.cancel();
        self.handle.abort();
    }
}
