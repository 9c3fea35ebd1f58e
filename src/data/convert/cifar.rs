//! CIFAR-10 and CIFAR-100, in both official versions.
//!
//! Binary version: records of `<label><3072 pixels>` (CIFAR-10) or `<coarse><fine><3072 pixels>`
//! (CIFAR-100), pixels as 1024 R, 1024 G, 1024 B row-major 32×32 — already our NCHW layout per image.
//! Class names come from `batches.meta.txt` (CIFAR-10) or `fine_label_names.txt` /
//! `coarse_label_names.txt` (CIFAR-100) when present among the inputs or beside them.
//!
//! Python version: pickled dicts with `data` (uint8 array N×3072, same pixel order) and `labels`
//! (CIFAR-10) or `fine_labels`/`coarse_labels` (CIFAR-100); class names in `batches.meta` (`label_names`)
//! or `meta` (`fine_label_names`, `coarse_label_names`).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::pickle::{self, Value};
use super::{split_of_file, LabelKind, RawDataset, RawSplit};

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
const IMAGE_BYTES: usize = 3 * 32 * 32;

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads a text file of class names, one per line (blank lines dropped).
fn read_names(path: &Path) -> Result<Vec<String>> {
    let text = crate::fsutil::read_regular_to_string(path)
        .with_context(|| format!("cannot read class names from {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Finds a metadata file named `name` among the inputs or in the folder of the first data file.
fn find_beside(files: &[PathBuf], name: &str) -> Option<PathBuf> {
    if let Some(p) = files.iter().find(|p| file_name(p) == name) {
        return Some(p.clone());
    }
    let dir = files.first()?.parent()?;
    let p = dir.join(name);
    p.is_file().then_some(p)
}

/// Puts data records into their splits, train files in name order (data_batch_1 … 5).
fn group_by_split(
    files: &[PathBuf],
    is_data: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut data: Vec<&PathBuf> = files.iter().filter(|p| is_data(&file_name(p))).collect();
    data.sort_by_key(|p| file_name(p));
    if data.is_empty() {
        bail!(
            "no CIFAR data files among the inputs ({} files given)",
            files.len()
        );
    }
    let mut groups: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for p in data {
        let split = split_of_file(&file_name(p));
        match groups.iter_mut().find(|(s, _)| *s == split) {
            Some((_, v)) => v.push(p.clone()),
            None => groups.push((split.to_string(), vec![p.clone()])),
        }
    }
    groups.sort_by_key(|(s, _)| if s == "train" { 0 } else { 1 });
    Ok(groups)
}

/// CIFAR-10 or CIFAR-100 binary batches.
pub fn from_bin(files: &[PathBuf], cifar100: bool, label_kind: LabelKind) -> Result<RawDataset> {
    let rec = IMAGE_BYTES + if cifar100 { 2 } else { 1 };
    let is_data = |n: &str| n.ends_with(".bin");
    let mut splits = Vec::new();
    for (split, paths) in group_by_split(files, is_data)? {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for p in &paths {
            let bytes = crate::fsutil::read_regular(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            if bytes.is_empty() || bytes.len() % rec != 0 {
                bail!(
                    "{} has {} bytes, not a whole number of {rec}-byte CIFAR-{} records; is it the right --from?",
                    p.display(),
                    bytes.len(),
                    if cifar100 { 100 } else { 10 }
                );
            }
            for r in bytes.chunks_exact(rec) {
                let label = if cifar100 {
                    match label_kind {
                        LabelKind::Coarse => r[0],
                        LabelKind::Fine => r[1],
                    }
                } else {
                    r[0]
                };
                labels.push(label as u32);
                pixels.extend_from_slice(&r[rec - IMAGE_BYTES..]);
            }
        }
        splits.push(RawSplit {
            name: split,
            n: labels.len(),
            h: 32,
            w: 32,
            pixels,
            labels,
        });
    }
    let classes = if cifar100 {
        let name = match label_kind {
            LabelKind::Fine => "fine_label_names.txt",
            LabelKind::Coarse => "coarse_label_names.txt",
        };
        match find_beside(files, name) {
            Some(p) => read_names(&p)?,
            None => numbered_classes(if label_kind == LabelKind::Fine {
                100
            } else {
                20
            }),
        }
    } else {
        match find_beside(files, "batches.meta.txt") {
            Some(p) => read_names(&p)?,
            None => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    };
    Ok(RawDataset {
        name: if cifar100 { "cifar100" } else { "cifar10" }.into(),
        classes,
        channels: 3,
        splits,
    })
}

pub fn numbered_classes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class{i}")).collect()
}

fn load_pickle(p: &Path) -> Result<Value> {
    let bytes =
        crate::fsutil::read_regular(p).with_context(|| format!("cannot read {}", p.display()))?;
    pickle::load(&bytes).with_context(|| format!("cannot decode the pickle {}", p.display()))
}

fn text_list(v: &Value, key: &str, path: &Path) -> Result<Vec<String>> {
    match v.get(key) {
        Some(Value::List(xs)) => xs
            .iter()
            .map(|x| {
                x.as_text()
                    .with_context(|| format!("{}: '{key}' holds a non-string", path.display()))
            })
            .collect(),
        _ => bail!("{} has no list '{key}'", path.display()),
    }
}

/// CIFAR-10 or CIFAR-100 python (pickle) batches.
pub fn from_python(files: &[PathBuf], cifar100: bool, label_kind: LabelKind) -> Result<RawDataset> {
    let is_data = |n: &str| {
        if cifar100 {
            n == "train" || n == "test"
        } else {
            n.starts_with("data_batch") || n.starts_with("test_batch")
        }
    };
    let label_key = match (cifar100, label_kind) {
        (false, _) => "labels",
        (true, LabelKind::Fine) => "fine_labels",
        (true, LabelKind::Coarse) => "coarse_labels",
    };
    let mut splits = Vec::new();
    for (split, paths) in group_by_split(files, is_data)? {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for p in &paths {
            let v = load_pickle(p)?;
            let Some(Value::Array(data)) = v.get("data") else {
                bail!(
                    "{} has no numpy array 'data'; is it a CIFAR python batch?",
                    p.display()
                );
            };
            if data.dtype.descr != "u1"
                || data.numel() % IMAGE_BYTES != 0
                || data.data.len() != data.numel()
            {
                bail!(
                    "{}: 'data' is {:?} of {}, expected uint8 N×3072",
                    p.display(),
                    data.shape,
                    data.dtype.descr
                );
            }
            if data.fortran && data.shape.len() == 2 {
                bail!(
                    "{}: 'data' is stored in Fortran order, which CIFAR batches never are",
                    p.display()
                );
            }
            let ls = v
                .get(label_key)
                .with_context(|| format!("{} has no '{label_key}'", p.display()))?
                .as_ints()
                .with_context(|| format!("{}: '{label_key}'", p.display()))?;
            let n = data.numel() / IMAGE_BYTES;
            if ls.len() != n {
                bail!("{}: {} images but {} labels", p.display(), n, ls.len());
            }
            for l in ls {
                if !(0..=u32::MAX as i64).contains(&l) {
                    bail!("{}: label {l} is negative or too large", p.display());
                }
                labels.push(l as u32);
            }
            pixels.extend_from_slice(&data.data);
        }
        splits.push(RawSplit {
            name: split,
            n: labels.len(),
            h: 32,
            w: 32,
            pixels,
            labels,
        });
    }
    let (meta_name, names_key) = match (cifar100, label_kind) {
        (false, _) => ("batches.meta", "label_names"),
        (true, LabelKind::Fine) => ("meta", "fine_label_names"),
        (true, LabelKind::Coarse) => ("meta", "coarse_label_names"),
    };
    let classes = match find_beside(files, meta_name) {
        Some(p) => text_list(&load_pickle(&p)?, names_key, &p)?,
        None if cifar100 => numbered_classes(if label_kind == LabelKind::Fine {
            100
        } else {
            20
        }),
        None => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
    };
    Ok(RawDataset {
        name: if cifar100 { "cifar100" } else { "cifar10" }.into(),
        classes,
        channels: 3,
        splits,
    })
}
