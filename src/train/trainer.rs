//! The training loop of `podgpu train`: the paper's recipe (DESIGN.md §1.7) end to end.
//!
//! Per epoch: lr from the step schedule, δ from the δ schedule, every training batch through forward →
//! loss (POD over the frozen PEDCC, or softmax CE) → backward → SGD; then δ's mean norm closes the
//! epoch, the test split is scored by cosine argmax, and metrics, plots and checkpoints are written.
//! A run folder holds everything needed to resume exactly: `config.toml`, `pedcc.safetensors`,
//! `last.safetensors` (weights, momentum, epoch, δ, M, RNG state) and the metrics so far.
//!
//! Reliability (issue 7): every input is checked before anything is written to the run folder; the
//! folder is locked against a second trainer; Ctrl-C stops after the current step with a checkpoint
//! of that exact point (`tally`); a non-finite loss or gradient stops the run naming the step, the
//! tensor and the last good checkpoint, and `--detect-anomaly` names the first op that produced one.
//!
//! Run identity (issue 14): a fresh run needs a new or empty folder (`--overwrite` replaces only
//! the run files) and records what it trains on (`identity`); `--resume` checks that record, the
//! folder's `config.toml` edits and the `best.safetensors` it claims (`checkpoint::reconcile_best`)
//! before continuing, and a dataset file that changes under a running job stops it with a
//! checkpoint of the last step that read good data.
//!
//! No host synchronisation inside a step (issue 10): the epoch's sums and the numerics guard live on
//! the training device (`ledger::StepLedger`); the host reads them every few steps (`ledger::Cadence`,
//! about once a second, or `PODGPU_READ_EVERY`), at the epoch's end and before a Ctrl-C checkpoint.
//! A non-finite step is recorded on the device and every later update skipped, so the error, read up
//! to a few steps later, names the step where it happened and the weights are those before it.

use super::checkpoint::{load_checkpoint, save_checkpoint, save_epoch_checkpoints, TrainState};
use super::config::{HeadKind, LossKind, TrainConfig};
use super::eval;
use super::identity::{self, DatasetIdentity, PedccIdentity, RunIdentity};
use super::ledger::{Cadence, NonFinite, StepLedger};
use super::metrics::{EpochRecord, MetricsLog};
use super::objective::{register_loss_buffers, Objective};
use super::plot::plot_metrics;
use super::progress::Progress;
use super::run_dir::{self, RunLock};
use super::signal::{self, Interrupted};
use super::tally::{self, EpochTally};
use crate::autograd::{ParamStore, Tape};
use crate::data::{Dataset, Loader, LoaderConfig, Split};
use crate::fsutil::quoted;
use crate::loss::{self, DeltaSchedule, Variant};
use crate::nn::{HeadSpec, ModelSpec, Network, Stem};
use crate::optim::{LrSchedule, Optimizer};
use crate::pedcc::{self, Method};
use crate::rng::Rng;
use crate::tensor::{DType, Device, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub epochs: usize,
    pub final_train_loss: f64,
    pub final_test_acc: Option<f64>,
    pub best_test_acc: Option<f64>,
    /// What the training steps of this invocation cost in host reads and waits.
    pub step_loop: LoopCounts,
}

/// Host reads and waits of the training steps (each epoch's step loop, from its first step to its
/// last read of the step ledger; evaluation and checkpoints excluded), summed over the epochs a
/// `train`/`resume` call ran. A step itself reads nothing: the host reads the ledger every
/// `PODGPU_READ_EVERY` steps (adaptive when unset), at the epoch's end and before a mid-epoch
/// checkpoint, so on a GPU `host_waits` is about `ledger_reads`, not a multiple of `steps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopCounts {
    /// Training steps taken.
    pub steps: u64,
    /// `tensor::host_reads()` during the loops (on any device).
    pub host_reads: u64,
    /// `Gpu::host_waits()` of the training GPU during the loops (0 on the CPU).
    pub host_waits: u64,
    /// Reads of the step ledger (each one host read).
    pub ledger_reads: u64,
}

/// Everything a run needs, built from the config (fresh) or from a run folder (resume).
struct Run {
    cfg: TrainConfig,
    dir: PathBuf,
    device: Device,
    train: Split,
    test: Option<Split>,
    net: Network,
    ps: ParamStore,
    /// What is minimised (the loss of `cfg.loss` and its per-step extras).
    objective: Objective,
    /// The optimiser (SGD, or AdamW for the transformers' recipes; `super::recipe`).
    sgd: Optimizer,
    schedule: LrSchedule,
    delta: DeltaSchedule,
    state: TrainState,
    metrics: MetricsLog,
    /// The sums of an epoch a mid-epoch checkpoint stopped in (resume continues it).
    pending: Option<EpochTally>,
    /// What `last.safetensors` on disk holds, for error messages ("end of epoch 3").
    saved: Option<String>,
    /// When the host reads the step ledger.
    cadence: Cadence,
    /// Host reads and waits of the step loops so far.
    loop_counts: LoopCounts,
    /// The ranks of a data-parallel run (`ranked`); one process by default.
    ranks: ranked::Ranks,
    /// Held by the rank that writes the run folder (rank 0, or the only process).
    _lock: Option<RunLock>,
}

/// How an epoch ended.
enum EpochOutcome {
    /// Trained through: its metrics record and test accuracy.
    Done(EpochRecord, Option<f64>),
    /// Stopped on request after a step; the sums so far.
    Stopped(EpochTally),
    /// The dataset file changed under the run (truncated or rewritten in place): stopped before the
    /// first batch that may hold changed data (or after training, before a test score that may);
    /// the sums of the steps trained.
    DataChanged(EpochTally),
}

/// What `--resume` may change besides continuing the run as saved.
#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Train up to this many epochs in all (extends or shortens the run).
    pub epochs: Option<usize>,
    pub device: Option<String>,
    pub threads: Option<usize>,
    /// Turn `--detect-anomaly` on for the rest of the run.
    pub detect_anomaly: bool,
    /// The run's dataset at a new place (it must be the same dataset: its identity is checked).
    pub data: Option<PathBuf>,
}

/// How a fresh run treats its `--out` folder.
#[derive(Clone, Debug, Default)]
pub struct FreshOptions {
    /// Replace the files of an earlier run in `--out` (`run_dir::RUN_FILES`; nothing else) instead
    /// of refusing a folder that is not empty.
    pub overwrite: bool,
}

/// The stem that suits an input size (DESIGN.md §1.7): CIFAR up to 32 px, the CIFAR stem with
/// max-pool up to 64 px (Tiny ImageNet, FaceScrub), the ImageNet stem above.
pub fn stem_for(height: usize) -> Stem {
    match height {
        0..=32 => Stem::Cifar,
        33..=64 => Stem::TinyImageNet,
        _ => Stem::ImageNet,
    }
}

#[path = "ranked.rs"]
pub mod ranked;
pub use ranked::{
    known_to_all_ranks, resume_ranked, train_ranked, RankHooks, Ranks, StoppedTogether,
};

/// Mixed into the seed of the per-step drop-path/dropout streams.
const DROP_SALT: u64 = 0xD50F_0A7B << 20;

/// Trains a fresh run described by `cfg` (into a new or empty folder).
pub fn train(cfg: TrainConfig) -> Result<RunSummary> {
    train_with(cfg, FreshOptions::default())
}

/// Trains a fresh run described by `cfg` with the given folder options.
pub fn train_with(cfg: TrainConfig, opts: FreshOptions) -> Result<RunSummary> {
    let run = Run::fresh(cfg, opts)?;
    run.go()
}

/// Continues the run in `dir` from its last checkpoint. `epochs` may extend the run.
pub fn resume(
    dir: &Path,
    epochs: Option<usize>,
    device: Option<String>,
    threads: Option<usize>,
) -> Result<RunSummary> {
    resume_with(
        dir,
        ResumeOptions {
            epochs,
            device,
            threads,
            detect_anomaly: false,
            data: None,
        },
    )
}

/// Continues the run in `dir` from its last checkpoint with the given changes.
pub fn resume_with(dir: &Path, opts: ResumeOptions) -> Result<RunSummary> {
    let run = Run::resumed(dir, opts)?;
    run.go()
}

/// What every run does first: validate, choose the device (saying why when `auto` falls back to the
/// CPU), size the thread pool, open the dataset.
fn prepare(
    cfg: &TrainConfig,
    writer: bool,
    single_process: bool,
) -> Result<(Device, Dataset, Split, Option<Split>)> {
    cfg.validate()?;
    let (device, note) = crate::device::select(&cfg.device)?;
    // The device note ("using the CPU: …") once per run: ranks other than 0 keep it to themselves.
    if let (Some(note), true) = (note, writer) {
        println!("{note}");
    }
    set_threads(cfg.threads, single_process);
    crate::cpu::set_deterministic(cfg.deterministic);
    crate::cuda::set_math_mode(match cfg.precision {
        super::config::Precision::Tf32 => crate::cuda::MathMode::Tf32,
        _ => crate::cuda::MathMode::Fp32,
    });
    set_precision(cfg.precision);
    check_gpu_bf16(cfg.precision, device, &cfg.model)?;
    // PODGPU_CUDA_GRAPH and PODGPU_COPY_STREAM: refused here, before a run folder exists, when
    // the run cannot use them.
    super::graphed::wanted(cfg, device)?;
    if crate::cuda::stager::wanted().map_err(anyhow::Error::msg)? && device == Device::Cpu {
        bail!("PODGPU_COPY_STREAM=1 needs a GPU (--device cuda); unset it to train on the CPU");
    }
    if cfg.sync_bn && cfg.precision == super::config::Precision::Bf16 && device != Device::Cpu {
        bail!(
            "--sync-bn with --precision bf16 on a GPU is not supported yet (the synchronised \
             batch norm has no bf16 form there): drop --sync-bn, or use --precision tf32"
        );
    }
    let (ds, train, test) = open_data(cfg)?;
    Ok((device, ds, train, test))
}

/// Applies `--precision bf16` for the process: the bf16 path's switch (`cpu::bf16`), which the
/// CPU runs as its emulation and a GPU as bf16 storage (`ops::store_bf16`). Other precisions turn
/// it off. Whether a GPU's bf16 step covers the network is checked where the network is known
/// (`check_gpu_bf16`).
pub fn set_precision(precision: super::config::Precision) {
    crate::cpu::bf16::set_emulation(precision == super::config::Precision::Bf16);
}

/// Refuses `--precision bf16` on a GPU for a network whose ops have no bf16 GPU form
/// (`nn::gpu_bf16_supported`).
pub fn check_gpu_bf16(
    precision: super::config::Precision,
    device: Device,
    arch: &str,
) -> Result<()> {
    if precision == super::config::Precision::Bf16
        && device != Device::Cpu
        && !crate::nn::gpu_bf16_supported(arch)
    {
        bail!("{}", crate::nn::gpu_bf16_unsupported(arch));
    }
    Ok(())
}

fn open_data(cfg: &TrainConfig) -> Result<(Dataset, Split, Option<Split>)> {
    let path = cfg
        .data
        .clone()
        .unwrap_or_else(crate::data::default_dataset_path);
    // Every message names the file (some dataset errors only name the split).
    let shown = path.display().to_string();
    let in_file = |e: crate::data::DatasetError| {
        let msg = e.to_string();
        if msg.contains(&shown) {
            anyhow!(msg)
        } else {
            anyhow!("dataset file {shown}: {msg}; convert it again")
        }
    };
    let ds = Dataset::open_for_training(&path).map_err(in_file)?;
    // Every section's CRC-32 (a few hundred MB/s at worst, and it pages the data in for training
    // anyway): a damaged file is refused before hours are spent training on it.
    ds.verify_all().map_err(in_file)?;
    let train = ds.split("train").map_err(in_file)?;
    let test = if ds.has_split("test") {
        Some(ds.split("test").map_err(in_file)?)
    } else {
        None
    };
    if ds.num_classes() < 2 {
        bail!(
            "dataset {} has {} class; classification (and a PEDCC, which needs K ≥ 2 centroids) \
             needs at least 2 classes",
            path.display(),
            ds.num_classes()
        );
    }
    if let Some(t) = &test {
        if t.image_shape() != train.image_shape() {
            let [c, h, w] = train.image_shape();
            let [tc, th, tw] = t.image_shape();
            bail!(
                "dataset {}: the test images are {tc}×{th}×{tw} but the training images \
                 {c}×{h}×{w}; both splits must have one image size (convert the dataset again)",
                path.display()
            );
        }
    }
    let n = cfg.limit_train.unwrap_or(train.len()).min(train.len());
    if cfg.batch_size > n {
        bail!(
            "--batch-size {} is larger than the {n} training images used; choose at most {n}",
            cfg.batch_size
        );
    }
    if cfg.loss == LossKind::Pod && cfg.batch_size < 2 {
        bail!("the POD loss needs batches of at least 2 images (SC divides by B − 1); raise --batch-size");
    }
    Ok((ds, train, test))
}

/// The network of a run (and the buffers its loss keeps in the store, e.g. the Center Loss centres),
/// registered in `ps` on the CPU. `centroids` is the PEDCC for losses with the PEDCC head.
pub fn build_network(
    cfg: &TrainConfig,
    ds: &Dataset,
    train: &Split,
    centroids: Option<&Tensor>,
    ps: &mut ParamStore,
) -> Result<Network> {
    let [c, h, w] = train.image_shape();
    if h < 8 || w < 8 {
        bail!(
            "images of {h}×{w} are too small for {}: it needs at least 8×8",
            cfg.model
        );
    }
    let classes = ds.num_classes();
    let feature_dim = super::recipe::feature_dim(cfg, classes);
    let spec = ModelSpec {
        arch: cfg.model.clone(),
        width: cfg.width,
        stem: stem_for(cfg.image_size.unwrap_or(h)),
        in_channels: c,
        classes,
        feature_dim,
        head: match (cfg.loss.head(), centroids) {
            (HeadKind::Pedcc, Some(p)) => HeadSpec::Pedcc(p.clone()),
            (HeadKind::Pedcc, None) => bail!("the {} loss needs the PEDCC centroids", cfg.loss),
            (HeadKind::Linear, _) => HeadSpec::Linear,
            (HeadKind::Cosine, _) => HeadSpec::Cosine,
        },
        image_size: cfg.image_size.unwrap_or(h),
        drop_path: cfg.drop_path,
    };
    let mut rng = Rng::derive(cfg.seed, 0x1A17);
    crate::budget::check_network(
        &spec,
        [c, h, w],
        cfg.batch_size,
        true,
        crate::budget::NetworkFlags {
            size: "lower --width (64 is the standard network) or --feature-dim",
            inputs: "lower --batch-size, or convert the dataset to smaller images (`podgpu data \
                     convert --size HxW`)",
        },
    )?;
    let net = Network::new(spec, ps, DType::F32, &mut rng).map_err(|e| anyhow!(e))?;
    register_loss_buffers(cfg.loss, ps, classes, feature_dim, DType::F32);
    Ok(net)
}

/// A fresh run's PEDCC before it is written into the run folder.
enum NewPedcc {
    /// The bytes of a `--pedcc FILE`, copied as they are.
    File(Vec<u8>),
    Generated(pedcc::Pedcc),
}

impl NewPedcc {
    /// Writes `pedcc.safetensors` into the run folder and reads it back, so that a fresh run trains
    /// with exactly the centroids a resumed one will load.
    fn save(&self, dir: &Path) -> Result<Tensor> {
        let keep = dir.join("pedcc.safetensors");
        match self {
            NewPedcc::File(bytes) => super::write_atomic(&keep, bytes)?,
            NewPedcc::Generated(p) => pedcc::save(&keep, p)?,
        }
        pedcc::load(&keep)
    }
}

/// The PEDCC for a fresh run, from `--pedcc FILE` or generated from the seed; nothing is written yet
/// (see `NewPedcc::save`; resume reads `pedcc.safetensors` from the run folder).
fn make_pedcc(cfg: &TrainConfig, classes: usize, dim: usize) -> Result<(Tensor, NewPedcc)> {
    if let Some(path) = &cfg.pedcc {
        let p = pedcc::load(path)?;
        if p.shape() != [classes, dim] {
            bail!(
                "the PEDCC in {} has shape {:?}, but this run needs [{classes}, {dim}] \
                 ({classes} classes, feature dim {dim}); generate one with \
                 `podgpu pedcc --classes {classes} --dim {dim} --out FILE` or change --feature-dim",
                path.display(),
                p.shape()
            );
        }
        let bytes = crate::fsutil::read_regular(path)
            .with_context(|| format!("cannot read PEDCC file {}", path.display()))?;
        return Ok((p, NewPedcc::File(bytes)));
    }
    let method = if classes - 1 > dim {
        if !cfg.pedcc_repulsion {
            bail!(
                "{classes} classes do not fit evenly in {dim} dimensions (an exact PEDCC needs \
                 classes ≤ feature dim + 1): raise --feature-dim to at least {}, or pass \
                 --pedcc-repulsion to use approximately even centroids",
                classes - 1
            );
        }
        eprintln!(
            "warning: {classes} classes in {dim} dimensions: using the approximate repulsion PEDCC"
        );
        Method::Repulsion
    } else {
        Method::Simplex
    };
    let p = pedcc::generate(classes, dim, cfg.seed, method)?;
    Ok((p.to_tensor(), NewPedcc::Generated(p)))
}

fn default_run_dir(cfg: &TrainConfig) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{}-{}-{}", cfg.model, cfg.loss, timestamp(secs)))
}

/// `YYYYmmdd-HHMMSS` (UTC) from Unix seconds.
pub fn timestamp(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Run {
    fn fresh(mut cfg: TrainConfig, opts: FreshOptions) -> Result<Run> {
        // The run records where its dataset is as an absolute path: a relative one would resolve
        // elsewhere when resumed from another folder.
        let data = cfg
            .data
            .clone()
            .unwrap_or_else(crate::data::default_dataset_path);
        cfg.data = Some(identity::absolute(&data));
        let (device, ds, train, test) = prepare(&cfg, true, true)?;
        let default_name = cfg.out.is_none();
        let dir = cfg.out.clone().unwrap_or_else(|| default_run_dir(&cfg));
        // Everything that can be wrong with the inputs is found before the run folder is touched, so
        // a refused run leaves nothing behind that looks like a run; a folder that holds anything is
        // never clobbered (issue 14).
        let replace = run_dir::plan_fresh(&dir, default_name, opts.overwrite, &cfg)?;
        let classes = ds.num_classes();
        let dim = super::recipe::feature_dim(&cfg, classes);
        let new_pedcc = match cfg.loss.uses_pedcc() {
            true => Some(make_pedcc(&cfg, classes, dim)?),
            false => None,
        };
        let mut ps = ParamStore::new();
        let net = build_network(
            &cfg,
            &ds,
            &train,
            new_pedcc.as_ref().map(|(p, _)| p),
            &mut ps,
        )?;
        if let Some(path) = &cfg.init {
            let report = crate::nn::pretrained::load_timm(path, &mut ps)?;
            println!("initialised from {}:\n{report}", path.display());
        }
        let (dir, lock) = run_dir::create_fresh(&dir, default_name, replace)?;
        cfg.out = Some(dir.clone());
        // config.toml first: a run killed before its first checkpoint is recognised by it when the
        // same command starts it again (`run_dir::holds_unstarted_run`).
        cfg.save(&dir.join("config.toml"))?;
        let centroids = match &new_pedcc {
            Some((_, p)) => Some(p.save(&dir)?),
            None => None,
        };
        let run = RunIdentity::new(
            DatasetIdentity::of(&ds, &data),
            centroids.as_ref().map(PedccIdentity::of),
        );
        run.save(&dir)?;
        ps.to_device(device);
        cfg.save(&dir.join("config.toml"))?;
        let sgd = super::recipe::optimizer(&cfg, &ps)?;
        let schedule = super::recipe::lr_schedule(&cfg)?;
        let delta = DeltaSchedule::resume(cfg.variant, cfg.alpha, 0, cfg.initial_mean_norm);
        let mut state =
            TrainState::new(cfg.model.clone(), cfg.to_json(), Rng::new(cfg.seed).state());
        state.run = Some(run);
        state.delta = delta.delta();
        state.mean_norm = delta.mean_norm();
        let metrics = MetricsLog::create(&dir)?;
        let objective = Objective::new(&cfg, centroids.map(|p| p.to_device(device)), &ps)?;
        let cadence = Cadence::from_env(cfg.detect_anomaly)?;
        Ok(Run {
            objective,
            cfg,
            dir,
            device,
            train,
            test,
            net,
            ps,
            sgd,
            schedule,
            delta,
            state,
            metrics,
            pending: None,
            saved: None,
            cadence,
            loop_counts: LoopCounts::default(),
            ranks: ranked::Ranks::single(),
            _lock: Some(lock),
        })
    }

    fn resumed(dir: &Path, opts: ResumeOptions) -> Result<Run> {
        let ckpt_path = dir.join("last.safetensors");
        if !dir.is_dir() {
            bail!(
                "--resume {}: no such run folder; give the folder of an earlier `podgpu train` \
                 (its --out)",
                dir.display()
            );
        }
        let lock = run_dir::lock(dir)?;
        let stale = run_dir::remove_stale_temp_files(dir)?;
        if !stale.is_empty() {
            println!(
                "removed {} temporary file(s) left by an interrupted write: {}",
                stale.len(),
                stale.join(", ")
            );
        }
        if !ckpt_path.exists() {
            bail!(
                "{} has no checkpoint (last.safetensors) to resume from; start a new run with \
                 `podgpu train` instead",
                dir.display()
            );
        }
        let ckpt = load_checkpoint(&ckpt_path)?;
        // The checkpoint must be this folder's run; its settings, with the edits of config.toml
        // that a resume may make (issue 14).
        let (mut resume, mut cfg) = identity::Resume::begin(dir, &ckpt, opts.data.as_deref())?;
        if let Some(e) = opts.epochs {
            cfg.epochs = e;
        }
        if let Some(d) = opts.device {
            cfg.device = d;
        }
        if opts.threads.is_some() {
            cfg.threads = opts.threads;
        }
        cfg.detect_anomaly |= opts.detect_anomaly;
        cfg.out = Some(dir.to_path_buf());
        cfg.data = resume.dataset_path()?;
        let pending = EpochTally::from_extra(&ckpt.state.extra)
            .with_context(|| format!("checkpoint {}", ckpt_path.display()))?;
        let (device, ds, train, test) = prepare(&cfg, true, true)?;
        let centroids = match cfg.loss.uses_pedcc() {
            true => Some(pedcc::load(&dir.join("pedcc.safetensors")).context(
                "the run folder's PEDCC cannot be used; restore pedcc.safetensors from a backup \
                 (it must be the run's own centroids) or start a new run",
            )?),
            false => None,
        };
        // The dataset and the PEDCC must be the run's own.
        let run = resume.check(&ds, centroids.as_ref(), &mut cfg)?;
        let mut ps = ParamStore::new();
        let net = build_network(&cfg, &ds, &train, centroids.as_ref(), &mut ps)?;
        ckpt.restore_into(&mut ps, &cfg.model)?;
        ps.to_device(device);
        let mut sgd = super::recipe::optimizer(&cfg, &ps)?;
        sgd.load_state(ckpt.optim.clone(), &ps)?;
        let schedule = super::recipe::lr_schedule(&cfg)?;
        let mut state = ckpt.state.clone();
        state.run = run;
        // Later checkpoints record the settings now in force (e.g. an extended --epochs).
        state.config = cfg.to_json();
        let delta = DeltaSchedule::resume(cfg.variant, cfg.alpha, state.epoch, state.mean_norm);
        let metrics = MetricsLog::resume(dir, state.epoch + 1)?;
        // best.safetensors made to agree with the record, run.json and config.toml written.
        resume.finish(&state, &cfg, pending.is_some())?;
        let saved = match &pending {
            Some(t) => format!("epoch {}, after batch {}", state.epoch + 1, t.next_batch),
            None => format!("end of epoch {}", state.epoch),
        };
        println!(
            "resuming {} from {} ({saved}), training to epoch {}",
            dir.display(),
            ckpt_path.display(),
            cfg.epochs
        );
        let objective = Objective::new(&cfg, centroids.map(|p| p.to_device(device)), &ps)?;
        let cadence = Cadence::from_env(cfg.detect_anomaly)?;
        Ok(Run {
            objective,
            cfg,
            dir: dir.to_path_buf(),
            device,
            train,
            test,
            net,
            ps,
            sgd,
            schedule,
            delta,
            state,
            metrics,
            pending,
            saved: Some(saved),
            cadence,
            loop_counts: LoopCounts::default(),
            ranks: ranked::Ranks::single(),
            _lock: Some(lock),
        })
    }

    /// What to do after the numerics went wrong: where the last good state is, and that a resume
    /// would repeat the same settings.
    fn recovery_advice(&self) -> String {
        let last = self.dir.join("last.safetensors");
        match &self.saved {
            Some(at) => format!(
                "The last good checkpoint is {} ({at}); `podgpu train --resume {}` continues from it \
                 with the same settings, so to change them (e.g. a lower --lr) start a new run",
                last.display(),
                quoted(&self.dir)
            ),
            None => "No checkpoint was written yet (the run failed in its first epoch); start \
                     again with a lower --lr or check the data"
                .into(),
        }
    }

    /// What to say when the GPU ran out of memory in `epoch`: how much, the batch size to try, and
    /// that the last checkpoint is intact (a smaller batch is a new run: it changes the run).
    fn out_of_memory_advice(&self, oom: &crate::cuda::OutOfMemory, epoch: usize) -> String {
        let kept = match &self.saved {
            Some(at) => format!(
                "The last checkpoint, {} ({at}), is intact",
                self.dir.join("last.safetensors").display()
            ),
            None => "No checkpoint was written yet".into(),
        };
        format!(
            "{} (in epoch {}). {kept}; the batch size is one of a run's settings, so a smaller one \
             means a new run",
            oom.advice(Some(self.cfg.batch_size)),
            epoch + 1
        )
    }

    fn go(mut self) -> Result<RunSummary> {
        // Before anything is printed, so that a Ctrl-C after the header always checkpoints.
        if let Err(e) = signal::install() {
            eprintln!("warning: Ctrl-C will not save a checkpoint ({e})");
        }
        let cfg = self.cfg.clone();
        let train_loader = Loader::new(
            self.train.clone(),
            LoaderConfig {
                limit: cfg.limit_train,
                prefetch: cfg.prefetch,
                augment: super::recipe::train_augment(&cfg, &self.train),
                ..LoaderConfig::train(cfg.batch_size, cfg.seed)
            },
        )?;
        // Rank 0 alone speaks for a data-parallel run.
        if self.ranks.is_writer() {
            let p = &self.net.spec;
            let shape = match crate::nn::transformer_config(&cfg.model) {
                Some(_) => format!("{0}×{0} images", p.image_size),
                None => format!("width {}, {:?} stem", cfg.width, p.stem),
            };
            println!(
                "training {} ({shape}) with {} loss{} on {}: {} classes, feature dim {}, \
                 {} train images, batch {}, {} epochs, {} trainable parameters",
                cfg.model,
                cfg.loss,
                match cfg.loss.uses_delta() {
                    true => format!(" ({} variant)", cfg.variant),
                    false => String::new(),
                },
                self.device,
                p.classes,
                p.feature_dim,
                train_loader.images_per_epoch(),
                cfg.batch_size,
                cfg.epochs,
                self.ps.count(crate::ParamKind::Trainable)
            );
            println!("{}", cfg.recipe_line());
            if let Some(note) = super::recipe::image_note(&cfg, &self.train) {
                println!("{note}");
            }
            println!("run folder: {}", self.dir.display());
            if cfg.deterministic {
                println!("deterministic mode: results do not depend on the thread count");
            }
            if self.ranks.distributed() {
                println!("{}", ranked::ranks_line(&cfg, self.ranks.comm.size()));
            }
        }
        let mut last_loss = f64::NAN;
        let mut last_acc = None;
        let start_epoch = self.state.epoch;
        for epoch in start_epoch..cfg.epochs {
            let pending = self.pending.take();
            // Out of GPU memory (a typed panic from the allocator, which the ops cannot return)
            // becomes an error with the batch size to try; the checkpoint on disk is untouched.
            let outcome = crate::cuda::catch_oom(|| match self.ranks.distributed() {
                true => self.train_epoch_ranked(&train_loader, epoch, pending),
                false => self.train_epoch(&train_loader, epoch, pending),
            })
            .map_err(|oom| anyhow::anyhow!(self.out_of_memory_advice(&oom, epoch)))?;
            let (rec, test_acc) = match outcome? {
                EpochOutcome::Done(rec, test_acc) => (rec, test_acc),
                EpochOutcome::Stopped(tally) => {
                    return Err(self.save_interrupted(tally, train_loader.batches_per_epoch())?)
                }
                EpochOutcome::DataChanged(tally) => {
                    return Err(self.stop_on_changed_data(tally, train_loader.batches_per_epoch()))
                }
            };
            last_loss = rec.train_loss;
            last_acc = test_acc;
            if self.ranks.is_writer() {
                self.metrics.append(rec.clone())?;
                // The plots are a view of metrics.csv: failing to draw them (a full disk) must not
                // lose the epoch.
                if let Err(e) = plot_metrics(&self.dir, self.metrics.records()) {
                    eprintln!(
                        "warning: {}; training goes on (the numbers are in metrics.csv, and the plots \
                         are drawn again after the next epoch)",
                        crate::cli::error_text(&e)
                    );
                }
            }
            self.state.epoch = epoch + 1;
            self.state.delta = self.delta.delta();
            self.state.mean_norm = self.delta.mean_norm();
            self.state.extra.remove(tally::EXTRA_KEY);
            if self.ranks.is_writer() {
                if let Err(e) = save_epoch_checkpoints(
                    &self.dir,
                    &self.ps,
                    &self.sgd.state(),
                    &mut self.state,
                    test_acc,
                ) {
                    bail!(
                        "at the end of epoch {}: {}. {}",
                        epoch + 1,
                        crate::cli::error_text(&e),
                        self.recovery_advice()
                    );
                }
            }
            self.saved = Some(format!("end of epoch {}", epoch + 1));
            if self.ranks.stop_after_epoch()? && epoch + 1 < cfg.epochs {
                // The signal came during evaluation or saving: the epoch is complete and saved.
                return Err(Interrupted {
                    run_dir: self.dir.clone(),
                    epoch: epoch + 1,
                    batches_done: 0,
                    batches_per_epoch: train_loader.batches_per_epoch(),
                    ranks: self.ranks.size(),
                    global_step: self.state.global_step,
                }
                .into());
            }
        }
        self.ranks.finish()?;
        if self.ranks.is_writer() {
            println!(
                "done: metrics in {}, plots {} and {}, checkpoint {}",
                self.dir.join("metrics.csv").display(),
                self.dir.join("loss.png").display(),
                self.dir.join("accuracy.png").display(),
                self.dir.join("last.safetensors").display()
            );
        }
        Ok(RunSummary {
            run_dir: self.dir,
            epochs: cfg.epochs,
            final_train_loss: last_loss,
            final_test_acc: last_acc,
            best_test_acc: self.state.best_acc,
            step_loop: self.loop_counts,
        })
    }

    /// Reads the step ledger (nothing when no step was added since the last read) into `tally`, and
    /// stops the run when its guard recorded a non-finite step: the error names that step (one of
    /// `unread`, the steps since the previous read), as the check before each update used to.
    fn read_ledger(
        &mut self,
        ledger: &mut StepLedger,
        tally: &mut EpochTally,
        unread: &[(u64, usize)],
        epoch: usize,
        total_batches: usize,
    ) -> Result<()> {
        if ledger.has_news() {
            self.loop_counts.ledger_reads += 1;
        }
        let r = ledger.read();
        self.cadence.read_done();
        if let Some(bad) = &r.bad {
            let at = match unread.iter().find(|(s, _)| *s == bad.step) {
                Some(&(step, index)) => step_place(epoch, index, total_batches, step),
                None => format!("epoch {} (step {})", epoch + 1, bad.step),
            };
            let advice = self.recovery_advice();
            let hint = "(--detect-anomaly finds the first op that produced a non-finite value)";
            match ledger.describe(bad) {
                NonFinite::Loss(lv) => {
                    bail!("the loss became {lv} at {at}: training diverged. {advice} {hint}")
                }
                NonFinite::Gradient { bad, loss } => bail!(
                    "a non-finite gradient at {at} (the loss was {loss}): {bad}. {advice} {hint}"
                ),
            }
        }
        tally.loss_sum = r.loss_sum;
        tally.norm_sum = r.norm_sum;
        tally.correct = r.correct as usize;
        Ok(())
    }

    /// Adds an epoch's step loop to `loop_counts` (host reads and waits since the loop started).
    fn count_loop(&mut self, reads_before: u64, waits_before: u64) {
        self.loop_counts.host_reads += crate::tensor::host_reads() - reads_before;
        self.loop_counts.host_waits += host_waits(self.device) - waits_before;
    }

    /// Writes the checkpoint of a run stopped mid-epoch (the epoch's sums included).
    fn save_mid_epoch(&mut self, tally: &EpochTally) -> Result<()> {
        self.state
            .extra
            .insert(tally::EXTRA_KEY.to_string(), tally.to_value());
        save_checkpoint(
            &self.dir.join("last.safetensors"),
            &self.ps,
            &self.sgd.state(),
            &self.state,
        )
    }

    /// The error of a run whose dataset file changed under it, after checkpointing the last step
    /// that trained on good data.
    fn stop_on_changed_data(
        &mut self,
        tally: EpochTally,
        batches_per_epoch: usize,
    ) -> anyhow::Error {
        let file = self
            .cfg
            .data
            .clone()
            .unwrap_or_else(crate::data::default_dataset_path);
        let at = if tally.next_batch >= batches_per_epoch {
            format!(
                "after training epoch {}, before its test score",
                self.state.epoch + 1
            )
        } else {
            format!(
                "in epoch {} before batch {} of {batches_per_epoch} (step {})",
                self.state.epoch + 1,
                tally.next_batch + 1,
                self.state.global_step + 1
            )
        };
        let saved = match self.save_mid_epoch(&tally) {
            Ok(()) => format!(
                "the checkpoint {} holds this point; put the run's dataset back (podgpu checks that \
                 it is the same one) and continue with `podgpu train --resume {}`",
                self.dir.join("last.safetensors").display(),
                quoted(&self.dir)
            ),
            Err(e) => format!(
                "the checkpoint could not be written ({}). {}",
                crate::cli::error_text(&e),
                self.recovery_advice()
            ),
        };
        anyhow!(
            "the dataset file {} changed while training (it was truncated or rewritten in place, \
             so part of it can no longer be read): stopped {at} without training on the changed \
             data; {saved}",
            file.display()
        )
    }

    /// Writes the checkpoint of a run stopped mid-epoch (the epoch's sums included) and returns the
    /// `Interrupted` error that tells the user how to resume.
    fn save_interrupted(
        &mut self,
        tally: EpochTally,
        batches_per_epoch: usize,
    ) -> Result<anyhow::Error> {
        if self.ranks.is_writer() {
            self.save_mid_epoch(&tally)?;
        }
        // Several ranks count the epoch in global batches of N of one rank's batches, as their
        // progress line does (the tally counts one rank's batches).
        let ranks = self.ranks.size();
        Ok(Interrupted {
            run_dir: self.dir.clone(),
            epoch: self.state.epoch,
            batches_done: tally.next_batch.div_ceil(ranks),
            batches_per_epoch: batches_per_epoch.div_ceil(ranks),
            ranks,
            global_step: self.state.global_step,
        }
        .into())
    }

    /// One epoch of training plus the evaluation (from the middle when `resume` holds the sums of a
    /// stopped epoch). Stops early, without evaluating, when a stop was requested.
    fn train_epoch(
        &mut self,
        loader: &Loader,
        epoch: usize,
        resume: Option<EpochTally>,
    ) -> Result<EpochOutcome> {
        let cfg = self.cfg.clone();
        let total_batches = loader.batches_per_epoch();
        // The lr of the epoch's first step (the record's); warm-up and cosine change it per step.
        let lr = self.schedule.lr(epoch, 0, total_batches);
        let mut tally = resume.unwrap_or_default();
        if tally.next_batch == 0
            && cfg.variant == Variant::Reference
            && self.schedule.is_milestone(epoch)
        {
            // The reference code re-creates its optimizer at each lr step (DESIGN.md §1.6.4).
            self.sgd.reset_momentum();
        }
        let delta = self.delta.delta();
        let started = Instant::now();
        let mut progress = Progress::new(total_batches, epoch + 1, cfg.epochs);
        // The epoch's sums and the numerics guard live on the device (`ledger`): a step reads
        // nothing back; the host reads the ledger every `cadence` steps, at the end of the epoch and
        // before a mid-epoch checkpoint, so that the host never waits for the GPU inside a step and
        // can queue the next steps while it computes.
        let mut ledger = StepLedger::new(self.device, &tally, &self.ps);
        let reads_before = crate::tensor::host_reads();
        let waits_before = host_waits(self.device);
        self.cadence.restart();
        // The batch of every step since the last read, to name the one a late-read guard record
        // points at.
        let mut unread_steps: Vec<(u64, usize)> = Vec::new();
        let poison = test_nan_gradient_at()?;
        // PODGPU_CUDA_GRAPH=1: after one eager step of the epoch, full batches replay one captured
        // step (`graphed`); `graph_gpu` is dropped (and the run goes on eagerly) if capture fails.
        let mut graph_gpu = if poison.is_none() {
            super::graphed::wanted(&cfg, self.device)?
        } else {
            None
        };
        let mut graphed: Option<super::graphed::Graphed> = None;
        let mut eager_steps = 0usize;
        // PODGPU_COPY_STREAM=1: batches go up on a copy stream, beside the previous step's kernels.
        let mut stager = input_stager(self.device, loader, cfg.batch_size)?;
        for batch in loader.epoch_from(epoch as u64, tally.next_batch) {
            let b = batch.labels.len();
            let index = batch.index;
            // A batch read after the dataset file changed under the run may hold zeros: stop
            // before training on it, with the sums of the steps before.
            if self.train.data_changed() {
                self.read_ledger(&mut ledger, &mut tally, &unread_steps, epoch, total_batches)?;
                tally.train_time_s += started.elapsed().as_secs_f64();
                self.count_loop(reads_before, waits_before);
                progress.finish(&format!(
                    "epoch {:>3}/{}  stopped before batch {} of {total_batches}: the dataset changed",
                    epoch + 1,
                    cfg.epochs,
                    index + 1
                ));
                return Ok(EpochOutcome::DataChanged(tally));
            }
            tally.next_batch = index + 1;
            if b < 2 {
                // Batch norm and SC need at least two samples; a last batch of one is skipped.
                continue;
            }
            let (images, labels) = batch.into_parts();
            let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            let step_lr = self.schedule.lr(epoch, index, total_batches);
            let step = self.state.global_step + 1;
            let images = match &mut stager {
                Some(st) => st
                    .upload(images.shape(), images.host::<f32>())
                    .map_err(anyhow::Error::msg)?,
                None => images,
            };
            let mut graph_gpu_failed = false;
            let replayed = match &graph_gpu {
                Some(gpu) if eager_steps > 0 && b == cfg.batch_size => {
                    let mut parts = super::graphed::StepParts {
                        net: &self.net,
                        ps: &mut self.ps,
                        objective: &self.objective,
                        opt: &mut self.sgd,
                        ledger: &mut ledger,
                        cfg: &cfg,
                        delta,
                    };
                    match &mut graphed {
                        Some(g) if g.fits(b) => {
                            g.replay(&mut parts, &images, &labels, step_lr, step)?;
                            true
                        }
                        _ => {
                            use super::graphed::{Captured, Graphed};
                            match Graphed::capture(gpu, &mut parts, &images, &labels, step_lr, step)
                            {
                                Captured::Replaying(g) => {
                                    graphed = Some(g);
                                    true
                                }
                                Captured::RanOnce(why) => {
                                    eprintln!("note: {why}; training on with eager steps");
                                    graph_gpu_failed = true;
                                    true
                                }
                                Captured::Failed(why) => {
                                    eprintln!("note: {why}; training on with eager steps");
                                    graph_gpu_failed = true;
                                    false
                                }
                                Captured::Broken(why) => bail!(
                                    "a CUDA graph capture at {} failed and left the model \
                                     unusable: {why}. {} Run again without PODGPU_CUDA_GRAPH.",
                                    step_place(epoch, index, total_batches, step),
                                    self.recovery_advice()
                                ),
                            }
                        }
                    }
                }
                _ => false,
            };
            if graph_gpu_failed {
                graph_gpu = None; // the capture did not give a replayable graph: eager from now on
            }
            if replayed {
                self.state.global_step += 1;
                self.loop_counts.steps += 1;
                tally.seen += b;
                unread_steps.push((step, index));
            } else {
                eager_steps += 1;
                // Drop path and dropout draw from a stream of the step: a resumed run draws the same.
                let mut tape = Tape::train()
                    .with_anomaly_detection(cfg.detect_anomaly)
                    .with_rng(Rng::derive(
                        cfg.seed ^ DROP_SALT,
                        self.state.global_step + 1,
                    ));
                let x = tape.constant(images.to_device(self.device));
                let out = self.net.forward(&mut tape, &mut self.ps, &x);
                let labels_t = loss::labels_tensor(&labels, out.features.value());
                let l = self
                    .objective
                    .loss(&mut tape, &self.ps, &out, &labels_t, delta);
                let step = self.state.global_step + 1;
                if let Some(a) = tape.anomaly() {
                    let at = step_place(epoch, index, total_batches, step);
                    bail!("--detect-anomaly at {at}: {a}. {}", self.recovery_advice());
                }
                let loss_t = l.value().clone();
                tape.backward(&l, &mut self.ps);
                if let Some(a) = tape.anomaly() {
                    let at = step_place(epoch, index, total_batches, step);
                    bail!("--detect-anomaly at {at}: {a}. {}", self.recovery_advice());
                }
                drop(tape);
                if let Some((at_step, name)) = &poison {
                    if *at_step == step {
                        poison_gradient(&mut self.ps, name.as_deref())?;
                    }
                }
                // Checked before the update, which skips while the guard's flag is set, so the weights
                // in memory stay the last good ones until the host reads the record.
                ledger.guard(step, &self.ps, &loss_t);
                if let Some(max_norm) = cfg.clip_grad {
                    crate::optim::clip_grad_norm(&mut self.ps, max_norm);
                }
                self.sgd
                    .step_unless(&mut self.ps, step_lr, Some(ledger.skip_flag()));
                self.ps.zero_grad();
                self.objective.after_step(
                    &self.net,
                    &mut self.ps,
                    x.value(),
                    &out,
                    &labels_t,
                    step_lr,
                    Some(ledger.skip_flag()),
                );
                self.state.global_step += 1;
                self.loop_counts.steps += 1;
                let norms =
                    loss::delta_norms(cfg.variant, out.features.value(), out.logits.value());
                ledger.add_step(&loss_t, out.logits.value(), &labels_t, &labels, &norms, b);
                tally.seen += b;
                unread_steps.push((step, index));
            }
            hold_for_a_signal_in_tests(self.state.global_step);
            let stopping = signal::stop_requested() && tally.next_batch < total_batches;
            if self.cadence.step_done() || stopping {
                self.read_ledger(&mut ledger, &mut tally, &unread_steps, epoch, total_batches)?;
                unread_steps.clear();
                progress.show_loss(tally.loss_sum / tally.seen as f64);
            }
            progress.advance(index, b);
            if stopping {
                tally.train_time_s += started.elapsed().as_secs_f64();
                self.count_loop(reads_before, waits_before);
                progress.finish(&format!(
                    "epoch {:>3}/{}  stopped after batch {} of {total_batches} on request",
                    epoch + 1,
                    cfg.epochs,
                    tally.next_batch
                ));
                return Ok(EpochOutcome::Stopped(tally));
            }
        }
        self.read_ledger(&mut ledger, &mut tally, &unread_steps, epoch, total_batches)?;
        self.count_loop(reads_before, waits_before);
        let whole_epoch = tally.clone();
        let EpochTally {
            loss_sum,
            seen,
            correct,
            norm_sum,
            train_time_s: earlier_time,
            ..
        } = tally;
        if seen == 0 {
            bail!(
                "epoch {} saw no training batch of at least 2 images",
                epoch + 1
            );
        }
        let mean_norm = norm_sum / seen as f64;
        // The schedule advances for every loss (only POD uses δ), so that its saved state is the
        // same whether a run went straight through or was resumed.
        self.delta.end_epoch(mean_norm)?;
        let train_time = earlier_time + started.elapsed().as_secs_f64();
        let test_acc = self.score_test_if_due(&cfg, epoch)?;
        if self.train.data_changed() {
            // The test score may have been computed from changed data: not recorded; a resume
            // scores the epoch again.
            let mut t = whole_epoch;
            t.next_batch = total_batches;
            t.train_time_s += started.elapsed().as_secs_f64();
            return Ok(EpochOutcome::DataChanged(t));
        }
        let rec = EpochRecord {
            train_loss: loss_sum / seen as f64,
            train_acc: correct as f64 / seen as f64,
            test_acc,
            lr,
            delta: if cfg.loss.uses_delta() {
                delta
            } else {
                f64::NAN
            },
            mean_norm,
            images_per_s: seen as f64 / train_time,
            epoch_time_s: earlier_time + started.elapsed().as_secs_f64(),
            peak_mem_bytes: peak_memory(self.device),
            ..EpochRecord::new(epoch + 1)
        };
        progress.finish(&epoch_line(&cfg, &rec, delta, ""));
        Ok(EpochOutcome::Done(rec, test_acc))
    }

    /// The test split's accuracy when this epoch is one to score (every `eval_every` epochs, and
    /// the last); `None` otherwise or without a test split.
    pub(super) fn score_test_if_due(
        &mut self,
        cfg: &TrainConfig,
        epoch: usize,
    ) -> Result<Option<f64>> {
        match &self.test {
            Some(test) if (epoch + 1).is_multiple_of(cfg.eval_every) || epoch + 1 == cfg.epochs => {
                let f = eval::extract_with(
                    &self.net,
                    &mut self.ps,
                    test,
                    cfg.batch_size,
                    cfg.limit_test,
                    self.device,
                    super::recipe::test_augment(cfg, test),
                )?;
                Ok(Some(eval::summarize(&f, self.net.spec.classes).accuracy))
            }
            _ => Ok(None),
        }
    }
}

/// The progress display's line for a finished epoch; `suffix` (e.g. " (2 ranks)") ends it. `delta`
/// is the schedule's δ, shown also for losses whose record leaves it out.
pub(super) fn epoch_line(cfg: &TrainConfig, rec: &EpochRecord, delta: f64, suffix: &str) -> String {
    format!(
        "epoch {:>3}/{}  loss {:.4}  train acc {:.2}%  test acc {}  lr {:.3e}  δ {:.4}  M {:.3}  \
         {:.0} img/s  {:.1}s{suffix}",
        rec.epoch,
        cfg.epochs,
        rec.train_loss,
        100.0 * rec.train_acc,
        rec.test_acc
            .map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a)),
        rec.lr,
        delta,
        rec.mean_norm,
        rec.images_per_s,
        rec.epoch_time_s
    )
}

/// "epoch 2, batch 5 of 20 (step 25)": where a step was, as the errors name it.
fn step_place(epoch: usize, index: usize, total_batches: usize, step: u64) -> String {
    format!(
        "epoch {}, batch {} of {total_batches} (step {step})",
        epoch + 1,
        index + 1
    )
}

/// `Gpu::host_waits` of the training GPU (0 on the CPU).
fn host_waits(device: Device) -> u64 {
    match device {
        Device::Cpu => 0,
        Device::Cuda(i) => crate::cuda::Gpu::get(i)
            .map(|g| g.host_waits())
            .unwrap_or(0),
    }
}

/// A test hook: `PODGPU_TEST_HOLD_AT_STEP=N` makes the run wait after its N-th step (counted from
/// 1 over the whole run) until a stop signal arrives, for at most 60 s. The signal tests use it so
/// that a run on a fast (or a slow, loaded) machine cannot finish, or pass the step they mean to
/// interrupt, before their signal lands.
pub const TEST_HOLD_AT_STEP_ENV: &str = "PODGPU_TEST_HOLD_AT_STEP";

fn hold_for_a_signal_in_tests(steps_done: u64) {
    static HOLD_AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let hold_at = HOLD_AT.get_or_init(|| {
        std::env::var(TEST_HOLD_AT_STEP_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if *hold_at != Some(steps_done) {
        return;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !signal::stop_requested() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A test hook: `PODGPU_TEST_NAN_GRADIENT_AT=STEP[:PARAM]` puts a NaN into the gradient of `PARAM`
/// (default: the first trainable parameter with a gradient) after the backward pass of global step
/// STEP (1-based), to check the numerics guard against a known step. Not for users.
pub const TEST_NAN_GRADIENT_ENV: &str = "PODGPU_TEST_NAN_GRADIENT_AT";

fn test_nan_gradient_at() -> Result<Option<(u64, Option<String>)>> {
    let Ok(v) = std::env::var(TEST_NAN_GRADIENT_ENV) else {
        return Ok(None);
    };
    let (step, name) = match v.split_once(':') {
        Some((s, n)) => (s, Some(n.to_string())),
        None => (v.as_str(), None),
    };
    let step = step
        .trim()
        .parse::<u64>()
        .map_err(|_| anyhow!("{TEST_NAN_GRADIENT_ENV}={v:?}: expected STEP[:PARAM]"))?;
    Ok(Some((step, name)))
}

fn poison_gradient(ps: &mut ParamStore, name: Option<&str>) -> Result<()> {
    let p = ps
        .iter_mut()
        .filter(|p| p.kind == crate::ParamKind::Trainable && p.grad.is_some())
        .find(|p| name.is_none_or(|n| p.name == n))
        .ok_or_else(|| anyhow!("{TEST_NAN_GRADIENT_ENV}: no such parameter with a gradient"))?;
    let g = p.grad.as_ref().expect("filtered on grad");
    let mut v = g.to_vec_f32();
    v[0] = f32::NAN;
    p.grad = Some(Tensor::from_vec(g.shape(), v).to_device(g.device()));
    Ok(())
}

/// The input stager of an epoch on a GPU when `PODGPU_COPY_STREAM=1` (`cuda::stager`), sized
/// for a full batch of the loader's images.
fn input_stager(
    device: Device,
    loader: &Loader,
    batch: usize,
) -> Result<Option<crate::cuda::stager::InputStager>> {
    let Device::Cuda(ordinal) = device else {
        return Ok(None);
    };
    if !crate::cuda::stager::wanted().map_err(anyhow::Error::msg)? {
        return Ok(None);
    }
    let gpu = crate::cuda::Gpu::get(ordinal).map_err(anyhow::Error::msg)?;
    let [c, h, w] = loader.image_shape();
    let stager = crate::cuda::stager::InputStager::new(&gpu, batch * c * h * w)
        .map_err(anyhow::Error::msg)?;
    Ok(Some(stager))
}

fn peak_memory(device: Device) -> u64 {
    match device {
        Device::Cpu => 0,
        Device::Cuda(i) => crate::cuda::Gpu::get(i)
            .map(|g| g.pool_stats().peak_bytes_in_use as u64)
            .unwrap_or(0),
    }
}

/// Sizes rayon's global pool once (later calls keep the first size). A single-process run of the
/// `podgpu` program joins its main thread to the pool (`cpu::size_pool_with_caller`: its ops then
/// run where their data is); ranks that are threads of one process do not (one of them blocking on
/// another outside rayon would hold up the other's work), nor does a run started by a test thread.
fn set_threads(threads: Option<usize>, single_process: bool) {
    let single_process = single_process && crate::cpu::main_thread_may_join_pool();
    let n = match threads {
        Some(n) => {
            // More threads than cores only add switching; a huge count would try to start them all.
            let (n, note) = crate::budget::useful_threads(n);
            if let Some(note) = note {
                println!("{note}");
            }
            n
        }
        // rayon's default size (RAYON_NUM_THREADS, else the cores).
        None if single_process => 0,
        None => return,
    };
    if single_process {
        crate::cpu::size_pool_with_caller(n);
    } else {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_dates() {
        assert_eq!(timestamp(0), "19700101-000000");
        assert_eq!(timestamp(951_782_400 + 3661), "20000229-010101");
    }

    #[test]
    fn stems_follow_the_input_size() {
        assert_eq!(stem_for(32), Stem::Cifar);
        assert_eq!(stem_for(28), Stem::Cifar);
        assert_eq!(stem_for(64), Stem::TinyImageNet);
        assert_eq!(stem_for(224), Stem::ImageNet);
    }
}
