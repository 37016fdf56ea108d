//! How etcd's errors become [`leader_core::Error`]s.

use etcd_client::Error as EtcdError;
use leader_core::Error;
pub(crate) use leader_core::ErrorChain;
use tonic::Code;

/// The messages of etcd's refusals that retrying cannot fix: a missing permission, bad or
/// missing credentials. etcd sends some of them with a generic status code
/// (`InvalidArgument`), so the message is what identifies them.
const DENIED_MESSAGES: &[&str] = &[
    "etcdserver: permission denied",
    "etcdserver: user name or password is invalid",
    // etcd's own wording of a failed authentication (`rpctypes.ErrGRPCAuthFailed`).
    "etcdserver: authentication failed, invalid user ID or password",
    // Authentication is enabled and this client sent no credentials.
    "etcdserver: user name is empty",
];

/// An expired or revoked token: a client with credentials gets a new one (etcd-client does
/// with `ConnectOptions::with_auto_token_refresh`), so it is worth retrying.
const REFRESHABLE_MESSAGE: &str = "etcdserver: invalid auth token";

/// An etcd client error as this crate's error: [`Error::Denied`] for refusals that retrying
/// cannot fix (see [`is_denied`]), [`Error::Store`] for everything else.
pub(crate) fn from_etcd(err: EtcdError) -> Error {
    if is_denied(&err) {
        Error::denied(Failure(err))
    } else {
        Error::store(Failure(err))
    }
}

/// An etcd client error, printed on one line with each cause once: etcd-client's own
/// `Display` of a gRPC status ends in a `Debug` dump of its transport error, and its
/// errors return no [`source`](std::error::Error::source). This one says the gRPC code and
/// message, and returns the root cause (an I/O or TLS error, say) as its source, unless the
/// message already says it.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) EtcdError);

impl Failure {
    /// The innermost cause behind the client's error, if it has one.
    fn root(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let mut cause: &(dyn std::error::Error + 'static) = match &self.0 {
            EtcdError::GRpcStatus(status) => std::error::Error::source(status)?,
            EtcdError::TransportError(err) => std::error::Error::source(err)?,
            EtcdError::IoError(err) => std::error::Error::source(err)?,
            _ => return None,
        };
        while let Some(next) = cause.source() {
            cause = next;
        }
        // A status whose message already says it (tonic puts its source's text there).
        let said = match &self.0 {
            EtcdError::GRpcStatus(status) => status.message(),
            _ => "",
        };
        (!said.contains(&cause.to_string())).then_some(cause)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            EtcdError::GRpcStatus(status) if status.message().is_empty() => {
                write!(f, "etcd: gRPC status {:?}", status.code())
            }
            EtcdError::GRpcStatus(status) => {
                write!(
                    f,
                    "etcd: gRPC status {:?}: {}",
                    status.code(),
                    status.message()
                )
            }
            EtcdError::TransportError(_) => f.write_str("etcd: transport error"),
            other => write!(f, "etcd: {other}"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.root()
    }
}

/// Whether etcd refused the request for a reason that retrying cannot fix: gRPC status
/// `PermissionDenied` or `Unauthenticated`, or one of etcd's messages for a missing
/// permission or bad credentials. An invalid (expired) auth token is not one of them: the
/// client can authenticate again.
pub(crate) fn is_denied(err: &EtcdError) -> bool {
    let (code, message) = match err {
        EtcdError::GRpcStatus(status) => (Some(status.code()), status.message().to_owned()),
        other => (None, other.to_string()),
    };
    if message.contains(REFRESHABLE_MESSAGE) {
        return false;
    }
    matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated))
        || DENIED_MESSAGES
            .iter()
            .any(|denied| message.contains(denied))
}

/// An etcd refusal, with what the client needs: the permission on the election's keys, or
/// valid credentials.
#[derive(Debug)]
pub(crate) struct Refusal {
    source: leader_core::BoxError,
    prefix: String,
}

impl Refusal {
    pub(crate) fn new(source: leader_core::BoxError, prefix: String) -> Self {
        Refusal { source, prefix }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let said = ErrorChain(self.source.as_ref()).to_string();
        let prefix = &self.prefix;
        if said.contains("permission denied") {
            write!(
                f,
                "{said}: the etcd user needs read and write on the keys under `{prefix}` \
                 (etcdctl role grant-permission ROLE readwrite {prefix} --prefix)"
            )
        } else {
            write!(
                f,
                "{said}: etcd refused the credentials (check the user and password, or the \
                 client certificate)"
            )
        }
    }
}

impl std::error::Error for Refusal {}

/// The error of a watch that etcd cancelled with `reason` (its `cancel_reason`), through
/// [`from_etcd`]: a refusal such as "permission denied" is [`Error::Denied`], anything
/// else a store error.
pub(crate) fn watch_cancelled(reason: &str) -> Error {
    let reason = if reason.is_empty() {
        "no reason given"
    } else {
        reason
    };
    from_etcd(EtcdError::WatchError(format!(
        "etcd cancelled the watch: {reason}"
    )))
}

/// A store error for something etcd did that the protocol does not expect.
pub(crate) fn unexpected(what: impl Into<String>) -> Error {
    Error::store(std::io::Error::other(what.into()))
}

/// Whether etcd says the lease does not exist (expired or revoked).
pub(crate) fn is_lease_not_found(err: &EtcdError) -> bool {
    match err {
        EtcdError::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        EtcdError::GRpcStatus(status) => status.message().contains("lease not found"),
        _ => false,
    }
}

/// Whether `err` is an etcd "lease not found" wrapped as a store error.
pub(crate) fn says_lease_not_found(err: &Error) -> bool {
    matches!(err, Error::Store(source)
        if source.downcast_ref::<Failure>().is_some_and(|failure| is_lease_not_found(&failure.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    fn status(code: Code, message: &str) -> EtcdError {
        EtcdError::GRpcStatus(Status::new(code, message))
    }

    #[test]
    fn permission_and_authentication_codes_are_denied() {
        assert!(matches!(
            from_etcd(status(
                Code::PermissionDenied,
                "etcdserver: permission denied"
            )),
            Error::Denied(_)
        ));
        assert!(matches!(
            from_etcd(status(Code::Unauthenticated, "some proxy says no")),
            Error::Denied(_)
        ));
    }

    #[test]
    fn etcd_refusal_messages_are_denied_whatever_the_code() {
        for message in [
            "etcdserver: permission denied",
            "etcdserver: user name or password is invalid",
            "etcdserver: authentication failed, invalid user ID or password",
            "etcdserver: user name is empty",
        ] {
            let err = from_etcd(status(Code::InvalidArgument, message));
            assert!(matches!(err, Error::Denied(_)), "{message}: {err:?}");
            assert!(!err.is_transient(), "{message}");
        }
        // The same text outside a gRPC status (e.g. in a keep-alive or watch error).
        let err = from_etcd(EtcdError::WatchError(
            "etcdserver: permission denied".to_owned(),
        ));
        assert!(matches!(err, Error::Denied(_)), "{err:?}");
    }

    #[test]
    fn an_invalid_auth_token_is_retried() {
        // etcd sends it as Unauthenticated, but a client with credentials can refresh it.
        let err = from_etcd(status(
            Code::Unauthenticated,
            "etcdserver: invalid auth token",
        ));
        assert!(matches!(err, Error::Store(_)), "{err:?}");
        assert!(err.is_transient());
    }

    #[test]
    fn other_failures_are_store_errors_that_keep_their_source() {
        for err in [
            status(Code::Unavailable, "etcdserver: no leader"),
            status(Code::DeadlineExceeded, "etcdserver: request timed out"),
            status(Code::NotFound, "etcdserver: requested lease not found"),
            EtcdError::LeaseKeepAliveError("lease not found".to_owned()),
        ] {
            let text = err.to_string();
            let mapped = from_etcd(err);
            assert!(matches!(mapped, Error::Store(_)), "{text}: {mapped:?}");
            let source = std::error::Error::source(&mapped).expect("a source");
            let said = source.to_string();
            assert!(said.starts_with("etcd: "), "{said}");
            assert!(
                said.contains("lease not found") || said.contains("etcdserver:"),
                "{said}"
            );
        }
    }

    #[test]
    fn a_status_with_a_transport_cause_is_one_line_without_debug() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(io));
        let err = from_etcd(EtcdError::GRpcStatus(status));
        let chain = ErrorChain(&err).to_string();
        assert!(!chain.contains("Os {"), "{chain}");
        assert!(chain.contains("connection refused"), "{chain}");
        assert_eq!(chain.matches("connection refused").count(), 1, "{chain}");
    }

    #[test]
    fn a_watch_cancelled_for_lack_of_permission_is_denied() {
        let err = watch_cancelled("etcdserver: permission denied");
        assert!(matches!(err, Error::Denied(_)), "{err:?}");
        let err = watch_cancelled("etcdserver: no leader");
        assert!(matches!(err, Error::Store(_)), "{err:?}");
        assert!(err.is_transient());
        let err = watch_cancelled("");
        assert!(matches!(err, Error::Store(_)), "{err:?}");
    }

    #[test]
    fn lease_not_found_is_recognised_through_the_store_error() {
        let err = from_etcd(status(
            Code::NotFound,
            "etcdserver: requested lease not found",
        ));
        assert!(says_lease_not_found(&err));
        assert!(!says_lease_not_found(&from_etcd(status(
            Code::Unavailable,
            "etcdserver: no leader"
        ))));
    }
}
