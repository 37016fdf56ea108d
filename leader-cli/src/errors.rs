//! Errors as `leader` prints them: one line, each cause once, outermost first, the store's
//! address without its password, and the exit status each kind of error gets.

use std::process::ExitCode;

use leader::{Error, StoreUrl};

use crate::cli::{NO_LEADER, STORE, USAGE};

/// The exit status for `err`: bad configuration is a usage error (2); a store that could
/// not be asked, or refused us, is 3.
pub(crate) fn status_of(err: &Error) -> u8 {
    match err {
        Error::InvalidConfig { .. } => USAGE,
        Error::NotALeader | Error::Withdrawn => NO_LEADER,
        _ => STORE,
    }
}

/// Prints `leader: {what} ({store}): {err}` on one line; returns the exit status for it.
pub(crate) fn fail(what: &str, store: Option<&StoreUrl>, err: &Error) -> ExitCode {
    let at = store.map(|url| format!(" at {url}")).unwrap_or_default();
    let hint = match err {
        Error::Store(_) | Error::Timeout(_) => {
            "; check that the store runs and is reachable from here"
        }
        _ => "",
    };
    say(&format!("{what}{at}: {}{hint}", one_line(err)));
    ExitCode::from(status_of(err))
}

/// Prints `leader: {line}` on stderr.
pub(crate) fn say(line: &str) {
    eprintln!("leader: {}", flatten(line));
}

/// `err` and its causes on one line, outermost first; a cause whose text an outer error
/// already printed is left out, so that nothing is said twice.
pub(crate) fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = flatten(&err.to_string());
    let mut source = err.source();
    while let Some(cause) = source {
        let text = flatten(&cause.to_string());
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// `text` with its line breaks (and the blanks around them) replaced by "; ".
fn flatten(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The schemes this build of `leader` can connect to, as the `leader` crate lists them in
/// its error for an unknown scheme (the one place that knows the stores).
async fn available_schemes() -> Option<String> {
    match leader::connect("leader-cli-no-such-scheme://127.0.0.1:1").await {
        Err(Error::InvalidConfig { reason, .. }) => reason
            .split_once("available: ")
            .map(|(_, schemes)| schemes.to_owned()),
        _ => None,
    }
}

/// Parses `--store`. An unknown scheme is named as such, with the schemes this build has,
/// before anything else about the URL is checked.
pub(crate) async fn parse_store(url: &str) -> Result<StoreUrl, ExitCode> {
    if let Some((scheme, _)) = url.split_once("://")
        && let Some(available) = available_schemes().await
    {
        let wanted = format!("{}://", scheme.to_ascii_lowercase());
        if !available.split(", ").any(|known| known == wanted) {
            say(&format!(
                "bad --store: unknown scheme `{wanted}` in `{}`; this build has {available}",
                leader::redact_urls(url)
            ));
            return Err(ExitCode::from(USAGE));
        }
    }
    StoreUrl::parse(url).map_err(|err| fail("bad --store", None, &err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn each_cause_once_and_one_line() {
        let err = Layer(
            "store request failed",
            Some(Box::new(Layer(
                "Connection refused (os error 111)",
                Some(Box::new(Layer("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            one_line(&err),
            "store request failed: Connection refused (os error 111)"
        );
        let err = Layer("Parse error at 1\nUnexpected `84`\n", None);
        assert_eq!(one_line(&err), "Parse error at 1; Unexpected `84`");
    }

    #[test]
    fn exit_statuses_by_kind() {
        assert_eq!(status_of(&Error::invalid_config("store", "bad")), USAGE);
        assert_eq!(status_of(&Error::store(std::io::Error::other("x"))), STORE);
        assert_eq!(
            status_of(&Error::Timeout(std::time::Duration::from_secs(1))),
            STORE
        );
        assert_eq!(status_of(&Error::denied(std::io::Error::other("x"))), STORE);
    }

    #[tokio::test]
    async fn the_leader_crate_lists_its_schemes() {
        let schemes = available_schemes().await.expect("a list of schemes");
        for scheme in [
            "etcd://",
            "etcds://",
            "redis://",
            "rediss://",
            "postgres://",
        ] {
            assert!(schemes.split(", ").any(|s| s == scheme), "{schemes}");
        }
    }
}
