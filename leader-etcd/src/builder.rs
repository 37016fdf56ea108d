//! The driver's options: [`Settings`], and [`EtcdDriverBuilder`] that sets them on a
//! client.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;

use crate::{ClientIo, DEFAULT_REQUEST_TIMEOUT, EtcdDriver};

/// The driver's own options, as [`EtcdDriverBuilder`] sets them; what
/// [`EtcdDriver::with_io`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// See [`EtcdDriverBuilder::prefix`].
    pub prefix: String,
    /// See [`EtcdDriverBuilder::lease_ttl`].
    pub lease_ttl: Option<Duration>,
    /// See [`EtcdDriverBuilder::request_timeout`].
    pub request_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            prefix: String::new(),
            lease_ttl: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Builds an [`EtcdDriver`] with options.
#[derive(Clone)]
#[must_use = "an EtcdDriverBuilder does nothing until build() is called"]
pub struct EtcdDriverBuilder {
    pub(crate) client: Client,
    pub(crate) settings: Settings,
}

impl EtcdDriverBuilder {
    /// A prefix put before every election key (`svc/` makes election `jobs` use keys under
    /// `svc/jobs/`). Defaults to none, which uses exactly the keys of `etcdctl elect jobs`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// One TTL for all of the driver's elections: a single lease of this TTL, rounded up to
    /// whole seconds (etcd's unit). By default each election campaigns on a lease of its
    /// own TTL rounded up the same way, plus one second (so that the next in line can end
    /// a crashed leader's term at its deadline rather than at the lease's expiry: see the
    /// README), one lease per distinct TTL. Terms of elections with a shorter TTL than the
    /// lease's still step down by their own deadline, but after a crash the store keeps
    /// their key until the lease expires, unless the next in line ends it (it can once the
    /// lease has less time left than its TTL less the term's, in whole seconds: with a
    /// fixed lease TTL of one second more than the elections' TTL, as by default).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lease_ttl = Some(ttl);
        self
    }

    /// The longest wait for one etcd request (not for a campaign, which waits as long as it
    /// takes). Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// The driver. Nothing is sent to etcd until a candidate campaigns.
    pub fn build(self) -> EtcdDriver {
        let io = Arc::new(ClientIo::new(self.client.clone()));
        let mut driver = EtcdDriver::with_io(io, self.settings);
        if let Some(inner) = Arc::get_mut(&mut driver.inner) {
            inner.client = Some(self.client);
        }
        driver
    }
}
