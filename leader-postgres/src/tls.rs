//! How the driver's connections are made: in plain text, or over TLS (feature `tls`,
//! rustls with ring).

use std::pin::Pin;

use futures::Stream;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// The messages of one connection; polling them drives it, and they end with it.
pub(crate) type Messages =
    Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// Plain text, or TLS with a rustls client configuration.
#[derive(Clone, Default)]
pub(crate) enum Tls {
    /// No TLS.
    #[default]
    Off,
    /// TLS, verifying the server's certificate and name.
    #[cfg(feature = "tls")]
    On(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_on() { "Tls::On" } else { "Tls::Off" })
    }
}

impl Tls {
    /// Opens a connection with `config`.
    pub(crate) async fn connect(
        &self,
        config: &Config,
    ) -> Result<(Client, Messages), tokio_postgres::Error> {
        match self {
            Tls::Off => {
                let (client, mut connection) = config.connect(NoTls).await?;
                let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                Ok((client, Box::pin(messages)))
            }
            #[cfg(feature = "tls")]
            Tls::On(make) => {
                let (client, mut connection) = config.connect(make.clone()).await?;
                let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                Ok((client, Box::pin(messages)))
            }
        }
    }

    /// Whether connections use TLS.
    pub(crate) fn is_on(&self) -> bool {
        !matches!(self, Tls::Off)
    }
}

/// The TLS parameters of a libpq URL's query that `tokio-postgres` does not read:
/// `sslrootcert`, `sslcert`, `sslkey`, and the `sslmode`s it lacks (`verify-ca`,
/// `verify-full`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct UrlTls {
    /// TLS was asked for (`sslmode` `require`, `verify-ca` or `verify-full`).
    pub(crate) required: bool,
    pub(crate) root_cert: Option<String>,
    pub(crate) client_cert: Option<String>,
    pub(crate) client_key: Option<String>,
}

/// Splits `url` into the URL `tokio-postgres` parses (without the parameters it does not
/// know; `sslmode=verify-*` as `require`) and the TLS parameters. A `key=value`
/// connection string is returned as it is.
pub(crate) fn split_url(url: &str) -> (String, UrlTls) {
    let mut tls = UrlTls::default();
    let Some((base, query)) = url.split_once('?') else {
        if let Some(mode) = url
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix("sslmode="))
        {
            tls.required = matches!(mode, "require" | "verify-ca" | "verify-full");
        }
        return (url.to_owned(), tls);
    };
    if !url.contains("://") {
        return (url.to_owned(), tls);
    }
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" => tls.root_cert = Some(value.to_owned()),
            "sslcert" => tls.client_cert = Some(value.to_owned()),
            "sslkey" => tls.client_key = Some(value.to_owned()),
            "sslmode" if matches!(value, "verify-ca" | "verify-full" | "require") => {
                tls.required = true;
                kept.push("sslmode=require".to_owned());
            }
            _ => kept.push(pair.to_owned()),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, tls)
}

#[cfg(feature = "tls")]
mod rustls_config {
    use leader_core::{Error, Result};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::UrlTls;

    fn read(what: &str, path: &str) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|err| {
            Error::invalid_config("store", format!("cannot read the {what} `{path}`: {err}"))
        })
    }

    /// A rustls configuration from the URL's files: the CA (`sslrootcert`, required:
    /// the system's roots are not built in) and a client certificate.
    pub(crate) fn from_url(tls: &UrlTls) -> Result<rustls::ClientConfig> {
        let Some(root) = &tls.root_cert else {
            return Err(Error::invalid_config(
                "store",
                "TLS to PostgreSQL needs `sslrootcert=PATH` (the CA of the server's \
                 certificate)",
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read("CA certificate (sslrootcert=)", root)?) {
            let cert = cert.map_err(|err| {
                Error::invalid_config("store", format!("sslrootcert `{root}`: {err}"))
            })?;
            roots.add(cert).map_err(|err| {
                Error::invalid_config("store", format!("sslrootcert `{root}`: {err}"))
            })?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        match (&tls.client_cert, &tls.client_key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => {
                let certs =
                    CertificateDer::pem_slice_iter(&read("client certificate (sslcert=)", cert)?)
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|err| {
                            Error::invalid_config("store", format!("sslcert `{cert}`: {err}"))
                        })?;
                let key = PrivateKeyDer::from_pem_slice(&read("client key (sslkey=)", key)?)
                    .map_err(|err| {
                        Error::invalid_config("store", format!("sslkey `{key}`: {err}"))
                    })?;
                builder.with_client_auth_cert(certs, key).map_err(|err| {
                    Error::invalid_config("store", format!("client certificate: {err}"))
                })
            }
            _ => Err(Error::invalid_config(
                "store",
                "`sslcert=` and `sslkey=` go together",
            )),
        }
    }
}

#[cfg(feature = "tls")]
pub(crate) use rustls_config::from_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (url, tls) = split_url(
            "postgres://u:p@h:5432/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        );
        assert_eq!(
            url,
            "postgres://u:p@h:5432/db?sslmode=require&application_name=x"
        );
        assert!(tls.required);
        assert_eq!(tls.root_cert.as_deref(), Some("/ca.pem"));
        let (url, tls) = split_url("postgres://h/db");
        assert_eq!(url, "postgres://h/db");
        assert_eq!(tls, UrlTls::default());
        let (url, tls) = split_url("host=h sslmode=require");
        assert_eq!(url, "host=h sslmode=require");
        assert!(tls.required);
    }
}
