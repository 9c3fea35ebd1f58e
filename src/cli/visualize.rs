//! `podgpu visualize --loss pod --out DIR`: the paper's Fig. 6. Trains `smallcnn` with a 2-D latent space
//! on MNIST classes 0–4 (the shipped `datasets/mnist-small.bin` filtered to labels < 5) and draws the test
//! images' latent features coloured by class, with the class directions of the head (the PEDCC for
//! PEDCC-head losses; five classes in two dimensions need the repulsion PEDCC, five evenly spread unit
//! vectors) and the class means. Works for every loss; any `podgpu train` flag may be given.
//!
//! DIR receives the filtered dataset (`mnist-small-0-4.bin`), the run folder (`run/`) and the picture
//! (`latent.png`).

use crate::cli::train as train_cli;
use crate::data::format::{write_dataset, DatasetSpec, SplitData};
use crate::data::Dataset;
use crate::train::checkpoint::{commit_temp, load_checkpoint, temp_path_for};
use crate::train::eval;
use crate::train::plot::{register_font, FONT_NAME};
use crate::train::trainer;
use crate::{pedcc, ParamStore, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[group(id = "visualize")]
pub struct Args {
    /// Keep the classes 0..N of the dataset (default 5: MNIST 0–4 as in the paper).
    #[arg(long, default_value_t = 5)]
    pub classes: usize,
    /// Training flags (defaults here: smallcnn, datasets/mnist-small.bin, 30 epochs, batch 32, lr step
    /// at 2/3 of the run, feature dim 2); --out DIR is required.
    #[command(flatten)]
    pub train: train_cli::Args,
}

/// Ten distinguishable class colours (Tableau 10).
const CLASS_COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The shipped MNIST sample, found like `data::default_dataset_path`.
fn mnist_small_path() -> PathBuf {
    const REL: &str = "datasets/mnist-small.bin";
    let here = PathBuf::from(REL);
    if here.is_file() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(REL)
}

/// Writes the images of `src` with labels < `classes` as a new dataset file.
pub fn filter_classes(src: &Path, classes: usize, dst: &Path) -> Result<()> {
    let ds = Dataset::open(src).map_err(|e| anyhow!("{e}"))?;
    if classes < 2 || classes > ds.num_classes() {
        bail!(
            "--classes {classes}: choose between 2 and the {} classes of {}",
            ds.num_classes(),
            src.display()
        );
    }
    let mut splits = Vec::new();
    for name in ds.split_names() {
        let s = ds.split(name).map_err(|e| anyhow!("{e}"))?;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..s.len() {
            let l = s.label(i);
            if (l as usize) < classes {
                pixels.extend_from_slice(s.pixels(i));
                labels.push(l);
            }
        }
        if labels.is_empty() {
            bail!(
                "the {name} split of {} has no image of classes 0..{classes}",
                src.display()
            );
        }
        splits.push(SplitData {
            name: name.to_string(),
            n: labels.len(),
            h: s.height(),
            w: s.width(),
            pixels,
            labels,
        });
    }
    let spec = DatasetSpec {
        name: format!("{}-0-{}", ds.name(), classes - 1),
        classes: ds.classes()[..classes].to_vec(),
        channels: ds.channels(),
        mean: ds.mean().to_vec(),
        std: ds.std().to_vec(),
        source: format!(
            "{} filtered to classes 0..{classes} by podgpu visualize",
            src.display()
        ),
        splits,
    };
    write_dataset(dst, &spec)
}

pub fn run(a: Args) -> Result<()> {
    let t = &a.train;
    if t.resume.is_some() {
        bail!("visualize trains a fresh run; it cannot --resume");
    }
    let Some(out) = t.out.clone() else {
        bail!("give the output folder with --out DIR");
    };
    if t.feature_dim.is_some_and(|d| d != 2) {
        bail!("visualize draws a 2-D latent space: leave --feature-dim out (or give 2)");
    }
    let mut cfg = train_cli::resolve(t)?;
    if t.model.is_none() {
        cfg.model = "smallcnn".into();
    }
    if t.epochs.is_none() && t.config.is_none() {
        cfg.epochs = 30;
    }
    if t.batch_size.is_none() && t.config.is_none() {
        cfg.batch_size = 32;
    }
    if t.milestones.is_none() && t.config.is_none() {
        cfg.milestones = vec![(2 * cfg.epochs / 3).max(1)];
    }
    cfg.feature_dim = Some(2);
    cfg.pedcc_repulsion = true;
    std::fs::create_dir_all(&out).with_context(|| {
        format!(
            "could not create {}; choose a writable --out",
            out.display()
        )
    })?;
    let src = t.data.clone().unwrap_or_else(mnist_small_path);
    let stem = src
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "data".into());
    let filtered = out.join(format!("{stem}-0-{}.bin", a.classes.max(1) - 1));
    filter_classes(&src, a.classes, &filtered)?;
    cfg.data = Some(filtered.clone());
    let run_dir = out.join("run");
    cfg.out = Some(run_dir.clone());
    cfg.validate()?;
    let summary = trainer::train(cfg.clone())?;

    // The trained network back from its checkpoint, features of the test split.
    let ds = Dataset::open(&filtered).map_err(|e| anyhow!("{e}"))?;
    let train = ds.split("train").map_err(|e| anyhow!("{e}"))?;
    let test = ds.split("test").map_err(|e| anyhow!("{e}"))?;
    let centroids = match cfg.loss.uses_pedcc() {
        true => Some(pedcc::load(&run_dir.join("pedcc.safetensors"))?),
        false => None,
    };
    let mut ps = ParamStore::new();
    let net = trainer::build_network(&cfg, &ds, &train, centroids.as_ref(), &mut ps)?;
    load_checkpoint(&run_dir.join("last.safetensors"))?.restore_into(&mut ps, &cfg.model)?;
    let f = eval::extract(
        &net,
        &mut ps,
        &test,
        cfg.batch_size,
        None,
        crate::Device::Cpu,
    )?;
    let acc = eval::summarize(&f, a.classes).accuracy;
    let directions = net.class_directions(&ps);
    let picture = out.join("latent.png");
    let title = format!(
        "{}: 2-D latent features of the {} test images, classes 0–{} (test acc {:.1}%)",
        cfg.loss.paper_name(),
        f.labels.len(),
        a.classes - 1,
        100.0 * acc
    );
    plot_latent(
        &picture,
        &title,
        &f.features,
        &f.labels,
        a.classes,
        directions.as_ref(),
    )?;
    println!(
        "latent features of {} drawn in {} (run folder {}, final test accuracy {:.2}%)",
        cfg.loss,
        picture.display(),
        summary.run_dir.display(),
        100.0 * acc
    );
    Ok(())
}

/// Class means [K][2] of 2-D features.
fn class_means(features: &[f32], labels: &[usize], classes: usize) -> Vec<Option<(f64, f64)>> {
    let mut sum = vec![(0.0, 0.0, 0usize); classes];
    for (p, &y) in features.chunks_exact(2).zip(labels) {
        let s = &mut sum[y];
        s.0 += p[0] as f64;
        s.1 += p[1] as f64;
        s.2 += 1;
    }
    sum.into_iter()
        .map(|(x, y, n)| (n > 0).then(|| (x / n as f64, y / n as f64)))
        .collect()
}

/// Draws 2-D features [N × 2] coloured by label, the head's class directions [K, 2] (rays from the
/// origin) and the class means, as a square PNG.
pub fn plot_latent(
    path: &Path,
    title: &str,
    features: &[f32],
    labels: &[usize],
    classes: usize,
    directions: Option<&Tensor>,
) -> Result<()> {
    if features.len() != 2 * labels.len() {
        bail!(
            "plot_latent needs 2-D features ({} values for {} labels)",
            features.len(),
            labels.len()
        );
    }
    register_font();
    let tmp = temp_path_for(path);
    draw_latent(&tmp, title, features, labels, classes, directions)
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow!("{e}")
        })
        .with_context(|| format!("could not draw {}", path.display()))?;
    commit_temp(&tmp, path)
}

fn draw_latent(
    path: &Path,
    title: &str,
    features: &[f32],
    labels: &[usize],
    classes: usize,
    directions: Option<&Tensor>,
) -> Result<(), Box<dyn std::error::Error>> {
    let extent = features
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let r = if extent > 0.0 { 1.08 * extent } else { 1.0 };
    let root = BitMapBackend::new(path, (900, 960)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_NAME, 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(-r..r, -r..r)?;
    chart
        .configure_mesh()
        .x_desc("x₁")
        .y_desc("x₂")
        .label_style((FONT_NAME, 15))
        .axis_desc_style((FONT_NAME, 17))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    let color = |k: usize| CLASS_COLORS[k % CLASS_COLORS.len()];
    for k in 0..classes {
        let pts: Vec<(f64, f64)> = features
            .chunks_exact(2)
            .zip(labels)
            .filter(|(p, &y)| y == k && p[0].is_finite() && p[1].is_finite())
            .map(|(p, _)| (p[0] as f64, p[1] as f64))
            .collect();
        let c = color(k);
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, c.mix(0.5).filled())))?
            .label(format!("class {k}"))
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
    }
    if let Some(d) = directions {
        let v = d.to_vec_f64();
        for k in 0..classes.min(d.dim(0)) {
            let (dx, dy) = (v[2 * k], v[2 * k + 1]);
            let norm = (dx * dx + dy * dy).sqrt().max(1e-12);
            let end = (r * dx / norm, r * dy / norm);
            let s =
                chart.draw_series(LineSeries::new([(0.0, 0.0), end], color(k).stroke_width(2)))?;
            if k == 0 {
                s.label("class direction (PEDCC / head)").legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2))
                });
            }
        }
    }
    for (k, m) in class_means(features, labels, classes)
        .into_iter()
        .enumerate()
    {
        if let Some(m) = m {
            let s = chart.draw_series([
                Circle::new(m, 9, color(k).filled()),
                Circle::new(m, 9, BLACK.stroke_width(2)),
            ])?;
            if k == 0 {
                s.label("class mean")
                    .legend(|(x, y)| Circle::new((x + 8, y), 6, BLACK.stroke_width(2)));
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_NAME, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;
    root.present()?;
    Ok(())
}
