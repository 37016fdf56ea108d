//! From a store URL to a driver: the scheme picks the driver crate, which parses the rest
//! (`EtcdDriver::connect_url`, `RedisDriver::connect_url`, `PostgresDriver::connect_url`).
//! A new store is one arm here and a feature in Cargo.toml; a new URL option goes in its
//! driver crate's `url.rs`.

use std::sync::Arc;

use leader_core::{Driver, Error, Result, StoreUrl, redact_url};

/// Which driver crate takes a scheme, and the `leader` feature that builds it in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Etcd,
    Redis,
    Postgres,
}

impl Store {
    const ALL: [Store; 3] = [Store::Etcd, Store::Redis, Store::Postgres];

    /// The feature of the `leader` crate that builds this store in.
    fn feature(self) -> &'static str {
        match self {
            Store::Etcd => "etcd",
            Store::Redis => "redis",
            Store::Postgres => "postgres",
        }
    }

    /// Whether this build has the store.
    fn built_in(self) -> bool {
        match self {
            Store::Etcd => cfg!(feature = "etcd"),
            Store::Redis => cfg!(feature = "redis"),
            Store::Postgres => cfg!(feature = "postgres"),
        }
    }

    /// The schemes the store's driver takes in this build; for a store not built in, its
    /// plain schemes (to recognise them in errors).
    fn schemes(self) -> &'static [&'static str] {
        match self {
            #[cfg(feature = "etcd")]
            Store::Etcd => leader_etcd::SCHEMES,
            #[cfg(not(feature = "etcd"))]
            Store::Etcd => &["etcd", "etcds"],
            #[cfg(feature = "redis")]
            Store::Redis => leader_redis::SCHEMES,
            #[cfg(not(feature = "redis"))]
            Store::Redis => &[
                "redis",
                "redis+cluster",
                "redis+sentinel",
                "rediss",
                "rediss+cluster",
                "rediss+sentinel",
            ],
            #[cfg(feature = "postgres")]
            Store::Postgres => leader_postgres::SCHEMES,
            #[cfg(not(feature = "postgres"))]
            Store::Postgres => &["postgres", "postgresql"],
        }
    }

    /// The store whose driver takes `scheme`: `rediss+cluster` is Redis's even in a build
    /// without TLS (the driver then says that it needs the `tls` feature).
    fn of(scheme: &str) -> Option<Store> {
        let family = scheme.split('+').next().unwrap_or(scheme);
        match family {
            "etcd" | "etcds" => Some(Store::Etcd),
            "redis" | "rediss" => Some(Store::Redis),
            _ => Store::ALL
                .into_iter()
                .find(|store| store.schemes().contains(&scheme)),
        }
    }
}

/// The schemes this build can connect to, for error messages.
pub(crate) fn available() -> String {
    let schemes: Vec<String> = Store::ALL
        .into_iter()
        .filter(|store| store.built_in())
        .flat_map(|store| store.schemes().iter().map(|s| format!("{s}://")))
        .collect();
    if schemes.is_empty() {
        "none (enable the `etcd`, `redis` or `postgres` feature of the `leader` crate)".to_owned()
    } else {
        schemes.join(", ")
    }
}

pub(crate) async fn connect(url: &str) -> Result<Arc<dyn Driver>> {
    let scheme = StoreUrl::scheme_of(url)?;
    let Some(store) = Store::of(&scheme).filter(|store| store.built_in()) else {
        let why = match Store::of(&scheme) {
            Some(store) => format!(
                "`{scheme}://` needs the `{}` feature of the `leader` crate, which this build \
                 does not have",
                store.feature()
            ),
            None => format!("unknown scheme `{scheme}://`"),
        };
        return Err(Error::invalid_config(
            "store",
            format!("{why} in `{}`; available: {}", redact_url(url), available()),
        ));
    };
    connecting(store, url).await
}

/// A driver being connected. Boxed: the store clients' connect futures are deep types, and
/// a caller's future that holds them unboxed can exceed rustc's query depth limit.
type Connecting<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Arc<dyn Driver>>> + Send + 'a>>;

/// `store`'s driver, connecting to `url`.
fn connecting(store: Store, url: &str) -> Connecting<'_> {
    match store {
        #[cfg(feature = "etcd")]
        Store::Etcd => Box::pin(async move {
            let driver = leader_etcd::EtcdDriver::connect_url(url).await?;
            Ok(Arc::new(driver) as Arc<dyn Driver>)
        }),
        #[cfg(feature = "redis")]
        Store::Redis => Box::pin(async move {
            let driver = leader_redis::RedisDriver::connect_url(url).await?;
            Ok(Arc::new(driver) as Arc<dyn Driver>)
        }),
        #[cfg(feature = "postgres")]
        Store::Postgres => Box::pin(async move {
            let driver = leader_postgres::PostgresDriver::connect_url(url).await?;
            Ok(Arc::new(driver) as Arc<dyn Driver>)
        }),
        // Not reached: `connect` hands over built-in stores only.
        #[allow(unreachable_patterns)]
        _ => Box::pin(async move {
            let _ = url;
            Err(Error::invalid_config(
                "store",
                format!("the `{}` store is not built in", store.feature()),
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_belongs_to_one_store() {
        for store in Store::ALL {
            for scheme in store.schemes() {
                assert_eq!(Store::of(scheme), Some(store), "{scheme}");
            }
        }
        assert_eq!(Store::of("rediss+sentinel"), Some(Store::Redis));
        assert_eq!(Store::of("zookeeper"), None);
    }
}
