//! [`Config`]: the election's settings as a service writes them in its own config file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An election's settings, for a service to embed in its own configuration file (YAML,
/// TOML, JSON: anything serde reads). Keys are camelCase; durations are human strings such
/// as `"10s"` or `"1500ms"`. Every field has a default, so `leader: {}` is a valid config.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: leader_core::Config = serde_json::from_str(
///     r#"{ "name": "reports-cron", "ttl": "5s", "value": "10.0.0.7:8080" }"#,
/// )?;
/// assert_eq!(config.ttl, std::time::Duration::from_secs(5));
/// # Ok(()) }
/// ```
///
/// Build an election from it with
/// [`ElectionBuilder::config`](crate::ElectionBuilder::config) (its `build()` validates
/// it); the config's `name` is the election's, whatever name was given to
/// [`Election::builder`](crate::Election::builder) (see `config`'s docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The election's name: candidates with the same name on the same store compete.
    /// Defaults to `"default"` (the Go original's `etcdName: default`).
    pub name: String,
    /// What observers see about this candidate while it leads. Defaults to none, which
    /// means the candidate id.
    pub value: Option<String>,
    /// The lease. A crashed leader is replaced about this long after its last renewal;
    /// the leader renews every third of it. Defaults to `"10s"`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Subtracted from each term's deadline, to absorb clock-rate drift between this
    /// process and the store. Defaults to none, which means 2% of the TTL (at least 2ms).
    #[serde(with = "humantime_serde")]
    pub safety_margin: Option<Duration>,
    /// The first delay before `run` campaigns again after a loss or a store error; it
    /// doubles at each further failure, with jitter. Defaults to `"200ms"`.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// The longest delay between two campaigns of `run`. Defaults to `"10s"`.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "default".to_owned(),
            value: None,
            ttl: Duration::from_secs(10),
            safety_margin: None,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_the_defaults() {
        let config: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.name, "default");
        assert_eq!(config.ttl, Duration::from_secs(10));
    }

    #[test]
    fn camel_case_keys_and_human_durations() {
        let config: Config = serde_json::from_str(
            r#"{"name":"jobs","ttl":"2s","safetyMargin":"50ms","retryMin":"1s","retryMax":"1m"}"#,
        )
        .unwrap();
        assert_eq!(config.name, "jobs");
        assert_eq!(config.ttl, Duration::from_secs(2));
        assert_eq!(config.safety_margin, Some(Duration::from_millis(50)));
        assert_eq!(config.retry_max, Duration::from_secs(60));
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["ttl"], "2s");
        assert_eq!(back["retryMin"], "1s");
    }

    #[cfg(feature = "testing")]
    #[test]
    fn the_config_name_wins_and_replacing_another_name_warns() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Logged(Arc<Mutex<Vec<u8>>>);
        impl Write for Logged {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("not poisoned").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let logged = Logged::default();
        let writer = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let config: Config = serde_json::from_str(r#"{"name":"from-config"}"#).unwrap();
        let driver = crate::testing::MemoryDriver::new();
        tracing::subscriber::with_default(subscriber, || {
            for given in ["", "from-config", "from-code"] {
                let election = crate::Election::builder(driver.clone(), given)
                    .config(&config)
                    .build()
                    .unwrap();
                assert_eq!(election.name(), "from-config", "given {given:?}");
            }
        });
        let logged = String::from_utf8(logged.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            logged.matches("replaced by the config's name").count(),
            1,
            "{logged}"
        );
        assert!(logged.contains("from-code"), "{logged}");
    }

    #[test]
    fn unknown_keys_are_rejected_not_ignored() {
        let err = serde_json::from_str::<Config>(r#"{"tll":"2s"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `tll`"), "{err}");
    }
}
