//! [`Config`]: the store and the election, as a service writes them in its config file.

use std::fmt;
use std::time::Duration;

use leader_core::{Election, Result};
use serde::{Deserialize, Serialize};

use crate::url::redact;

/// Everything a service needs to take part in an election, for its own config file (YAML,
/// TOML, JSON: anything serde reads): the store as a URL, and the election's settings.
/// Keys are camelCase, durations human strings (`"10s"`), unknown keys are rejected.
/// Moving from etcd to Redis is a change of `store`, nothing else.
///
/// ```no_run
/// # async fn demo() -> leader::Result<()> {
/// let config: leader::Config = serde_json::from_str(
///     r#"{ "store": "etcd://10.0.0.1:2379", "name": "reports-cron", "ttl": "10s" }"#,
/// ).expect("valid config");
/// let election = config.election().await?;
/// # Ok(()) }
/// ```
///
/// `Debug` shows the store URL with its password replaced by `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The store, as a URL: see [`connect`](crate::connect). Defaults to
    /// `etcd://127.0.0.1:2379`.
    pub store: String,
    /// The election's name: candidates with the same name on the same store compete.
    /// Defaults to `"default"`.
    pub name: String,
    /// What observers see about this candidate while it leads. Defaults to the candidate
    /// id.
    pub value: Option<String>,
    /// The lease; a crashed leader is replaced about this long after its last renewal.
    /// Defaults to `"10s"`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Subtracted from each deadline: the leader's work gets this long to stop before the
    /// store could elect anyone else. Defaults to 2% of the TTL.
    #[serde(with = "humantime_serde")]
    pub safety_margin: Option<Duration>,
    /// The first delay before campaigning again after a loss or an error. Defaults to
    /// `"200ms"`.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// The longest delay between two campaigns. Defaults to `"10s"`.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        let election = leader_core::Config::default();
        Config {
            store: "etcd://127.0.0.1:2379".to_owned(),
            name: election.name,
            value: election.value,
            ttl: election.ttl,
            safety_margin: election.safety_margin,
            retry_min: election.retry_min,
            retry_max: election.retry_max,
        }
    }
}

impl Config {
    /// The election's settings, without the store.
    pub fn election_config(&self) -> leader_core::Config {
        let mut election = leader_core::Config::default();
        election.name.clone_from(&self.name);
        election.value.clone_from(&self.value);
        election.ttl = self.ttl;
        election.safety_margin = self.safety_margin;
        election.retry_min = self.retry_min;
        election.retry_max = self.retry_max;
        election
    }

    /// Connects to the store and builds the election.
    ///
    /// # Errors
    ///
    /// As [`connect`](crate::connect) for the store (`store` named in
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig)), and as
    /// [`ElectionBuilder::build`](crate::ElectionBuilder::build) for the settings (the bad
    /// key named).
    pub async fn election(&self) -> Result<Election> {
        let election = self.election_config();
        let driver = crate::connect(&self.store).await?;
        Election::builder(driver, election.name.clone())
            .config(&election)
            .build()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store", &redact(&self.store))
            .field("name", &self.name)
            .field("value", &self.value)
            .field("ttl", &self.ttl)
            .field("safety_margin", &self.safety_margin)
            .field("retry_min", &self.retry_min)
            .field("retry_max", &self.retry_max)
            .finish()
    }
}
