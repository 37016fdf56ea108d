//! Generates the man pages (`leader.1`, `leader-run.1`, …) and the shell completions (bash,
//! zsh, fish) from the clap definitions in `src/cli.rs`, so they never drift from the
//! command. They go to `$OUT_DIR/{man,completions}` and, for `cargo deb`, to
//! `target/<profile>/leader-assets/` (cargo-deb takes assets from `target/release/`).

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code, unused_macros)]
#[path = "src/cli.rs"]
mod cli;

fn main() -> std::io::Result<()> {
    println!("cargo::rerun-if-changed=src/cli.rs");
    println!("cargo::rerun-if-changed=build.rs");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| {
            std::io::Error::other("OUT_DIR is not set: build.rs runs under cargo")
        })?);
    write_assets(&out)?;
    // target/<profile>/build/leader-cli-<hash>/out -> target/<profile>/leader-assets
    if let Some(profile_dir) = out.ancestors().nth(3) {
        write_assets(&profile_dir.join("leader-assets"))?;
    }
    Ok(())
}

fn write_assets(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    // No page of a subcommand that no longer exists.
    if man.exists() {
        std::fs::remove_dir_all(&man)?;
    }
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;

    let mut command = cli::Cli::command();
    command.build();
    write_man(&man, "leader", command.clone())?;
    for sub in command.get_subcommands() {
        // `man leader-run`: the page of one subcommand, named as git names its own.
        let name: &'static str = Box::leak(format!("leader-{}", sub.get_name()).into_boxed_str());
        let page = sub.clone().name(name).version(env!("CARGO_PKG_VERSION"));
        write_man(&man, name, page)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "leader", &completions)?;
    }
    Ok(())
}

fn write_man(dir: &Path, name: &str, command: clap::Command) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .section("1")
        .manual("leader manual")
        .source(concat!("leader ", env!("CARGO_PKG_VERSION")))
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)
}
