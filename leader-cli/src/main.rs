//! `leader`: runs any program on exactly one machine at a time, and tells who leads.
//!
//! See `leader --help`, `man leader` and the crate README.

mod check;
mod cli;
mod errors;
mod logging;
mod query;
mod run;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Commands, NO_LEADER, OK, USAGE};
use crate::errors::say;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            say("a command is needed: run, observe, who or check (see leader --help)");
            return ExitCode::from(USAGE);
        }
        Err(err) if err.use_stderr() => {
            // One line: the error, and what it refers to when clap puts that on the next;
            // a store URL the user typed keeps its password to itself.
            let text = leader::redact_urls(&err.to_string());
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ")
                .to_owned();
            if line.ends_with(':')
                && let Some(next) = lines.next()
            {
                line = format!("{line} {next}");
            }
            say(&line);
            return ExitCode::from(USAGE);
        }
        Err(err) => {
            // --help, --version.
            let _ = err.print();
            return ExitCode::from(OK);
        }
    };
    let chatty = matches!(cli.command, Commands::Run(_));
    logging::init(cli.log_format, cli.quiet, chatty);
    if let Commands::Check(args) = &cli.command {
        return check::check(args);
    }
    // One thread: the child is spawned by the thread that lives as long as the process,
    // so its parent-death signal fires only when `leader` itself dies.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            say(&format!("cannot start: {err}"));
            return ExitCode::from(NO_LEADER);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Commands::Run(args) => run::run(args).await,
            Commands::Observe(args) => query::observe(args).await,
            Commands::Who(args) => query::who(args).await,
            Commands::Candidates(args) => query::candidates(args).await,
            Commands::Check(args) => check::check(&args),
        }
    })
}
