//! The Redis harness shared by this crate's tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use leader_core::Driver;
use leader_core::testing::{Fault, Harness};
use leader_redis::RedisDriver;
use leader_testkit::FaultProxy;
use leader_testkit::RedisServer;

pub const TTL: Duration = Duration::from_secs(1);

pub struct RedisHarness {
    pub server: RedisServer,
}

pub async fn harness() -> RedisHarness {
    start(RedisServer::start).await
}

pub async fn start(how: fn() -> std::io::Result<RedisServer>) -> RedisHarness {
    let server = tokio::task::spawn_blocking(how)
        .await
        .expect("start task")
        .expect("redis-server starts (install it with: sudo apt-get install -y redis-server)");
    RedisHarness { server }
}

impl RedisHarness {
    pub async fn driver_at(&self, url: &str) -> RedisDriver {
        RedisDriver::connect(url).await.expect("connect to redis")
    }

    /// Kills redis-server and starts it again on the same port and directory. Needs a
    /// multi-threaded runtime (the restart blocks until the server listens).
    pub fn restart(&mut self) {
        tokio::task::block_in_place(|| {
            self.server.kill();
            self.server.restart().expect("redis restarts");
        });
    }

    /// A plain connection for poking at the keys.
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.server.url())
            .expect("url")
            // A long response timeout: the tests' own queries must not fail on a busy
            // machine while the server serves a thousand candidates.
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(std::time::Duration::from_secs(20))),
            )
            .await
            .expect("admin connection")
    }
}

#[async_trait::async_trait]
impl Harness for RedisHarness {
    async fn driver(&self) -> Arc<dyn Driver> {
        Arc::new(self.driver_at(&self.server.url()).await)
    }

    async fn faulty_driver(&self) -> (Arc<dyn Driver>, Box<dyn Fault>) {
        let proxy = FaultProxy::start(self.server.addr())
            .await
            .expect("proxy starts");
        let driver = self.driver_at(&format!("redis://{}", proxy.addr())).await;
        (Arc::new(driver), Box::new(proxy))
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}
