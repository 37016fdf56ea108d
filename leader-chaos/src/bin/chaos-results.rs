//! Results files and README tables (see `leader_chaos::results`).
//!
//! ```text
//! chaos-results soak RUNS_DIR OUT_DIR --command "ci/soak 5" [--figure NAME=VALUE:GOAL]...
//! chaos-results readme-tables [--check] [--readme README.md] [--results docs/results]
//! ```

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Results files of the chaos soak, and the README's tables made from them.
#[derive(Debug, Parser)]
#[command(name = "chaos-results")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Gathers the chaos runs' JSON files into soak.json and soak.md.
    Soak {
        /// The folder the runs wrote their JSON into (CHAOS_RESULTS_DIR).
        runs: PathBuf,
        /// Where soak.json and soak.md go.
        out: PathBuf,
        /// The command that produced the runs, as written in the results.
        #[arg(long)]
        command: String,
        /// A figure measured outside the chaos runs: NAME=VALUE:GOAL.
        #[arg(long = "figure", value_parser = parse_figure)]
        figures: Vec<(String, f64, String)>,
    },
    /// Regenerates the README's tables between `<!-- results:NAME -->` markers.
    ReadmeTables {
        /// Fail, changing nothing, if the README differs from what the results give.
        #[arg(long)]
        check: bool,
        /// The README.
        #[arg(long, default_value = "README.md")]
        readme: PathBuf,
        /// The folder of the results files.
        #[arg(long, default_value = "docs/results")]
        results: PathBuf,
    },
}

fn parse_figure(s: &str) -> Result<(String, f64, String), String> {
    let (name, rest) = s.split_once('=').ok_or("expected NAME=VALUE:GOAL")?;
    let (value, goal) = rest.split_once(':').unwrap_or((rest, ""));
    let value = value
        .parse()
        .map_err(|err| format!("{value:?} is not a number: {err}"))?;
    Ok((name.to_owned(), value, goal.to_owned()))
}

fn main() {
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match Args::parse().command {
        Command::Soak {
            runs,
            out,
            command,
            figures,
        } => leader_chaos::results::soak(&runs, &out, &command, &figures),
        Command::ReadmeTables {
            check,
            readme,
            results,
        } => (|| {
            let text = std::fs::read_to_string(&readme)?;
            let new = leader_chaos::results::readme_tables(&text, &results)?;
            if check {
                if new != text {
                    return Err(format!(
                        "{} does not match {}: run ci/readme-tables and commit the result",
                        readme.display(),
                        results.display()
                    )
                    .into());
                }
            } else if new != text {
                std::fs::write(&readme, new)?;
            }
            Ok(())
        })(),
    };
    if let Err(err) = result {
        eprintln!("chaos-results: {err}");
        std::process::exit(1);
    }
}
