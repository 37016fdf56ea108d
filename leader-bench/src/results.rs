//! The figures of one run, and the two files they are written to: `bench.json` (for
//! `ci/readme-tables` and for checks) and `bench.md` (for people).
//!
//! Every number is recorded once, as a [`Figure`] under a dotted key
//! (`postgres.requests_per_handoff.1000_waiting`); `bench.json` shows each figure three
//! ways from that one record: under `figures` with its goal and unit, as a plain number
//! under its dotted key at the top level, and in a tree (`postgres` → `requests_per_handoff`
//! → `1000_waiting`). The per-store table of `bench.md` is formatted from the same values.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::BoxResult;
use leader_chaos::StoreKind;

/// What a figure should be.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Goal {
    /// Context, no goal.
    None,
    /// At most this.
    AtMost(f64),
}

impl Goal {
    fn text(self) -> String {
        match self {
            Goal::None => String::new(),
            Goal::AtMost(limit) => format!("<= {limit}"),
        }
    }

    fn met(self, value: f64) -> Option<bool> {
        match self {
            Goal::None => None,
            Goal::AtMost(limit) => Some(value <= limit),
        }
    }
}

/// One number of the run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Figure {
    /// The number.
    pub(crate) value: f64,
    /// The goal, as text (`"<= 10"`), empty if none.
    pub(crate) goal: String,
    /// What it counts (`"ms"`, `"requests"`, `"x TTL"`, ...).
    pub(crate) unit: String,
    /// What it means, for bench.md (not in the JSON).
    #[serde(skip)]
    what: String,
    #[serde(skip)]
    kind: Goal,
}

/// The run's machine and software.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Meta {
    /// When the run finished (UTC, RFC 3339).
    pub(crate) date: String,
    /// `git rev-parse HEAD`, with `-dirty` if the work tree had changes.
    pub(crate) commit: String,
    /// Cores available to the bench.
    pub(crate) nproc: usize,
    /// The machine's memory, e.g. `"23.5 GiB"`.
    pub(crate) memory: String,
    /// The processor's model name.
    pub(crate) cpu: String,
    /// etcd, redis, postgres (the servers' own answers) and rustc.
    pub(crate) versions: BTreeMap<String, String>,
    /// `"full"` or `"quick"` (smaller samples).
    pub(crate) mode: String,
    /// How long the run took, in seconds.
    pub(crate) seconds: u64,
}

/// A row of the per-store table in bench.md.
struct Row {
    measurement: String,
    cells: [String; 3],
}

/// Everything one run found.
#[derive(Default)]
pub(crate) struct Results {
    figures: BTreeMap<String, Figure>,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Results {
    /// Records a figure; the key's last part must not be another figure's parent.
    pub(crate) fn figure(&mut self, key: &str, value: f64, unit: &str, goal: Goal, what: &str) {
        self.figures.insert(
            key.to_owned(),
            Figure {
                value,
                goal: goal.text(),
                unit: unit.to_owned(),
                what: what.to_owned(),
                kind: goal,
            },
        );
    }

    /// Gives a recorded figure a goal (nothing if it was not recorded).
    pub(crate) fn set_goal(&mut self, key: &str, goal: Goal) {
        if let Some(figure) = self.figures.get_mut(key) {
            figure.goal = goal.text();
            figure.kind = goal;
        }
    }

    /// A figure recorded earlier.
    pub(crate) fn get(&self, key: &str) -> Option<f64> {
        self.figures.get(key).map(|f| f.value)
    }

    /// A row of the per-store table: one cell per store, in [`StoreKind::ALL`]'s order.
    pub(crate) fn row(&mut self, measurement: impl Into<String>, cells: [String; 3]) {
        self.rows.push(Row {
            measurement: measurement.into(),
            cells,
        });
    }

    /// A line for bench.md's notes (how something was measured, what to read into it).
    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The JSON document: `meta`, `figures`, and each figure flat and nested.
    pub(crate) fn json(&self, meta: &Meta) -> BoxResult<Value> {
        let mut root = Map::new();
        root.insert("meta".into(), serde_json::to_value(meta)?);
        root.insert("figures".into(), serde_json::to_value(&self.figures)?);
        for (key, figure) in &self.figures {
            if !key.contains('.') {
                return Err(format!("{key}: a figure's key is dotted (store.measurement)").into());
            }
            let number = serde_json::Number::from_f64(figure.value)
                .ok_or_else(|| format!("{key} is not a finite number: {}", figure.value))?;
            root.insert(key.clone(), Value::Number(number.clone()));
            let mut node = &mut root;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    if node
                        .insert(part.to_owned(), Value::Number(number))
                        .is_some()
                    {
                        return Err(format!("{key} is also a group of figures").into());
                    }
                    break;
                }
                let child = node
                    .entry(part.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                node = child
                    .as_object_mut()
                    .ok_or_else(|| format!("{key}: {part} is also a figure"))?;
            }
        }
        Ok(Value::Object(root))
    }

    /// bench.md: where the figures came from, the goals, the per-store table, every figure.
    pub(crate) fn markdown(&self, meta: &Meta) -> BoxResult<String> {
        let mut md = String::new();
        writeln!(md, "# ci/bench results\n")?;
        writeln!(
            md,
            "Written by `ci/bench` (leader-bench), {mode} run of {minutes:.1} min, finished {date}, \
             on commit `{commit}`: {nproc} cores ({cpu}), {memory} of memory, shared with other \
             builds, so ratios measured beside a baseline in the same run say more than absolute \
             times. Versions: {versions}. The machine-readable figures are in `bench.json`; the \
             charts in `docs/bench-*.svg` come from the same run.\n",
            mode = meta.mode,
            minutes = meta.seconds as f64 / 60.0,
            date = meta.date,
            commit = meta.commit,
            nproc = meta.nproc,
            cpu = meta.cpu,
            memory = meta.memory,
            versions = meta
                .versions
                .iter()
                .map(|(name, version)| format!("{name} {version}"))
                .collect::<Vec<_>>()
                .join(", "),
        )?;
        writeln!(md, "## Goals\n")?;
        writeln!(md, "| figure | value | goal | |\n|---|---|---|---|")?;
        for (key, f) in self.figures.iter().filter(|(_, f)| !f.goal.is_empty()) {
            let met = match f.kind.met(f.value) {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            };
            writeln!(
                md,
                "| `{key}`: {} | {} {} | {} | {met} |",
                f.what,
                number(f.value),
                f.unit,
                f.goal
            )?;
        }
        writeln!(md, "\n## Per store\n")?;
        writeln!(
            md,
            "| measurement | {} |\n|---|---|---|---|",
            StoreKind::ALL.map(StoreKind::name).join(" | ")
        )?;
        for row in &self.rows {
            writeln!(md, "| {} | {} |", row.measurement, row.cells.join(" | "))?;
        }
        if !self.notes.is_empty() {
            writeln!(md, "\n## How it was measured\n")?;
            for note in &self.notes {
                writeln!(md, "- {note}")?;
            }
        }
        writeln!(md, "\n## Every figure\n")?;
        writeln!(
            md,
            "| key | value | unit | goal | meaning |\n|---|---|---|---|---|"
        )?;
        for (key, f) in &self.figures {
            writeln!(
                md,
                "| `{key}` | {} | {} | {} | {} |",
                number(f.value),
                f.unit,
                f.goal,
                f.what
            )?;
        }
        Ok(md)
    }

    /// Writes `bench.json` and `bench.md` into `dir`.
    pub(crate) fn write(&self, dir: &Path, meta: &Meta) -> BoxResult<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(&self.json(meta)?)?;
        std::fs::write(dir.join("bench.json"), json + "\n")?;
        std::fs::write(dir.join("bench.md"), self.markdown(meta)?)?;
        Ok(())
    }
}

/// A figure as a table shows it: two decimals below 100, one below 10,000, else none.
pub(crate) fn number(value: f64) -> String {
    if value.abs() < 100.0 {
        format!("{value:.2}")
    } else if value.abs() < 10_000.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

/// The machine and software of this run (the commit from [`commit`], the servers'
/// versions from `versions`).
pub(crate) fn meta(
    commit: &str,
    versions: &[(StoreKind, String)],
    quick: bool,
    seconds: u64,
) -> BoxResult<Meta> {
    let mut all: BTreeMap<String, String> = versions
        .iter()
        .map(|(store, version)| (store.name().to_owned(), version.clone()))
        .collect();
    all.insert(
        "rustc".into(),
        command_line("rustc", &["--version"])
            .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
            .unwrap_or_else(|| "unknown".into()),
    );
    let memory_kib: u64 = proc_field("/proc/meminfo", "MemTotal:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(Meta {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        commit: commit.to_owned(),
        nproc: std::thread::available_parallelism().map_or(0, usize::from),
        memory: format!("{:.1} GiB", memory_kib as f64 / 1024.0 / 1024.0),
        cpu: proc_field("/proc/cpuinfo", "model name")
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into()),
        versions: all,
        mode: if quick { "quick" } else { "full" }.into(),
        seconds,
    })
}

/// `git rev-parse HEAD`, with `-dirty` if tracked files differ from it: read before the
/// run writes its charts into the work tree.
pub(crate) fn commit() -> String {
    let commit = command_line("git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|out| !out.stdout.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// The first line of a command's output, trimmed.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status.success().then_some(())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .to_owned(),
    )
}

/// The rest of the first line of `file` that starts with `field`.
fn proc_field(file: &str, field: &str) -> Option<String> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field).map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            date: "2026-12-03T02:00:00Z".into(),
            commit: "abc".into(),
            nproc: 2,
            memory: "23.5 GiB".into(),
            cpu: "cpu".into(),
            versions: BTreeMap::new(),
            mode: "full".into(),
            seconds: 600,
        }
    }

    #[test]
    fn every_figure_appears_three_ways() {
        let mut r = Results::default();
        r.figure(
            "postgres.requests_per_handoff.1000_waiting",
            12.0,
            "requests",
            Goal::AtMost(10.0),
            "statements per handoff",
        );
        r.figure(
            "etcd.handoff_ratio_to_etcdctl",
            0.7,
            "ratio",
            Goal::None,
            "x",
        );
        let json = r.json(&meta()).unwrap();
        assert_eq!(json["postgres.requests_per_handoff.1000_waiting"], 12.0);
        assert_eq!(
            json["postgres"]["requests_per_handoff"]["1000_waiting"],
            12.0
        );
        let figure = &json["figures"]["postgres.requests_per_handoff.1000_waiting"];
        assert_eq!(figure["value"], 12.0);
        assert_eq!(figure["goal"], "<= 10");
        assert_eq!(figure["unit"], "requests");
        assert_eq!(json["etcd"]["handoff_ratio_to_etcdctl"], 0.7);
        assert_eq!(json["meta"]["nproc"], 2);
        let md = r.markdown(&meta()).unwrap();
        assert!(md.contains("**missed**"), "{md}");
    }

    #[test]
    fn a_figure_that_is_also_a_group_is_refused() {
        let mut r = Results::default();
        r.figure("etcd.handoff", 1.0, "ms", Goal::None, "");
        r.figure("etcd.handoff.p99", 2.0, "ms", Goal::None, "");
        assert!(r.json(&meta()).is_err());
    }

    #[test]
    fn non_finite_figures_are_refused() {
        let mut r = Results::default();
        r.figure("etcd.ratio", f64::NAN, "ratio", Goal::None, "");
        assert!(r.json(&meta()).is_err());
    }
}
