//! TEMPORARY: the announced API of leader_testkit::sim, until it lands.
#![allow(dead_code, unused_variables)]
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone)]
pub struct Net;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub usize);
#[derive(Debug, Clone)]
pub enum Fault {
    Unreachable,
    Timeout(Duration),
}
impl Fault {
    pub fn into_error(self) -> leader_core::Error {
        leader_core::Error::Timeout(Duration::ZERO)
    }
}
impl Net {
    pub async fn call<T: Send + std::fmt::Debug + 'static>(
        &self,
        client: ClientId,
        limit: Duration,
        label: impl Into<String>,
        effect: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Fault> {
        Ok(effect())
    }
    pub fn reachable(&self, client: ClientId) -> bool {
        true
    }
    pub fn link(&self, client: ClientId) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(0).1
    }
    pub fn push_delay(&self, client: ClientId) -> Option<Duration> {
        None
    }
    pub fn store_now(&self) -> Instant {
        Instant::now()
    }
    pub fn client_at(&self, at: Instant) -> Instant {
        at
    }
    pub fn draw<T>(&self, f: impl FnOnce(&mut rand::rngs::StdRng) -> T) -> T {
        use rand::SeedableRng;
        f(&mut rand::rngs::StdRng::seed_from_u64(0))
    }
    pub fn chaos(&self) -> bool {
        false
    }
    pub fn trace(&self, line: impl FnOnce() -> String) {}
    pub fn granted(&self, id: &str, election: &str, token: u64) {}
}
pub trait Model: Send + Sync + 'static {
    type Driver: leader_core::Driver + Clone + 'static;
    fn name(&self) -> &'static str;
    fn driver(&self, net: &Net, client: ClientId) -> Self::Driver;
    fn tamper(&self, net: &Net) -> Option<String> {
        None
    }
    fn restart(&self, net: &Net, kept: bool) {}
    fn volatile(&self) -> bool {
        false
    }
    fn leftovers(&self, net: &Net) -> Vec<String>;
    fn orphan_bound(&self, ttl: Duration) -> Duration;
}
pub fn run_seeds<M: Model>(
    crate_name: &str,
    make: impl Fn(&Net) -> M + Send + Sync + Copy + 'static,
) {
}
