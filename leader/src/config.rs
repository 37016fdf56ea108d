//! [`Config`]: the store and the election, as a service writes them in its config file.
//!
//! The election's settings are [`leader_core::Config`] itself, not a copy: a new setting
//! added there is a key here too, with no change in this file.

use std::fmt;
use std::ops::{Deref, DerefMut};

use leader_core::{Election, Result, redact_url};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The store's key.
const STORE: &str = "store";

/// Everything a service needs to take part in an election, for its own config file (YAML,
/// TOML, JSON: anything serde reads): the store as a URL, and the election's settings
/// ([`leader_core::Config`], whose fields this type derefs to: `config.ttl`). Keys are
/// camelCase, durations human strings (`"10s"`), unknown keys are rejected with their name.
/// Moving from etcd to Redis is a change of `store`, nothing else.
///
/// ```no_run
/// # async fn demo() -> leader::Result<()> {
/// let config: leader::Config = serde_json::from_str(
///     r#"{ "store": "etcd://10.0.0.1:2379", "name": "reports-cron", "ttl": "10s" }"#,
/// ).expect("valid config");
/// assert_eq!(config.ttl, std::time::Duration::from_secs(10));
/// let election = config.election().await?;
/// # Ok(()) }
/// ```
///
/// `Debug` shows the store URL with its password replaced by `***`.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Config {
    /// The store, as a URL: see [`connect`](crate::connect). Defaults to
    /// `etcd://127.0.0.1:2379`.
    pub store: String,
    /// The election's settings (`name`, `value`, `ttl`, `safetyMargin`, `retryMin`,
    /// `retryMax`), written beside `store` in the same map.
    #[serde(flatten)]
    pub election: leader_core::Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "etcd://127.0.0.1:2379".to_owned(),
            election: leader_core::Config::default(),
        }
    }
}

impl Deref for Config {
    type Target = leader_core::Config;

    fn deref(&self) -> &leader_core::Config {
        &self.election
    }
}

impl DerefMut for Config {
    fn deref_mut(&mut self) -> &mut leader_core::Config {
        &mut self.election
    }
}

impl Config {
    /// The election's settings, without the store: a copy of
    /// [`election`](Self::election).
    pub fn election_config(&self) -> leader_core::Config {
        self.election.clone()
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
        let driver = crate::stores::connect(&self.store).await?;
        Election::builder(driver, self.election.name.clone())
            .config(&self.election)
            .build()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store", &redact_url(&self.store))
            .field("election", &self.election)
            .finish()
    }
}

/// `store` taken out of the map, everything else handed to [`leader_core::Config`]'s own
/// `Deserialize` (which has `deny_unknown_fields`, so a misspelt key is an error naming
/// it). serde's `flatten` cannot do this: it would pass unknown keys by silently.
impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ConfigVisitor)
    }
}

struct ConfigVisitor;

impl<'de> Visitor<'de> for ConfigVisitor {
    type Value = Config;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of leader settings (store, name, ttl, …)")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Config, A::Error> {
        let mut store = None;
        let election =
            leader_core::Config::deserialize(de::value::MapAccessDeserializer::new(TakingStore {
                map,
                store: &mut store,
            }))?;
        Ok(Config {
            store: store.unwrap_or_else(|| Config::default().store),
            election,
        })
    }
}

/// A map that hides its `store` entry (kept in `store`) from whoever reads it.
struct TakingStore<'a, A> {
    map: A,
    store: &'a mut Option<String>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for TakingStore<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key::<String>()? else {
                return Ok(None);
            };
            if key != STORE {
                let key: de::value::StringDeserializer<A::Error> = key.into_deserializer();
                return seed.deserialize(key).map(Some);
            }
            if self.store.is_some() {
                return Err(de::Error::duplicate_field(STORE));
            }
            *self.store = Some(self.map.next_value()?);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_store_and_every_core_key_in_one_map() {
        let config: Config = serde_json::from_str(
            r#"{"name":"jobs","store":"redis://h:1","ttl":"2s","safetyMargin":"50ms","retryMin":"1s","retryMax":"1m","value":"v"}"#,
        )
        .expect("valid");
        assert_eq!(config.store, "redis://h:1");
        assert_eq!(config.name, "jobs");
        assert_eq!(config.ttl, Duration::from_secs(2));
        assert_eq!(config.value.as_deref(), Some("v"));
        let back = serde_json::to_value(&config).expect("serializes");
        assert_eq!(back["store"], "redis://h:1");
        assert_eq!(back["retryMax"], "1m");
        let again: Config = serde_json::from_value(back).expect("round trip");
        assert_eq!(again, config);
    }

    #[test]
    fn every_core_key_is_a_key_here_and_nothing_else_is() {
        // The keys of leader_core::Config, as it serializes them, plus `store`.
        let core = serde_json::to_value(leader_core::Config::default()).expect("serializes");
        let mut keys: Vec<String> = core.as_object().expect("a map").keys().cloned().collect();
        keys.push("store".to_owned());
        keys.sort();
        let ours = serde_json::to_value(Config::default()).expect("serializes");
        let mut our_keys: Vec<String> = ours.as_object().expect("a map").keys().cloned().collect();
        our_keys.sort();
        assert_eq!(our_keys, keys);
    }

    #[test]
    fn unknown_and_duplicate_keys_are_named() {
        for (json, said) in [
            (r#"{"stor":"etcd://x:1"}"#, "unknown field `stor`"),
            (
                r#"{"store":"etcd://x:1","tll":"2s"}"#,
                "unknown field `tll`",
            ),
            (
                r#"{"store":"etcd://x:1","store":"etcd://y:1"}"#,
                "duplicate field `store`",
            ),
            (r#"{"store":1}"#, "invalid type"),
            (r#"["etcd://x:1"]"#, "invalid type"),
        ] {
            let err = serde_json::from_str::<Config>(json).expect_err(json);
            assert!(err.to_string().contains(said), "{json}: {err}");
        }
        let defaults: Config = serde_json::from_str("{}").expect("every key has a default");
        assert_eq!(defaults, Config::default());
    }

    #[test]
    fn debug_hides_the_password() {
        let config: Config =
            serde_json::from_str(r#"{"store":"redis://app:hunter2@h:1"}"#).expect("valid");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@h:1"), "{shown}");
    }
}
