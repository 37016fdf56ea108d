//! The one error type of this workspace.

use std::time::Duration;

/// A boxed error from a store client, kept as the [`source`](std::error::Error::source) of
/// [`Error::Store`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in an election.
///
/// Store failures keep their cause as [`source`](std::error::Error::source): print an error
/// with `{:#}` (or walk the chain) to see it. Nothing here is ever turned into a string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operation needs this candidate to lead, and it does not (the Go original's
    /// `ErrNotALeader`).
    #[error("not a leader")]
    NotALeader,

    /// A builder or [`Config`](crate::Config) option makes no sense.
    #[error("invalid configuration: `{name}` {reason}")]
    InvalidConfig {
        /// The option's name, as in [`Config`](crate::Config).
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The store could not be reached or answered with an error. The operation may be
    /// retried; a held term survives such errors until its deadline.
    #[error("store request failed")]
    Store(#[source] BoxError),

    /// A store request got no answer in time.
    #[error("store request timed out after {0:?}")]
    Timeout(Duration),

    /// The store refused this client: bad credentials, or a permission it lacks (the
    /// source says which). Retrying cannot help, so [`Election::run`](crate::Election::run)
    /// returns it instead of campaigning again.
    #[error("the store refused the request: bad credentials or a missing permission")]
    Denied(#[source] BoxError),

    /// A campaign that waited in line was withdrawn by a concurrent
    /// [`resign`](crate::Election::resign) of the same candidate.
    #[error("the campaign was withdrawn by resign()")]
    Withdrawn,

    /// The store no longer holds this candidate's term: its key was deleted, expired, or
    /// taken over. Renewal cannot succeed; the candidate must campaign again.
    #[error("the store no longer holds this candidate's term")]
    TermGone,

    /// [`Election::hand_over`](crate::Election::hand_over) named a candidate that is not
    /// waiting in this election. Nothing changed.
    #[error("no candidate `{id}` is waiting in this election")]
    NotWaiting {
        /// The candidate id that was named.
        id: String,
    },

    /// A fence refused a write: the resource has already seen a higher fencing token than
    /// `token`, so the writer is a leader whose term has ended. Nothing was written.
    #[error("fenced: token {token} is stale for `{resource}`{}", newer.map(|n| format!(" (it has seen {n})")).unwrap_or_default())]
    Fenced {
        /// The fenced resource (a fence's name, or an etcd key).
        resource: String,
        /// The stale token the write carried.
        token: u64,
        /// The higher token the resource has seen, when the fence knows it.
        newer: Option<u64>,
    },

    /// This driver does not implement the operation.
    #[error("this store driver does not support {operation}")]
    Unsupported {
        /// The operation's name.
        operation: &'static str,
    },
}

impl Error {
    /// Wraps a store client's error as [`Error::Store`], keeping it as the source.
    pub fn store(err: impl Into<BoxError>) -> Self {
        Error::Store(err.into())
    }

    /// An [`Error::InvalidConfig`] for option `name`.
    pub fn invalid_config(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            name,
            reason: reason.into(),
        }
    }

    /// An [`Error::Denied`]: the store refused this client, for a reason that retrying
    /// cannot fix.
    pub fn denied(err: impl Into<BoxError>) -> Self {
        Error::Denied(err.into())
    }

    /// Whether retrying the same operation later could succeed (store errors, timeouts, a
    /// lost term, a withdrawn campaign), as opposed to a mistake in the call or a refusal
    /// by the store ([`Error::Denied`]).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Store(_) | Error::Timeout(_) | Error::TermGone | Error::Withdrawn
        )
    }
}

/// Displays an error with its chain of sources (`outer: cause: root cause`), for logs and
/// one-line messages: `tracing::warn!(error = %ErrorChain(&err), "…")`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn not_a_leader_displays_like_the_go_original() {
        assert_eq!(Error::NotALeader.to_string(), "not a leader");
    }

    #[test]
    fn store_error_keeps_its_source_and_does_not_repeat_it() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::store(io);
        assert_eq!(err.to_string(), "store request failed");
        let source = err.source().expect("store error has a source");
        assert_eq!(source.to_string(), "refused");
        assert!(err.is_transient());
    }

    #[test]
    fn denied_is_not_transient_and_keeps_its_source() {
        let err = Error::denied(std::io::Error::other("etcdserver: permission denied"));
        assert!(!err.is_transient());
        let source = err.source().expect("denied has a source");
        assert_eq!(source.to_string(), "etcdserver: permission denied");
    }

    #[test]
    fn invalid_config_names_the_option() {
        let err = Error::invalid_config("ttl", "must be at least 10ms");
        assert_eq!(
            err.to_string(),
            "invalid configuration: `ttl` must be at least 10ms"
        );
        assert!(!err.is_transient());
    }
}
