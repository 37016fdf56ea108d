//! [`EtcdDriver::connect_url`]: etcd's store URLs, their parameters and TLS files.

use leader_core::{Result, StoreUrl};

use crate::EtcdDriver;

/// The schemes [`EtcdDriver::connect_url`] takes in this build.
pub const SCHEMES: &[&str] = if cfg!(feature = "tls") {
    &["etcd", "etcds"]
} else {
    &["etcd"]
};

impl EtcdDriver {
    /// Connects to the etcd cluster `url` names and returns a driver on it:
    ///
    /// * `etcd://[user:password@]host:port[,host:port…][/prefix/]`: the path is the key
    ///   prefix ([`EtcdDriverBuilder::prefix`](crate::EtcdDriverBuilder::prefix)); none
    ///   gives the keys of `etcdctl elect NAME`.
    /// * `etcds://…?ca=PATH[&cert=PATH&key=PATH]` (feature `tls`): TLS, with a CA of your
    ///   own and a client certificate, both optional.
    ///
    /// The client has [`default_connect_options`](Self::default_connect_options) and the
    /// URL's user and password.
    ///
    /// ```no_run
    /// # async fn demo() -> leader_core::Result<()> {
    /// let driver = leader_etcd::EtcdDriver::connect_url("etcd://127.0.0.1:2379/svc/").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](leader_core::Error::InvalidConfig) (`store`) for a URL of
    /// another scheme (the message names the schemes this build takes), a host without a
    /// port, a parameter etcd's URLs do not take, an unreadable certificate, or `etcds://`
    /// without the `tls` feature; [`Error::Denied`](leader_core::Error::Denied) for
    /// credentials etcd refuses; [`Error::Store`](leader_core::Error::Store) if it cannot
    /// be reached. No message contains the password.
    pub async fn connect_url(url: &str) -> Result<Self> {
        let url = StoreUrl::parse(url)?;
        let tls = match url.scheme() {
            "etcd" => false,
            "etcds" => true,
            other => {
                return Err(url.invalid(format!(
                    "`{other}://` is not an etcd URL; leader-etcd takes {}",
                    schemes()
                )));
            }
        };
        url.require_host_ports()?;
        let mut options = Self::default_connect_options();
        if tls {
            options = with_tls(&url, options)?;
        } else {
            url.only_params(&[])?;
        }
        if let Some((user, password)) = url.credentials()? {
            options = options.with_user(user, password);
        }
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = url
            .hosts()
            .iter()
            .map(|host| format!("{scheme}://{host}"))
            .collect();
        // The path is the key prefix: `/svc/` gives `svc/`; no path, no prefix.
        let prefix = url.path().strip_prefix('/').unwrap_or(url.path());
        let builder = Self::connect_builder(&endpoints, options).await?;
        Ok(builder.prefix(prefix).build())
    }
}

/// The schemes, as `etcd://, etcds://`.
fn schemes() -> String {
    SCHEMES
        .iter()
        .map(|scheme| format!("{scheme}://"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(feature = "tls")]
fn with_tls(
    url: &StoreUrl,
    options: etcd_client::ConnectOptions,
) -> Result<etcd_client::ConnectOptions> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    url.only_params(&["ca", "cert", "key"])?;
    let files = url.tls_files()?;
    let mut tls = TlsOptions::new();
    if let Some(ca) = files.ca {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = files.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(options.with_tls(tls))
}

#[cfg(not(feature = "tls"))]
fn with_tls(
    url: &StoreUrl,
    _options: etcd_client::ConnectOptions,
) -> Result<etcd_client::ConnectOptions> {
    Err(url.invalid(format!(
        "`etcds://` needs the `tls` feature of leader-etcd (the `tls` feature of `leader`), \
         which this build does not have; available: {}",
        schemes()
    )))
}

#[cfg(test)]
mod tests {
    use leader_core::Error;

    use super::*;

    async fn refused(url: &str) -> Error {
        match EtcdDriver::connect_url(url).await {
            Err(err) => err,
            Ok(_) => panic!("{url} connected"),
        }
    }

    #[tokio::test]
    async fn bad_urls_are_invalid_config_and_never_show_the_password() {
        for url in [
            "redis://u:pw@127.0.0.1:6379",
            "etcd://u:pw@",
            "etcd://u:pw@127.0.0.1",
            "etcd://u:pw@127.0.0.1:2379?ca=/ca.pem",
            "etcd://u@127.0.0.1:2379",
            #[cfg(not(feature = "tls"))]
            "etcds://u:pw@127.0.0.1:2379",
            #[cfg(feature = "tls")]
            "etcds://u:pw@127.0.0.1:2379?ca=/no/such/ca.pem",
            #[cfg(feature = "tls")]
            "etcds://u:pw@127.0.0.1:2379?cert=/c.pem",
            #[cfg(feature = "tls")]
            "etcds://u:pw@127.0.0.1:2379?prefix=x",
        ] {
            let err = refused(url).await;
            assert!(
                matches!(err, Error::InvalidConfig { name: "store", .. }),
                "{url}: {err:?}"
            );
            let text = format!("{err} {err:?}");
            assert!(!text.contains(":pw@"), "{text}");
        }
        let other = refused("redis://127.0.0.1:6379").await.to_string();
        assert!(
            other.contains("etcd://"),
            "names the schemes it takes: {other}"
        );
    }
}
