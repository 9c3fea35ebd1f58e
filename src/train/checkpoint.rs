//! Checkpoints: one safetensors file with every parameter and buffer under its reference PyTorch
//! name (DESIGN.md §1.7), the SGD momentum buffers under `optim.momentum.<name>`, and the training
//! state as JSON values in the `__metadata__` header. Written atomically, so a crash at any point
//! leaves either the previous file or the new one, never a torn one.
//!
//! Tensors are stored as F32 (F64 for f64 host tensors), except `*.num_batches_tracked`, which is I64
//! like PyTorch's. To load the model part into the reference PyTorch model, drop the keys that start
//! with `optim.` before `load_state_dict(..., strict=True)`.
//!
//! Every tensor's bytes carry a CRC-32 in the metadata, and (format version 2, issue 14) the whole
//! header is covered too: `header_checksum` is the CRC-32 of every other metadata entry (epoch, lr
//! schedule state, best accuracy, settings, the checksum list itself) and of every tensor's name,
//! dtype and shape, so that one changed byte anywhere is reported as corruption rather than loaded
//! silently. Version-1 files (tensor checksums only) are still read.
//!
//! Non-finite weights are refused both ways: a checkpoint is never written from NaN/inf weights (the
//! last good one stays), and a file that holds them is not loaded for `eval` or `--resume`.

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

use std::path::{Path, PathBuf};

/// Marks a safetensors file as a podgpu checkpoint; bumped when the layout changes incompatibly.
const FORMAT: &str = "podgpu-checkpoint";
const FORMAT_VERSION: u64 = 2;
/// Metadata entry holding the CRC-32 of the rest of the header (format version 2).
pub const HEADER_CHECKSUM: &str = "header_checksum";
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
    /// The epoch (1-based, as `epoch` counts) whose weights `best.safetensors` holds; None before the
    /// first evaluation and in checkpoints written before it was recorded.
    pub best_epoch: Option<usize>,
    /// What the run trains on (dataset, PEDCC, run id); None in checkpoints written before run
    /// identities existed.
    pub run: Option<super::identity::RunIdentity>,
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
            best_epoch: None,
            run: None,
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
    let mut bad = NonFiniteTensors::default();
    for p in store.iter() {
        let e = Entry::of(&p.name, &p.value)?;
        bad.add(&p.name, e.nan, e.inf, e.numel);
        entries.push((p.name.clone(), e));
    }
    for (name, buf) in &optim.momentum {
        let key = format!("{MOMENTUM_PREFIX}{name}");
        let e = Entry::of(&key, buf)?;
        bad.add(&key, e.nan, e.inf, e.numel);
        entries.push((key.clone(), e));
    }
    if let Some(what) = bad.describe() {
        bail!(
            "the weights are not finite ({what}): the training diverged, and a checkpoint of them \
             would be useless, so none was written"
        );
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
    put("best_epoch", serde_json::to_value(state.best_epoch)?);
    put("run", serde_json::to_value(&state.run)?);
    put("podgpu_version", Value::from(env!("CARGO_PKG_VERSION")));
    put("extra", serde_json::to_value(&state.extra)?);
    put("optim_steps", Value::from(optim.steps));
    put("checksums", serde_json::to_value(&checksums)?);
    let shapes = entries
        .iter()
        .map(|(name, e)| (name.as_str(), e.dtype, e.shape.as_slice()));
    let sum = header_checksum(&meta, shapes);
    meta.insert(HEADER_CHECKSUM.to_string(), Value::from(sum).to_string());

    safetensors::serialize(entries, Some(meta)).map_err(|e| anyhow!("safetensors: {e}"))
}

/// The CRC-32 that covers a checkpoint's header: every metadata entry but `header_checksum` (key and
/// raw JSON text, sorted by key) and every tensor's name, dtype and shape (sorted by name). A tool
/// that edits a checkpoint on purpose recomputes it (and the edited tensors' checksums).
pub fn header_checksum<'a>(
    meta: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize])>,
) -> String {
    let mut h = crc32fast::Hasher::new();
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != HEADER_CHECKSUM).collect();
    keys.sort();
    for k in keys {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(meta[k].as_bytes());
        h.update(&[0]);
    }
    let mut t: Vec<(&str, Dtype, &[usize])> = tensors.collect();
    t.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape) in t {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(format!("{dtype:?}{shape:?}").as_bytes());
        h.update(&[0]);
    }
    format!("{:08x}", h.finalize())
}

/// Non-finite values found in a checkpoint's tensors, for one message.
#[derive(Default)]
struct NonFiniteTensors {
    first: Option<(String, usize, usize, usize)>,
    tensors: usize,
}

impl NonFiniteTensors {
    fn add(&mut self, name: &str, nan: usize, inf: usize, numel: usize) {
        if nan + inf == 0 {
            return;
        }
        self.tensors += 1;
        if self.first.is_none() {
            self.first = Some((name.to_string(), nan, inf, numel));
        }
    }

    /// "`fc.weight` holds 3 NaN and 0 infinite values of 24; 2 tensors in all".
    fn describe(&self) -> Option<String> {
        let (name, nan, inf, numel) = self.first.as_ref()?;
        let mut s = format!("`{name}` holds {nan} NaN and {inf} infinite values of {numel}");
        if self.tensors > 1 {
            s.push_str(&format!("; {} tensors in all", self.tensors));
        }
        Some(s)
    }
}

/// How many NaN and infinite values `v` holds.
fn count_non_finite<T: Copy + Into<f64>>(v: impl Iterator<Item = T>) -> (usize, usize) {
    let (mut nan, mut inf) = (0, 0);
    for x in v {
        let x: f64 = x.into();
        if x.is_nan() {
            nan += 1;
        } else if x.is_infinite() {
            inf += 1;
        }
    }
    (nan, inf)
}

/// One tensor's bytes in its on-disk dtype, and how many of its values are NaN or infinite.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    nan: usize,
    inf: usize,
    numel: usize,
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
                nan: 0,
                inf: 0,
                numel: t.numel(),
            });
        }
        let (dtype, bytes, (nan, inf)) = match (t.device(), t.dtype()) {
            (Device::Cpu, DType::F64) => {
                let v = t.host::<f64>();
                let counts = count_non_finite(v.iter().copied());
                (Dtype::F64, le_bytes(v, f64::to_le_bytes), counts)
            }
            (Device::Cpu, DType::F32) => {
                let v = t.host::<f32>();
                let counts = count_non_finite(v.iter().copied());
                (Dtype::F32, le_bytes(v, f32::to_le_bytes), counts)
            }
            // Checkpoints stay f32 whatever the precision the values were computed in.
            (Device::Cuda(_), _) | (Device::Cpu, DType::Bf16) => {
                let v = t.to_vec_f32();
                let counts = count_non_finite(v.iter().copied());
                (Dtype::F32, le_bytes(&v, f32::to_le_bytes), counts)
            }
        };
        Ok(Entry {
            dtype,
            shape,
            bytes,
            nan,
            inf,
            numel: t.numel(),
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
    let bytes = crate::fsutil::read_regular(path)
        .with_context(|| format!("could not read checkpoint {}", path.display()))?;
    parse_checkpoint(path, &bytes)
}

/// What to do with a damaged checkpoint, exactly: a run's `last.safetensors` can be continued from
/// its `best.safetensors` by copying it over (the two belong to the same run).
pub fn damaged_checkpoint_advice(path: &Path) -> String {
    use crate::fsutil::quoted;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let best = dir.join("best.safetensors");
    let is_last = path.file_name().is_some_and(|n| n == "last.safetensors");
    if is_last && best.is_file() {
        format!(
            "to continue the run from its best epoch instead, copy that checkpoint over this one \
             (`cp {} {}`) and run `podgpu train --resume {}` again; or restore it from a backup, or \
             start the run again",
            quoted(&best),
            quoted(path),
            quoted(dir)
        )
    } else if is_last {
        "restore it from a backup or start the run again (the run has no best.safetensors to \
         continue from)"
            .into()
    } else {
        "use another checkpoint (the run's last.safetensors, or a backup)".into()
    }
}

/// Parses checkpoint bytes; `path` only names the file in error messages.
pub fn parse_checkpoint(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let shown = path.display();
    let advice = damaged_checkpoint_advice(path);
    let corrupted =
        |why: String| anyhow!("checkpoint {shown} is corrupted or truncated ({why}); {advice}");
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
    if !matches!(version.as_u64(), Some(1..=FORMAT_VERSION)) {
        bail!(
            "checkpoint {shown} has format version {version}, this podgpu reads version \
             {FORMAT_VERSION}; use the podgpu version that wrote it ({})",
            meta.get("podgpu_version").map_or("unknown", |s| s.as_str())
        );
    }
    if version.as_u64() != Some(1) {
        // Version 2 and later: the header is covered by its own checksum.
        let want = get(HEADER_CHECKSUM)?;
        let shapes: Vec<(String, Dtype, Vec<usize>)> = st
            .iter()
            .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec()))
            .collect();
        let got = header_checksum(
            &meta,
            shapes
                .iter()
                .map(|(n, d, s)| (n.as_str(), *d, s.as_slice())),
        );
        if want.as_str() != Some(got.as_str()) {
            return Err(corrupted(
                "its header fails its checksum: the training state, the settings or the list \
                 of tensors was changed"
                    .into(),
            ));
        }
    }
    macro_rules! parse {
        ($k:expr) => {
            serde_json::from_value(get($k)?)
                .map_err(|e| corrupted(format!("metadata entry `{}`: {e}", $k)))?
        };
    }
    // Entries that version-1 files lack.
    macro_rules! parse_opt {
        ($k:expr) => {
            match meta.get($k) {
                None => None,
                Some(_) => parse!($k),
            }
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
        best_epoch: parse_opt!("best_epoch"),
        run: parse_opt!("run"),
        podgpu_version: parse!("podgpu_version"),
        extra: parse!("extra"),
    };
    let steps: u64 = parse!("optim_steps");
    let checksums: BTreeMap<String, String> = parse!("checksums");

    let mut tensors = BTreeMap::new();
    let mut momentum = BTreeMap::new();
    let mut bad = NonFiniteTensors::default();
    for (name, view) in st.iter() {
        let want = checksums
            .get(name)
            .ok_or_else(|| corrupted(format!("tensor `{name}` has no checksum")))?;
        let got = format!("{:08x}", crc32fast::hash(view.data()));
        if &got != want {
            return Err(corrupted(format!("tensor `{name}` fails its checksum")));
        }
        let (t, nan, inf) = tensor_of(name, &view).map_err(|e| corrupted(e.to_string()))?;
        bad.add(name, nan, inf, t.numel());
        match name.strip_prefix(MOMENTUM_PREFIX) {
            Some(param) => momentum.insert(param.to_string(), t),
            None => tensors.insert(name.to_string(), t),
        };
    }
    if let Some(missing) = checksums.keys().find(|k| st.tensor(k.as_str()).is_err()) {
        return Err(corrupted(format!("tensor `{missing}` is missing")));
    }
    if let Some(what) = bad.describe() {
        bail!(
            "checkpoint {shown} holds non-finite values ({what}), so its weights are unusable; \
             {advice}"
        );
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        optim: SgdState { momentum, steps },
        state,
    })
}

/// A tensor of the file as a host tensor, and how many NaN and infinite values it holds.
fn tensor_of(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<(Tensor, usize, usize)> {
    let shape = view.shape();
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (nan, inf) = count_non_finite(v.iter().copied());
            (Tensor::from_vec(shape, v), nan, inf)
        }
        Dtype::F64 => {
            let v: Vec<f64> = data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (nan, inf) = count_non_finite(v.iter().copied());
            (Tensor::from_vec(shape, v), nan, inf)
        }
        Dtype::I64 => (
            Tensor::from_vec(
                shape,
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            ),
            0,
            0,
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
/// `best.safetensors` (a copy of the same file). Updates `state.best_acc` and `state.best_epoch`
/// (= `state.epoch`) first so that both files record them. `last` is written first: a failure
/// between the two writes (disk full, SIGKILL) leaves a `last` that records a best epoch equal to its
/// own, from which `reconcile_best` restores `best.safetensors` on resume.
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
        state.best_epoch = Some(state.epoch);
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

/// Makes `best.safetensors` agree with the run's record in `state` (read from `last.safetensors`,
/// whose bytes are `last_bytes`) after a failure between the two writes of an epoch's end: when the
/// record's best epoch is the epoch `last` ends (`mid_epoch` false), `best` is restored from `last`;
/// otherwise a `best` that does not hold the recorded epoch is left alone and reported. Returns the
/// note to print, if any.
pub fn reconcile_best(
    run_dir: &Path,
    state: &TrainState,
    last_bytes: &[u8],
    mid_epoch: bool,
) -> Result<Option<String>> {
    let (Some(acc), Some(epoch)) = (state.best_acc, state.best_epoch) else {
        return Ok(None);
    };
    let best = run_dir.join("best.safetensors");
    let run_id = state.run.as_ref().map(|r| r.run_id.as_str());
    let found = if best.exists() {
        match load_checkpoint(&best) {
            Ok(c) => {
                let same_run = c.state.run.as_ref().map(|r| r.run_id.as_str()) == run_id;
                if c.state.epoch == epoch && c.state.best_acc == Some(acc) && same_run {
                    return Ok(None);
                }
                if same_run {
                    format!("it holds epoch {}", c.state.epoch)
                } else {
                    "it belongs to another run".to_string()
                }
            }
            Err(e) => format!("it cannot be read ({e:#})"),
        }
    } else {
        "it is missing".to_string()
    };
    let pct = 100.0 * acc;
    if epoch == state.epoch && !mid_epoch {
        write_atomic(&best, last_bytes)?;
        return Ok(Some(format!(
            "note: restored {} from last.safetensors (epoch {epoch}, test accuracy {pct:.2}%): \
             {found}, the run stopped before writing it",
            best.display()
        )));
    }
    Ok(Some(format!(
        "warning: {} does not hold the run's best epoch (epoch {epoch}, test accuracy {pct:.2}%): \
         {found}; it is left as it is, and the next epoch that beats {pct:.2}% writes a new one",
        best.display()
    )))
}
