//! [`ElectionBuilder`]: settings, their validation, and the candidate id.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::{Candidate, Driver};
use crate::election::{Election, Handle};
use crate::machinery::Core;
use crate::{Config, Error, Result};

/// The shortest TTL [`ElectionBuilder::build`] accepts.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// The longest TTL [`ElectionBuilder::build`] accepts.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest value [`ElectionBuilder::build`] accepts, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// The longest election name [`ElectionBuilder::build`] accepts, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// An election's settings, kept once: the builder fills them, `build()` checks them, and
/// the election keeps the checked copy.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) on_deadline: Option<DeadlineHook>,
    pub(crate) value: Option<Vec<u8>>,
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
            name,
            value,
            ttl,
            safety_margin,
            retry_min,
            retry_max,
        } = config;
        Settings {
            name: name.clone(),
            on_deadline: None,
            value: value.as_ref().map(|v| v.as_bytes().to_vec()),
            ttl: *ttl,
            safety_margin: *safety_margin,
            retry_min: *retry_min,
            retry_max: *retry_max,
        }
    }
}

impl Settings {
    /// The safety margin subtracted from deadlines of a term with `ttl`.
    pub(crate) fn margin_for(&self, ttl: Duration) -> Duration {
        self.safety_margin
            .unwrap_or_else(|| (ttl / 50).max(Duration::from_millis(2)))
    }

    fn check(&self, driver: &dyn Driver) -> Result<()> {
        let name = &self.name;
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
        if let Some(value) = &self.value
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

/// The hook of [`ElectionBuilder::on_deadline`].
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

/// Builds an [`Election`]; see [`Election::builder`].
#[must_use = "an ElectionBuilder does nothing until build() is called"]
pub struct ElectionBuilder {
    driver: Arc<dyn Driver>,
    settings: Settings,
}

impl ElectionBuilder {
    pub(crate) fn new(driver: Arc<dyn Driver>, name: String) -> Self {
        let mut settings = Settings::from(&Config::default());
        settings.name = name;
        ElectionBuilder { driver, settings }
    }

    /// Takes every setting from `config`, replacing what was set before.
    ///
    /// # The election's name
    ///
    /// `config.name` wins over the name given to [`Election::builder`]: the config file is
    /// where an operator renames an election. When it replaces a different name that was
    /// not empty, a `tracing` warning names both; pass `""` (or the config's name) to
    /// `builder` to say the config decides. Settings set after `config()` (`.ttl(…)`, …)
    /// override the config's.
    pub fn config(mut self, config: &Config) -> Self {
        if !self.settings.name.is_empty() && self.settings.name != config.name {
            tracing::warn!(
                given = %self.settings.name,
                config = %config.name,
                "the election's name given to builder() is replaced by the config's name"
            );
        }
        let on_deadline = self.settings.on_deadline.take();
        self.settings = Settings::from(config);
        self.settings.on_deadline = on_deadline;
        self
    }

    /// What observers see about this candidate while it leads (an address, say). Defaults
    /// to the candidate id.
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.settings.value = Some(value.into());
        self
    }

    /// The lease: a crashed leader is replaced about this long after its last renewal.
    /// Defaults to 10 seconds; at least [`MIN_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// Subtracted from each deadline for clock-rate drift between this process and the
    /// store, and the time leader-only work gets to stop: the term ends this long before
    /// the store could elect anyone else. Defaults to 2% of the TTL (at least 2ms); must be
    /// under half the TTL.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.settings.safety_margin = Some(margin);
        self
    }

    /// The range of delays [`Election::run`] waits between campaigns after a loss or an
    /// error (doubling, with jitter). Defaults to 200ms to 10s.
    pub fn retry(mut self, min: Duration, max: Duration) -> Self {
        self.settings.retry_min = min;
        self.settings.retry_max = max;
        self
    }

    /// Calls `hook(fencing_token, deadline)` each time a term of this candidate gets its
    /// deadline, or moves it: synchronously, before [`Status::is_leader`](crate::Status::is_leader)
    /// can rely on the new deadline. So a log written by the hook holds every deadline the
    /// candidate ever acted on, even if the process is killed right after (an audit trail;
    /// the chaos suite's exact checker reads it). Keep the hook short, and do not call
    /// into the election from it (its status, terms or events): it runs with the term's
    /// locks held. If it panics when a renewal would move the deadline, the deadline stays
    /// where it was (the term ends there). Defaults to none.
    pub fn on_deadline(
        mut self,
        hook: impl Fn(u64, std::time::Instant) + Send + Sync + 'static,
    ) -> Self {
        self.settings.on_deadline = Some(DeadlineHook(Arc::new(hook)));
        self
    }

    /// Checks the settings and creates the candidate. Nothing is sent to the store until
    /// it campaigns.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the first setting that makes no sense: an empty or
    /// overlong name, a name the driver's store cannot hold, a TTL outside
    /// [`MIN_TTL`]..=[`MAX_TTL`], a safety margin of half the TTL or more, a retry range
    /// that is empty or starts at zero, a value over [`MAX_VALUE_LEN`].
    pub fn build(self) -> Result<Election> {
        let ElectionBuilder { driver, settings } = self;
        settings.check(driver.as_ref())?;
        let id = candidate_id();
        let value = settings
            .value
            .clone()
            .unwrap_or_else(|| id.clone().into_bytes());
        let candidate = Candidate::new(settings.name.clone(), id, value, settings.ttl);
        let core = Arc::new(Core::new(driver, candidate, settings));
        Ok(Election::from_handle(Handle { core }))
    }
}

impl fmt::Debug for ElectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElectionBuilder")
            .field("name", &self.settings.name)
            .field("ttl", &self.settings.ttl)
            .finish_non_exhaustive()
    }
}

/// `hostname-pid-random`: unique per process and per election handle.
fn candidate_id() -> String {
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}
