//! An election's settings, checked once: what the builder fills, `build()` checks, and the
//! term machinery reads (the safety margin, the retry range, the deadline hook).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::Driver;
use crate::{Config, Error, Result};

/// The shortest TTL [`ElectionBuilder::build`](crate::ElectionBuilder::build) accepts.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// The longest TTL [`ElectionBuilder::build`](crate::ElectionBuilder::build) accepts.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest value [`ElectionBuilder::build`](crate::ElectionBuilder::build) accepts, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// The longest election name [`ElectionBuilder::build`](crate::ElectionBuilder::build) accepts, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// An election's settings, kept once: the builder fills them, `build()` checks them, and
/// the election keeps the checked copy. The name and the value are the builder's, then the
/// candidate's (kept once per election).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) on_deadline: Option<DeadlineHook>,
    pub(crate) ttl: Duration,
    pub(crate) safety_margin: Option<Duration>,
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
}

impl From<&Config> for Settings {
    fn from(config: &Config) -> Self {
        // Every field, by name: a field added to `Config` does not compile until it has a
        // place here.
        let Config {
            // The builder's (see `ElectionBuilder::config`).
            name: _,
            value: _,
            ttl,
            safety_margin,
            retry_min,
            retry_max,
        } = config;
        Settings {
            on_deadline: None,
            ttl: *ttl,
            safety_margin: *safety_margin,
            retry_min: *retry_min,
            retry_max: *retry_max,
        }
    }
}

/// The safety margin of a term of `ttl` when none is set
/// ([`ElectionBuilder::safety_margin`](crate::ElectionBuilder::safety_margin)): a fiftieth
/// of the TTL, at least 2 ms. A holder's deadline is its confirmation plus the TTL less the
/// margin, which covers clocks that differ in rate by up to as much. A driver whose store
/// lets the next in line end a term once the term's TTL has passed on the store's clock
/// (leader-etcd) refuses to renew a grant past the same deadline.
pub fn default_safety_margin(ttl: Duration) -> Duration {
    (ttl / 50).max(Duration::from_millis(2))
}

impl Settings {
    /// The safety margin subtracted from deadlines of a term with `ttl`.
    pub(crate) fn margin_for(&self, ttl: Duration) -> Duration {
        self.safety_margin
            .unwrap_or_else(|| default_safety_margin(ttl))
    }

    /// Checks these settings with the election's `name` and `value`.
    pub(crate) fn check(
        &self,
        name: &str,
        value: Option<&[u8]>,
        driver: &dyn Driver,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid_config("name", "must not be empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Error::invalid_config(
                "name",
                format!("is {} bytes; at most {MAX_NAME_LEN} allowed", name.len()),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::invalid_config(
                "name",
                "must not contain control characters",
            ));
        }
        driver.check_name(name)?;
        if !(MIN_TTL..=MAX_TTL).contains(&self.ttl) {
            return Err(Error::invalid_config(
                "ttl",
                format!(
                    "is {:?}; it must be between {MIN_TTL:?} and {MAX_TTL:?}",
                    self.ttl
                ),
            ));
        }
        if let Some(margin) = self.safety_margin
            && margin >= self.ttl / 2
        {
            return Err(Error::invalid_config(
                "safetyMargin",
                format!(
                    "is {margin:?}; it must be under half the TTL ({:?})",
                    self.ttl / 2
                ),
            ));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(Error::invalid_config(
                "retryMin",
                format!(
                    "is {:?}; it must be above zero and at most retryMax ({:?})",
                    self.retry_min, self.retry_max
                ),
            ));
        }
        if let Some(value) = value
            && value.len() > MAX_VALUE_LEN
        {
            return Err(Error::invalid_config(
                "value",
                format!("is {} bytes; at most {MAX_VALUE_LEN} allowed", value.len()),
            ));
        }
        Ok(())
    }
}

/// The hook of [`ElectionBuilder::on_deadline`](crate::ElectionBuilder::on_deadline).
#[derive(Clone)]
pub(crate) struct DeadlineHook(pub(crate) Arc<dyn Fn(u64, std::time::Instant) + Send + Sync>);

impl DeadlineHook {
    /// Calls the hook; a panic in it is caught, logged and returned as `Err`.
    pub(crate) fn call(&self, fencing_token: u64, deadline: std::time::Instant) -> Result<(), ()> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (self.0)(fencing_token, deadline);
        }))
        .map_err(|_| {
            tracing::error!(fencing_token, "the on_deadline hook panicked");
        })
    }
}

impl fmt::Debug for DeadlineHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeadlineHook")
    }
}
