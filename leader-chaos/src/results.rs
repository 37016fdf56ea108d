//! Results files anyone can reproduce, and the README tables made from them.
//!
//! `ci/soak` has each chaos run write its [`Report::json`](crate::Report::json) into a
//! folder; [`soak`] gathers them into `docs/results/soak.json` (with the machine and the
//! code they ran on) and `docs/results/soak.md`. Every results file has the shape
//!
//! ```json
//! {"meta": {"date": "...", "commit": "...", "nproc": 2, "memory": "...", "versions": {...}},
//!  "figures": {"etcd.overlapping_terms": {"value": 0, "goal": "0", "unit": "pairs"}, ...}}
//! ```
//!
//! (`ci/bench` writes `docs/results/bench.json` the same way), and [`readme_tables`]
//! renders each one between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in the
//! README: `ci/readme-tables` writes them, `ci/readme-tables --check` (run by `ci/test`)
//! fails when the README and the results files disagree.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::BoxResult;

/// The machine and the code a run used: date (UTC), commit, `nproc`, memory, and the
/// stores' versions, each read from the system (what cannot be read says so).
pub fn meta(command: &str) -> Value {
    let run = |program: &str, args: &[&str]| -> String {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| {
                let text = String::from_utf8_lossy(&out.stdout);
                text.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_else(|| "unknown".to_owned())
    };
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let postgres = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|dirs| {
            let mut bins: Vec<_> = dirs
                .flatten()
                .map(|d| d.path().join("bin/postgres"))
                .filter(|p| p.is_file())
                .collect();
            bins.sort();
            bins.pop()
        })
        .map(|bin| run(&bin.to_string_lossy(), &["--version"]))
        .unwrap_or_else(|| run("postgres", &["--version"]));
    json!({
        "date": run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": run("git", &["rev-parse", "HEAD"]),
        "command": command,
        "nproc": run("nproc", &[]).parse::<u64>().ok(),
        "memory": memory,
        "versions": {
            "etcd": run("etcd", &["--version"]),
            "redis": run("redis-server", &["--version"]),
            "postgres": postgres,
            "rustc": run("rustc", &["--version"]),
        },
    })
}

/// Gathers the runs' JSON files in `runs` (one per run, [`Report::json`](crate::Report::json),
/// its figures prefixed with the file's name)
/// into `out/soak.json` and `out/soak.md`, with [`meta`] for `command`. `extra` are
/// figures measured outside the chaos runs (the simulation's seeds and violations).
///
/// # Errors
///
/// If a file cannot be read, parsed or written.
pub fn soak(
    runs: &Path,
    out: &Path,
    command: &str,
    extra: &[(String, f64, String)],
) -> BoxResult<()> {
    let mut files: Vec<_> = std::fs::read_dir(runs)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut figures = Map::new();
    for (name, value, goal) in extra {
        figures.insert(
            name.clone(),
            json!({"value": value, "goal": goal, "unit": ""}),
        );
    }
    let mut reports = Vec::new();
    for file in &files {
        let report: Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
        // Named by the file: `etcd.json` gives `etcd.*`, `clock-postgres.json`
        // `clock-postgres.*`.
        let run = file
            .file_stem()
            .and_then(|stem| stem.to_str())
            .ok_or("a run file without a name")?;
        if let Some(own) = report["figures"].as_object() {
            for (name, figure) in own {
                figures.insert(format!("{run}.{name}"), figure.clone());
            }
        }
        reports.push(report);
    }
    let meta = meta(command);
    let results = json!({"meta": meta, "figures": figures, "runs": reports});
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    std::fs::write(out.join("soak.md"), soak_markdown(&results))?;
    Ok(())
}

/// `soak.md`: where the figures come from, the figures, and each run's table.
fn soak_markdown(results: &Value) -> String {
    let meta = &results["meta"];
    let mut md = String::from("# Soak results\n\n");
    md.push_str(
        "Written by `ci/soak` (through `chaos-results soak`); never edited by hand. The \
         README's soak table is generated from `soak.json` by `ci/readme-tables`.\n\n",
    );
    md.push_str(&meta_line(meta));
    md.push_str("\n\n## Figures\n\n");
    md.push_str(&table(results));
    if let Some(runs) = results["runs"].as_array() {
        for run in runs {
            md.push_str(&format!(
                "\n## {}\n\n```text\n{}```\n",
                run["store"].as_str().unwrap_or("?"),
                run["table"].as_str().unwrap_or_default()
            ));
            let tampering = run["check"]["tampering"].as_array().map_or(0, Vec::len);
            if tampering > 0 {
                md.push_str(&format!(
                    "\nEvery tampering ({tampering}) and each overlap after it are listed in \
                     `soak.json` (`runs[].check.tampering`, `overlaps_after_tampering`).\n"
                ));
            }
        }
    }
    md
}

/// One line saying when, where and on what code a results file was made.
fn meta_line(meta: &Value) -> String {
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    let commit = text(&meta["commit"]);
    // Uncommitted changes stay visible in the short form.
    let dirty = if commit.ends_with("-dirty") {
        "-dirty"
    } else {
        ""
    };
    let short = format!("{}{dirty}", commit.get(..12).unwrap_or(&commit));
    // bench.json names its mode, not its command.
    let command = match (meta["command"].as_str(), meta["mode"].as_str()) {
        (Some(command), _) => command.to_owned(),
        (None, Some("quick")) => "ci/bench --quick".to_owned(),
        (None, Some(_)) => "ci/bench".to_owned(),
        (None, None) => text(&meta["command"]),
    };
    let mut line = format!(
        "`{command}` on {}, commit `{short}`, {} CPUs, {} memory",
        text(&meta["date"]),
        text(&meta["nproc"]),
        text(&meta["memory"]),
    );
    if let Some(versions) = meta["versions"].as_object() {
        let list: Vec<String> = versions
            .iter()
            .map(|(name, v)| format!("{name}: {}", text(v)))
            .collect();
        line.push_str(&format!("; {}", list.join(", ")));
    }
    line.push('.');
    line
}

/// Whether `value` meets `goal` when the goal is a plain comparison (`0`, `<= 2.5 s`,
/// `>= 5`); `None` when the goal is words.
fn meets(value: f64, goal: &str) -> Option<bool> {
    let goal = goal.trim();
    let (op, rest) = ["<=", ">=", "<", ">", "="]
        .iter()
        .find_map(|op| goal.strip_prefix(op).map(|rest| (*op, rest)))
        .unwrap_or(("=", goal));
    let number: f64 = rest.split_whitespace().next()?.parse().ok()?;
    // A goal with words after its number and its unit is not a plain comparison.
    if rest.split_whitespace().count() > 2 {
        return None;
    }
    Some(match op {
        "<=" => value <= number,
        ">=" => value >= number,
        "<" => value < number,
        ">" => value > number,
        _ => value == number,
    })
}

fn number(value: &Value) -> String {
    match value.as_f64() {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
        Some(v) => format!("{v}"),
        None => value.to_string(),
    }
}

/// The figures of a results file as a Markdown table: figure, value, goal, met.
pub fn table(results: &Value) -> String {
    let mut out = String::from("| figure | value | goal | met |\n|---|---|---|---|\n");
    if let Some(figures) = results["figures"].as_object() {
        for (name, figure) in figures {
            let value = &figure["value"];
            let unit = figure["unit"].as_str().unwrap_or_default();
            let goal = figure["goal"].as_str().unwrap_or_default();
            let met = match value.as_f64().and_then(|v| meets(v, goal)) {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            out.push_str(&format!(
                "| {name} | {} {unit} | {goal} | {met} |\n",
                number(value)
            ));
        }
    }
    out
}

/// The block between a README's markers for results file `name`.
fn block(name: &str, results: Option<&Value>) -> String {
    match results {
        Some(results) => format!(
            "\n<!-- generated by ci/readme-tables from docs/results/{name}.json: do not edit -->\n{}\n\n{}",
            meta_line(&results["meta"]),
            table(results)
        ),
        None => format!("\n(no docs/results/{name}.json yet: run ci/{name})\n"),
    }
}

/// The README with every `<!-- results:NAME -->` … `<!-- /results:NAME -->` block
/// regenerated from `results_dir/NAME.json`.
///
/// # Errors
///
/// A results file that cannot be parsed, or markers that do not pair up.
pub fn readme_tables(readme: &str, results_dir: &Path) -> BoxResult<String> {
    let mut out = String::new();
    let mut rest = readme;
    while let Some(start) = rest.find("<!-- results:") {
        let open_end = rest[start..]
            .find("-->")
            .ok_or("an unclosed <!-- results: marker")?
            + start
            + 3;
        let name = rest[start + "<!-- results:".len()..open_end - 3].trim();
        let close = format!("<!-- /results:{name} -->");
        let close_at = rest[open_end..]
            .find(&close)
            .ok_or_else(|| format!("no {close} after <!-- results:{name} -->"))?
            + open_end;
        let path = results_dir.join(format!("{name}.json"));
        let results: Option<Value> = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                serde_json::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?,
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => return Err(err.into()),
        };
        out.push_str(&rest[..open_end]);
        out.push_str(&block(name, results.as_ref()));
        out.push_str(&close);
        rest = &rest[close_at + close.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_compared_when_they_are_plain() {
        assert_eq!(meets(0.0, "0"), Some(true));
        assert_eq!(meets(1.0, "0"), Some(false));
        assert_eq!(meets(2.4, "<= 2.5 s"), Some(true));
        assert_eq!(meets(4.0, ">= 5"), Some(false));
        assert_eq!(meets(1.0, ""), None);
        assert_eq!(meets(1.0, "each ending <= 20 ms after it"), None);
    }

    #[test]
    fn blocks_between_markers_are_regenerated_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("bench.json"),
            r#"{"meta": {"date": "d", "commit": "0123456789abcdef", "nproc": 2, "memory": "1 GiB", "versions": {"etcd": "3.5"}},
                "figures": {"etcd.requests_per_handoff.1000_waiting": {"value": 6.9, "goal": "<= 10", "unit": "requests"}}}"#,
        )
        .expect("write");
        let readme = "intro\n<!-- results:bench -->\nold\n<!-- /results:bench -->\nmiddle\n\
                      <!-- results:soak -->\n<!-- /results:soak -->\nend\n";
        let new = readme_tables(readme, dir.path()).expect("rendered");
        assert!(new.starts_with("intro\n<!-- results:bench -->\n"));
        assert!(
            new.contains("| etcd.requests_per_handoff.1000_waiting | 6.9 requests | <= 10 | yes |")
        );
        assert!(new.contains("commit `0123456789ab`"));
        assert!(new.contains("no docs/results/soak.json yet"));
        assert!(new.ends_with("<!-- /results:soak -->\nend\n"));
        assert!(!new.contains("old"));
        // Rendering again changes nothing.
        assert_eq!(readme_tables(&new, dir.path()).expect("again"), new);
        assert!(readme_tables("<!-- results:x -->", dir.path()).is_err());
    }
}
