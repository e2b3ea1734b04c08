//! Latency percentile charts as SVG, in HdrHistogram's style: the x axis
//! runs from the median out into the tail on a logarithmic scale
//! (50%, 90%, 99%, 99.9%, ...), so the tail gets the room it deserves;
//! several runs share one chart.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

/// One line on a chart: a label and `[percentile, seconds]` points.
pub struct Series<'a> {
    /// Legend text.
    pub label: &'a str,
    /// The points, percentiles ascending.
    pub points: &'a [[f64; 2]],
}

/// Where a percentile sits on the x axis: the number of nines.
fn nines(percentile: f64) -> f64 {
    let tail = (1.0 - percentile / 100.0).max(1e-7);
    -tail.log10()
}

/// Draws `series` into an SVG file at `path`.
pub fn percentile_chart(path: &Path, title: &str, series: &[Series<'_>]) -> anyhow::Result<()> {
    let furthest = series
        .iter()
        .flat_map(|s| s.points.iter())
        .map(|p| nines(p[0]))
        .fold(2.0_f64, f64::max)
        .min(6.0)
        .ceil();
    let highest_ms = series
        .iter()
        .flat_map(|s| s.points.iter())
        .map(|p| p[1] * 1e3)
        .fold(0.0_f64, f64::max)
        .max(0.001)
        * 1.1;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).context("cannot draw the chart")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..furthest, 0.0..highest_ms)
        .context("cannot lay the chart out")?;
    chart
        .configure_mesh()
        .x_labels(furthest as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            if p < 100.0 - 1e-9 {
                format!("{}%", trim(p))
            } else {
                "max".into()
            }
        })
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .context("cannot draw the axes")?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p[0] >= 0.0)
            .map(|p| (nines(p[0]).min(furthest), p[1] * 1e3))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .context("cannot draw a series")?
            .label(s.label.to_owned())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .context("cannot draw the legend")?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn trim(p: f64) -> String {
    let text = format!("{p:.5}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_spread_the_tail() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(trim(99.9), "99.9");
        assert_eq!(trim(50.0), "50");
    }

    #[test]
    fn writes_an_svg_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let a = [
            [0.0, 0.001],
            [50.0, 0.002],
            [99.0, 0.004],
            [99.99, 0.02],
            [100.0, 0.03],
        ];
        let b = [[0.0, 0.001], [50.0, 0.003], [99.9, 0.01], [100.0, 0.05]];
        percentile_chart(
            &path,
            "latency",
            &[
                Series {
                    label: "direct",
                    points: &a,
                },
                Series {
                    label: "infermesh",
                    points: &b,
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("direct") && svg.contains("infermesh"));
        assert!(svg.contains("99.9%"));
    }
}
