//! [`PostgresDriver::connect_url`] and [`PostgresDriver::parse_url`]: PostgreSQL's
//! connection URLs (libpq's form, as `tokio-postgres` reads it, plus its TLS files),
//! parsed once.

use leader_core::{Error, Result, StoreUrl, redact_url};
use tokio_postgres::Config;

use crate::builder::PostgresDriverBuilder;
use crate::driver::PostgresDriver;
use crate::tls;

/// The schemes [`PostgresDriver::connect_url`] takes.
pub const SCHEMES: &[&str] = &["postgres", "postgresql"];

impl PostgresDriver {
    /// Connects to the PostgreSQL that `url` names (libpq's URL form:
    /// `postgres://[user[:password]@][host[:port]][/dbname][?param=value…]`, or
    /// `postgresql://…`, or libpq's `key=value` form), creates the table if it is missing,
    /// and returns a driver with the default options; fails if PostgreSQL cannot be
    /// reached now. TLS (feature `tls`): `sslmode=require` or `verify-full`, with
    /// `sslrootcert=PATH` (and `sslcert=`, `sslkey=` for a client certificate).
    ///
    /// ```no_run
    /// # async fn demo() -> leader_core::Result<()> {
    /// let driver = leader_postgres::PostgresDriver::connect_url("postgres://app:pw@127.0.0.1:5432/app").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) for a URL of another scheme (the message names
    /// the schemes taken), one `tokio-postgres` cannot parse, an unreadable certificate, or
    /// TLS without the `tls` feature; [`Error::Denied`] for refused credentials or missing
    /// privileges; [`Error::Store`] or [`Error::Timeout`] when the server cannot be
    /// reached. No message contains the password.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect_builder(Self::parse_url(url)?).await
    }

    /// Parses a connection URL (as [`connect_url`](Self::connect_url) takes) into a
    /// builder with the default options, for more options before connecting. The password
    /// never appears in the error.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) for a URL of another scheme or one
    /// `tokio-postgres` cannot parse, an unreadable certificate, or TLS without the `tls`
    /// feature.
    pub fn parse_url(url: &str) -> Result<PostgresDriverBuilder> {
        if url.contains("://") {
            let scheme = StoreUrl::scheme_of(url)?;
            if !SCHEMES.contains(&scheme.as_str()) {
                return Err(Error::invalid_config(
                    "store",
                    format!(
                        "`{scheme}://` is not a PostgreSQL URL; leader-postgres takes \
                         postgres://, postgresql:// (in `{}`)",
                        redact_url(url)
                    ),
                ));
            }
        }
        let (url, tls) = tls::split_url(url);
        let config: Config = url.parse().map_err(|err: tokio_postgres::Error| {
            // tokio-postgres's message names the bad parameter, never the URL's password.
            Error::invalid_config("store", format!("is not a PostgreSQL URL: {err}"))
        })?;
        let builder = Self::builder(config);
        if !tls.required && tls.root_cert.is_none() {
            return Ok(builder);
        }
        #[cfg(feature = "tls")]
        {
            Ok(builder.tls(tls::from_url(&tls)?))
        }
        #[cfg(not(feature = "tls"))]
        {
            Err(Error::invalid_config(
                "store",
                "TLS to PostgreSQL (sslmode=require, sslrootcert=) needs the `tls` feature of \
                 leader-postgres (the `tls` feature of `leader`), which this build does not \
                 have; available: postgres:// and postgresql:// without TLS",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_schemes_and_bad_urls_are_invalid_config_without_the_password() {
        for url in [
            "redis://u:hunter2@127.0.0.1:6379",
            "postgres://u:hunter2@127.0.0.1:notaport/db",
            #[cfg(not(feature = "tls"))]
            "postgres://u:hunter2@127.0.0.1:5432/db?sslmode=require",
            #[cfg(feature = "tls")]
            "postgres://u:hunter2@127.0.0.1:5432/db?sslmode=require&sslrootcert=/no/such.pem",
        ] {
            let err = PostgresDriver::parse_url(url).expect_err(url);
            assert!(
                matches!(err, Error::InvalidConfig { name: "store", .. }),
                "{url}: {err:?}"
            );
            let text = format!("{err} {err:?}");
            assert!(!text.contains("hunter2"), "{text}");
        }
        let other = PostgresDriver::parse_url("etcd://h:1").expect_err("etcd");
        assert!(other.to_string().contains("postgresql://"), "{other}");
        for url in [
            "postgres://app:pw@db.internal/app",
            "postgresql:///app?host=/var/run/postgresql",
            "host=/var/run/postgresql dbname=app",
        ] {
            let _builder = PostgresDriver::parse_url(url).expect(url);
        }
    }
}
