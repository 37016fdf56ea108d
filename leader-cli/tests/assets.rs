//! The man pages and shell completions build.rs generates: present, and in step with the
//! command's own help (they come from the same clap definitions).

use std::path::Path;
use std::process::Command;

const OUT: &str = env!("OUT_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_leader");

fn asset(path: &str) -> String {
    let path = Path::new(OUT).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The long flags `leader ARGS --help` lists.
fn flags(args: &[&str]) -> Vec<String> {
    let output = Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .expect("leader --help");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(|word| {
            word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .collect()
}

#[test]
fn each_subcommand_has_a_man_page_with_every_flag_of_its_help() {
    let main = asset("man/leader.1");
    assert!(main.contains("Exit status"), "the exit statuses: {main}");
    for sub in ["run", "observe", "who", "candidates", "check"] {
        let page = asset(&format!("man/leader-{sub}.1"));
        assert!(main.contains(&format!("leader\\-{sub}")), "{sub} listed");
        for flag in flags(&[sub]) {
            // roff escapes each `-` as `\-`.
            let roff = flag.replace('-', "\\-");
            assert!(page.contains(&roff), "leader-{sub}.1 lacks {flag}");
        }
    }
    assert!(!Path::new(OUT).join("man/leader-help.1").exists());
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_subcommand_and_flag() {
    for file in [
        "completions/leader.bash",
        "completions/_leader",
        "completions/leader.fish",
    ] {
        let script = asset(file);
        for sub in ["run", "observe", "who", "candidates", "check"] {
            assert!(script.contains(sub), "{file} lacks {sub}");
            for flag in flags(&[sub]) {
                let bare = flag.trim_start_matches('-');
                assert!(script.contains(bare), "{file} lacks {flag} of {sub}");
            }
        }
    }
}
