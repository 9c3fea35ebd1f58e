//! `podgpu eval --checkpoint FILE --data FILE`: accuracy by cosine argmax (or the trainable head's
//! argmax), per-class accuracy, the confusion matrix and the paper's Table I norm split.

use crate::autograd::ParamStore;
use crate::data::Dataset;
use crate::nn::{layers::transpose2d, HeadSpec, ModelSpec, Network};
use crate::train::checkpoint::load_checkpoint;
use crate::train::config::{HeadKind, TrainConfig};
use crate::train::eval::{extract, summarize};
use crate::train::objective::register_loss_buffers;
use crate::train::trainer::stem_for;
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A checkpoint written by `podgpu train` (last.safetensors or best.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Dataset file (.bin); default: the one the run trained on.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which split to score.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Precision of the forward pass: fp32, tf32 (GPU tensor cores) or bf16 (mixed precision:
    /// bf16 activations on a GPU for the ResNets, the CPU's emulation of them elsewhere). The
    /// checkpoint is f32 and loads the same whatever this is.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: crate::train::Precision,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also classify with Gaussian Discriminant Analysis fitted on the train split's latent features
    /// (the paper's Table IX alternative to cosine argmax).
    #[arg(long)]
    pub gda: bool,
}

/// Rebuilds the network a checkpoint was trained as and loads its weights.
pub fn load_network(
    checkpoint: &std::path::Path,
    data: Option<PathBuf>,
) -> Result<(Network, ParamStore, TrainConfig, Dataset)> {
    let ckpt = load_checkpoint(checkpoint)?;
    let cfg = TrainConfig::from_json(&ckpt.state.config)
        .with_context(|| format!("the configuration saved in {}", checkpoint.display()))?;
    let data = data
        .or_else(|| cfg.data.clone())
        .unwrap_or_else(crate::data::default_dataset_path);
    let ds = Dataset::open(&data).map_err(|e| anyhow!("{e}"))?;
    // Every section's checksum, as `train` does: a damaged file gives a wrong score, not an error.
    ds.verify_all().map_err(|e| anyhow!("{e}"))?;
    // Scoring on another dataset is allowed (another test set of the same classes), but said.
    if let Some(run) = &ckpt.state.run {
        let now = crate::train::identity::DatasetIdentity::of(&ds, &data);
        if let Some(diff) = run.dataset.difference(&now) {
            eprintln!(
                "note: {} is not the dataset {} was trained on ({}): {diff}",
                data.display(),
                checkpoint.display(),
                run.dataset.path.display()
            );
        }
    }
    let probe = ds.split(ds.split_names()[0]).map_err(|e| anyhow!("{e}"))?;
    let [c, h, _] = probe.image_shape();
    // The transformers without FC1 use their pooled width; their PEDCC is timm's `head.weight`
    // [K, n] (Swin: `head.fc.weight`) instead of the CNNs' transposed `out.weight`.
    let native = crate::nn::native_feature_dim(&cfg.model);
    let feature_dim = match (ckpt.tensors.get("fc.weight"), native) {
        (Some(fc), _) => fc.dim(0),
        (None, Some(n)) => n,
        (None, None) => bail!(
            "{} has no fc.weight: not a podgpu checkpoint",
            checkpoint.display()
        ),
    };
    let timm_head = ["head.weight", "head.fc.weight"]
        .iter()
        .find_map(|k| ckpt.tensors.get(*k).filter(|_| native.is_some()));
    let head = match cfg.loss.head() {
        HeadKind::Pedcc if timm_head.is_some() => HeadSpec::Pedcc(timm_head.unwrap().clone()),
        HeadKind::Pedcc => {
            let w = ckpt.tensors.get("out.weight").ok_or_else(|| {
                anyhow!(
                    "{} has no out.weight (the PEDCC head)",
                    checkpoint.display()
                )
            })?;
            HeadSpec::Pedcc(transpose2d(w))
        }
        HeadKind::Linear => HeadSpec::Linear,
        HeadKind::Cosine => HeadSpec::Cosine,
    };
    let spec = ModelSpec {
        arch: cfg.model.clone(),
        width: cfg.width,
        stem: stem_for(cfg.image_size.unwrap_or(h)),
        in_channels: c,
        classes: ds.num_classes(),
        feature_dim,
        head,
        image_size: cfg.image_size.unwrap_or(h),
        drop_path: cfg.drop_path,
    };
    crate::budget::check_network(
        &spec,
        [c, h, probe.image_shape()[2]],
        1,
        false,
        crate::budget::NetworkFlags {
            size: "the width in the checkpoint's settings is wrong; use the checkpoint as written",
            inputs: "the dataset's images are too large for this machine",
        },
    )?;
    let mut ps = ParamStore::new();
    let net = Network::new(
        spec,
        &mut ps,
        crate::DType::F32,
        &mut crate::rng::Rng::new(0),
    )
    .map_err(|e| anyhow!(e))?;
    // The loss's own buffers (Center Loss centres) are in the checkpoint too.
    register_loss_buffers(
        cfg.loss,
        &mut ps,
        ds.num_classes(),
        feature_dim,
        crate::DType::F32,
    );
    ckpt.restore_into(&mut ps, &cfg.model).with_context(|| {
        format!(
            "{} does not fit a {} for {} ({} classes, {c}×{h} images)",
            checkpoint.display(),
            cfg.model,
            data.display(),
            ds.num_classes()
        )
    })?;
    Ok((net, ps, cfg, ds))
}

pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (device, note) = crate::device::select(&a.device)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    crate::cuda::set_math_mode(match a.precision {
        crate::train::Precision::Tf32 => crate::cuda::MathMode::Tf32,
        _ => crate::cuda::MathMode::Fp32,
    });
    crate::train::trainer::set_precision(a.precision);
    let (net, mut ps, cfg, ds) = load_network(&a.checkpoint, a.data.clone())?;
    crate::train::trainer::check_gpu_bf16(a.precision, device, &cfg.model)?;
    ps.to_device(device);
    let split = ds.split(&a.split).map_err(|e| anyhow!("{e}"))?;
    // Out of GPU memory comes back as an error naming a smaller --batch-size.
    let oom = |o: crate::cuda::OutOfMemory| anyhow!(o.advice(Some(a.batch_size)));
    let f = crate::cuda::catch_oom(|| extract(&net, &mut ps, &split, a.batch_size, None, device))
        .map_err(oom)??;
    if ds.data_changed() {
        bail!(
            "the dataset file {} changed while it was being scored (it was truncated or rewritten \
             in place); put the complete file back and run eval again",
            ds.path().display()
        );
    }
    let mut r = summarize(&f, ds.num_classes());
    if a.gda {
        let train = ds.split("train").map_err(|e| anyhow!("{e}"))?;
        let ft =
            crate::cuda::catch_oom(|| extract(&net, &mut ps, &train, a.batch_size, None, device))
                .map_err(oom)??;
        let g = crate::train::gda::fit(&ft.features, &ft.labels, ds.num_classes())?;
        r.gda_accuracy = Some(g.accuracy(&f.features, &f.labels));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} ({}, {} loss) on {} split `{}`: {} images",
        a.checkpoint.display(),
        cfg.model,
        cfg.loss,
        ds.path().display(),
        a.split,
        r.samples
    );
    println!(
        "accuracy {:.2}% ({} / {})",
        100.0 * r.accuracy,
        r.correct,
        r.samples
    );
    println!(
        "Table I split at mean ‖x‖ = {:.3}: below {:.2}% ({} images), above {:.2}% ({} images)",
        r.mean_norm,
        100.0 * r.below_mean_norm_accuracy,
        r.below_mean_norm_samples,
        100.0 * r.above_mean_norm_accuracy,
        r.samples - r.below_mean_norm_samples
    );
    println!(
        "Table V: variance of the normalised latent features around their class means {:.4}",
        r.normalized_feature_variance
    );
    if let Some(g) = r.gda_accuracy {
        println!(
            "GDA (fitted on the train split's features) accuracy {:.2}%",
            100.0 * g
        );
    }
    println!("per-class accuracy:");
    for (name, acc) in ds.classes().iter().zip(&r.per_class_accuracy) {
        println!("  {name:<16} {:.2}%", 100.0 * acc);
    }
    println!("confusion matrix (rows: true class, columns: predicted):");
    for row in &r.confusion {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
        println!("  {}", cells.join(""));
    }
    Ok(())
}
