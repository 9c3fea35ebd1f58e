//! Converters from the formats datasets arrive in to the podgpu `.bin` format.
//!
//! Each source reader returns a `RawDataset` (classes + u8 NCHW splits); `convert` then applies the
//! subset limits, picks the normalisation and builds the `DatasetSpec` to write.

pub mod cifar;
pub mod idx;
pub mod image_folder;
pub mod pickle;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::format::{DatasetSpec, SplitData};
pub use image_folder::Fit;

/// The formats `podgpu data convert --from` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceFormat {
    /// CIFAR-10 binary version: data_batch_*.bin, test_batch.bin, batches.meta.txt.
    Cifar10Bin,
    /// CIFAR-100 binary version: train.bin, test.bin, fine/coarse_label_names.txt.
    Cifar100Bin,
    /// CIFAR-10 python version: data_batch_1..5, test_batch, batches.meta (pickles).
    Cifar10Python,
    /// CIFAR-100 python version: train, test, meta (pickles).
    Cifar100Python,
    /// MNIST IDX files (gzipped or not).
    Mnist,
    /// Fashion-MNIST IDX files (gzipped or not).
    FashionMnist,
    /// A folder tree of PNG/JPEG images, one folder per class.
    ImageFolder,
}

impl SourceFormat {
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Cifar10Bin => "cifar10-bin",
            SourceFormat::Cifar100Bin => "cifar100-bin",
            SourceFormat::Cifar10Python => "cifar10-python",
            SourceFormat::Cifar100Python => "cifar100-python",
            SourceFormat::Mnist => "mnist",
            SourceFormat::FashionMnist => "fashion-mnist",
            SourceFormat::ImageFolder => "image-folder",
        }
    }
}

/// CIFAR-100 has 100 fine and 20 coarse classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelKind {
    Fine,
    Coarse,
}

/// Where the per-channel normalisation mean/std come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Norm {
    /// CIFAR-10/100: the values of DESIGN.md §1.7; everything else: computed from the train split.
    Auto,
    /// Mean and std of every pixel of the train split, per channel.
    Computed,
    /// A published normalisation by name (see `norm_preset`).
    Preset(String),
    /// Fixed values on the [0, 1] scale.
    Fixed { mean: Vec<f32>, std: Vec<f32> },
}

/// Published normalisations by name (DESIGN.md §1.7, and MNIST's usual 0.1307/0.3081).
pub fn norm_preset(name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
    Some(match name {
        "cifar10" => (vec![0.4914, 0.4822, 0.4465], vec![0.2023, 0.1994, 0.2010]),
        "cifar100" => (vec![0.507, 0.487, 0.441], vec![0.267, 0.256, 0.276]),
        "imagenet" => (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]),
        "mnist" => (vec![0.1307], vec![0.3081]),
        _ => return None,
    })
}

/// What a source reader produces: u8 NCHW splits in source order.
#[derive(Clone, Debug)]
pub struct RawDataset {
    pub name: String,
    pub classes: Vec<String>,
    pub channels: usize,
    pub splits: Vec<RawSplit>,
}

pub type RawSplit = SplitData;

/// Everything `podgpu data convert` can be told.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// `None`: detect from the inputs (see `detect`).
    pub format: Option<SourceFormat>,
    pub inputs: Vec<PathBuf>,
    pub label_kind: LabelKind,
    pub norm: Norm,
    /// Keep only the first N images of the train / test split (in source order).
    pub max_train: Option<usize>,
    pub max_test: Option<usize>,
    /// Dataset name stored in the file (default: from the source).
    pub name: Option<String>,
    pub folder: image_folder::FolderOptions,
}

impl ConvertOptions {
    pub fn new(inputs: Vec<PathBuf>) -> ConvertOptions {
        ConvertOptions {
            format: None,
            inputs,
            label_kind: LabelKind::Fine,
            norm: Norm::Auto,
            max_train: None,
            max_test: None,
            name: None,
            folder: image_folder::FolderOptions {
                size: None,
                fit: Fit::Stretch,
                grayscale: false,
                test_fraction: 0.0,
                split_seed: 0,
                classes: None,
            },
        }
    }
}

/// The split a source file belongs to, from its name: anything mentioning "test" or "t10k" is `test`.
pub fn split_of_file(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    if n.contains("test") || n.contains("t10k") {
        "test"
    } else {
        "train"
    }
}

/// The input paths with folders replaced by the files directly inside them (sorted).
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            files.extend(v);
        } else if p.is_file() {
            files.push(p.clone());
        } else if p.exists() {
            // A FIFO or device would block the reader or never end.
            let e = crate::fsutil::open_regular(p).err();
            bail!(
                "input {}: {}",
                p.display(),
                e.map_or("not a regular file".to_string(), |e| e.to_string())
            );
        } else {
            bail!("input {} does not exist", p.display());
        }
    }
    Ok(files)
}

fn names_of(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// Tells the source format from the input names:
/// - a single folder with class subfolders (or train/ with class subfolders) → image-folder;
/// - `data_batch*.bin` / `test_batch*.bin` → cifar10-bin; `train.bin` / `test.bin` → cifar100-bin;
/// - `data_batch_N` / `test_batch` (no extension) → cifar10-python; `train` / `test` / `meta` →
///   cifar100-python;
/// - `*-idx3-ubyte[.gz]` → fashion-mnist when a path mentions "fashion", else mnist.
pub fn detect(inputs: &[PathBuf]) -> Result<SourceFormat> {
    let files = expand_inputs(inputs)?;
    let names = names_of(&files);
    let any = |f: &dyn Fn(&str) -> bool| names.iter().any(|n| f(n));
    if any(&|n| n.contains("-idx3-ubyte")) {
        let fashion = inputs
            .iter()
            .chain(&files)
            .any(|p| p.to_string_lossy().to_ascii_lowercase().contains("fashion"));
        return Ok(if fashion {
            SourceFormat::FashionMnist
        } else {
            SourceFormat::Mnist
        });
    }
    if any(&|n| (n.starts_with("data_batch") || n.starts_with("test_batch")) && n.ends_with(".bin"))
    {
        return Ok(SourceFormat::Cifar10Bin);
    }
    if any(&|n| n == "train.bin" || n == "test.bin") {
        return Ok(SourceFormat::Cifar100Bin);
    }
    if any(&|n| n.starts_with("data_batch") || n == "test_batch") {
        return Ok(SourceFormat::Cifar10Python);
    }
    if any(&|n| n == "train" || n == "test") && any(&|n| n == "meta") {
        return Ok(SourceFormat::Cifar100Python);
    }
    if let [root] = inputs {
        if root.is_dir() {
            let tree = if image_folder::has_split_dirs(root) {
                root.join("train")
            } else {
                root.clone()
            };
            let has_class_dirs = std::fs::read_dir(&tree)
                .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.path().is_dir()))
                .unwrap_or(false);
            if has_class_dirs {
                return Ok(SourceFormat::ImageFolder);
            }
        }
    }
    bail!(
        "cannot tell the format of {:?}; pass --from (cifar10-bin, cifar100-bin, cifar10-python, cifar100-python, \
         mnist, fashion-mnist, image-folder)",
        inputs
    )
}

/// Per-channel mean and (population) std of all pixels of a split, on the [0, 1] scale.
pub fn channel_stats(split: &SplitData, channels: usize) -> (Vec<f32>, Vec<f32>) {
    let plane = split.h * split.w;
    let mut hist = vec![[0u64; 256]; channels];
    for img in split.pixels.chunks_exact(channels * plane) {
        for (c, p) in img.chunks_exact(plane).enumerate() {
            for &v in p {
                hist[c][v as usize] += 1;
            }
        }
    }
    let mut mean = Vec::new();
    let mut std = Vec::new();
    for h in &hist {
        let n: u64 = h.iter().sum();
        let m = h
            .iter()
            .enumerate()
            .map(|(v, &k)| v as f64 * k as f64)
            .sum::<f64>()
            / n as f64;
        let var = h
            .iter()
            .enumerate()
            .map(|(v, &k)| (v as f64 - m).powi(2) * k as f64)
            .sum::<f64>()
            / n as f64;
        mean.push((m / 255.0) as f32);
        // A constant channel would give std 0; fall back to 1 so normalisation stays finite.
        let s = var.sqrt() / 255.0;
        std.push(if s > 0.0 { s as f32 } else { 1.0 });
    }
    (mean, std)
}

fn truncate(split: &mut SplitData, channels: usize, max: Option<usize>) {
    if let Some(m) = max {
        if m < split.n {
            split.n = m;
            split.labels.truncate(m);
            // m < n, and the split's own n·c·h·w pixels exist: no overflow.
            split.pixels.truncate(m * channels * split.h * split.w);
        }
    }
}

/// Reads the inputs in `opts.format` (or the detected format) and returns the dataset to write.
pub fn convert(opts: &ConvertOptions) -> Result<(SourceFormat, DatasetSpec)> {
    if opts.inputs.is_empty() {
        bail!("no inputs given");
    }
    let format = match opts.format {
        Some(f) => f,
        None => detect(&opts.inputs)?,
    };
    let files = || expand_inputs(&opts.inputs);
    let mut raw = match format {
        SourceFormat::Cifar10Bin => cifar::from_bin(&files()?, false, opts.label_kind)?,
        SourceFormat::Cifar100Bin => cifar::from_bin(&files()?, true, opts.label_kind)?,
        SourceFormat::Cifar10Python => cifar::from_python(&files()?, false, opts.label_kind)?,
        SourceFormat::Cifar100Python => cifar::from_python(&files()?, true, opts.label_kind)?,
        SourceFormat::Mnist => idx::from_idx(&files()?, false)?,
        SourceFormat::FashionMnist => idx::from_idx(&files()?, true)?,
        SourceFormat::ImageFolder => {
            let [root] = &opts.inputs[..] else {
                bail!(
                    "image-folder takes one root folder, got {} inputs",
                    opts.inputs.len()
                );
            };
            image_folder::from_folder(root, &opts.folder)?
        }
    };
    for s in &mut raw.splits {
        let max = if s.name == "train" {
            opts.max_train
        } else {
            opts.max_test
        };
        truncate(s, raw.channels, max);
    }
    raw.splits.retain(|s| s.n > 0);
    if raw.splits.is_empty() {
        bail!("no images left after --max-train/--max-test");
    }
    let stats_split = raw
        .splits
        .iter()
        .find(|s| s.name == "train")
        .unwrap_or(&raw.splits[0]);
    let (mean, std, how) = match &opts.norm {
        Norm::Fixed { mean, std } => (
            mean.clone(),
            std.clone(),
            "given on the command line".to_string(),
        ),
        Norm::Preset(name) => {
            let (m, s) = norm_preset(name).with_context(|| {
                format!("unknown normalisation preset '{name}'; use cifar10, cifar100, imagenet or mnist")
            })?;
            (m, s, format!("the published {name} values"))
        }
        Norm::Auto
            if matches!(
                format,
                SourceFormat::Cifar10Bin | SourceFormat::Cifar10Python
            ) =>
        {
            let (m, s) = norm_preset("cifar10").unwrap();
            (m, s, "CIFAR-10 values of the paper recipe".into())
        }
        Norm::Auto
            if matches!(
                format,
                SourceFormat::Cifar100Bin | SourceFormat::Cifar100Python
            ) =>
        {
            let (m, s) = norm_preset("cifar100").unwrap();
            (m, s, "CIFAR-100 values of the paper recipe".into())
        }
        Norm::Auto | Norm::Computed => {
            let (m, s) = channel_stats(stats_split, raw.channels);
            (
                m,
                s,
                format!(
                    "computed over the {} '{}' images",
                    stats_split.n, stats_split.name
                ),
            )
        }
    };
    if mean.len() != raw.channels || std.len() != raw.channels {
        bail!(
            "normalisation needs {} values per mean/std, got {} and {}",
            raw.channels,
            mean.len(),
            std.len()
        );
    }
    let inputs: Vec<String> = opts.inputs.iter().map(|p| display_name(p)).collect();
    let spec = DatasetSpec {
        name: opts.name.clone().unwrap_or(raw.name),
        classes: raw.classes,
        channels: raw.channels,
        mean,
        std,
        source: format!(
            "converted by podgpu from {} ({}); normalisation: {how}",
            inputs.join(", "),
            format.name()
        ),
        splits: raw.splits,
    };
    spec.validate()
        .context("the converted data is inconsistent")?;
    Ok((format, spec))
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
