//! Where held terms rest: the holder of every term on one driver (see `hold.rs`) runs in
//! one task, not in a task of its own.
//!
//! A process may hold thousands of elections on one driver, and each term's holder rests
//! nearly all its life. As a Tokio task each cost a cell aligned to 128 bytes (384 bytes
//! for the holder), and the aligned allocations left gaps besides: 10,000 held terms took
//! about 4.5 MiB of resident memory more than the same holders boxed (measured with
//! `leader-bench hold` on etcd). Here they are boxed and polled by one task per driver, as
//! a `FuturesUnordered`, which polls only the holders that were woken.
//!
//! What does not change: each holder is the same future, and it runs until its term ends;
//! a holder that panics ends alone (caught and logged, as Tokio would have kept the panic
//! of a task to itself). The task of a driver ends when it holds nothing; the next term
//! starts another one, on the runtime it is elected on. A driver used from several runtimes
//! has its holders run on the runtime of the first term still held (its requests are tied
//! to the runtime that made its connections anyway).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tracing::error;

use super::lock;
use crate::driver::Driver;

/// The running tasks, by the address of their driver: the generation of each (so that an
/// ending task removes itself, not a successor) and where to send it holders.
type Tasks = HashMap<usize, (u64, mpsc::UnboundedSender<BoxFuture<'static, ()>>)>;

struct Registry {
    tasks: Mutex<Tasks>,
    next_generation: std::sync::atomic::AtomicU64,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        tasks: Mutex::new(HashMap::new()),
        next_generation: std::sync::atomic::AtomicU64::new(0),
    })
}

/// The key of `driver`: its [`Driver::identity`], the address of its state, which lives as
/// long as any of its holders (each keeps its core, and so the driver).
fn key_of(driver: &Arc<dyn Driver>) -> usize {
    driver.identity()
}

/// Runs `holder` in the task of `driver`'s holders, starting that task (on the current
/// runtime) if none runs.
pub(super) fn hold(driver: &Arc<dyn Driver>, holder: impl Future<Output = ()> + Send + 'static) {
    let key = key_of(driver);
    let registry = registry();
    let mut tasks = lock(&registry.tasks);
    let mut holder: BoxFuture<'static, ()> = Box::pin(holder);
    if let Some((_, sender)) = tasks.get(&key) {
        match sender.send(holder) {
            Ok(()) => return,
            // The task is gone with its runtime: start another.
            Err(mpsc::error::SendError(back)) => holder = back,
        }
    }
    let (sender, receiver) = mpsc::unbounded_channel();
    // Cannot fail: the receiver is here.
    let _ = sender.send(holder);
    let generation = registry
        .next_generation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tasks.insert(key, (generation, sender));
    drop(tasks);
    tokio::spawn(run(key, generation, receiver));
}

/// The task of one driver's holders: takes new ones, polls the woken ones, and ends once
/// none is left and none is on its way.
async fn run(
    key: usize,
    generation: u64,
    mut arriving: mpsc::UnboundedReceiver<BoxFuture<'static, ()>>,
) {
    let mut holders = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Biased: a fixed order keeps the simulation deterministic.
            biased;
            arrived = arriving.recv() => match arrived {
                Some(holder) => holders.push(caught(holder)),
                // Only the registry sends, and it keeps the sender while this task is
                // listed: not reached.
                None => return,
            },
            Some(()) = holders.next(), if !holders.is_empty() => {}
        }
        if holders.is_empty() {
            // Leave the registry, unless a holder was sent meanwhile (sends happen under
            // the registry's lock, so none can come after this look).
            let mut tasks = lock(&registry().tasks);
            match arriving.try_recv() {
                Ok(holder) => holders.push(caught(holder)),
                Err(_) => {
                    if tasks.get(&key).is_some_and(|(g, _)| *g == generation) {
                        tasks.remove(&key);
                    }
                    return;
                }
            }
        }
    }
}

/// `holder`, its panic caught and logged: it ends that holder only.
async fn caught(holder: BoxFuture<'static, ()>) {
    if AssertUnwindSafe(holder).catch_unwind().await.is_err() {
        error!("the holder of a term panicked; that term is no longer renewed");
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::testing::MemoryDriver;

    #[tokio::test(start_paused = true)]
    async fn holders_of_one_driver_share_a_task_that_ends_with_the_last_and_a_panic_ends_one() {
        let driver: Arc<dyn Driver> = Arc::new(MemoryDriver::new());
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..3u64 {
            let done = Arc::clone(&done);
            hold(&driver, async move {
                tokio::time::sleep(Duration::from_secs(i + 1)).await;
                assert!(i != 1, "the second holder panics");
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert!(lock(&registry().tasks).contains_key(&key_of(&driver)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            2,
            "the others ran to their end"
        );
        // The task left the registry with its last holder; the next one starts another.
        assert!(!lock(&registry().tasks).contains_key(&key_of(&driver)));
        let again = Arc::clone(&done);
        hold(&driver, async move {
            again.fetch_add(1, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }
}
