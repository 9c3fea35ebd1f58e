//! The convolution algorithms cuDNN measured fastest, per shape, kept on disk so that a second run
//! (or the next process of the same run) starts without measuring again.
//!
//! One file per device model, compute capability and cuDNN version
//! (`<cache>/cudnn/<device>-sm90-cudnn92100.json`, `<cache>` = `libs::cache_root()`): an algorithm
//! measured on another GPU or another cuDNN is never reused. An entry maps a pass, a shape and a math
//! mode to the algorithm number, its workspace and its math type. A file that cannot be read is
//! ignored (the shapes are measured again) and rewritten; writes are atomic.

use super::conv::{ConvGeom, Pass};
use super::Storage;
use crate::cuda::MathMode;
use crate::tensor::Layout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FORMAT: &str = "podgpu-cudnn-algorithms";
const VERSION: u32 = 1;

/// A measured choice: cuDNN's algorithm number, its workspace bytes and its math type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub algo: u32,
    pub workspace: usize,
    pub math: u32,
}

#[derive(Serialize, Deserialize)]
struct File {
    format: String,
    version: u32,
    device: String,
    cudnn: usize,
    entries: BTreeMap<String, Choice>,
}

/// The measured choices of one device and cuDNN version, in memory and in their file.
pub struct AlgoCache {
    path: Option<PathBuf>,
    device: String,
    cudnn: usize,
    entries: BTreeMap<String, Choice>,
}

/// The key of one pass of one convolution shape in one math mode and storage type. f32 keys are
/// those of the files written before bf16 existed (no storage suffix), so those files stay valid.
pub fn key(
    pass: Pass,
    x: [usize; 4],
    w: [usize; 4],
    g: &ConvGeom,
    mode: MathMode,
    storage: Storage,
    layout: Layout,
) -> String {
    // Suffixes only for what the first caches did not have, so their keys stay valid.
    let mut suffix = match storage {
        Storage::F32 => "",
        Storage::Bf16 => " bf16",
    }
    .to_string();
    if layout == Layout::Nhwc {
        suffix.push_str(" nhwc");
    }
    format!(
        "{pass:?} x{x:?} w{w:?} stride{:?} pad{:?} dilation{:?} groups{} {mode:?}{suffix}",
        g.stride, g.pad, g.dilation, g.groups
    )
}

/// The cache file of a device (`name`, compute capability) and a cuDNN version under `root`.
pub fn file_for(root: &Path, device: &str, cc: (i32, i32), cudnn: usize) -> PathBuf {
    let safe: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    root.join("cudnn")
        .join(format!("{safe}-sm{}{}-cudnn{cudnn}.json", cc.0, cc.1))
}

impl AlgoCache {
    /// The cache in `path` (`None`: memory only). A missing file is an empty cache; an unreadable
    /// or foreign one too, with a warning saying so (it will be rewritten).
    pub fn open(path: Option<PathBuf>, device: &str, cudnn: usize) -> (AlgoCache, Option<String>) {
        let mut cache = AlgoCache {
            path,
            device: device.to_string(),
            cudnn,
            entries: BTreeMap::new(),
        };
        let Some(p) = cache.path.clone() else {
            return (cache, None);
        };
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (cache, None),
            Err(e) => return (cache, Some(format!("cannot read {}: {e}", p.display()))),
        };
        match serde_json::from_str::<File>(&text) {
            Ok(f)
                if f.format == FORMAT
                    && f.version == VERSION
                    && f.device == device
                    && f.cudnn == cudnn =>
            {
                cache.entries = f.entries;
                (cache, None)
            }
            Ok(_) => (
                cache,
                Some(format!(
                    "{} belongs to another device, cuDNN or format: measuring again",
                    p.display()
                )),
            ),
            Err(e) => (
                cache,
                Some(format!("{} is damaged ({e}): measuring again", p.display())),
            ),
        }
    }

    pub fn get(&self, key: &str) -> Option<Choice> {
        self.entries.get(key).copied()
    }

    /// Records a choice and rewrites the file (atomically). A file that cannot be written only costs
    /// a measurement in the next process: the error is returned for a warning, never fatal.
    pub fn insert(&mut self, key: String, choice: Choice) -> Result<(), String> {
        self.entries.insert(key, choice);
        let Some(p) = &self.path else { return Ok(()) };
        let file = File {
            format: FORMAT.into(),
            version: VERSION,
            device: self.device.clone(),
            cudnn: self.cudnn,
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        crate::fsutil::write_atomic(p, text.as_bytes()).map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: ConvGeom = ConvGeom {
        stride: [1, 1],
        pad: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };

    fn choice(algo: u32) -> Choice {
        Choice {
            algo,
            workspace: 1 << 20,
            math: 1,
        }
    }

    #[test]
    fn keys_tell_passes_shapes_and_modes_apart() {
        let x = [128, 64, 32, 32];
        let w = [64, 64, 3, 3];
        let (f32_nchw, bf16, nhwc) = (
            (Storage::F32, Layout::RowMajor),
            (Storage::Bf16, Layout::RowMajor),
            (Storage::Bf16, Layout::Nhwc),
        );
        let at = |pass, x, g: &ConvGeom, mode, (storage, layout): (Storage, Layout)| {
            key(pass, x, w, g, mode, storage, layout)
        };
        let k = at(Pass::Forward, x, &G, MathMode::Tf32, f32_nchw);
        assert_ne!(k, at(Pass::BackwardData, x, &G, MathMode::Tf32, f32_nchw));
        assert_ne!(k, at(Pass::Forward, x, &G, MathMode::Fp32, f32_nchw));
        let other_x = [64, 64, 32, 32];
        assert_ne!(k, at(Pass::Forward, other_x, &G, MathMode::Tf32, f32_nchw));
        let strided = ConvGeom {
            stride: [2, 2],
            ..G
        };
        assert_ne!(k, at(Pass::Forward, x, &strided, MathMode::Tf32, f32_nchw));
        assert_eq!(k, at(Pass::Forward, x, &G, MathMode::Tf32, f32_nchw));
        // bf16 data is measured apart from f32 data, channels-last apart from NCHW; the f32 NCHW
        // key is the one the first caches wrote.
        let kb = at(Pass::Forward, x, &G, MathMode::Tf32, bf16);
        let kn = at(Pass::Forward, x, &G, MathMode::Tf32, nhwc);
        assert!(k != kb && kb != kn && k != kn);
        assert!(kn.ends_with("Tf32 bf16 nhwc"), "{kn}");
        assert!(k.ends_with("Tf32"), "{k}");
    }

    #[test]
    fn choices_survive_a_new_process_of_the_same_device_and_cudnn() {
        let t = tempfile::tempdir().unwrap();
        let path = file_for(t.path(), "NVIDIA H200", (9, 0), 92100);
        assert!(
            path.ends_with("cudnn/NVIDIA-H200-sm90-cudnn92100.json"),
            "{path:?}"
        );
        let (mut c, warn) = AlgoCache::open(Some(path.clone()), "NVIDIA H200", 92100);
        assert!(warn.is_none() && c.entries.is_empty());
        c.insert("a".into(), choice(1)).unwrap();
        c.insert("b".into(), choice(6)).unwrap();
        let (again, warn) = AlgoCache::open(Some(path.clone()), "NVIDIA H200", 92100);
        assert!(warn.is_none(), "{warn:?}");
        assert_eq!(
            (again.get("a"), again.get("b"), again.entries.len()),
            (Some(choice(1)), Some(choice(6)), 2)
        );
        // Another cuDNN version has its own file; a foreign file under this name is not trusted.
        assert_ne!(path, file_for(t.path(), "NVIDIA H200", (9, 0), 92200));
        let (other, warn) = AlgoCache::open(Some(path.clone()), "NVIDIA H100", 92100);
        assert!(other.entries.is_empty() && warn.unwrap().contains("another device"));
    }

    #[test]
    fn a_damaged_file_is_measured_again_and_rewritten() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("cudnn").join("x.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"format\": \"podgpu-cudnn-alg").unwrap();
        let (mut c, warn) = AlgoCache::open(Some(path.clone()), "dev", 1);
        assert!(c.entries.is_empty());
        assert!(warn.unwrap().contains("damaged"));
        c.insert("k".into(), choice(2)).unwrap();
        let (again, warn) = AlgoCache::open(Some(path), "dev", 1);
        assert!(warn.is_none());
        assert_eq!(again.get("k"), Some(choice(2)));
    }
}
