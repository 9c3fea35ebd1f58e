//! PNG line plots: the run's loss and accuracy curves (refreshed every epoch) and a generic
//! multi-curve plot for comparisons. Text is drawn with the bundled DejaVu Sans (no system fonts
//! needed; licence in assets/fonts/LICENSE-DejaVu.txt).

use super::checkpoint::{commit_temp, temp_path_for};
use super::metrics::EpochRecord;
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub(crate) const FONT_NAME: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 600);
/// Colour-blind friendly line colours (Okabe–Ito), then three more so that a ten-loss comparison has
/// ten distinct curves; cycled.
const COLORS: [RGBColor; 10] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(136, 34, 85),
    RGBColor(153, 153, 51),
    RGBColor(128, 128, 128),
];

pub(crate) fn register_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the bundled DejaVu Sans font does not parse"));
    });
}

/// Writes `loss.png` (train loss) and `accuracy.png` (train and test accuracy) in `run_dir` from
/// the run's records. Epochs without a test evaluation are skipped on the test curve.
pub fn plot_metrics(run_dir: &Path, records: &[EpochRecord]) -> Result<()> {
    let pts = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|y| (r.epoch as f64, y)))
            .collect()
    };
    plot_curves(
        &run_dir.join("loss.png"),
        "Training loss",
        "epoch",
        "loss",
        &[("train loss", pts(&|r| Some(r.train_loss)))],
    )?;
    plot_curves(
        &run_dir.join("accuracy.png"),
        "Accuracy",
        "epoch",
        "accuracy",
        &[
            ("train", pts(&|r| Some(r.train_acc))),
            ("test", pts(&|r| r.test_acc)),
        ],
    )
}

/// A line plot of several labelled curves, written atomically to `path` (PNG). Non-finite points are
/// left out; an empty plot still gets its axes and labels.
pub fn plot_curves<S: AsRef<str>>(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(S, Vec<(f64, f64)>)],
) -> Result<()> {
    register_font();
    let series: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(label, pts)| {
            let finite = pts
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (label.as_ref(), finite)
        })
        .collect();
    let tmp = temp_path_for(path);
    draw(&tmp, title, x_label, y_label, &series)
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow!("{e}")
        })
        .with_context(|| format!("could not draw plot {}", path.display()))?;
    commit_temp(&tmp, path)
}

fn draw(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let xs = padded_range(all().map(|p| p.0), 0.02);
    let ys = padded_range(all().map(|p| p.1), 0.05);
    let integer_x = all().all(|p| p.0.fract() == 0.0);

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_NAME, 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(xs.clone(), ys.clone())?;
    let x_ticks = if integer_x {
        ((xs.end - xs.start).round() as usize + 1).clamp(2, 12)
    } else {
        10
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(x_ticks)
        .y_labels(10)
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .label_style((FONT_NAME, 16))
        .axis_desc_style((FONT_NAME, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    for (i, (label, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), line))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], line));
        // Markers, so that a single epoch still shows up.
        if pts.len() <= 60 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(legend_corner(series, &ys))
            .label_font((FONT_NAME, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// min..max of the values, widened by `pad` of its length on each side; a sensible range when there
/// are no values or just one.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return 0.0..1.0;
    }
    if lo == hi {
        let half = if lo == 0.0 { 0.5 } else { lo.abs() * 0.1 };
        return lo - half..hi + half;
    }
    let d = (hi - lo) * pad;
    lo - d..hi + d
}

/// Put the legend where the curves end low or high: away from the right-hand end of the curves.
fn legend_corner(series: &[(&str, Vec<(f64, f64)>)], ys: &Range<f64>) -> SeriesLabelPosition {
    let ends: Vec<f64> = series
        .iter()
        .filter_map(|(_, p)| p.last().map(|q| q.1))
        .collect();
    if ends.is_empty() {
        return SeriesLabelPosition::UpperRight;
    }
    let mean = ends.iter().sum::<f64>() / ends.len() as f64;
    if mean > (ys.start + ys.end) / 2.0 {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
