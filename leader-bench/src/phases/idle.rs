//! Idle cost: store requests per second of one leader, of a follower added to it, and of
//! one process holding 1,000 elections (TTL 3 s). The stores are measured at once: each
//! counts only its own requests.

use std::time::Duration;

use leader_core::Election;
use tokio::time::sleep;

use super::many::hold_elections;
use super::{Bench, cells, shown};
use crate::results::{Goal, Results};
use crate::stores::{Stores, redis_monitored};
use crate::{BoxResult, Sizes};
use leader_chaos::StoreKind;

const TTL: Duration = Duration::from_secs(3);

/// What one store cost, in requests per second.
struct Idle {
    leader: f64,
    follower: f64,
    thousand: f64,
    /// Of the 1,000 elections, those still led at the end of the count (a driver that
    /// cannot keep up loses terms, and its requests per second then look small).
    still_leading: usize,
}

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    let measured = futures::future::try_join_all(StoreKind::ALL.map(|store| async move {
        idle(&bench.stores, &bench.sizes, store, bench.tag)
            .await
            .map_err(|err| format!("{}: {err}", store.name()))
    }))
    .await?;
    for (store, idle) in StoreKind::ALL.into_iter().zip(measured) {
        let name = store.name();
        results.figure(
            &format!("{name}.requests_per_second.leader"),
            idle.leader,
            "requests/s",
            Goal::None,
            "one leader, TTL 3s",
        );
        results.figure(
            &format!("{name}.requests_per_second.follower"),
            idle.follower,
            "requests/s",
            Goal::None,
            "one follower added to the leader, TTL 3s",
        );
        results.figure(
            &format!("{name}.requests_per_second.1000_elections"),
            idle.thousand,
            "requests/s",
            Goal::AtMost(5.0),
            "1,000 elections held by one process on one driver, TTL 3s",
        );
        results.figure(
            &format!("{name}.still_leading.1000_elections"),
            idle.still_leading as f64,
            "elections",
            Goal::None,
            "of the 1,000 elections, those still led after their requests were counted",
        );
    }
    for (label, key) in [
        ("idle: one leader, requests/s", "leader"),
        (
            "idle: one follower (added to the leader), requests/s",
            "follower",
        ),
    ] {
        let row = cells(|s| shown(results, &format!("{}.requests_per_second.{key}", s.name())));
        results.row(label, row);
    }
    let row = cells(|s| {
        format!(
            "{} ({} still led)",
            shown(
                results,
                &format!("{}.requests_per_second.1000_elections", s.name())
            ),
            results
                .get(&format!("{}.still_leading.1000_elections", s.name()))
                .unwrap_or(f64::NAN)
        )
    });
    results.row(
        "idle: one process, 1,000 elections on one driver, requests/s (elections still led at the end)",
        row,
    );
    results.note(
        "Requests per second: etcd, gRPC messages received (`/metrics`); Redis, commands \
         sent by clients (MONITOR; the commands inside scripts are counted in the store work \
         per handoff); PostgreSQL, statements (`pg_stat_statements`, utility statements \
         included).",
    );
    Ok(())
}

async fn idle(stores: &Stores, sizes: &Sizes, store: StoreKind, tag: u32) -> BoxResult<Idle> {
    let name = format!("idle-{}-{tag}", store.name());
    let leader = Election::builder(stores.driver(store).await?, name.clone())
        .ttl(TTL)
        .build()?;
    leader.campaign().await?;
    sleep(Duration::from_secs(1)).await;
    let alone = rate(stores, store, sizes.idle_window).await?;
    let follower = Election::builder(stores.driver(store).await?, name)
        .ttl(TTL)
        .build()?;
    let waiting = tokio::spawn({
        let follower = follower.clone();
        async move { follower.campaign().await }
    });
    sleep(Duration::from_secs(1)).await;
    let both = rate(stores, store, sizes.idle_window).await?;
    waiting.abort();
    let _ = leader.resign().await;
    drop((leader, follower));
    let driver = stores.driver(store).await?;
    let many = hold_elections(
        &driver,
        &format!("idle-many-{}-{tag}", store.name()),
        1000,
        TTL,
    )
    .await?;
    sleep(Duration::from_secs(1)).await;
    let thousand = rate(stores, store, sizes.idle_window).await?;
    let still_leading = many.iter().filter(|e| e.status().is_leader()).count();
    for e in &many {
        let _ = e.resign().await;
    }
    Ok(Idle {
        leader: alone,
        follower: (both - alone).max(0.0),
        thousand,
        still_leading,
    })
}

/// Store requests per second over `window` (Redis: client commands counted by MONITOR,
/// not the commands inside scripts).
pub(crate) async fn rate(stores: &Stores, store: StoreKind, window: Duration) -> BoxResult<f64> {
    let requests = match store {
        StoreKind::Etcd | StoreKind::Postgres => {
            let before = stores.requests(store).await?;
            sleep(window).await;
            stores.requests(store).await?.saturating_sub(before)
        }
        StoreKind::Redis => {
            let waited = async {
                sleep(window).await;
                Ok(())
            };
            redis_monitored(&stores.redis, waited).await?.1.requests
        }
    };
    Ok(requests as f64 / window.as_secs_f64())
}
