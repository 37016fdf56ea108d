//! The etcd harness shared by this crate's tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use leader_core::Driver;
use leader_core::testing::{Fault, Harness};
use leader_etcd::EtcdDriver;
use leader_testkit::EtcdServer;
use leader_testkit::FaultProxy;

/// Election TTL for tests: etcd's lease unit is a second.
pub const TTL: Duration = Duration::from_secs(1);

pub struct EtcdHarness {
    pub server: EtcdServer,
}

pub async fn harness() -> EtcdHarness {
    let server = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("start task")
        .expect("etcd starts (install it with: sudo apt-get install -y etcd-server)");
    EtcdHarness { server }
}

impl EtcdHarness {
    pub async fn driver_at(&self, endpoint: String) -> EtcdDriver {
        EtcdDriver::connect([endpoint])
            .await
            .expect("connect to etcd")
    }
}

#[async_trait::async_trait]
impl Harness for EtcdHarness {
    async fn driver(&self) -> Arc<dyn Driver> {
        Arc::new(self.driver_at(self.server.endpoints()[0].clone()).await)
    }

    async fn faulty_driver(&self) -> (Arc<dyn Driver>, Box<dyn Fault>) {
        let proxy = FaultProxy::start(self.server.client_addr(0))
            .await
            .expect("proxy starts");
        let driver = self.driver_at(proxy.addr().to_string()).await;
        (Arc::new(driver), Box::new(proxy))
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}
