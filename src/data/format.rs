//! The podgpu dataset file (`.bin`): what is on disk, and the writer.
//!
//! Layout (all integers little-endian; the full spec is `datasets/FORMAT.md`):
//!
//! ```text
//! 0   magic        8 bytes  "PODGPUDS"
//! 8   version      u32      FORMAT_VERSION
//! 12  meta_len     u32      length of the JSON metadata that follows the header
//! 16  meta_crc32   u32      CRC-32 of the metadata bytes
//! 20  header_crc32 u32      CRC-32 of bytes 0..20
//! 24  metadata     meta_len bytes of UTF-8 JSON (`Meta`)
//! ..  sections     at the 64-byte aligned offsets the metadata names: per split, the pixels
//!                  (u8, N×C×H×W, NCHW) and the labels (u32, N)
//! ```
//!
//! The metadata is JSON rather than a packed struct so that it stays readable with `head -c` and can
//! grow optional fields without a version bump; the bulk data is raw so that it can be memory-mapped.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

use super::DatasetError;

pub const MAGIC: [u8; 8] = *b"PODGPUDS";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 24;
/// Every section starts at a multiple of this, so u32 labels and SIMD-friendly pixel rows are aligned in
/// the memory map (which itself is page aligned).
pub const SECTION_ALIGN: u64 = 64;
/// The metadata is small (names and offsets); a larger value means a corrupt header, not a big dataset.
pub const MAX_META_LEN: u32 = 64 << 20;

/// Where one section lies in the file and its checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

/// One split (e.g. "train", "test") as described in the metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub name: String,
    /// Number of images.
    pub n: u64,
    pub h: u32,
    pub w: u32,
    /// u8 pixels, N×C×H×W (channel-planar per image).
    pub pixels: Section,
    /// u32 little-endian labels, one per image, each < number of classes.
    pub labels: Section,
}

/// The JSON metadata block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Short dataset name, e.g. "cifar10".
    pub name: String,
    /// Class names; label k is `classes[k]`.
    pub classes: Vec<String>,
    /// Channels per image (1 grey, 3 RGB), shared by every split.
    pub channels: u32,
    /// Per-channel normalisation on the [0, 1] scale: x = (pixel/255 - mean[c]) / std[c].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Always "NCHW-u8" in version 1; stored so that a reader can say what it found.
    pub layout: String,
    /// Free text: where the data came from and how the normalisation was chosen.
    #[serde(default)]
    pub source: String,
    pub splits: Vec<SplitMeta>,
}

pub const LAYOUT: &str = "NCHW-u8";

/// An in-memory split to write: pixels N×C×H×W u8, one label per image.
#[derive(Clone, Debug)]
pub struct SplitData {
    pub name: String,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
}

/// Everything needed to write a dataset file.
#[derive(Clone, Debug)]
pub struct DatasetSpec {
    pub name: String,
    pub classes: Vec<String>,
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub source: String,
    pub splits: Vec<SplitData>,
}

const META_SLACK: usize = 128;

fn align_up(x: u64) -> u64 {
    x.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The fixed 24-byte header for a metadata block.
pub fn header_bytes(version: u32, meta: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&(meta.len() as u32).to_le_bytes());
    h[16..20].copy_from_slice(&crc32(meta).to_le_bytes());
    let hc = crc32(&h[0..20]);
    h[20..24].copy_from_slice(&hc.to_le_bytes());
    h
}

/// What is wrong with a per-channel normalisation, if anything: every value must be finite, every std
/// above zero, and every normalised pixel `(p/255 − mean)/std` (computed as the loader does) finite in
/// f32 — a tiny std would turn the inputs into infinities.
pub fn normalisation_problem(mean: &[f32], std: &[f32]) -> Option<String> {
    for (c, (&m, &s)) in mean.iter().zip(std).enumerate() {
        if !m.is_finite() {
            return Some(format!(
                "mean values must be finite, got {m} for channel {c}"
            ));
        }
        if !(s.is_finite() && s > 0.0) {
            return Some(format!(
                "std values must be finite and > 0, got {s} for channel {c}"
            ));
        }
        for p in [0.0, 1.0] {
            let x = ((p - m as f64) / s as f64) as f32;
            if !x.is_finite() {
                return Some(format!(
                    "mean {m} / std {s} of channel {c} turn pixel value {} into {x}: the inputs \
                     would not be finite (std is far too small)",
                    p * 255.0
                ));
            }
        }
    }
    None
}

impl DatasetSpec {
    /// Checks the spec is self-consistent (the same rules the reader enforces), so that a converter bug
    /// surfaces before a file is written rather than when it is opened.
    pub fn validate(&self) -> Result<(), DatasetError> {
        let bad = |msg: String| Err(DatasetError::Invalid(msg));
        if self.classes.is_empty() {
            return bad("the dataset has no classes".into());
        }
        if self.channels == 0 {
            return bad("the dataset has 0 channels".into());
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return bad(format!(
                "mean/std must have one value per channel ({}), got {} and {}",
                self.channels,
                self.mean.len(),
                self.std.len()
            ));
        }
        if let Some(problem) = normalisation_problem(&self.mean, &self.std) {
            return bad(problem);
        }
        if self.splits.is_empty() {
            return bad("the dataset has no splits".into());
        }
        for (i, s) in self.splits.iter().enumerate() {
            if self.splits[..i].iter().any(|o| o.name == s.name) {
                return bad(format!("split name '{}' appears twice", s.name));
            }
            if s.n == 0 {
                return Err(DatasetError::EmptySplit {
                    split: s.name.clone(),
                });
            }
            if s.h == 0 || s.w == 0 {
                return bad(format!("split '{}' has image size {}x{}", s.name, s.h, s.w));
            }
            let expect =
                s.n.checked_mul(self.channels)
                    .and_then(|x| x.checked_mul(s.h))
                    .and_then(|x| x.checked_mul(s.w));
            let Some(expect) = expect else {
                return bad(format!(
                    "split '{}': n={} c={} h={} w={} overflows",
                    s.name, s.n, self.channels, s.h, s.w
                ));
            };
            if s.h > u32::MAX as usize || s.w > u32::MAX as usize {
                return bad(format!(
                    "split '{}': image size {}x{} is too large for the format",
                    s.name, s.h, s.w
                ));
            }
            if s.pixels.len() != expect || s.labels.len() != s.n {
                return bad(format!(
                    "split '{}': {} pixel bytes and {} labels for n={} c={} h={} w={} (expected {} and {})",
                    s.name,
                    s.pixels.len(),
                    s.labels.len(),
                    s.n,
                    self.channels,
                    s.h,
                    s.w,
                    expect,
                    s.n
                ));
            }
            if let Some((i, &l)) = s
                .labels
                .iter()
                .enumerate()
                .find(|(_, &l)| l as usize >= self.classes.len())
            {
                return Err(DatasetError::LabelOutOfRange {
                    split: s.name.clone(),
                    index: i,
                    label: l,
                    classes: self.classes.len(),
                });
            }
        }
        Ok(())
    }

    /// The metadata and section layout this spec is written with.
    pub fn meta(&self) -> Meta {
        Meta {
            name: self.name.clone(),
            classes: self.classes.clone(),
            channels: self.channels as u32,
            mean: self.mean.clone(),
            std: self.std.clone(),
            layout: LAYOUT.to_string(),
            source: self.source.clone(),
            splits: self
                .splits
                .iter()
                .map(|s| SplitMeta {
                    name: s.name.clone(),
                    n: s.n as u64,
                    h: s.h as u32,
                    w: s.w as u32,
                    pixels: Section {
                        offset: 0,
                        len: s.pixels.len() as u64,
                        crc32: crc32(&s.pixels),
                    },
                    labels: Section {
                        offset: 0,
                        len: 4 * s.labels.len() as u64,
                        crc32: crc32(&labels_le_bytes(&s.labels)),
                    },
                })
                .collect(),
        }
    }
}

pub fn labels_le_bytes(labels: &[u32]) -> Vec<u8> {
    labels.iter().flat_map(|l| l.to_le_bytes()).collect()
}

/// Fills in the section offsets. The offsets are written into the JSON, whose length depends on them, so
/// iterate until the layout is stable (two rounds in practice: digits only grow).
fn layout(meta: &mut Meta) -> Vec<u8> {
    let mut data_start = align_up((HEADER_LEN + META_SLACK) as u64);
    loop {
        let mut at = data_start;
        for s in &mut meta.splits {
            s.pixels.offset = at;
            at = align_up(at + s.pixels.len);
            s.labels.offset = at;
            at = align_up(at + s.labels.len);
        }
        let json = serde_json::to_vec(meta).expect("metadata serialises");
        // Some slack after the metadata lets tools patch it in place.
        let needed = align_up((HEADER_LEN + json.len() + META_SLACK) as u64);
        if needed <= data_start {
            return json;
        }
        data_start = needed;
    }
}

/// Writes `spec` to `path` atomically: a temporary file in the same folder, fsync, rename. A crash leaves
/// either the old file or the new one, never a half-written dataset.
pub fn write_dataset(path: &Path, spec: &DatasetSpec) -> anyhow::Result<()> {
    use anyhow::Context;
    spec.validate()?;
    let mut meta = spec.meta();
    let json = layout(&mut meta);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    if path.file_name().is_none() {
        anyhow::bail!("output path {} has no file name", path.display());
    }
    let tmp = crate::fsutil::temp_path_for(path);
    let shown = path.display().to_string();
    let result = (|| -> anyhow::Result<()> {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        let mut pos = 0u64;
        let mut put = |w: &mut std::io::BufWriter<std::fs::File>,
                       bytes: &[u8],
                       at: u64|
         -> std::io::Result<()> {
            debug_assert!(at >= pos);
            w.write_all(&vec![0u8; (at - pos) as usize])?;
            w.write_all(bytes)?;
            pos = at + bytes.len() as u64;
            Ok(())
        };
        put(&mut w, &header_bytes(FORMAT_VERSION, &json), 0)?;
        put(&mut w, &json, HEADER_LEN as u64)?;
        for (s, m) in spec.splits.iter().zip(&meta.splits) {
            put(&mut w, &s.pixels, m.pixels.offset)?;
            put(&mut w, &labels_le_bytes(&s.labels), m.labels.offset)?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        // Everything a reader checks, on the written bytes, before they replace anything at `path`
        // (a file that does not open must never cost the user the file it would replace).
        let ds = super::Dataset::open(&tmp).map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.to_string().replace(&*tmp.display().to_string(), &shown)
            )
        })?;
        ds.verify_all().map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.to_string().replace(&*tmp.display().to_string(), &shown)
            )
        })?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing dataset {}", path.display())));
    }
    crate::fsutil::commit_temp(&tmp, path)
}
