//! Run identity (issue 14): a run records what it trains on, so that `--resume` never continues from
//! the wrong state.
//!
//! A fresh run writes `run.json` into its folder and the same record into every checkpoint (where the
//! header checksum covers it): a run id of its own, the dataset's absolute path and identity (name,
//! classes, normalisation, every split's size and the CRC-32s of its pixels and labels, as its header
//! records them) and the PEDCC's hash. The settings are the whole serialised `TrainConfig` in the
//! checkpoint, compared key by key, so a setting added to `TrainConfig` is covered without a list
//! here. `--resume` then refuses, naming the difference and the way out:
//! - a `last.safetensors` of another run (its run id is not the folder's);
//! - a dataset that is another one, holds other images or labels, or was re-normalised — whether
//!   found at the recorded path, given again with `--data`, or reached through a relative path that
//!   now resolves elsewhere; a dataset that moved is accepted at its new place when it is the same;
//! - a `pedcc.safetensors` that is not the run's own centroids;
//! - hand edits of `config.toml` that change the run: only the settings in `RESUMABLE` may be edited
//!   (they are honoured, as the same flags are), and `data` may point to the same dataset elsewhere.

use super::checkpoint::{reconcile_best, Checkpoint, TrainState};
use super::config::TrainConfig;
use crate::data::Dataset;
use crate::fsutil::quoted;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The run folder's identity record.
pub const RUN_FILE: &str = "run.json";

/// Settings a resumed run may change (with the flags of the same names, or by editing
/// `config.toml`): how long it trains and where and how fast it runs, never what it computes.
pub const RESUMABLE: &[&str] = &["epochs", "device", "threads", "detect_anomaly", "prefetch"];

/// What a run trains on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// Unique per fresh run (16 hex digits).
    pub run_id: String,
    /// When the run started, `YYYYmmdd-HHMMSS` UTC.
    pub created: String,
    pub dataset: DatasetIdentity,
    /// The frozen head's centroids, for losses with a PEDCC head.
    pub pedcc: Option<PedccIdentity>,
}

/// A dataset file as its header describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetIdentity {
    /// Absolute path (symbolic links resolved) when the run last opened it.
    pub path: PathBuf,
    pub name: String,
    pub classes: usize,
    /// CRC-32 of the class names, one per line.
    pub class_names_crc32: String,
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub splits: Vec<SplitIdentity>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitIdentity {
    pub name: String,
    pub n: u64,
    pub h: u32,
    pub w: u32,
    pub pixels_crc32: String,
    pub labels_crc32: String,
}

/// The PEDCC's shape and the CRC-32 of its f32 values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PedccIdentity {
    pub classes: usize,
    pub dim: usize,
    pub crc32: String,
}

fn hex(v: u32) -> String {
    format!("{v:08x}")
}

/// `p` made absolute, symbolic links resolved when it exists (relative paths depend on the folder
/// podgpu runs in; the run must not).
pub fn absolute(p: &Path) -> PathBuf {
    p.canonicalize()
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

impl DatasetIdentity {
    /// The identity of an opened dataset found at `path`.
    pub fn of(ds: &Dataset, path: &Path) -> DatasetIdentity {
        let m = ds.meta();
        DatasetIdentity {
            path: absolute(path),
            name: m.name.clone(),
            classes: m.classes.len(),
            class_names_crc32: hex(crc32fast::hash(m.classes.join("\n").as_bytes())),
            channels: m.channels as usize,
            mean: m.mean.clone(),
            std: m.std.clone(),
            splits: m
                .splits
                .iter()
                .map(|s| SplitIdentity {
                    name: s.name.clone(),
                    n: s.n,
                    h: s.h,
                    w: s.w,
                    pixels_crc32: hex(s.pixels.crc32),
                    labels_crc32: hex(s.labels.crc32),
                })
                .collect(),
        }
    }

    fn splits_text(&self) -> String {
        let v: Vec<String> = self
            .splits
            .iter()
            .map(|s| format!("{} {} of {}×{}×{}", s.name, s.n, self.channels, s.h, s.w))
            .collect();
        v.join(", ")
    }

    /// How `now` differs from this (the run's) dataset, most telling difference first; None when it
    /// is the same data with the same normalisation (the path may differ).
    pub fn difference(&self, now: &DatasetIdentity) -> Option<String> {
        let shape = |d: &DatasetIdentity| {
            (
                d.classes,
                d.channels,
                d.splits
                    .iter()
                    .map(|s| (s.name.clone(), s.n, s.h, s.w))
                    .collect::<Vec<_>>(),
            )
        };
        if self.name != now.name || shape(self) != shape(now) {
            return Some(format!(
                "it is another dataset (`{}`: {} classes, {}), the run trained on `{}` ({} \
                 classes, {})",
                now.name,
                now.classes,
                now.splits_text(),
                self.name,
                self.classes,
                self.splits_text()
            ));
        }
        if self.class_names_crc32 != now.class_names_crc32 {
            return Some("its class names differ from the run's dataset".into());
        }
        for (a, b) in self.splits.iter().zip(&now.splits) {
            for (what, x, y) in [
                ("pixels", &a.pixels_crc32, &b.pixels_crc32),
                ("labels", &a.labels_crc32, &b.labels_crc32),
            ] {
                if x != y {
                    return Some(format!(
                        "it holds other {what}: split '{}' {what} have CRC-32 {y}, the run's \
                         dataset {x}",
                        a.name
                    ));
                }
            }
        }
        if self.mean != now.mean || self.std != now.std {
            return Some(format!(
                "it was re-normalised: mean {:?} / std {:?} now, the run trained with mean {:?} / \
                 std {:?} (convert it again with `--mean` and `--std` set to the run's values, or \
                 start a new run)",
                now.mean, now.std, self.mean, self.std
            ));
        }
        None
    }
}

impl PedccIdentity {
    pub fn of(centroids: &Tensor) -> PedccIdentity {
        let bytes: Vec<u8> = centroids
            .to_vec_f32()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        PedccIdentity {
            classes: centroids.dim(0),
            dim: centroids.dim(1),
            crc32: hex(crc32fast::hash(&bytes)),
        }
    }
}

/// A run id no other run has: time, process and a counter, mixed.
fn new_run_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = nanos
        ^ ((std::process::id() as u64) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:016x}", crate::rng::Rng::new(seed).next_u64())
}

impl RunIdentity {
    /// A new run's identity.
    pub fn new(dataset: DatasetIdentity, pedcc: Option<PedccIdentity>) -> RunIdentity {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        RunIdentity {
            run_id: new_run_id(),
            created: super::trainer::timestamp(secs),
            dataset,
            pedcc,
        }
    }

    /// "run 1f2e… started 20250101-120000 on /data/cifar10.bin".
    fn describe(&self) -> String {
        format!(
            "run {}, started {} on {}",
            self.run_id,
            self.created,
            self.dataset.path.display()
        )
    }

    /// Writes `run.json` into the run folder (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("an identity always serializes");
        super::write_atomic(&dir.join(RUN_FILE), (text + "\n").as_bytes())
    }
}

/// Reads the run folder's `run.json`, None when there is none (runs from before identities).
pub fn load_run_file(dir: &Path) -> Result<Option<RunIdentity>> {
    let path = dir.join(RUN_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::fsutil::read_regular_to_string(&path)
        .with_context(|| format!("could not read {}", path.display()))?;
    serde_json::from_str(&text).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "{} is damaged ({e}); delete it, and `podgpu train --resume {}` writes it again from \
             last.safetensors",
            path.display(),
            quoted(dir)
        )
    })
}

/// Checks that `last.safetensors` (whose identity is `ckpt`) belongs to the run of `dir` (its
/// `run.json`). Returns whether `run.json` needs to be written (missing).
pub fn check_checkpoint_belongs(dir: &Path, ckpt: Option<&RunIdentity>) -> Result<bool> {
    let Some(folder) = load_run_file(dir)? else {
        return Ok(true);
    };
    let last = dir.join("last.safetensors");
    match ckpt {
        Some(c) if c.run_id == folder.run_id => Ok(false),
        other => bail!(
            "{} belongs to another run ({}), not to the run of {} ({}); put this run's own \
             checkpoint back (or its best.safetensors), or resume the other run in its own folder",
            last.display(),
            other.map_or("a run that records no run id".into(), |c| c.describe()),
            dir.display(),
            folder.describe()
        ),
    }
}

/// The run's settings for a resume: those saved in the checkpoint, with the edits of the folder's
/// `config.toml` that a resume may make (`RESUMABLE`) honoured; any other edit is refused, never
/// silently overwritten. Returns the settings and a `data` path edited into `config.toml` (to be
/// checked as the same dataset).
pub fn settings_for_resume(
    dir: &Path,
    saved: &TrainConfig,
) -> Result<(TrainConfig, Option<PathBuf>)> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok((saved.clone(), None));
    }
    let text = crate::fsutil::read_regular_to_string(&path)
        .with_context(|| format!("could not read {}", path.display()))?;
    let edited = TrainConfig::from_toml_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid ({e}); fix it, or delete it to continue with the settings saved in \
             last.safetensors",
            path.display()
        )
    })?;
    let (a, b) = (saved.to_json(), edited.to_json());
    let (Value::Object(a), Value::Object(b)) = (&a, &b) else {
        return Ok((saved.clone(), None));
    };
    let mut merged = a.clone();
    let mut refused = Vec::new();
    let mut data = None;
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (old, new) = (
            a.get(k).unwrap_or(&Value::Null),
            b.get(k).unwrap_or(&Value::Null),
        );
        if old == new || k == "out" {
            continue;
        }
        if RESUMABLE.contains(&k.as_str()) {
            merged.insert(k.clone(), new.clone());
        } else if k == "data" {
            data = edited.data.clone();
        } else {
            refused.push(format!(
                "{k} = {new} in config.toml, {old} in the checkpoint"
            ));
        }
    }
    if !refused.is_empty() {
        bail!(
            "{} and the run's checkpoint disagree on settings that a run keeps from its start \
             ({}): was config.toml edited? Only {} may change when resuming (and data may point \
             to the same dataset in a new place). Undo the edit to continue the run, or start a \
             new run with these settings: `podgpu train --config {} --out NEW_FOLDER`",
            path.display(),
            refused.join("; "),
            RESUMABLE.join(", "),
            quoted(&path)
        );
    }
    let cfg = TrainConfig::from_json(&Value::Object(merged))?;
    Ok((cfg, data))
}

/// Where a resumed run's dataset comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// `--data` given with `--resume`.
    Flag,
    /// A `data` path edited into `config.toml`.
    ConfigFile,
    /// The run's record (the absolute path it last opened).
    Recorded,
}

/// The dataset file a resumed run opens: `--data`, else a path edited into `config.toml`, else the
/// absolute path the run recorded (for runs without a record: the saved setting).
pub fn resume_data_path(
    flag: Option<&Path>,
    edited: Option<&Path>,
    run: Option<&RunIdentity>,
    saved: Option<&Path>,
) -> (Option<PathBuf>, DataSource) {
    if let Some(p) = flag {
        return (Some(p.to_path_buf()), DataSource::Flag);
    }
    if let Some(p) = edited {
        return (Some(p.to_path_buf()), DataSource::ConfigFile);
    }
    match run {
        Some(r) => (Some(r.dataset.path.clone()), DataSource::Recorded),
        None => (saved.map(Path::to_path_buf), DataSource::Recorded),
    }
}

/// Refuses a resume whose recorded dataset is gone, saying how to give it again if it moved.
pub fn check_dataset_exists(dir: &Path, path: &Path, source: DataSource) -> Result<()> {
    if source == DataSource::Recorded && !path.exists() {
        bail!(
            "dataset file {} does not exist: the run {} trained on it; if it moved, continue \
             with `podgpu train --resume {} --data NEW_PATH` (podgpu checks that it is the same \
             dataset), or convert it again with `podgpu data convert` and the same settings",
            path.display(),
            dir.display(),
            quoted(dir)
        );
    }
    Ok(())
}

/// Checks the dataset a resumed run opened (`ds`, found at `path`) against the run's record and
/// records its place. Returns a note when it moved.
pub fn check_dataset(
    run: &mut RunIdentity,
    ds: &Dataset,
    path: &Path,
    source: DataSource,
) -> Result<Option<String>> {
    let now = DatasetIdentity::of(ds, path);
    if let Some(diff) = run.dataset.difference(&now) {
        let resolved = if path.is_relative() {
            format!(
                " (the relative path {} resolves to {} from here)",
                path.display(),
                now.path.display()
            )
        } else {
            String::new()
        };
        let (given, way_out) = match source {
            DataSource::Flag => (
                "given with --data",
                "give the run's own dataset with --data, or start a new run on this one",
            ),
            DataSource::ConfigFile => (
                "named in config.toml",
                "set data in config.toml back to the run's dataset, or start a new run on this one",
            ),
            DataSource::Recorded => (
                "at the run's recorded path",
                "put the run's own dataset back at that path (or give it with --data), or start a \
                 new run on this one",
            ),
        };
        bail!(
            "the dataset {}{resolved} {given} is not the one this run trained on ({}): {diff}; \
             {way_out}",
            path.display(),
            run.dataset.path.display()
        );
    }
    if now.path != run.dataset.path {
        let note = format!(
            "note: the run's dataset moved: using {} (the run started on {}), which holds the \
             same data",
            now.path.display(),
            run.dataset.path.display()
        );
        run.dataset.path = now.path;
        return Ok(Some(note));
    }
    Ok(None)
}

/// Checks that the run folder's PEDCC (`centroids`, read from `path`) is the one the run started
/// with.
pub fn check_pedcc(run: &RunIdentity, centroids: &Tensor, path: &Path) -> Result<()> {
    let Some(want) = &run.pedcc else {
        return Ok(());
    };
    let got = PedccIdentity::of(centroids);
    if &got != want {
        bail!(
            "{} is not this run's PEDCC: its centroids ([{}, {}], CRC-32 {}) differ from those the \
             run started with ([{}, {}], CRC-32 {}); restore the run's own pedcc.safetensors from \
             a backup, or start a new run",
            path.display(),
            got.classes,
            got.dim,
            got.crc32,
            want.classes,
            want.dim,
            want.crc32
        );
    }
    Ok(())
}

/// The identity side of `--resume`, in the order the trainer needs it: `begin` (the checkpoint is
/// this folder's run; the settings, with the `config.toml` edits a resume may make), `dataset_path`
/// (which file to open), `check` (the opened dataset and the PEDCC are the run's own; runs from
/// before identities get one), `finish` (`best.safetensors` agrees with the record; `run.json` and
/// `config.toml` written when they need to be).
pub struct Resume {
    dir: PathBuf,
    last: PathBuf,
    run: Option<RunIdentity>,
    write_run_file: bool,
    data: Option<PathBuf>,
    source: DataSource,
}

impl Resume {
    /// Checks that `ckpt` (the folder's `last.safetensors`) belongs to the run of `dir`, and returns
    /// the run's settings: the checkpoint's, with the edits of `config.toml` that a resume may make.
    /// `data_flag` is `--data` given with `--resume`.
    pub fn begin(
        dir: &Path,
        ckpt: &Checkpoint,
        data_flag: Option<&Path>,
    ) -> Result<(Resume, TrainConfig)> {
        let saved = TrainConfig::from_json(&ckpt.state.config)
            .with_context(|| format!("the configuration saved in {}", ckpt.path.display()))?;
        let write_run_file = check_checkpoint_belongs(dir, ckpt.state.run.as_ref())?;
        let (cfg, edited_data) = settings_for_resume(dir, &saved)?;
        let (data, source) = resume_data_path(
            data_flag,
            edited_data.as_deref(),
            ckpt.state.run.as_ref(),
            saved.data.as_deref(),
        );
        let resume = Resume {
            dir: dir.to_path_buf(),
            last: ckpt.path.clone(),
            run: ckpt.state.run.clone(),
            write_run_file,
            data,
            source,
        };
        Ok((resume, cfg))
    }

    /// The dataset file to open (the trainer's `cfg.data`); a recorded one that is gone is refused
    /// with the way to give its new place.
    pub fn dataset_path(&self) -> Result<Option<PathBuf>> {
        if let Some(d) = &self.data {
            check_dataset_exists(&self.dir, d, self.source)?;
        }
        Ok(self.data.clone())
    }

    /// Checks the opened dataset and the run folder's PEDCC against the run's record and points
    /// `cfg.data` at the dataset's absolute path; a run from before identities is given one now.
    /// Returns the identity later checkpoints record.
    pub fn check(
        &mut self,
        ds: &Dataset,
        centroids: Option<&Tensor>,
        cfg: &mut TrainConfig,
    ) -> Result<Option<RunIdentity>> {
        let data = self
            .data
            .clone()
            .unwrap_or_else(crate::data::default_dataset_path);
        match &mut self.run {
            Some(run) => {
                if let Some(note) = check_dataset(run, ds, &data, self.source)? {
                    println!("{note}");
                }
                if let Some(c) = centroids {
                    check_pedcc(run, c, &self.dir.join("pedcc.safetensors"))?;
                }
            }
            None => {
                println!(
                    "note: {} predates run identity records; recording its dataset ({}) and \
                     PEDCC now",
                    self.dir.display(),
                    data.display()
                );
                self.run = Some(RunIdentity::new(
                    DatasetIdentity::of(ds, &data),
                    centroids.map(PedccIdentity::of),
                ));
                self.write_run_file = true;
            }
        }
        cfg.data = Some(absolute(&data));
        Ok(self.run.clone())
    }

    /// After the run is ready to go on (with `state` and `cfg` in force; `mid_epoch` when the
    /// checkpoint was written inside an epoch): restores or reports a `best.safetensors` that does
    /// not agree with the record (a failure between writing last and best), writes `run.json` when
    /// it is missing or changed (a moved dataset), and `config.toml` only when the settings in
    /// force differ from what it says (a flag given with --resume), so that the user's own
    /// formatting and comments stay.
    pub fn finish(&self, state: &TrainState, cfg: &TrainConfig, mid_epoch: bool) -> Result<()> {
        let last_bytes = crate::fsutil::read_regular(&self.last)
            .with_context(|| format!("could not read checkpoint {}", self.last.display()))?;
        if let Some(note) = reconcile_best(&self.dir, state, &last_bytes, mid_epoch)? {
            println!("{note}");
        }
        drop(last_bytes);
        if let Some(run) = &state.run {
            if self.write_run_file || load_run_file(&self.dir)?.as_ref() != Some(run) {
                run.save(&self.dir)?;
            }
        }
        let config_file = self.dir.join("config.toml");
        let on_disk = crate::fsutil::read_regular_to_string(&config_file)
            .ok()
            .and_then(|t| TrainConfig::from_toml_str(&t).ok());
        if on_disk.as_ref() != Some(cfg) {
            cfg.save(&config_file)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> DatasetIdentity {
        DatasetIdentity {
            path: "/d/tiny.bin".into(),
            name: "tiny".into(),
            classes: 3,
            class_names_crc32: "0000000a".into(),
            channels: 1,
            mean: vec![0.3],
            std: vec![0.25],
            splits: vec![SplitIdentity {
                name: "train".into(),
                n: 64,
                h: 12,
                w: 12,
                pixels_crc32: "00000001".into(),
                labels_crc32: "00000002".into(),
            }],
        }
    }

    #[test]
    fn differences_name_what_changed() {
        let a = identity();
        let mut b = a.clone();
        b.path = "/elsewhere/tiny.bin".into();
        assert_eq!(a.difference(&b), None, "a move is no difference");
        b.std = vec![0.5];
        assert!(a.difference(&b).unwrap().contains("re-normalised"));
        b.splits[0].pixels_crc32 = "00000009".into();
        let d = a.difference(&b).unwrap();
        assert!(d.contains("other pixels") && d.contains("00000009"), "{d}");
        b.classes = 10;
        assert!(a.difference(&b).unwrap().contains("another dataset"));
    }

    #[test]
    fn run_ids_do_not_repeat() {
        let ids: std::collections::BTreeSet<String> = (0..100).map(|_| new_run_id()).collect();
        assert_eq!(ids.len(), 100);
    }
}
