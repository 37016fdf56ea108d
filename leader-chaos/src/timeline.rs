//! A picture of one chaos run: an SVG timeline with a lane per candidate slot (the
//! processes started in it one after another), each term a bar from its election to its
//! last instant of belief coloured by fencing token, the faults marked, and every overlap
//! the [checker](crate::checker) found drawn in red across the lanes it joins.
//!
//! [`run`](crate::run) records what the picture needs in [`Report::timeline`]; nothing is
//! recomputed here except the layout.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::checker::ProcessLog;
use crate::{Fault, Report};

pub use crate::svg::DrawResult;
use crate::svg::{PALETTE, colour};

/// One candidate process: the slot (lane) it ran in and its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessSpan {
    /// The process number (its log's number, [`ProcessLog::process`]).
    pub process: usize,
    /// The slot it ran in: candidate `lane` of the run's three.
    pub lane: usize,
    /// When it was started (CLOCK_MONOTONIC ns).
    pub started_ns: u64,
    /// When it had exited and was reaped, if it was.
    pub exited_ns: Option<u64>,
    /// Whether the orchestrator SIGKILLed it.
    pub killed: bool,
}

/// One term, as the checker judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TermSpan {
    /// The process that held it.
    pub process: usize,
    /// Its slot.
    pub lane: usize,
    /// The fencing token.
    pub token: u64,
    /// The first instant of belief.
    pub elected_ns: u64,
    /// The last instant of belief ([`TermLog::belief_end_ns`](crate::checker::TermLog::belief_end_ns)):
    /// the end, or the last deadline if that came first or no end was logged.
    pub end_ns: u64,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultSpan {
    /// Which fault.
    pub fault: Fault,
    /// The slot it was aimed at; `None`: the whole store.
    pub lane: Option<usize>,
    /// When it was injected.
    pub from_ns: u64,
    /// When it was lifted (equal to `from_ns` for a fault that is one act: a kill, a
    /// SIGTERM, a deleted key, a revoked lease).
    pub to_ns: u64,
}

/// What happened when in one run, on CLOCK_MONOTONIC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeline {
    /// When the run began (before the store was started).
    pub started_ns: u64,
    /// When everything had stopped.
    pub ended_ns: u64,
    /// How many candidate slots (lanes).
    pub lanes: usize,
    /// Every candidate process, by process number.
    pub processes: Vec<ProcessSpan>,
    /// Every term whose election was logged.
    pub terms: Vec<TermSpan>,
    /// The faults, in order.
    pub faults: Vec<FaultSpan>,
}

impl Timeline {
    /// Gathers the terms from the candidates' logs.
    pub fn new(
        started_ns: u64,
        ended_ns: u64,
        lanes: usize,
        processes: Vec<ProcessSpan>,
        faults: Vec<FaultSpan>,
        logs: &[ProcessLog],
    ) -> Timeline {
        let mut terms: Vec<TermSpan> = logs
            .iter()
            .flat_map(|log| log.terms_of(0))
            .filter_map(|term| {
                Some(TermSpan {
                    process: term.process,
                    lane: processes.get(term.process)?.lane,
                    token: term.token,
                    elected_ns: term.elected_ns?,
                    end_ns: term.belief_end_ns(),
                })
            })
            .collect();
        terms.sort_by_key(|t| t.token);
        Timeline {
            started_ns,
            ended_ns,
            lanes,
            processes,
            terms,
            faults,
        }
    }

    fn lane_of(&self, process: usize) -> Option<usize> {
        self.processes.get(process).map(|p| p.lane)
    }
}

/// Where the chaos tests write their timelines: `CHAOS_SVG_DIR` if set, else `default`.
pub fn dir_from_env(default: impl Into<PathBuf>) -> PathBuf {
    std::env::var_os("CHAOS_SVG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into())
}

/// Draws the run's timeline and writes it to `path` as SVG (creating its folder).
///
/// # Errors
///
/// If drawing fails or the file cannot be written.
pub fn write_svg(report: &Report, path: &Path) -> DrawResult<()> {
    crate::svg::write_file(path, &svg(report)?)?;
    Ok(())
}

const WIDTH: u32 = 1600;
const LANE_PX: u32 = 64;
/// A CSS pixel per character of 11 px sans-serif text, roughly, to keep labels apart.
const CHAR_PX: i32 = 7;
const FONT: &str = "sans-serif";

const OVERLAP: RGBColor = crate::svg::RED;
const FAULT: RGBColor = RGBColor(0x40, 0x40, 0x40);
const PROCESS: RGBColor = RGBColor(0xB0, 0xB0, 0xB0);

/// The colour of a fencing token.
fn token_colour(token: u64) -> RGBColor {
    colour(usize::try_from(token % PALETTE.len() as u64).unwrap_or(0))
}

/// Left edges of labels already placed in one row; a label goes where it does not touch
/// the previous one.
struct Row(Option<i32>);

impl Row {
    fn fits(&mut self, x: i32, text: &str) -> bool {
        let width = CHAR_PX * i32::try_from(text.len()).unwrap_or(i32::MAX / CHAR_PX);
        if self.0.is_some_and(|end| x < end + 4) {
            return false;
        }
        self.0 = Some(x + width);
        true
    }
}

/// The run's timeline as an SVG document.
///
/// # Errors
///
/// If drawing fails.
pub fn svg(report: &Report) -> DrawResult<String> {
    let timeline = &report.timeline;
    let lanes = timeline.lanes.max(1);
    let height = 140 + LANE_PX * u32::try_from(lanes)?;
    let seconds = |ns: u64| ns.saturating_sub(timeline.started_ns) as f64 / 1e9;
    // Until everything stopped, or the last belief ended if that was later (a killed
    // candidate believes until its deadline).
    let last_ns = timeline
        .terms
        .iter()
        .map(|t| t.end_ns)
        .fold(timeline.ended_ns, u64::max);
    let duration = seconds(last_ns).max(1.0);
    // A lane's centre: lane 0 at the top; the row above the lanes holds the faults' names.
    let centre = |lane: usize| (lanes - 1 - lane.min(lanes - 1)) as f64;
    let top = lanes as f64 - 0.5;
    let overlaps = &report.check.overlap_spans;
    let failed = overlaps.iter().filter(|o| !o.after_tampering).count();
    let title = format!(
        "chaos on {}: {} faults, TTL {:?}; {} terms, {} overlapping{}",
        report.backend.name(),
        timeline.faults.len(),
        report.ttl,
        timeline.terms.len(),
        failed,
        match overlaps.len() - failed {
            0 => String::new(),
            n => format!(" ({n} more after tampering with the key)"),
        }
    );

    crate::svg::draw_svg((WIDTH, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 18))
            .margin(12)
            .margin_bottom(34)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..duration, -0.5..top + 0.6)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("seconds since the run started")
            .x_label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .light_line_style(RGBColor(0xF0, 0xF0, 0xF0))
            .draw()?;
        // Seconds per pixel, so that the shortest things stay visible.
        let (x_px, _) = chart.plotting_area().get_pixel_range();
        let px = duration / f64::from((x_px.end - x_px.start).max(1));
        let px_x = |t: f64| x_px.start + (t / px).round() as i32;
        let label = |size: u32| TextStyle::from((FONT, size).into_font());

        // Lane names, left of the axis.
        for lane in 0..lanes {
            let (x, y) = chart.backend_coord(&(0.0, centre(lane)));
            root.draw(&Text::new(
                format!("candidate {lane}"),
                (x - 8, y),
                label(12).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
        }
        let (x, y) = chart.backend_coord(&(0.0, top + 0.3));
        root.draw(&Text::new(
            "faults",
            (x - 8, y),
            label(12).pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;

        // Fault windows: a band across the lanes, a mark in the lane aimed at, the name
        // above (where there is room).
        let mut rows = [Row(None), Row(None)];
        for fault in &timeline.faults {
            let (from, to) = (seconds(fault.from_ns), seconds(fault.to_ns));
            let to = to.max(from + px);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(from, -0.5), (to, lanes as f64 - 0.5)],
                FAULT.mix(0.1).filled(),
            )))?;
            let (low, high) = match fault.lane {
                Some(lane) => (centre(lane) - 0.45, centre(lane) + 0.45),
                None => (-0.5, lanes as f64 - 0.5),
            };
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(from, low), (from, high)],
                FAULT.stroke_width(1),
            )))?;
            if let Some(lane) = fault.lane {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(from, centre(lane) - 0.45), (to, centre(lane) - 0.38)],
                    FAULT.filled(),
                )))?;
            }
            let name = fault.fault.short();
            let x = px_x(from);
            for (row, y) in rows.iter_mut().zip([top + 0.45, top + 0.17]) {
                if row.fits(x, name) {
                    chart.draw_series(std::iter::once(Text::new(
                        name,
                        (from, y),
                        label(11).pos(Pos::new(HPos::Left, VPos::Center)),
                    )))?;
                    break;
                }
            }
        }

        // Each process's life: a thin grey line high in its lane, a tick where it began.
        for process in &timeline.processes {
            let y = centre(process.lane) + 0.38;
            let from = seconds(process.started_ns);
            let to = seconds(process.exited_ns.unwrap_or(timeline.ended_ns));
            chart.draw_series([
                PathElement::new(vec![(from, y), (to, y)], PROCESS.stroke_width(2)),
                PathElement::new(
                    vec![(from, y - 0.07), (from, y + 0.07)],
                    PROCESS.stroke_width(2),
                ),
            ])?;
        }

        // The terms: a bar per term, its token on it where there is room.
        let mut token_rows: Vec<Row> = (0..lanes).map(|_| Row(None)).collect();
        for term in &timeline.terms {
            let c = centre(term.lane);
            let from = seconds(term.elected_ns);
            let to = seconds(term.end_ns).max(from + px);
            let colour = token_colour(term.token);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(from, c - 0.28), (to, c + 0.28)],
                colour.filled(),
            )))?;
            let text = term.token.to_string();
            let (left, right) = (px_x(from), px_x(to));
            if right - left > CHAR_PX * i32::try_from(text.len())? + 6
                && token_rows[term.lane.min(lanes - 1)].fits(left + 3, &text)
            {
                chart.draw_series(std::iter::once(Text::new(
                    text,
                    (from + 3.0 * px, c),
                    label(11)
                        .color(&WHITE)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )))?;
            }
        }

        // Overlaps: red across the lanes of both terms, at least two pixels wide.
        for overlap in overlaps {
            let lanes_of = [overlap.earlier_process, overlap.later_process]
                .map(|p| timeline.lane_of(p).unwrap_or(0));
            let low = lanes_of.iter().map(|&l| centre(l)).fold(f64::MAX, f64::min) - 0.4;
            let high = lanes_of.iter().map(|&l| centre(l)).fold(f64::MIN, f64::max) + 0.4;
            let from = seconds(overlap.from_ns);
            let to = seconds(overlap.to_ns).max(from + 2.0 * px);
            // See-through, so that the terms beneath still show.
            let (alpha, line) = if overlap.after_tampering {
                (0.15, 1)
            } else {
                (0.3, 2)
            };
            chart.draw_series([
                Rectangle::new([(from, low), (to, high)], OVERLAP.mix(alpha).filled()),
                Rectangle::new([(from, low), (to, high)], OVERLAP.stroke_width(line)),
            ])?;
            let what = format!(
                "{:.1} ms{}",
                overlap.to_ns.saturating_sub(overlap.from_ns) as f64 / 1e6,
                if overlap.after_tampering {
                    " (after tampering)"
                } else {
                    ""
                }
            );
            chart.draw_series(std::iter::once(Text::new(
                what,
                (to + 2.0 * px, high),
                label(11)
                    .color(&OVERLAP)
                    .pos(Pos::new(HPos::Left, VPos::Top)),
            )))?;
        }

        // The legend, under the axis.
        let y = i32::try_from(height)? - 16;
        let mut x = 90;
        let swatch =
            |x: i32, style: ShapeStyle| Rectangle::new([(x, y - 6), (x + 14, y + 6)], style);
        let items: [(ShapeStyle, &str); 4] = [
            (
                PALETTE[0].filled(),
                "a term, from election to its last instant of belief (colour cycles with the fencing token)",
            ),
            (
                FAULT.mix(0.25).filled(),
                "a fault (bar: the candidate it hit)",
            ),
            (PROCESS.filled(), "a candidate process's life"),
            (
                OVERLAP.mix(0.5).filled(),
                "overlapping terms (faint: after tampering with the key)",
            ),
        ];
        for (style, text) in items {
            root.draw(&swatch(x, style))?;
            root.draw(&Text::new(
                text,
                (x + 20, y),
                label(12).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
            x += 20 + CHAR_PX * i32::try_from(text.len())? * 5 / 7 + 30;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::StoreKind;
    use crate::checker::{Check, Observed, Overlap};

    const S: u64 = 1_000_000_000;

    fn report(faults: usize) -> Report {
        let mut processes = Vec::new();
        let mut terms = Vec::new();
        let mut spans = Vec::new();
        for round in 0..faults {
            let at = 10 * S + round as u64 * 2 * S;
            let lane = round % 3;
            processes.push(ProcessSpan {
                process: round,
                lane,
                started_ns: at - S,
                exited_ns: Some(at + 2 * S),
                killed: round % 2 == 0,
            });
            terms.push(TermSpan {
                process: round,
                lane,
                token: round as u64 + 1,
                elected_ns: at,
                end_ns: at + S + S / 2,
            });
            spans.push(FaultSpan {
                fault: Fault::Partition,
                lane: Some(lane),
                from_ns: at + S,
                to_ns: at + 3 * S,
            });
        }
        let check = Check {
            overlap_spans: vec![Overlap {
                election: 0,
                earlier: 1,
                earlier_process: 0,
                later: 2,
                later_process: 1,
                from_ns: 12 * S,
                to_ns: 12 * S + S / 2,
                after_tampering: false,
            }],
            ..Check::default()
        };
        Report {
            backend: StoreKind::Redis,
            ttl: Duration::from_secs(1),
            elections: 1,
            rounds: Vec::new(),
            liveness_failures: Vec::new(),
            bad_exits: Vec::new(),
            check,
            terms_per_fault: BTreeMap::new(),
            observed: Observed::default(),
            timeline: Timeline {
                started_ns: 5 * S,
                ended_ns: 10 * S + faults as u64 * 2 * S + 5 * S,
                lanes: 3,
                processes,
                terms,
                faults: spans,
            },
        }
    }

    #[test]
    fn a_timeline_is_an_svg_with_lanes_terms_faults_and_overlaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("deeper").join("timeline.svg");
        write_svg(&report(13), &path).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "candidate 0",
            "candidate 2",
            "part",
            "1 overlapping",
            "500.0 ms",
        ] {
            assert!(svg.contains(text), "no {text:?}");
        }
        // The overlap's colour, and a token's.
        assert!(svg.contains("#D60000"), "no red");
        assert!(svg.contains("#0072B2"));
    }

    #[test]
    fn a_soak_of_500_faults_renders_quickly() {
        let started = std::time::Instant::now();
        let svg = svg(&report(500)).expect("drawn");
        assert!(svg.starts_with("<svg"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
