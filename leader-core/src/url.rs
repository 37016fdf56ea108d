//! [`StoreUrl`]: a store URL, parsed, with its password kept out of every printout; what
//! every driver's `connect_url` shares (the shape, credentials, parameters, TLS files).
//! Which schemes, parameters and paths mean what is each driver's business.

use std::fmt;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// The password shown in place of the real one.
const REDACTED: &str = "***";

/// A store URL: `scheme://[user[:password]@][host[:port][,host[:port]…]][/path][?query]`.
///
/// Parsing checks the shape only: a scheme, user info, hosts, a path and query parameters,
/// percent-decoded. Each driver's `connect_url` checks the rest for its schemes (the hosts'
/// ports with [`require_host_ports`](Self::require_host_ports), the parameters it takes
/// with [`only_params`](Self::only_params)). `Display` and `Debug` show the URL with the
/// password replaced by `***`: pass a `StoreUrl` to logs and errors, never the string it
/// came from.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<String>,
    path: String,
    query: Vec<(String, String)>,
    /// The URL as given (shown redacted; given to clients that parse URLs themselves).
    raw: String,
}

impl StoreUrl {
    /// Parses `url`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) when it has no scheme, or a user, password or
    /// parameter that is not UTF-8 once decoded; the message never contains the password.
    pub fn parse(url: &str) -> Result<Self> {
        let bad =
            |why: &str| Error::invalid_config("store", format!("{why} (in `{}`)", redact(url)));
        let (scheme, rest) = split_scheme(url)?;
        // The user info runs to the last `@`, so that a password with an unencoded `/`, `?`
        // or `@` still parses (and is still hidden).
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (hosts, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        let decode = |s: &str| -> Result<String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| bad("has a user or password that is not UTF-8"))
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((user, password)) => (Some(decode(user)?), Some(decode(password)?)),
                None => (Some(decode(info)?), None),
            },
        };
        // Some stores' URLs may leave out the port and even the host (libpq's: a unix
        // socket, or `?host=`): drivers that need them call `require_host_ports`.
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        let mut pairs = Vec::new();
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            pairs.push((decode(key)?, decode(value)?));
        }
        Ok(StoreUrl {
            scheme: scheme.to_ascii_lowercase(),
            user: user.filter(|u| !u.is_empty()),
            password,
            hosts,
            path: decode(path)?,
            query: pairs,
            raw: url.to_owned(),
        })
    }

    /// The scheme, in lower case: `etcd`, `redis`, `redis+cluster`…
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The user name, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password, if any. Handle with care: never log it.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The `host:port` entries, in order.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The path, percent-decoded, with its leading `/` (empty if none).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The value of query parameter `key`, if given.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every query parameter, in order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.query.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The URL as given, with its password: for store clients that parse URLs
    /// themselves. Handle with care: never log it.
    pub fn as_given(&self) -> &str {
        &self.raw
    }

    /// The scheme of `url`, in lower case, without parsing the rest: for a caller that
    /// picks a driver by scheme and hands the URL on.
    ///
    /// # Errors
    ///
    /// As [`parse`](Self::parse), for a string with no valid scheme.
    pub fn scheme_of(url: &str) -> Result<String> {
        split_scheme(url).map(|(scheme, _)| scheme.to_ascii_lowercase())
    }

    /// An [`Error::InvalidConfig`] (`store`) saying `why`, followed by this URL (its
    /// password hidden).
    pub fn invalid(&self, why: impl fmt::Display) -> Error {
        Error::invalid_config("store", format!("{why} (in `{self}`)"))
    }

    /// Fails unless the URL has at least one host and each host is `host:port`, for the
    /// stores that are always addressed so.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`): "has no host", or "needs host:port".
    pub fn require_host_ports(&self) -> Result<()> {
        if self.hosts.is_empty() {
            return Err(self.invalid("has no host"));
        }
        for host in &self.hosts {
            match host.rsplit_once(':') {
                Some((name, port))
                    if !name.is_empty() && !port.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(self.invalid(format!("needs host:port, not `{host}`"))),
            }
        }
        Ok(())
    }

    /// Fails on a query parameter not in `allowed`, naming it and the allowed ones.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`).
    pub fn only_params(&self, allowed: &[&str]) -> Result<()> {
        match self.params().find(|(key, _)| !allowed.contains(key)) {
            None => Ok(()),
            Some((key, _)) if allowed.is_empty() => {
                Err(self.invalid(format!("`{}://` takes no parameter `{key}`", self.scheme)))
            }
            Some((key, _)) => Err(self.invalid(format!(
                "`{}://` takes no parameter `{key}`; it takes {}",
                self.scheme,
                allowed.join(", ")
            ))),
        }
    }

    /// The user and password, both or neither.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) for a user without a password or a password
    /// without a user.
    pub fn credentials(&self) -> Result<Option<(&str, &str)>> {
        match (self.user(), self.password()) {
            (Some(user), Some(password)) => Ok(Some((user, password))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(self.invalid("a user needs a password")),
            (None, Some(_)) => Err(self.invalid("a password needs a user")),
        }
    }

    /// The TLS files the URL names, each read now: `ca=PATH` (a CA certificate, PEM), and
    /// `cert=PATH` with `key=PATH` (a client certificate and its key, PEM).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) for a file that cannot be read, or `cert=`
    /// without `key=` (or the reverse).
    pub fn tls_files(&self) -> Result<TlsFiles> {
        let read = |what: &str, key: &str| -> Result<Option<Vec<u8>>> {
            self.param(key)
                .map(|path| {
                    std::fs::read(path).map_err(|err| {
                        self.invalid(format!("cannot read the {what} `{path}`: {err}"))
                    })
                })
                .transpose()
        };
        let ca = read("CA certificate (ca=)", "ca")?;
        let identity = match (
            read("client certificate (cert=)", "cert")?,
            read("client key (key=)", "key")?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(self.invalid("`cert=` and `key=` go together")),
        };
        Ok(TlsFiles { ca, identity })
    }
}

/// The TLS files a [`StoreUrl`] names ([`StoreUrl::tls_files`]), read. `Debug` shows which
/// are there, not their contents.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The CA certificate (`ca=`), PEM.
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key (`cert=`, `key=`), PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// `url`'s scheme (as written) and the rest, or the error of a URL without a valid one.
fn split_scheme(url: &str) -> Result<(&str, &str)> {
    let bad = |why: &str| Error::invalid_config("store", format!("{why} (in `{}`)", redact(url)));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("is not a URL: expected scheme://host:port"))?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err(bad("has no valid scheme"));
    }
    Ok((scheme, rest))
}

impl std::str::FromStr for StoreUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        StoreUrl::parse(url)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.raw))
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreUrl").field(&redact(&self.raw)).finish()
    }
}

/// `url` with the password of its user info (if any) replaced by `***`, and the values of
/// query parameters that look secret (`password`, `pass`, `secret`, `token`, `key` in
/// their names, except the `key=` of a client key's path) too. The user info runs to the
/// last `@`, whatever it contains. A string that is not a URL is shown as `***` whole (it
/// might be a password pasted by mistake).
pub fn redact_url(url: &str) -> String {
    redact(url)
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: it might be a password pasted by mistake, so show none of it.
        return REDACTED.to_owned();
    };
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{hosts}"),
            None => format!("{userinfo}@{hosts}"),
        },
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((before, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if looks_secret(key) => format!("{key}={REDACTED}"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{before}?{}", query.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

fn looks_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key != "key"
        && ["pass", "secret", "token", "key"]
            .iter()
            .any(|s| key.contains(s))
}

/// `text` with every URL's password in it replaced by `***`: for messages that quote
/// what a user typed.
pub fn redact_urls(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            let trimmed = word.trim_matches(|c| matches!(c, '\'' | '"' | '`'));
            if trimmed.contains("://") && trimmed.contains('@') {
                word.replace(trimmed, &redact(trimmed))
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_parsed_and_decoded() {
        let url = StoreUrl::parse(
            "etcds://app%40corp:p%3Ass@10.0.0.1:2379,10.0.0.2:2379/svc/jobs/?ca=/etc/ca.pem&cert=c.pem",
        )
        .expect("valid");
        assert_eq!(url.scheme(), "etcds");
        assert_eq!(url.user(), Some("app@corp"));
        assert_eq!(url.password(), Some("p:ss"));
        assert_eq!(url.hosts(), ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(url.path(), "/svc/jobs/");
        assert_eq!(url.param("ca"), Some("/etc/ca.pem"));
        assert_eq!(url.param("cert"), Some("c.pem"));
        assert_eq!(url.param("key"), None);
    }

    #[test]
    fn the_password_never_shows() {
        let url = StoreUrl::parse("redis://admin:s3cret@127.0.0.1:6379/2").expect("valid");
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("admin:***@127.0.0.1:6379/2"), "{shown}");
        }
        let err = StoreUrl::parse("redis://admin:s3cret@")
            .and_then(|url| url.require_host_ports())
            .expect_err("no host");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
        assert_eq!(redact("s3cret"), "***", "not a URL: nothing of it is shown");
        assert_eq!(redact("user:s3cret"), "***");
        for url in [
            "redis://app:pa/ss@127.0.0.1:6379",
            "etcd://root:pa?ss@127.0.0.1:2379",
            "etcd://root:p@ss@127.0.0.1:2379/svc/",
        ] {
            assert!(!redact(url).contains("ss@"), "{}", redact(url));
            let parsed = StoreUrl::parse(url).expect(url);
            assert!(parsed.password().is_some_and(|p| p.contains("ss")), "{url}");
            assert!(!parsed.to_string().contains("pa"), "{parsed}");
        }
        let said =
            redact("redis://h:1/?password=hunter2&ca=/ca.pem&key=/k.pem&sslpassword=hunter2");
        assert_eq!(
            said,
            "redis://h:1/?password=***&ca=/ca.pem&key=/k.pem&sslpassword=***"
        );
        let said = redact_urls("unexpected argument 'redis://u:hunter2@h:1' found");
        assert!(!said.contains("hunter2"), "{said}");
        assert!(said.contains("redis://u:***@h:1"), "{said}");
    }

    #[test]
    fn urls_may_leave_out_the_port_and_host_until_a_driver_requires_them() {
        for url in [
            "postgres://app:pw@db.internal/app",
            "postgresql:///app?host=/var/run/postgresql",
            "postgres://127.0.0.1:5432,127.0.0.2:5432/app?target_session_attrs=read-write",
        ] {
            let parsed = StoreUrl::parse(url).expect(url);
            assert!(!parsed.to_string().contains(":pw@"), "{parsed}");
        }
        let url = StoreUrl::parse("redis://db.internal/0").expect("the shape is right");
        assert!(url.require_host_ports().is_err());
        assert!(
            StoreUrl::parse("etcd://a:1,b:2")
                .expect("valid")
                .require_host_ports()
                .is_ok()
        );
    }

    #[test]
    fn bad_urls_are_invalid_config_naming_the_store() {
        for bad in [
            "",
            "etcd",
            "127.0.0.1:2379",
            "://x:1",
            "etcd://",
            "etcd:///prefix",
        ] {
            let err = StoreUrl::parse(bad)
                .and_then(|url| url.require_host_ports())
                .expect_err(bad);
            assert!(
                matches!(err, Error::InvalidConfig { name: "store", .. }),
                "{bad}: {err:?}"
            );
        }
    }
}

#[cfg(test)]
mod driver_helpers {
    use super::*;

    #[test]
    fn helpers_name_the_problem_and_hide_the_password() {
        let url = StoreUrl::parse("etcd://u:hunter2@h:1?ca=/no/such.pem&x=1").expect("valid");
        for err in [
            url.only_params(&["ca"]).expect_err("x is unknown"),
            url.only_params(&[]).expect_err("no parameters"),
            url.tls_files().expect_err("no such file"),
        ] {
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidConfig { name: "store", .. }));
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert_eq!(url.credentials().expect("both"), Some(("u", "hunter2")));
        let alone = StoreUrl::parse("etcd://u@h:1").expect("valid");
        assert!(alone.credentials().is_err());
        let cert_only = StoreUrl::parse("etcds://h:1?cert=/c.pem").expect("valid");
        assert!(cert_only.tls_files().is_err());
        assert_eq!(
            StoreUrl::scheme_of("Redis+Cluster://h:1").expect("valid"),
            "redis+cluster"
        );
        assert!(StoreUrl::scheme_of("h:1").is_err());
        assert_eq!(redact_url("s3cret"), "***");
        let files = StoreUrl::parse("etcds://h:1")
            .expect("valid")
            .tls_files()
            .expect("none");
        assert_eq!(
            format!("{files:?}"),
            "TlsFiles { ca: false, identity: false }"
        );
    }
}
