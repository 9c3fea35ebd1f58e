//! Checkpoints: one safetensors file with every parameter and buffer under its reference PyTorch
//! name (DESIGN.md §1.7), the SGD momentum buffers under `optim.momentum.<name>`, and the training
//! state as JSON values in the `__metadata__` header. Written atomically, so a crash at any point
//! leaves either the previous file or the new one, never a torn one.
//!
//! Tensors are stored as F32 (F64 for f64 host tensors), except `*.num_batches_tracked`, which is I64
//! like PyTorch's. To load the model part into the reference PyTorch model, drop the keys that start
//! with `optim.` before `load_state_dict(..., strict=True)`.
//!
//! Every tensor's bytes carry a CRC-32 in the metadata, so a flipped bit in the data is reported as
//! corruption rather than loaded silently.

use crate::autograd::ParamStore;
pub use crate::fsutil::{commit_temp, temp_path_for, write_atomic};
use crate::optim::SgdState;
use crate::tensor::{DType, Device, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// Marks a safetensors file as a podgpu checkpoint; bumped when the layout changes incompatibly.
const FORMAT: &str = "podgpu-checkpoint";
const FORMAT_VERSION: u64 = 1;
/// Prefix of the momentum buffers' keys.
pub const MOMENTUM_PREFIX: &str = "optim.momentum.";

/// Everything about a run besides the tensors that resuming needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Model name (`resnet50`, ...); loading into another model is refused.
    pub model: String,
    /// The resolved training configuration (a serialized `TrainConfig`).
    pub config: Value,
    /// Number of completed epochs: a resumed run continues with 0-based epoch `epoch`.
    pub epoch: usize,
    /// Number of optimizer steps taken.
    pub global_step: u64,
    /// δ of the NaC loss for the next epoch.
    pub delta: f64,
    /// Mean norm M measured during the last completed epoch.
    pub mean_norm: f64,
    /// State of the run's random number generator.
    pub rng_state: [u64; 4],
    /// Best test accuracy so far (None before the first evaluation).
    pub best_acc: Option<f64>,
    /// Version of podgpu that wrote the checkpoint.
    pub podgpu_version: String,
    /// Anything else the trainer wants to carry across a resume.
    pub extra: BTreeMap<String, Value>,
}

impl TrainState {
    /// The state of a fresh run (epoch 0, step 0, δ and M zero: the trainer sets its initial δ).
    pub fn new(model: impl Into<String>, config: Value, rng_state: [u64; 4]) -> TrainState {
        TrainState {
            model: model.into(),
            config,
            epoch: 0,
            global_step: 0,
            delta: 0.0,
            mean_norm: 0.0,
            rng_state,
            best_acc: None,
            podgpu_version: env!("CARGO_PKG_VERSION").to_string(),
            extra: BTreeMap::new(),
        }
    }
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    /// Parameters and buffers by name, as host tensors (num_batches_tracked as f32).
    pub tensors: BTreeMap<String, Tensor>,
    /// The optimizer state (momentum buffers by parameter name, as host tensors).
    pub optim: SgdState,
    pub state: TrainState,
}

/// Writes a checkpoint atomically (see `write_atomic`). `state.podgpu_version` is written as this
/// build's version whatever the field holds.
pub fn save_checkpoint(
    path: &Path,
    store: &ParamStore,
    optim: &SgdState,
    state: &TrainState,
) -> Result<()> {
    let bytes = serialize_checkpoint(store, optim, state)
        .with_context(|| format!("could not write checkpoint {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// The bytes of a checkpoint file.
pub fn serialize_checkpoint(
    store: &ParamStore,
    optim: &SgdState,
    state: &TrainState,
) -> Result<Vec<u8>> {
    let mut entries: Vec<(String, Entry)> = Vec::with_capacity(store.len() + optim.momentum.len());
    for p in store.iter() {
        entries.push((p.name.clone(), Entry::of(&p.name, &p.value)?));
    }
    for (name, buf) in &optim.momentum {
        let key = format!("{MOMENTUM_PREFIX}{name}");
        entries.push((key.clone(), Entry::of(&key, buf)?));
    }
    let checksums: BTreeMap<&str, String> = entries
        .iter()
        .map(|(name, e)| (name.as_str(), format!("{:08x}", crc32fast::hash(&e.bytes))))
        .collect();

    for (what, v) in [("delta", state.delta), ("mean_norm", state.mean_norm)] {
        if !v.is_finite() {
            bail!("refusing to save a checkpoint with a non-finite {what} ({v})");
        }
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    let mut put = |k: &str, v: Value| meta.insert(k.to_string(), v.to_string());
    put("format", Value::from(FORMAT));
    put("format_version", Value::from(FORMAT_VERSION));
    put("model", Value::from(state.model.as_str()));
    put("config", state.config.clone());
    put("epoch", Value::from(state.epoch));
    put("global_step", Value::from(state.global_step));
    put("delta", Value::from(state.delta));
    put("mean_norm", Value::from(state.mean_norm));
    put("rng_state", serde_json::to_value(state.rng_state)?);
    put("best_acc", serde_json::to_value(state.best_acc)?);
    put("podgpu_version", Value::from(env!("CARGO_PKG_VERSION")));
    put("extra", serde_json::to_value(&state.extra)?);
    put("optim_steps", Value::from(optim.steps));
    put("checksums", serde_json::to_value(&checksums)?);

    safetensors::serialize(entries, Some(meta)).map_err(|e| anyhow!("safetensors: {e}"))
}

/// One tensor's bytes in its on-disk dtype.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Entry {
    fn of(name: &str, t: &Tensor) -> Result<Entry> {
        let shape = t.shape().to_vec();
        if is_counter(name) {
            let mut bytes = Vec::with_capacity(t.numel() * 8);
            for v in t.to_vec_f64() {
                if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0) {
                    bail!("`{name}` should hold a whole count but holds {v}");
                }
                bytes.extend_from_slice(&(v as i64).to_le_bytes());
            }
            return Ok(Entry {
                dtype: Dtype::I64,
                shape,
                bytes,
            });
        }
        let (dtype, bytes) = match (t.device(), t.dtype()) {
            (Device::Cpu, DType::F64) => (Dtype::F64, le_bytes(t.host::<f64>(), f64::to_le_bytes)),
            (Device::Cpu, DType::F32) => (Dtype::F32, le_bytes(t.host::<f32>(), f32::to_le_bytes)),
            (Device::Cuda(_), _) => (Dtype::F32, le_bytes(&t.to_vec_f32(), f32::to_le_bytes)),
        };
        Ok(Entry {
            dtype,
            shape,
            bytes,
        })
    }
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

impl View for Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Batch-norm step counters, stored as I64 like PyTorch's.
fn is_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// Reads and verifies a checkpoint. Errors say whether the file is missing, unreadable, corrupted or
/// truncated, or not a podgpu checkpoint.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    if !path.exists() {
        bail!("checkpoint {} does not exist", path.display());
    }
    let bytes =
        fs::read(path).with_context(|| format!("could not read checkpoint {}", path.display()))?;
    parse_checkpoint(path, &bytes)
}

/// Parses checkpoint bytes; `path` only names the file in error messages.
pub fn parse_checkpoint(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let shown = path.display();
    let corrupted = |why: String| {
        anyhow!(
            "checkpoint {shown} is corrupted or truncated ({why}); use another checkpoint \
             (best.safetensors, or a backup) or start the run again"
        )
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupted(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupted(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| -> Result<Value> {
        let raw = meta.get(k).ok_or_else(|| {
            anyhow!("{shown} is not a podgpu checkpoint (its metadata has no `{k}` entry)")
        })?;
        serde_json::from_str(raw)
            .map_err(|e| corrupted(format!("metadata entry `{k}` is not valid JSON: {e}")))
    };
    if get("format")? != FORMAT {
        bail!(
            "{shown} is not a podgpu checkpoint (format is {})",
            meta["format"]
        );
    }
    let version = get("format_version")?;
    if version.as_u64() != Some(FORMAT_VERSION) {
        bail!(
            "checkpoint {shown} has format version {version}, this podgpu reads version \
             {FORMAT_VERSION}; use the podgpu version that wrote it ({})",
            meta.get("podgpu_version").map_or("unknown", |s| s.as_str())
        );
    }
    macro_rules! parse {
        ($k:expr) => {
            serde_json::from_value(get($k)?)
                .map_err(|e| corrupted(format!("metadata entry `{}`: {e}", $k)))?
        };
    }
    let state = TrainState {
        model: parse!("model"),
        config: get("config")?,
        epoch: parse!("epoch"),
        global_step: parse!("global_step"),
        delta: parse!("delta"),
        mean_norm: parse!("mean_norm"),
        rng_state: parse!("rng_state"),
        best_acc: parse!("best_acc"),
        podgpu_version: parse!("podgpu_version"),
        extra: parse!("extra"),
    };
    let steps: u64 = parse!("optim_steps");
    let checksums: BTreeMap<String, String> = parse!("checksums");

    let mut tensors = BTreeMap::new();
    let mut momentum = BTreeMap::new();
    for (name, view) in st.iter() {
        let want = checksums
            .get(name)
            .ok_or_else(|| corrupted(format!("tensor `{name}` has no checksum")))?;
        let got = format!("{:08x}", crc32fast::hash(view.data()));
        if &got != want {
            return Err(corrupted(format!("tensor `{name}` fails its checksum")));
        }
        let t = tensor_of(name, &view).map_err(|e| corrupted(e.to_string()))?;
        match name.strip_prefix(MOMENTUM_PREFIX) {
            Some(param) => momentum.insert(param.to_string(), t),
            None => tensors.insert(name.to_string(), t),
        };
    }
    if let Some(missing) = checksums.keys().find(|k| st.tensor(k.as_str()).is_err()) {
        return Err(corrupted(format!("tensor `{missing}` is missing")));
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        optim: SgdState { momentum, steps },
        state,
    })
}

fn tensor_of(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    let shape = view.shape();
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => Tensor::from_vec(
            shape,
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        Dtype::F64 => Tensor::from_vec(
            shape,
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        Dtype::I64 => Tensor::from_vec(
            shape,
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
        ),
        other => {
            bail!("tensor `{name}` has dtype {other:?}; podgpu checkpoints hold F32, F64 and I64")
        }
    })
}

impl Checkpoint {
    /// Differences in names and shapes between the checkpoint's tensors and a model's parameters and
    /// buffers, one line each (empty when they match).
    pub fn differences(&self, store: &ParamStore) -> Vec<String> {
        let mut out = Vec::new();
        for p in store.iter() {
            match self.tensors.get(&p.name) {
                None => out.push(format!(
                    "`{}` is in the model but not in the checkpoint",
                    p.name
                )),
                Some(t) if t.shape() != p.value.shape() => out.push(format!(
                    "`{}` has shape {:?} in the checkpoint but {:?} in the model",
                    p.name,
                    t.shape(),
                    p.value.shape()
                )),
                Some(_) => {}
            }
        }
        for name in self.tensors.keys() {
            if store.find(name).is_none() {
                out.push(format!(
                    "`{name}` is in the checkpoint but not in the model"
                ));
            }
        }
        out
    }

    /// Errors unless the checkpoint is of model `model` and matches `store` name for name and shape.
    pub fn check_against(&self, store: &ParamStore, model: &str) -> Result<()> {
        let shown = self.path.display();
        if self.state.model != model {
            bail!(
                "checkpoint {shown} is of model `{}`, not `{model}`; pick the matching model or \
                 another checkpoint",
                self.state.model
            );
        }
        let diffs = self.differences(store);
        if diffs.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 20;
        let mut msg = format!(
            "checkpoint {shown} does not fit this `{model}` ({} differences; was it written with \
             other model options, e.g. another feature dimension or class count?):",
            diffs.len()
        );
        for d in diffs.iter().take(SHOWN) {
            msg.push_str("\n  - ");
            msg.push_str(d);
        }
        if diffs.len() > SHOWN {
            msg.push_str(&format!("\n  ... and {} more", diffs.len() - SHOWN));
        }
        bail!(msg)
    }

    /// Checks the checkpoint against `store` (see `check_against`) and copies every tensor into it,
    /// on each parameter's device and dtype.
    pub fn restore_into(&self, store: &mut ParamStore, model: &str) -> Result<()> {
        self.check_against(store, model)?;
        for p in store.iter_mut() {
            let t = &self.tensors[&p.name];
            p.value = match p.value.device() {
                Device::Cpu => t.to_dtype(p.value.dtype()),
                d => t.to_device(d),
            };
            p.grad = None;
        }
        Ok(())
    }
}

/// Paths written by `save_epoch_checkpoints`.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochCheckpoints {
    pub last: PathBuf,
    /// Set when this epoch's test accuracy is the best so far and `best.safetensors` was written.
    pub best: Option<PathBuf>,
}

/// True when `acc` beats the best accuracy so far (strictly; NaN never does).
pub fn is_new_best(best: Option<f64>, acc: Option<f64>) -> bool {
    match (best, acc) {
        (_, None) => false,
        (_, Some(a)) if a.is_nan() => false,
        (None, Some(_)) => true,
        (Some(b), Some(a)) => a > b,
    }
}

/// The end-of-epoch checkpoints: `last.safetensors` always and, when `test_acc` is a new best,
/// `best.safetensors` (a copy of the same file). Updates `state.best_acc` first so that both
/// files record it.
pub fn save_epoch_checkpoints(
    run_dir: &Path,
    store: &ParamStore,
    optim: &SgdState,
    state: &mut TrainState,
    test_acc: Option<f64>,
) -> Result<EpochCheckpoints> {
    let new_best = is_new_best(state.best_acc, test_acc);
    if new_best {
        state.best_acc = test_acc;
    }
    let last = run_dir.join("last.safetensors");
    let bytes = serialize_checkpoint(store, optim, state)
        .with_context(|| format!("could not write checkpoint {}", last.display()))?;
    write_atomic(&last, &bytes)?;
    let best = if new_best {
        let best = run_dir.join("best.safetensors");
        write_atomic(&best, &bytes)?;
        Some(best)
    } else {
        None
    };
    Ok(EpochCheckpoints { last, best })
}
