//! The training loop of `podgpu train`: the paper's recipe (DESIGN.md §1.7) end to end.
//!
//! Per epoch: lr from the step schedule, δ from the δ schedule, every training batch through forward →
//! loss (POD over the frozen PEDCC, or softmax CE) → backward → SGD; then δ's mean norm closes the
//! epoch, the test split is scored by cosine argmax, and metrics, plots and checkpoints are written.
//! A run folder holds everything needed to resume exactly: `config.toml`, `pedcc.safetensors`,
//! `last.safetensors` (weights, momentum, epoch, δ, M, RNG state) and the metrics so far.

use super::checkpoint::{load_checkpoint, save_epoch_checkpoints, TrainState};
use super::config::{HeadKind, LossKind, TrainConfig};
use super::eval;
use super::metrics::{EpochRecord, MetricsLog};
use super::objective::{register_loss_buffers, Objective};
use super::plot::plot_metrics;
use super::progress::Progress;
use crate::autograd::{ParamStore, Tape};
use crate::data::{Dataset, Loader, LoaderConfig, Split};
use crate::loss::{self, DeltaSchedule, Variant};
use crate::nn::{HeadSpec, ModelSpec, Network, Stem};
use crate::optim::{Sgd, StepSchedule};
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
    sgd: Sgd,
    schedule: StepSchedule,
    delta: DeltaSchedule,
    state: TrainState,
    metrics: MetricsLog,
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

/// Trains a fresh run described by `cfg`.
pub fn train(cfg: TrainConfig) -> Result<RunSummary> {
    let run = Run::fresh(cfg)?;
    run.go()
}

/// Continues the run in `dir` from its last checkpoint. `epochs` may extend the run.
pub fn resume(
    dir: &Path,
    epochs: Option<usize>,
    device: Option<String>,
    threads: Option<usize>,
) -> Result<RunSummary> {
    let run = Run::resumed(dir, epochs, device, threads)?;
    run.go()
}

/// What every run does first: validate, choose the device (saying why when `auto` falls back to the
/// CPU), size the thread pool, open the dataset.
fn prepare(cfg: &TrainConfig) -> Result<(Device, Dataset, Split, Option<Split>)> {
    cfg.validate()?;
    let (device, note) = crate::device::select(&cfg.device)?;
    if let Some(note) = note {
        println!("{note}");
    }
    set_threads(cfg.threads);
    let (ds, train, test) = open_data(cfg)?;
    Ok((device, ds, train, test))
}

fn open_data(cfg: &TrainConfig) -> Result<(Dataset, Split, Option<Split>)> {
    let path = cfg
        .data
        .clone()
        .unwrap_or_else(crate::data::default_dataset_path);
    let ds = Dataset::open(&path).map_err(|e| anyhow!("{e}"))?;
    let train = ds.split("train").map_err(|e| anyhow!("{e}"))?;
    let test = if ds.has_split("test") {
        Some(ds.split("test").map_err(|e| anyhow!("{e}"))?)
    } else {
        None
    };
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
        bail!("images of {h}×{w} are too small for {}: it needs at least 8×8", cfg.model);
    }
    let classes = ds.num_classes();
    let feature_dim = cfg
        .feature_dim
        .unwrap_or_else(|| pedcc::recommended_dim(classes));
    let spec = ModelSpec {
        arch: cfg.model.clone(),
        width: cfg.width,
        stem: stem_for(h),
        in_channels: c,
        classes,
        feature_dim,
        head: match (cfg.loss.head(), centroids) {
            (HeadKind::Pedcc, Some(p)) => HeadSpec::Pedcc(p.clone()),
            (HeadKind::Pedcc, None) => bail!("the {} loss needs the PEDCC centroids", cfg.loss),
            (HeadKind::Linear, _) => HeadSpec::Linear,
            (HeadKind::Cosine, _) => HeadSpec::Cosine,
        },
    };
    let mut rng = Rng::derive(cfg.seed, 0x1A17);
    let net = Network::new(spec, ps, DType::F32, &mut rng).map_err(|e| anyhow!(e))?;
    register_loss_buffers(cfg.loss, ps, classes, feature_dim, DType::F32);
    Ok(net)
}

/// The PEDCC for a fresh run, from `--pedcc FILE` or generated from the seed, saved into the run
/// folder as `pedcc.safetensors` (resume reads it from there).
fn make_pedcc(cfg: &TrainConfig, classes: usize, dim: usize, dir: &Path) -> Result<Tensor> {
    let keep = dir.join("pedcc.safetensors");
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
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        super::write_atomic(&keep, &bytes)?;
        return Ok(p);
    }
    let method = if classes > dim + 1 {
        if !cfg.pedcc_repulsion {
            bail!(
                "{classes} classes do not fit evenly in {dim} dimensions (an exact PEDCC needs \
                 classes ≤ feature dim + 1): raise --feature-dim to at least {}, or pass \
                 --pedcc-repulsion to use approximately even centroids",
                classes - 1
            );
        }
        eprintln!("warning: {classes} classes in {dim} dimensions: using the approximate repulsion PEDCC");
        Method::Repulsion
    } else {
        Method::Simplex
    };
    let p = pedcc::generate(classes, dim, cfg.seed, method)?;
    pedcc::save(&keep, &p)?;
    Ok(p.to_tensor())
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
    fn fresh(cfg: TrainConfig) -> Result<Run> {
        let (device, ds, train, test) = prepare(&cfg)?;
        let dir = cfg.out.clone().unwrap_or_else(|| default_run_dir(&cfg));
        if dir.join("last.safetensors").exists() {
            bail!(
                "{} already holds a run (last.safetensors); continue it with `podgpu train --resume {}` \
                 or choose another --out",
                dir.display(),
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| {
            format!("could not create the run folder {}; choose a writable --out", dir.display())
        })?;
        let classes = ds.num_classes();
        let dim = cfg
            .feature_dim
            .unwrap_or_else(|| pedcc::recommended_dim(classes));
        let centroids = match cfg.loss.uses_pedcc() {
            true => Some(make_pedcc(&cfg, classes, dim, &dir)?),
            false => None,
        };
        let mut ps = ParamStore::new();
        let net = build_network(&cfg, &ds, &train, centroids.as_ref(), &mut ps)?;
        ps.to_device(device);
        cfg.save(&dir.join("config.toml"))?;
        let sgd = Sgd::new(cfg.momentum, cfg.weight_decay, cfg.nesterov)?;
        let schedule = StepSchedule::new(cfg.lr, &cfg.milestones, cfg.gamma)?;
        let delta = DeltaSchedule::resume(cfg.variant, cfg.alpha, 0, cfg.initial_mean_norm);
        let mut state = TrainState::new(cfg.model.clone(), cfg.to_json(), Rng::new(cfg.seed).state());
        state.delta = delta.delta();
        state.mean_norm = delta.mean_norm();
        let metrics = MetricsLog::create(&dir)?;
        let objective = Objective::new(&cfg, centroids.map(|p| p.to_device(device)), &ps)?;
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
        })
    }

    fn resumed(
        dir: &Path,
        epochs: Option<usize>,
        device: Option<String>,
        threads: Option<usize>,
    ) -> Result<Run> {
        let ckpt_path = dir.join("last.safetensors");
        if !ckpt_path.exists() {
            bail!(
                "{} has no checkpoint (last.safetensors) to resume from; start a new run with \
                 `podgpu train` instead",
                dir.display()
            );
        }
        let ckpt = load_checkpoint(&ckpt_path)?;
        let mut cfg = TrainConfig::from_json(&ckpt.state.config)
            .with_context(|| format!("the configuration saved in {}", ckpt_path.display()))?;
        if let Some(e) = epochs {
            cfg.epochs = e;
        }
        if let Some(d) = device {
            cfg.device = d;
        }
        if threads.is_some() {
            cfg.threads = threads;
        }
        cfg.out = Some(dir.to_path_buf());
        let (device, ds, train, test) = prepare(&cfg)?;
        let centroids = match cfg.loss.uses_pedcc() {
            true => Some(pedcc::load(&dir.join("pedcc.safetensors"))?),
            false => None,
        };
        let mut ps = ParamStore::new();
        let net = build_network(&cfg, &ds, &train, centroids.as_ref(), &mut ps)?;
        ckpt.restore_into(&mut ps, &cfg.model)?;
        ps.to_device(device);
        let mut sgd = Sgd::new(cfg.momentum, cfg.weight_decay, cfg.nesterov)?;
        sgd.load_state(ckpt.optim.clone(), &ps)?;
        let schedule = StepSchedule::new(cfg.lr, &cfg.milestones, cfg.gamma)?;
        let state = ckpt.state.clone();
        let delta = DeltaSchedule::resume(cfg.variant, cfg.alpha, state.epoch, state.mean_norm);
        let metrics = MetricsLog::resume(dir, state.epoch + 1)?;
        cfg.save(&dir.join("config.toml"))?;
        println!(
            "resuming {} from epoch {} of {} ({})",
            dir.display(),
            state.epoch,
            cfg.epochs,
            ckpt_path.display()
        );
        let objective = Objective::new(&cfg, centroids.map(|p| p.to_device(device)), &ps)?;
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
        })
    }

    fn go(mut self) -> Result<RunSummary> {
        let cfg = self.cfg.clone();
        let train_loader = Loader::new(
            self.train.clone(),
            LoaderConfig {
                limit: cfg.limit_train,
                prefetch: cfg.prefetch,
                ..LoaderConfig::train(cfg.batch_size, cfg.seed)
            },
        )?;
        let p = &self.net.spec;
        println!(
            "training {} (width {}, {:?} stem) with {} loss{} on {}: {} classes, feature dim {}, \
             {} train images, batch {}, {} epochs, {} trainable parameters",
            cfg.model,
            cfg.width,
            p.stem,
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
        println!("run folder: {}", self.dir.display());
        let mut last_loss = f64::NAN;
        let mut last_acc = None;
        let start_epoch = self.state.epoch;
        for epoch in start_epoch..cfg.epochs {
            let (rec, test_acc) = self.train_epoch(&train_loader, epoch)?;
            last_loss = rec.train_loss;
            last_acc = test_acc;
            self.metrics.append(rec.clone())?;
            plot_metrics(&self.dir, self.metrics.records())?;
            self.state.epoch = epoch + 1;
            self.state.delta = self.delta.delta();
            self.state.mean_norm = self.delta.mean_norm();
            save_epoch_checkpoints(&self.dir, &self.ps, self.sgd.state(), &mut self.state, test_acc)?;
        }
        println!(
            "done: metrics in {}, plots {} and {}, checkpoint {}",
            self.dir.join("metrics.csv").display(),
            self.dir.join("loss.png").display(),
            self.dir.join("accuracy.png").display(),
            self.dir.join("last.safetensors").display()
        );
        Ok(RunSummary {
            run_dir: self.dir,
            epochs: cfg.epochs,
            final_train_loss: last_loss,
            final_test_acc: last_acc,
            best_test_acc: self.state.best_acc,
        })
    }

    /// One epoch of training plus the evaluation; returns the metrics record and the test accuracy.
    fn train_epoch(&mut self, loader: &Loader, epoch: usize) -> Result<(EpochRecord, Option<f64>)> {
        let cfg = &self.cfg;
        let lr = self.schedule.lr_at(epoch);
        if cfg.variant == Variant::Reference && self.schedule.is_milestone(epoch) {
            // The reference code re-creates its optimizer at each lr step (DESIGN.md §1.6.4).
            self.sgd.reset_momentum();
        }
        let delta = self.delta.delta();
        let started = Instant::now();
        let mut progress = Progress::new(loader.batches_per_epoch(), epoch + 1, cfg.epochs);
        let (mut loss_sum, mut seen, mut correct, mut norm_sum) = (0.0, 0usize, 0usize, 0.0);
        for batch in loader.epoch(epoch as u64) {
            let b = batch.labels.len();
            if b < 2 {
                // Batch norm and SC need at least two samples; a last batch of one is skipped.
                continue;
            }
            let index = batch.index;
            let (images, labels) = batch.into_parts();
            let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            let mut tape = Tape::train();
            let x = tape.constant(images.to_device(self.device));
            let out = self.net.forward(&mut tape, &mut self.ps, &x);
            let labels_t = loss::labels_tensor(&labels, out.features.value());
            let l = self.objective.loss(&mut tape, &self.ps, &out, &labels_t, delta);
            let lv = l.value().item();
            if !lv.is_finite() {
                bail!(
                    "the loss became {lv} at epoch {}, batch {index} (step {}): training diverged. \
                     The last good checkpoint is {} (from the end of epoch {}); lower --lr and \
                     resume from it or start again",
                    epoch + 1,
                    self.state.global_step,
                    self.dir.join("last.safetensors").display(),
                    self.state.epoch
                );
            }
            tape.backward(&l, &mut self.ps);
            drop(tape);
            self.sgd.step(&mut self.ps, lr);
            self.ps.zero_grad();
            self.objective.after_step(&self.net, &mut self.ps, x.value(), &out, &labels_t, lr);
            self.state.global_step += 1;
            loss_sum += lv * b as f64;
            seen += b;
            correct += loss::count_correct(out.logits.value(), &labels);
            norm_sum += loss::delta_norm_sum(cfg.variant, out.features.value(), out.logits.value());
            progress.update(index, b, lv);
        }
        if seen == 0 {
            bail!("epoch {} saw no training batch of at least 2 images", epoch + 1);
        }
        let mean_norm = norm_sum / seen as f64;
        if cfg.loss.uses_delta() {
            self.delta.end_epoch(mean_norm)?;
        }
        let train_time = started.elapsed().as_secs_f64();
        let test_acc = match &self.test {
            Some(test) if (epoch + 1).is_multiple_of(cfg.eval_every) || epoch + 1 == cfg.epochs => {
                let f = eval::extract(
                    &self.net,
                    &mut self.ps,
                    test,
                    cfg.batch_size,
                    cfg.limit_test,
                    self.device,
                )?;
                Some(eval::summarize(&f, self.net.spec.classes).accuracy)
            }
            _ => None,
        };
        let mut rec = EpochRecord::new(epoch + 1);
        rec.train_loss = loss_sum / seen as f64;
        rec.train_acc = correct as f64 / seen as f64;
        rec.test_acc = test_acc;
        rec.lr = lr;
        rec.delta = if cfg.loss.uses_delta() { delta } else { f64::NAN };
        rec.mean_norm = mean_norm;
        rec.images_per_s = seen as f64 / train_time;
        rec.epoch_time_s = started.elapsed().as_secs_f64();
        rec.peak_mem_bytes = peak_memory(self.device);
        progress.finish(&format!(
            "epoch {:>3}/{}  loss {:.4}  train acc {:.2}%  test acc {}  lr {:.3e}  δ {:.4}  M {:.3}  \
             {:.0} img/s  {:.1}s",
            epoch + 1,
            cfg.epochs,
            rec.train_loss,
            100.0 * rec.train_acc,
            test_acc.map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a)),
            lr,
            delta,
            mean_norm,
            rec.images_per_s,
            rec.epoch_time_s
        ));
        Ok((rec, test_acc))
    }
}

fn peak_memory(device: Device) -> u64 {
    match device {
        Device::Cpu => 0,
        Device::Cuda(i) => crate::cuda::Gpu::get(i)
            .map(|g| g.pool_stats().peak_bytes_in_use as u64)
            .unwrap_or(0),
    }
}

/// Sizes rayon's global pool once (later calls keep the first size).
fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
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
