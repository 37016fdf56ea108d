//! [`ElectionBuilder`]: settings, their validation, and the candidate id.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::{Candidate, Driver};
use crate::election::{Election, Handle};
use crate::machinery::Core;
use crate::settings::{DeadlineHook, Settings};
use crate::{Config, Result};

impl Election {
    /// Starts building a candidate for election `name` on `driver`.
    ///
    /// `driver` is any [`Driver`], including an `Arc<dyn Driver>`; several elections may
    /// share one driver (clone it).
    pub fn builder(driver: impl Driver, name: impl Into<String>) -> ElectionBuilder {
        // An `Arc<dyn Driver>` (what `leader::connect` returns) is shared as it is, not
        // wrapped once more for every election.
        let any: &dyn std::any::Any = &driver;
        let driver = match any.downcast_ref::<Arc<dyn Driver>>() {
            Some(shared) => Arc::clone(shared),
            None => Arc::new(driver),
        };
        ElectionBuilder::new(driver, name.into())
    }
}

/// Builds an [`Election`]; see [`Election::builder`].
#[must_use = "an ElectionBuilder does nothing until build() is called"]
pub struct ElectionBuilder {
    driver: Arc<dyn Driver>,
    name: String,
    value: Option<Vec<u8>>,
    settings: Settings,
}

impl ElectionBuilder {
    pub(crate) fn new(driver: Arc<dyn Driver>, name: String) -> Self {
        ElectionBuilder {
            driver,
            name,
            value: None,
            settings: Settings::from(&Config::default()),
        }
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
        if !self.name.is_empty() && self.name != config.name {
            tracing::warn!(
                given = %self.name,
                config = %config.name,
                "the election's name given to builder() is replaced by the config's name"
            );
        }
        let on_deadline = self.settings.on_deadline.take();
        self.settings = Settings::from(config);
        self.settings.on_deadline = on_deadline;
        self.name.clone_from(&config.name);
        self.value = config.value.as_ref().map(|v| v.as_bytes().to_vec());
        self
    }

    /// What observers see about this candidate while it leads (an address, say). Defaults
    /// to the candidate id.
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// The lease: a crashed leader is replaced about this long after its last renewal.
    /// Defaults to 10 seconds; at least [`MIN_TTL`](crate::MIN_TTL).
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
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the first setting that makes no sense: an empty or
    /// overlong name, a name the driver's store cannot hold, a TTL outside
    /// [`MIN_TTL`](crate::MIN_TTL)..=[`MAX_TTL`](crate::MAX_TTL), a safety margin of half the TTL or more, a retry range
    /// that is empty or starts at zero, a value over [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN).
    pub fn build(self) -> Result<Election> {
        let ElectionBuilder {
            driver,
            name,
            value,
            settings,
        } = self;
        settings.check(&name, value.as_deref(), driver.as_ref())?;
        let id = candidate_id();
        // The name and the value are kept once, in the candidate.
        let value = value.unwrap_or_else(|| id.clone().into_bytes());
        let candidate = Candidate::new(name, id, value, settings.ttl);
        let core = Arc::new(Core::new(driver, candidate, settings));
        Ok(Election::from_handle(Handle { core }))
    }
}

impl fmt::Debug for ElectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElectionBuilder")
            .field("name", &self.name)
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
        crate::backoff::random_u64()
    )
}
