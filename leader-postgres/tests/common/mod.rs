//! The PostgreSQL harness shared by this crate's tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use leader_core::Driver;
use leader_core::testing::{Fault, Harness};
use leader_postgres::PostgresDriver;
use leader_postgres::tokio_postgres::{self, NoTls};
use leader_testkit::FaultProxy;
use leader_testkit::PostgresServer;

pub const TTL: Duration = Duration::from_secs(1);

pub struct PostgresHarness {
    pub server: PostgresServer,
}

pub async fn harness() -> PostgresHarness {
    PostgresHarness {
        server: leader_testkit::postgres().await,
    }
}

impl PostgresHarness {
    pub async fn driver_at(&self, url: &str) -> PostgresDriver {
        PostgresDriver::connect(url)
            .await
            .expect("connect to postgres")
    }

    /// Kills postgres and starts it again on the same port and data directory. Needs a
    /// multi-threaded runtime (the restart blocks until the server is ready).
    pub fn restart(&mut self) {
        tokio::task::block_in_place(|| {
            self.server.restart().expect("postgres restarts");
        });
    }

    /// A superuser connection for poking at the table.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.server.url(), NoTls)
            .await
            .expect("admin connection");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

#[async_trait::async_trait]
impl Harness for PostgresHarness {
    async fn driver(&self) -> Arc<dyn Driver> {
        Arc::new(self.driver_at(&self.server.url()).await)
    }

    async fn faulty_driver(&self) -> (Arc<dyn Driver>, Box<dyn Fault>) {
        let proxy = FaultProxy::start(self.server.addr())
            .await
            .expect("proxy starts");
        let driver = self
            .driver_at(&format!("postgres://postgres@{}/postgres", proxy.addr()))
            .await;
        (Arc::new(driver), Box::new(proxy))
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}
