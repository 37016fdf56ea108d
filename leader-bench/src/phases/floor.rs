//! The floor: one durable write to each store, sequential, for context.

use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::{Bench, cells, latency, p50_p99};
use crate::BoxResult;
use crate::results::Results;
use crate::stats::{histogram, record};
use crate::stores::Stores;
use leader_chaos::StoreKind;

const WRITES: usize = 1000;

pub(crate) async fn measure(bench: &Bench, results: &mut Results) -> BoxResult<()> {
    for store in StoreKind::ALL {
        let h = floor(&bench.stores, store, WRITES).await?;
        let what = format!("one write ({WRITES} in sequence)");
        latency(results, &format!("{}.floor", store.name()), &h, &what);
    }
    let row = cells(|store| p50_p99(results, &format!("{}.floor", store.name())));
    results.row(
        "floor: one write (etcd put / redis SET / postgres upsert, fsync on), p50 / p99",
        row,
    );
    Ok(())
}

/// Latencies of `n` sequential writes.
async fn floor(stores: &Stores, store: StoreKind, n: usize) -> BoxResult<Histogram<u64>> {
    let mut h = histogram();
    match store {
        StoreKind::Etcd => {
            let mut client = etcd_client::Client::connect([stores.endpoint(store)], None).await?;
            for i in 0..n {
                let started = Instant::now();
                client.put("bench-floor", i.to_string(), None).await?;
                record(&mut h, started.elapsed());
            }
        }
        StoreKind::Redis => {
            let client = redis::Client::open(stores.endpoint(store))?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            for i in 0..n {
                let started = Instant::now();
                let _: () = redis::cmd("SET")
                    .arg("bench-floor")
                    .arg(i)
                    .query_async(&mut conn)
                    .await?;
                record(&mut h, started.elapsed());
            }
        }
        StoreKind::Postgres => {
            let client = &stores.postgres_admin;
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS bench_floor (id int PRIMARY KEY, v bigint)",
                )
                .await?;
            let upsert = client
                .prepare(
                    "INSERT INTO bench_floor VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET v = excluded.v",
                )
                .await?;
            for i in 0..n {
                let started = Instant::now();
                client.execute(&upsert, &[&i64::try_from(i)?]).await?;
                record(&mut h, started.elapsed());
            }
        }
    }
    Ok(h)
}
