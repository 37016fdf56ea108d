//! SVG charts of the bench's figures, drawn from plain data: handoff latency
//! distributions, crash failover as a multiple of the TTL, and store requests per handoff
//! against the number of waiting candidates.
//!
//! Each function writes one SVG file (creating its folder) through leader-chaos's SVG
//! writer, in its palette; `leader-bench run --charts` says where (`docs` by default, as
//! `ci/bench` runs it).

use std::path::Path;

use hdrhistogram::Histogram;
use leader_chaos::svg::{DrawResult, RED, colour, write_svg};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Errors from drawing or writing a chart (the cause is kept as the source).
pub(crate) type ChartResult = DrawResult<()>;

/// The handoff chart's file name.
pub(crate) const HANDOFF_SVG: &str = "bench-handoff.svg";
/// The failover chart's file name.
pub(crate) const FAILOVER_SVG: &str = "bench-failover.svg";
/// The requests-per-handoff chart's file name.
pub(crate) const REQUESTS_SVG: &str = "bench-requests-per-handoff.svg";

const SIZE: (u32, u32) = (900, 520);
const FONT: &str = "sans-serif";

/// Every sample of a bench histogram (recorded in microseconds), in milliseconds.
pub(crate) fn histogram_ms(h: &Histogram<u64>) -> Vec<f64> {
    h.iter_recorded()
        .flat_map(|v| {
            let ms = h.lowest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
            std::iter::repeat_n(ms, usize::try_from(v.count_at_value()).unwrap_or(0))
        })
        .collect()
}

/// The value at quantile `q` of sorted samples (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// Handoff latencies (milliseconds), one series per contender (ours on etcd, `etcdctl
/// elect`, ours on Redis, ...), as cumulative distributions: the fraction of handoffs done
/// within x ms.
pub(crate) fn handoff_distributions(path: &Path, series: &[(&str, Vec<f64>)]) -> ChartResult {
    let curves: Vec<Curve> = series
        .iter()
        .map(|(name, samples)| {
            let sorted = sorted(samples);
            let n = sorted.len();
            // A step up at each sample.
            let mut points = Vec::with_capacity(2 * n);
            for (i, &ms) in sorted.iter().enumerate() {
                points.push((ms, i as f64 / n as f64));
                points.push((ms, (i + 1) as f64 / n as f64));
            }
            let label = format!(
                "{name}: p50 {:.2} ms, p99 {:.2} ms (n={n})",
                quantile(&sorted, 0.5),
                quantile(&sorted, 0.99)
            );
            Curve { label, points }
        })
        .collect();
    cdf(path, "graceful handoff latency", &curves)
}

/// One cumulative distribution.
struct Curve {
    label: String,
    /// (milliseconds, fraction done).
    points: Vec<(f64, f64)>,
}

/// Cumulative distributions.
fn cdf(path: &Path, title: &str, curves: &[Curve]) -> ChartResult {
    let max_ms = curves
        .iter()
        .flat_map(|curve| curve.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max);
    let x_max = if max_ms > 0.0 { max_ms * 1.1 } else { 1.0 };
    write_svg(path, SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds from the leader's signal to the new leader")
            .y_desc("fraction of handoffs done")
            .axis_desc_style((FONT, 14))
            .draw()?;
        for (index, Curve { label, points }) in curves.iter().enumerate() {
            let c = colour(index);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        Ok(())
    })
}

/// One store at one TTL: the crash failover times as multiples of the TTL.
struct Failover<'a> {
    store: &'a str,
    ttl_secs: f64,
    median: f64,
    max: f64,
    samples: &'a [f64],
}

/// Crash failover as a multiple of the TTL: per (store, TTL in seconds, multiples), every
/// kill as a dot, the median and the worst joined across TTLs, and the TTL and the goal
/// (TTL + 10 %) as reference lines.
pub(crate) fn failover_multiples(path: &Path, points: &[(&str, f64, Vec<f64>)]) -> ChartResult {
    let sorted: Vec<Vec<f64>> = points.iter().map(|(_, _, m)| sorted(m)).collect();
    let failovers: Vec<Failover<'_>> = points
        .iter()
        .zip(&sorted)
        .map(|((store, ttl_secs, _), sorted)| Failover {
            store,
            ttl_secs: *ttl_secs,
            median: quantile(sorted, 0.5),
            max: sorted.last().copied().unwrap_or(0.0),
            samples: sorted,
        })
        .collect();
    failover_chart(path, "crash failover as a multiple of the TTL", &failovers)
}

fn failover_chart(path: &Path, title: &str, failovers: &[Failover<'_>]) -> ChartResult {
    let mut stores: Vec<&str> = Vec::new();
    for f in failovers {
        if !stores.contains(&f.store) {
            stores.push(f.store);
        }
    }
    let ttl_max = failovers.iter().map(|f| f.ttl_secs).fold(1.0f64, f64::max);
    let y_max = failovers
        .iter()
        .flat_map(|f| f.samples.iter().copied().chain([f.max]))
        .fold(1.2f64, f64::max)
        * 1.1;
    write_svg(path, SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..ttl_max * 1.1, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("TTL (seconds)")
            .y_desc("time to a new leader / TTL")
            .axis_desc_style((FONT, 14))
            .draw()?;
        for (y, label, style) in [
            (1.0, "TTL", BLACK.mix(0.6).stroke_width(1)),
            (1.1, "goal: TTL + 10 %", RED.mix(0.6).stroke_width(1)),
        ] {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(0.0, y), (ttl_max * 1.1, y)],
                style,
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                label,
                (ttl_max * 0.02, y + y_max * 0.035),
                (FONT, 12),
            )))?;
        }
        // Stores side by side at each TTL.
        let nudge =
            |index: usize| (index as f64 - (stores.len() as f64 - 1.0) / 2.0) * ttl_max * 0.012;
        for (index, store) in stores.iter().enumerate() {
            let c = colour(index);
            let mut own: Vec<&Failover<'_>> =
                failovers.iter().filter(|f| f.store == *store).collect();
            own.sort_by(|a, b| a.ttl_secs.total_cmp(&b.ttl_secs));
            let at = |f: &Failover<'_>| f.ttl_secs + nudge(index);
            chart.draw_series(own.iter().flat_map(|f| {
                f.samples
                    .iter()
                    .map(move |&m| Circle::new((at(f), m), 2, c.mix(0.4).filled()))
            }))?;
            chart
                .draw_series(LineSeries::new(
                    own.iter().map(|f| (at(f), f.median)),
                    c.stroke_width(2),
                ))?
                .label(format!("{store}: median"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart.draw_series(
                own.iter()
                    .map(|f| Circle::new((at(f), f.median), 4, c.filled())),
            )?;
            chart
                .draw_series(DashedLineSeries::new(
                    own.iter().map(|f| (at(f), f.max)),
                    6,
                    4,
                    c.stroke_width(1),
                ))?
                .label(format!("{store}: worst"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1))
                });
            chart.draw_series(
                own.iter()
                    .map(|f| TriangleMarker::new((at(f), f.max), 5, c.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        Ok(())
    })
}

/// Store requests per handoff against the number of waiting candidates, both axes
/// logarithmic: per series (such as "redis: commands"), (waiters, requests per handoff)
/// points.
pub(crate) fn requests_per_handoff(
    path: &Path,
    series: &[(&str, Vec<(usize, f64)>)],
) -> ChartResult {
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, points)| {
            let mut points: Vec<(f64, f64)> = points
                .iter()
                .map(|&(waiters, requests)| (waiters as f64, requests))
                .filter(|&(w, r)| w > 0.0 && r > 0.0 && r.is_finite())
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points
        })
        .collect();
    let all = || points.iter().flatten();
    let x_max = all().map(|p| p.0).fold(10.0f64, f64::max) * 1.5;
    let y_min = all().map(|p| p.1).fold(f64::MAX, f64::min).min(1.0) / 1.5;
    let y_max = all().map(|p| p.1).fold(10.0f64, f64::max) * 2.0;
    write_svg(path, SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("store requests per handoff", (FONT, 20))
            .margin(14)
            .x_label_area_size(42)
            .y_label_area_size(64)
            .build_cartesian_2d((0.7..x_max).log_scale(), (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("candidates waiting (log scale)")
            .y_desc("requests per handoff (log scale)")
            .axis_desc_style((FONT, 14))
            .x_label_formatter(&|v| format!("{v}"))
            .y_label_formatter(&|v| format!("{v}"))
            .draw()?;
        for (index, ((name, _), points)) in series.iter().zip(&points).enumerate() {
            let c = colour(index);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
            chart.draw_series(points.iter().map(|&(w, r)| {
                Text::new(
                    format!("{r:.1}"),
                    (w * 1.1, r),
                    TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_svg(path: &Path, names: &[&str]) {
        let svg = std::fs::read_to_string(path).expect("written");
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"), "not closed");
        assert_eq!(
            svg.matches("<svg").count(),
            svg.matches("</svg>").count(),
            "unbalanced"
        );
        for name in names {
            assert!(
                svg.contains(name),
                "{} does not name {name:?}",
                path.display()
            );
        }
    }

    #[test]
    fn handoff_distributions_draw_every_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested").join(HANDOFF_SVG);
        let ours: Vec<f64> = (0..50).map(|i| 3.0 + f64::from(i) * 0.04).collect();
        let etcdctl: Vec<f64> = (0..50).map(|i| 3.5 + f64::from(i) * 0.07).collect();
        handoff_distributions(
            &path,
            &[
                ("ours on etcd", ours),
                ("etcdctl elect", etcdctl),
                ("ours on redis", vec![1.9, 2.0, 2.1]),
                ("nothing measured", Vec::new()),
            ],
        )
        .expect("drawn");
        assert_svg(
            &path,
            &[
                "ours on etcd",
                "etcdctl elect",
                "ours on redis",
                "p50 3.96 ms",
            ],
        );
    }

    #[test]
    fn failover_multiples_draw_every_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FAILOVER_SVG);
        failover_multiples(
            &path,
            &[
                ("etcd", 1.0, vec![1.1, 1.2, 1.45]),
                ("etcd", 2.0, vec![1.0, 1.25]),
                ("redis", 1.0, vec![0.85, 1.03]),
                ("redis", 5.0, Vec::new()),
            ],
        )
        .expect("drawn");
        assert_svg(&path, &["etcd: median", "redis: worst", "TTL + 10 %"]);
    }

    #[test]
    fn requests_per_handoff_draw_every_series_on_log_axes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(REQUESTS_SVG);
        requests_per_handoff(
            &path,
            &[
                ("etcd: requests", vec![(1, 8.9), (10, 8.8), (1000, 8.1)]),
                ("redis: commands", vec![(1, 6.0), (1000, 1311.8)]),
                ("zero is left out", vec![(0, 1.0), (10, 0.0)]),
            ],
        )
        .expect("drawn");
        assert_svg(&path, &["etcd: requests", "redis: commands", "1311.8"]);
    }

    #[test]
    fn histograms_give_their_samples_in_milliseconds() {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        h.record_n(2000, 3).expect("recorded");
        h.record(5000).expect("recorded");
        assert_eq!(histogram_ms(&h), vec![2.0, 2.0, 2.0, 5.0]);
    }
}
