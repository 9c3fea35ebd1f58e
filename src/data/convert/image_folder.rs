//! Image-folder trees of PNG/JPEG files, one folder per class (torchvision's `ImageFolder` layout).
//!
//! Two layouts:
//! - `ROOT/<split>/<class>/*.png|jpg` with split folders among train, test, val, validation
//!   (`val`/`validation` become the `test` split when there is no `test`);
//! - `ROOT/<class>/*.png|jpg`, a single tree: everything is `train`, or with `--test-fraction F` a seeded,
//!   per-class random fraction goes to `test`.
//!
//! Classes are the sorted folder names of the train split (byte order, as torchvision sorts); every
//! other split must use the same class folders. Files are taken in sorted name order within a class,
//! and the classes are interleaved in the file (the first image of every class, then the second, …),
//! so that the first N images of a split — `--max-train`, `train --limit-train` — cover every class
//! instead of the first class only, as in CIFAR's own mixed order. Images are decoded
//! in parallel and converted to RGB (or grey with `--grayscale`); with `--size HxW` they are resized
//! (bilinear, `--fit stretch`) or scaled to cover and centre-cropped (`--fit center-crop`), otherwise all
//! images must already have the same size.

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use super::{RawDataset, RawSplit};
use crate::rng::Rng;

/// How images are brought to `--size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fit {
    /// Resize to exactly H×W, ignoring the aspect ratio.
    Stretch,
    /// Scale so the image covers H×W, then cut out the centre.
    CenterCrop,
}

#[derive(Clone, Debug)]
pub struct FolderOptions {
    pub size: Option<(usize, usize)>,
    pub fit: Fit,
    pub grayscale: bool,
    /// Fraction of each class moved to `test` for a single tree (0 = none).
    pub test_fraction: f64,
    pub split_seed: u64,
    /// Keep only the first N class folders in sorted order (the paper's ImageNet(N)).
    pub classes: Option<usize>,
}

const SPLIT_DIRS: [&str; 4] = ["train", "test", "val", "validation"];

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    v.sort();
    Ok(v)
}

/// Per class folder: its name and its sorted image files.
type ClassFiles = Vec<(String, Vec<PathBuf>)>;

/// class name → sorted image files.
fn scan_classes(dir: &Path) -> Result<ClassFiles> {
    let mut out = Vec::new();
    for p in sorted_entries(dir)? {
        if !p.is_dir() {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let files: Vec<PathBuf> = sorted_entries(&p)?
            .into_iter()
            .filter(|f| f.is_file() && is_image(f))
            .collect();
        out.push((name, files));
    }
    if out.is_empty() {
        bail!(
            "{} has no class folders; expected ROOT/<class>/*.png|jpg or ROOT/train/<class>/…",
            dir.display()
        );
    }
    if let Some((c, _)) = out.iter().find(|(_, f)| f.is_empty()) {
        bail!(
            "class folder {} has no PNG/JPEG images",
            dir.join(c).display()
        );
    }
    Ok(out)
}

/// Whether `root` is laid out as split folders (train/test/…) rather than class folders.
pub fn has_split_dirs(root: &Path) -> bool {
    root.join("train").is_dir()
}

/// Decodes one image to CHW u8 at the target size.
fn decode(path: &Path, opts: &FolderOptions) -> Result<(usize, usize, Vec<u8>)> {
    let img = image::open(path)
        .map_err(|e| anyhow::anyhow!("cannot decode image {}: {e}", path.display()))?;
    let img = match opts.size {
        None => img,
        Some((h, w)) => match opts.fit {
            Fit::Stretch => img.resize_exact(w as u32, h as u32, FilterType::Triangle),
            Fit::CenterCrop => img.resize_to_fill(w as u32, h as u32, FilterType::Triangle),
        },
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hw = h * w;
    let chw = if opts.grayscale {
        img.to_luma8().into_raw()
    } else {
        let rgb = img.to_rgb8().into_raw();
        let mut out = vec![0u8; 3 * hw];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            out[i] = px[0];
            out[hw + i] = px[1];
            out[2 * hw + i] = px[2];
        }
        out
    };
    Ok((h, w, chw))
}

/// Round-robin over the classes (labels 0..classes), keeping each class's own order: the first item
/// of every class, then the second, …; a class that runs out is left out of later rounds.
fn interleave_classes(items: Vec<(PathBuf, u32)>, classes: usize) -> Vec<(PathBuf, u32)> {
    let mut per_class: Vec<std::collections::VecDeque<(PathBuf, u32)>> =
        vec![std::collections::VecDeque::new(); classes];
    for it in items {
        per_class[it.1 as usize].push_back(it);
    }
    let mut out = Vec::new();
    while per_class.iter().any(|q| !q.is_empty()) {
        for q in per_class.iter_mut() {
            if let Some(it) = q.pop_front() {
                out.push(it);
            }
        }
    }
    out
}

/// The most one image may take decoded (the image crate's own default limit).
const MAX_DECODED: u64 = 512 << 20;

/// Checks, from the image headers alone, that decoding the split fits: no image beyond
/// `MAX_DECODED` (a PNG bomb announces a huge size in a tiny file), and the whole split, as stored
/// (at `--size` when given), within the machine's memory.
fn check_sizes(name: &str, items: &[(PathBuf, u32)], opts: &FolderOptions) -> Result<()> {
    let channels: u128 = if opts.grayscale { 1 } else { 3 };
    let dims: Vec<(u32, u32)> = items
        .par_iter()
        .map(|(p, _)| {
            image::ImageReader::open(p)
                .and_then(|r| r.with_guessed_format())
                .map_err(image::ImageError::IoError)
                .and_then(|r| r.into_dimensions())
                .map_err(|e| anyhow::anyhow!("cannot decode image {}: {e}", p.display()))
        })
        .collect::<Result<_>>()?;
    let mut total: u128 = 0;
    for ((p, _), &(w, h)) in items.iter().zip(&dims) {
        let decoded = w as u64 * h as u64 * 4;
        if decoded > MAX_DECODED {
            bail!(
                "image {} is {w}×{h} pixels: decoding it needs {}, more than podgpu decodes for one \
                 image ({}); shrink it first, or leave it out",
                p.display(),
                crate::budget::fmt_bytes(decoded as u128),
                crate::budget::fmt_bytes(MAX_DECODED as u128)
            );
        }
        let stored = match opts.size {
            Some((th, tw)) => th as u128 * tw as u128,
            None => h as u128 * w as u128,
        };
        total = total.saturating_add(stored * channels);
    }
    crate::budget::ensure_fits(
        total,
        || format!("the {} images of split '{name}'", items.len()),
        "pass --size HxW to store them smaller, or convert fewer of them",
    )
}

fn build_split(name: &str, items: &[(PathBuf, u32)], opts: &FolderOptions) -> Result<RawSplit> {
    check_sizes(name, items, opts)?;
    let decoded: Vec<(usize, usize, Vec<u8>)> = items
        .par_iter()
        .map(|(p, _)| decode(p, opts))
        .collect::<Result<_>>()?;
    let (h, w) = (decoded[0].0, decoded[0].1);
    if let Some(i) = decoded.iter().position(|d| (d.0, d.1) != (h, w)) {
        bail!(
            "images differ in size: {} is {}x{} but {} is {h}x{w}; pass --size HxW to resize them",
            items[i].0.display(),
            decoded[i].0,
            decoded[i].1,
            items[0].0.display()
        );
    }
    let mut pixels = Vec::with_capacity(decoded.len() * decoded[0].2.len());
    for d in &decoded {
        pixels.extend_from_slice(&d.2);
    }
    Ok(RawSplit {
        name: name.to_string(),
        n: items.len(),
        h,
        w,
        pixels,
        labels: items.iter().map(|i| i.1).collect(),
    })
}

pub fn from_folder(root: &Path, opts: &FolderOptions) -> Result<RawDataset> {
    if !root.is_dir() {
        bail!(
            "{} is not a folder; image-folder input is one root folder",
            root.display()
        );
    }
    let mut split_items: Vec<(String, ClassFiles)> = Vec::new();
    if has_split_dirs(root) {
        for s in SPLIT_DIRS {
            let d = root.join(s);
            if d.is_dir() {
                split_items.push((s.to_string(), scan_classes(&d)?));
            }
        }
        // `val` is the test split when there is no `test`.
        if !split_items.iter().any(|(s, _)| s == "test") {
            if let Some(v) = split_items
                .iter_mut()
                .find(|(s, _)| s == "val" || s == "validation")
            {
                v.0 = "test".into();
            }
        }
    } else {
        split_items.push(("train".into(), scan_classes(root)?));
    }
    if let Some(n) = opts.classes {
        for (split, class_files) in &mut split_items {
            if n < 2 || n > class_files.len() {
                bail!(
                    "--classes {n}: the '{split}' folder of {} has {} class folders; keep between 2 \
                     and {}",
                    root.display(),
                    class_files.len(),
                    class_files.len()
                );
            }
            class_files.truncate(n);
        }
    }
    let classes: Vec<String> = split_items[0].1.iter().map(|(c, _)| c.clone()).collect();
    let mut labelled: Vec<(String, Vec<(PathBuf, u32)>)> = Vec::new();
    for (split, class_files) in &split_items {
        let names: Vec<&String> = class_files.iter().map(|(c, _)| c).collect();
        if names != classes.iter().collect::<Vec<_>>() {
            bail!(
                "the '{split}' folder has classes {:?} but 'train' has {:?}; every split needs the same class folders",
                names,
                classes
            );
        }
        let items = class_files
            .iter()
            .enumerate()
            .flat_map(|(k, (_, files))| files.iter().map(move |f| (f.clone(), k as u32)))
            .collect();
        labelled.push((split.clone(), items));
    }
    if !has_split_dirs(root) && opts.test_fraction > 0.0 {
        if opts.test_fraction >= 1.0 || opts.test_fraction.is_nan() {
            bail!(
                "--test-fraction must be in [0, 1), got {}",
                opts.test_fraction
            );
        }
        // Per class, a seeded random subset of round(F·n) files (at least 1 when the class has 2+) is test.
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (k, (_, files)) in split_items[0].1.iter().enumerate() {
            let n = files.len();
            let mut n_test = (opts.test_fraction * n as f64).round() as usize;
            if n >= 2 {
                n_test = n_test.clamp(1, n - 1);
            } else {
                n_test = 0;
            }
            let perm = Rng::derive(opts.split_seed, k as u64).permutation(n);
            let mut is_test = vec![false; n];
            for &i in &perm[..n_test] {
                is_test[i] = true;
            }
            for (i, f) in files.iter().enumerate() {
                if is_test[i] { &mut test } else { &mut train }.push((f.clone(), k as u32));
            }
        }
        labelled = vec![("train".into(), train), ("test".into(), test)];
    }
    for (_, items) in labelled.iter_mut() {
        *items = interleave_classes(std::mem::take(items), classes.len());
    }
    let splits = labelled
        .iter()
        .filter(|(_, items)| !items.is_empty())
        .map(|(s, items)| build_split(s, items, opts))
        .collect::<Result<Vec<_>>>()?;
    if splits.len() > 1
        && splits
            .iter()
            .any(|s| (s.h, s.w) != (splits[0].h, splits[0].w))
    {
        bail!("the splits have different image sizes; pass --size HxW");
    }
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".into());
    Ok(RawDataset {
        name,
        classes,
        channels: if opts.grayscale { 1 } else { 3 },
        splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_interleaved_in_their_own_order() {
        let it = |c: u32, i: u32| (PathBuf::from(format!("{c}/{i}.png")), c);
        let items = vec![it(0, 0), it(0, 1), it(0, 2), it(1, 0), it(2, 0), it(2, 1)];
        let out = interleave_classes(items, 3);
        let names: Vec<String> = out.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            names,
            ["0/0.png", "1/0.png", "2/0.png", "0/1.png", "2/1.png", "0/2.png"]
        );
        // Every class appears among the first `classes` images.
        let first: std::collections::BTreeSet<u32> = out[..3].iter().map(|i| i.1).collect();
        assert_eq!(first.len(), 3);
    }
}
