//! Where held terms rest: the holder of every term on one driver (see `hold.rs`) runs in
//! one task, not in a task of its own.
//!
//! A process may hold thousands of elections on one driver, and each term's holder rests
//! nearly all its life. As a Tokio task each cost a cell aligned to 128 bytes (384 bytes
//! for the holder), and the aligned allocations left gaps besides. Here one task per
//! driver and runtime keeps them in a `FuturesUnordered` (one allocation each) and polls
//! only those that were woken (`ci/bench` writes what 10,000 held terms add:
//! `{store}.rss_mib.10000_elections` in `docs/results/bench.json`).
//!
//! What does not change: each holder is the same future, and it runs until its term ends;
//! a holder that panics ends alone (caught and logged, as Tokio would have kept the panic
//! of a task to itself). There is one task per driver and runtime: a term's holder runs on
//! the runtime the term was elected on, as its own task did, so a runtime that stops takes
//! only its own terms' holders with it. The task ends when it holds nothing; the next term
//! starts another one.
//!
//! What does change: the holders of one driver on one runtime take turns on one thread
//! instead of spreading over the runtime's workers. Each turn is short (a look at the
//! clock, a request sent, an answer counted), but a slow `on_deadline` hook, which runs
//! inside a holder when a renewal extends its term, now delays the other terms of that
//! driver too.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tracing::error;

use super::lock;
use crate::driver::Driver;

/// The running tasks, by their driver's [`Driver::instance_id`], runtime and type of
/// holder: the generation of each (so that an ending task removes itself, not a
/// successor) and where to send it holders.
type Tasks = HashMap<Key, (u64, Box<dyn Listed>)>;

/// A driver on a runtime, and the type of its holders (one in practice: `Core::hold`'s).
type Key = (usize, tokio::runtime::Id, TypeId);

/// Where a task takes holders of type `F`: an `UnboundedSender<F>`, its type erased.
trait Listed: Send {
    fn is_closed(&self) -> bool;
    fn as_any(&self) -> &dyn Any;
}

impl<F: Send + 'static> Listed for mpsc::UnboundedSender<F> {
    fn is_closed(&self) -> bool {
        mpsc::UnboundedSender::is_closed(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

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

/// The key of `driver`'s holders of type `F` on the current runtime. Its
/// [`Driver::instance_id`] is the address of its state, which lives as long as any of its
/// holders (each keeps its core, and so the driver).
fn key_of<F: 'static>(driver: &Arc<dyn Driver>) -> Key {
    (
        driver.instance_id(),
        tokio::runtime::Handle::current().id(),
        TypeId::of::<F>(),
    )
}

/// Runs `holder` in the task of `driver`'s holders, starting that task (on the current
/// runtime) if none runs. Not boxed: the task keeps each holder in its
/// `FuturesUnordered`'s node, one allocation per term.
pub(super) fn hold<F>(driver: &Arc<dyn Driver>, mut holder: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let key = key_of::<F>(driver);
    let registry = registry();
    let mut tasks = lock(&registry.tasks);
    if let Some(sender) = tasks
        .get(&key)
        .and_then(|(_, listed)| listed.as_any().downcast_ref::<mpsc::UnboundedSender<F>>())
    {
        match sender.send(holder) {
            Ok(()) => return,
            // The task is gone with its runtime: start another.
            Err(mpsc::error::SendError(back)) => holder = back,
        }
    }
    // Starting a task is rare: forget those whose runtime stopped meanwhile.
    tasks.retain(|_, (_, listed)| !listed.is_closed());
    let (sender, receiver) = mpsc::unbounded_channel();
    // Cannot fail: the receiver is here.
    let _ = sender.send(holder);
    let generation = registry
        .next_generation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tasks.insert(key, (generation, Box::new(sender)));
    drop(tasks);
    tokio::spawn(run(key, generation, receiver));
}

/// The task of one driver's holders: takes new ones, polls the woken ones, and ends once
/// none is left and none is on its way. A holder's panic is caught and logged: it ends
/// that holder only.
async fn run<F>(key: Key, generation: u64, mut arriving: mpsc::UnboundedReceiver<F>)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut holders = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Biased: a fixed order keeps the simulation deterministic.
            biased;
            arrived = arriving.recv() => match arrived {
                Some(holder) => holders.push(AssertUnwindSafe(holder).catch_unwind()),
                // Only the registry sends, and it keeps the sender while this task is
                // listed: not reached.
                None => return,
            },
            Some(ended) = holders.next(), if !holders.is_empty() => {
                if ended.is_err() {
                    error!("the holder of a term panicked; that term is no longer renewed");
                }
            }
        }
        if holders.is_empty() {
            // Leave the registry, unless a holder was sent meanwhile (sends happen under
            // the registry's lock, so none can come after this look).
            let mut tasks = lock(&registry().tasks);
            match arriving.try_recv() {
                Ok(holder) => holders.push(AssertUnwindSafe(holder).catch_unwind()),
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

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::testing::MemoryDriver;

    /// How many tasks of `driver`'s holders are listed (on any runtime).
    fn listed(driver: &Arc<dyn Driver>) -> usize {
        lock(&registry().tasks)
            .keys()
            .filter(|(id, _, _)| *id == driver.instance_id())
            .count()
    }

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
        assert_eq!(listed(&driver), 1, "one task");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            2,
            "the others ran to their end"
        );
        // The task left the registry with its last holder; the next one starts another.
        assert_eq!(listed(&driver), 0);
        let again = Arc::clone(&done);
        hold(&driver, async move {
            again.fetch_add(1, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_driver_used_on_two_runtimes_has_a_task_on_each_and_one_stopping_leaves_the_other() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime")
        };
        let (first, second) = (runtime(), runtime());
        let driver: Arc<dyn Driver> = Arc::new(MemoryDriver::new());
        // One type of holder on both runtimes, as `Core::hold` is: one that never ends,
        // one that counts once.
        let holder = |done: Option<Arc<AtomicUsize>>| async move {
            match done {
                None => std::future::pending().await,
                Some(done) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        first.block_on(async { hold(&driver, holder(None)) });
        let done = Arc::new(AtomicUsize::new(0));
        let keys = second.block_on(async {
            hold(&driver, holder(Some(Arc::clone(&done))));
            listed(&driver)
        });
        assert_eq!(keys, 2, "one task per runtime");
        // The first runtime stops with its task; the second's holder runs on.
        drop(first);
        second.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while done.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
