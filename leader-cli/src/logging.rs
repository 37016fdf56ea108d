//! Log lines on stderr: `leader run` logs its life at info, the libraries their warnings;
//! `--quiet` keeps warnings and errors only; `--log-format json` writes one object per line;
//! `RUST_LOG`, when set, decides instead.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The target of this command's own log lines (the libraries log under theirs).
pub(crate) const TARGET: &str = "leader_cli";

/// Installs the subscriber. `chatty`: log this command's steps at info.
pub(crate) fn init(format: LogFormat, quiet: bool, chatty: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if chatty && !quiet {
            "warn,leader_cli=info"
        } else {
            "warn"
        })
    });
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
