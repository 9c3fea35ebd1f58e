//! `podgpu train MODEL --data FILE`: train with the paper's recipe (DESIGN.md §1.7); every knob is a
//! flag or a key of a TOML `--config` file (flags win). `--resume RUN_DIR` continues a run.

use crate::train::config::{LossKind, TrainConfig, Variant};
use crate::train::trainer;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Default)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Network: resnet18, resnet34, resnet50 (default), resnet101, resnet152, densenet121, mobilenetv2,
    /// smallcnn, vit_b16, vit_small_patch16_224, vit_tiny_patch16_224, test_vit, swin_b,
    /// swin_tiny_patch4_window7_224, or vit(...)/swin(...) (`podgpu models` lists them with sizes).
    pub model: Option<String>,
    /// Dataset file (.bin, see datasets/FORMAT.md). Default: datasets/cifar10-small.bin. With
    /// --resume: the run's own dataset at a new place (podgpu checks that it is the same dataset).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// TOML file with any of the settings below (flags given here override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (its saved settings are used;
    /// --epochs may extend it, --device and --threads may change, --data gives its dataset's new
    /// place).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// pod (NaC + SC over the frozen PEDCC, default), or a baseline of the paper's Table IV: softmax,
    /// center, am-softmax, arcface, combined-margin, cot, pedcc-loss, cosine, nac.
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// POD form: paper (default) or reference (the public reference code's, DESIGN.md §1.6).
    #[arg(long, value_enum)]
    pub variant: Option<Variant>,
    /// auto (default), cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Default 100.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Default 128.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Initial learning rate (default 0.1).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Default 0.9.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Default 5e-4.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Epochs after which lr is multiplied by --gamma (default 30,60,90).
    #[arg(long, value_delimiter = ',')]
    pub milestones: Option<Vec<usize>>,
    /// Default 0.1.
    #[arg(long)]
    pub gamma: Option<f64>,
    /// α of the δ schedule (default 0.01).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// λ, the weight of SC (default 1).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Latent dimension n (default: the paper's recommendation for the class count).
    #[arg(long)]
    pub feature_dim: Option<usize>,
    /// Base channel width of the network (default 64; smaller for quick CPU runs).
    #[arg(long)]
    pub width: Option<usize>,
    /// Use this PEDCC file (from `podgpu pedcc`) instead of generating one.
    #[arg(long)]
    pub pedcc: Option<PathBuf>,
    /// Allow more classes than feature dim + 1 with approximately even (repulsion) centroids.
    #[arg(long)]
    pub pedcc_repulsion: bool,
    /// Train on the first N training images only (quick runs).
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub limit_test: Option<usize>,
    /// Run folder (default runs/MODEL-LOSS-TIMESTAMP). It must be new or empty.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Start the run in an --out folder that holds files: the files a run writes there (an earlier
    /// run's checkpoints, metrics, plots, settings) are replaced, any other file is left alone.
    #[arg(long)]
    pub overwrite: bool,
    /// CPU threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// center: weight λ of the Center Loss term (default 0.003).
    #[arg(long)]
    pub center_lambda: Option<f64>,
    /// center: rate α of the centre update (default 0.5).
    #[arg(long)]
    pub center_alpha: Option<f64>,
    /// am-softmax, arcface, combined-margin: the scale s (default 30).
    #[arg(long)]
    pub margin_scale: Option<f64>,
    /// am-softmax: margin m of cos θ − m (default 0.35).
    #[arg(long)]
    pub am_margin: Option<f64>,
    /// arcface: margin m of cos(θ + m) (default 0.5).
    #[arg(long)]
    pub arc_margin: Option<f64>,
    /// combined-margin: m1 of cos(m1·θ + m2) − m3 (default 0.9).
    #[arg(long)]
    pub cm_m1: Option<f64>,
    /// combined-margin: m2 (default 0.4).
    #[arg(long)]
    pub cm_m2: Option<f64>,
    /// combined-margin: m3 (default 0.15).
    #[arg(long)]
    pub cm_m3: Option<f64>,
    /// pedcc-loss: AM-Softmax margin over the PEDCC (default 0.5).
    #[arg(long)]
    pub pedcc_margin: Option<f64>,
    /// pedcc-loss: AM-Softmax scale (default 15).
    #[arg(long)]
    pub pedcc_scale: Option<f64>,
    /// pedcc-loss: weight λ of the MSE term (default 1).
    #[arg(long)]
    pub pedcc_lambda: Option<f64>,
    /// pedcc-loss: q of the root (MSE)^(1/q) (default 1).
    #[arg(long)]
    pub pedcc_root: Option<f64>,
    /// Bit-identical weights for a seed whatever the thread count (fixed-order reductions on the
    /// CPU); on the GPU, deterministic cuDNN algorithms only.
    #[arg(long)]
    pub deterministic: bool,
    /// Precision: fp32 (true fp32, the default), tf32 (GPU tensor cores for convolutions and matrix
    /// products; the SC loss stays fp32; the CPU computes in f32) or bf16 (mixed precision: bf16
    /// activations with f32 master weights, statistics and loss; on a GPU for the ResNets, on the
    /// CPU as an emulation of the same numerics).
    #[arg(long, value_enum)]
    pub precision: Option<crate::train::Precision>,
    /// Check every op's output and gradients for NaN/inf and name the first op that produced one
    /// (slow; for debugging a diverging run). May be given with --resume.
    #[arg(long)]
    pub detect_anomaly: bool,
    #[command(flatten)]
    pub transformer: TransformerArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

/// Data-parallel training (issue 16, docs/DISTRIBUTED.md): `mpirun -np N podgpu train …` with a
/// podgpu built with `--features distributed`.
#[derive(clap::Args, Debug, Default)]
pub struct ParallelArgs {
    /// How the lr follows the N ranks of `mpirun -np N` (global batch N × --batch-size): none
    /// (default) or linear (lr × N; with --warmup-epochs E --warmup-lr LR, Goyal et al.'s gradual
    /// warm-up from LR to N × lr).
    #[arg(long, value_enum)]
    pub lr_scaling: Option<crate::train::config::LrScaling>,
    /// Batch-norm statistics over the global batch (summed across ranks) instead of per rank.
    #[arg(long)]
    pub sync_bn: bool,
}

/// The transformers' settings (issue 13): recipes, input size, timm weights, optimiser, schedule.
#[derive(clap::Args, Debug, Default)]
pub struct TransformerArgs {
    /// Start from a named recipe, printed at start; any flag given overrides it: paper (the CNN
    /// recipe, default), vit-finetune, swin.
    #[arg(long)]
    pub recipe: Option<String>,
    /// Feed the network IMAGE×IMAGE images, resized on the fly from the stored size (training:
    /// random-resized-crop + flip; test: resize, see --test-resize). Default: the stored size.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Test images: resize to this side, then the centre --image-size crop (e.g. 256 for 224).
    #[arg(long)]
    pub test_resize: Option<usize>,
    /// Start the backbone from a timm state dict saved with safetensors (the head is new; position
    /// embeddings and relative-position tables are resampled to the model's size).
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// sgd (default) or adamw.
    #[arg(long, value_enum)]
    pub optimizer: Option<crate::train::config::OptimizerKind>,
    /// step (×gamma at --milestones, default) or cosine (to --min-lr), stepped per iteration.
    #[arg(long, value_enum)]
    pub schedule: Option<crate::optim::Decay>,
    /// Linear warm-up from --warmup-lr over this many epochs (fractions allowed).
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long)]
    pub warmup_lr: Option<f64>,
    /// Where the cosine decay ends.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Clip gradients to this global L2 norm.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Stochastic depth rate of the transformers (default: timm's, ViT 0, Swin 0.1).
    #[arg(long)]
    pub drop_path: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_eps: Option<f64>,
}

impl TransformerArgs {
    fn any_given(&self) -> bool {
        self.recipe.is_some()
            || self.image_size.is_some()
            || self.test_resize.is_some()
            || self.init.is_some()
            || self.optimizer.is_some()
            || self.schedule.is_some()
            || [
                self.warmup_epochs,
                self.warmup_lr,
                self.min_lr,
                self.clip_grad,
                self.drop_path,
                self.adam_beta1,
                self.adam_beta2,
                self.adam_eps,
            ]
            .iter()
            .any(Option::is_some)
    }

    /// Writes the given flags over `c`.
    fn apply(&self, c: &mut TrainConfig) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            optimizer,
            schedule,
            warmup_epochs,
            warmup_lr,
            min_lr,
            adam_beta1,
            adam_beta2,
            adam_eps
        );
        for (flag, field) in [
            (self.image_size, &mut c.image_size),
            (self.test_resize, &mut c.test_resize),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
        if self.clip_grad.is_some() {
            c.clip_grad = self.clip_grad;
        }
        if self.drop_path.is_some() {
            c.drop_path = self.drop_path;
        }
        if self.init.is_some() {
            c.init = self.init.clone();
        }
    }
}

impl Args {
    /// Whether any loss hyper-parameter flag was given.
    fn loss_settings_given(&self) -> bool {
        [
            self.center_lambda,
            self.center_alpha,
            self.margin_scale,
            self.am_margin,
            self.arc_margin,
            self.cm_m1,
            self.cm_m2,
            self.cm_m3,
            self.pedcc_margin,
            self.pedcc_scale,
            self.pedcc_lambda,
            self.pedcc_root,
        ]
        .iter()
        .any(Option::is_some)
    }
}

/// The configuration these flags describe: defaults, then `--config`, then the flags.
pub fn resolve(a: &Args) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(path) => TrainConfig::load(path)?,
        None => TrainConfig::default(),
    };
    if let Some(m) = &a.model {
        c.model = m.clone();
    }
    if a.data.is_some() {
        c.data = a.data.clone();
    }
    if let Some(r) = &a.transformer.recipe {
        c.apply_recipe(r)?;
    }
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = &a.$field { c.$field = v.clone(); } )* };
    }
    set!(
        loss,
        variant,
        device,
        seed,
        epochs,
        batch_size,
        lr,
        momentum,
        weight_decay,
        milestones
    );
    set!(gamma, alpha, lambda, width);
    set!(
        center_lambda,
        center_alpha,
        margin_scale,
        am_margin,
        arc_margin,
        cm_m1,
        cm_m2,
        cm_m3
    );
    set!(pedcc_margin, pedcc_scale, pedcc_lambda, pedcc_root);
    if let Some(m) = &a.model {
        c.model = m.clone();
    }
    if a.data.is_some() {
        c.data = a.data.clone();
    }
    for (flag, field) in [
        (a.feature_dim, &mut c.feature_dim),
        (a.limit_train, &mut c.limit_train),
        (a.limit_test, &mut c.limit_test),
        (a.threads, &mut c.threads),
    ] {
        if flag.is_some() {
            *field = flag;
        }
    }
    if a.pedcc.is_some() {
        c.pedcc = a.pedcc.clone();
    }
    if a.out.is_some() {
        c.out = a.out.clone();
    }
    c.pedcc_repulsion |= a.pedcc_repulsion;
    c.deterministic |= a.deterministic;
    c.detect_anomaly |= a.detect_anomaly;
    if let Some(p) = a.precision {
        c.precision = p;
    }
    a.transformer.apply(&mut c);
    if let Some(r) = a.parallel.lr_scaling {
        c.lr_scaling = r;
    }
    c.sync_bn |= a.parallel.sync_bn;
    if let Some(Err(e)) = crate::nn::TransformerConfig::parse(&c.model) {
        bail!(e);
    }
    if !crate::nn::is_model_name(&c.model) {
        let t: Vec<&str> = crate::nn::TRANSFORMER_NAMES.iter().map(|t| t.0).collect();
        bail!(
            "unknown model `{}`; podgpu has {}, {}, and vit(...)/swin(...) configurations",
            c.model,
            crate::nn::MODEL_NAMES.join(", "),
            t.join(", ")
        );
    }
    c.validate()?;
    Ok(c)
}

pub fn run(a: Args) -> Result<()> {
    if crate::dist::launched_by_mpi() {
        return run_ranked(a);
    }
    run_with(a, trainer::Ranks::single())
}

/// One rank of `mpirun -np N podgpu train …`: rank 0 reports; the others end quietly on an error
/// that rank 0 reports too (after finalising MPI, which the launcher expects).
#[cfg(feature = "distributed")]
fn run_ranked(a: Args) -> Result<()> {
    let world = crate::dist::mpi::MpiWorld::init().map_err(|e| anyhow::anyhow!("MPI: {e}"))?;
    let world: std::rc::Rc<dyn crate::dist::Collective> = std::rc::Rc::new(world);
    let rank = world.rank();
    let result = run_with(a, trainer::Ranks::new(world.clone()));
    // An agreed stop (a signal): rank 0 has written the checkpoint of the exact point; it says so
    // before any rank leaves, because the launcher tears the job down as soon as one rank ends with
    // a non-zero status, which could cut rank 0's message (seen with Open MPI 4.1 under SIGTERM).
    if let Err(e) = &result {
        if let Some(stop) = e.downcast_ref::<crate::train::Interrupted>() {
            if rank == 0 {
                eprintln!("{stop}");
            }
            let _ = world.barrier();
            drop(world);
            std::process::exit(crate::train::signal::INTERRUPTED_EXIT_CODE);
        }
    }
    drop(world);
    match result {
        Err(e) if rank != 0 && trainer::known_to_all_ranks(&e) => std::process::exit(1),
        r => r,
    }
}

#[cfg(not(feature = "distributed"))]
fn run_ranked(a: Args) -> Result<()> {
    // A launcher of one process (`srun` of a single task) is a plain run.
    if crate::dist::launched_size().is_some_and(|n| n <= 1) {
        return run_with(a, trainer::Ranks::single());
    }
    bail!(
        "this podgpu was started by an MPI launcher (mpirun, srun) but built without MPI; build it          with `cargo build --release --features distributed` (docs/DISTRIBUTED.md), or run it          without the launcher"
    )
}

fn run_with(a: Args, ranks: trainer::Ranks) -> Result<()> {
    let summary = match &a.resume {
        Some(dir) => {
            let changes_math = a.model.is_some()
                || a.config.is_some()
                || a.loss.is_some()
                || a.variant.is_some()
                || a.seed.is_some()
                || a.batch_size.is_some()
                || a.lr.is_some()
                || a.width.is_some()
                || a.feature_dim.is_some()
                || a.momentum.is_some()
                || a.weight_decay.is_some()
                || a.milestones.is_some()
                || a.gamma.is_some()
                || a.alpha.is_some()
                || a.lambda.is_some()
                || a.pedcc.is_some()
                || a.pedcc_repulsion
                || a.limit_train.is_some()
                || a.limit_test.is_some()
                || a.out.is_some()
                || a.overwrite
                || a.deterministic
                || a.precision.is_some()
                || a.transformer.any_given()
                || a.parallel.lr_scaling.is_some()
                || a.parallel.sync_bn
                || a.loss_settings_given();
            if changes_math {
                bail!(
                    "--resume continues a run with its saved settings ({}); only --epochs, --device, \
                     --threads, --detect-anomaly and --data (the run's dataset at a new place) may \
                     be given with it",
                    dir.join("config.toml").display()
                );
            }
            trainer::resume_ranked(
                dir,
                trainer::ResumeOptions {
                    epochs: a.epochs,
                    device: a.device.clone(),
                    threads: a.threads,
                    detect_anomaly: a.detect_anomaly,
                    data: a.data.clone(),
                },
                ranks,
            )?
        }
        None => trainer::train_ranked(
            resolve(&a)?,
            trainer::FreshOptions {
                overwrite: a.overwrite,
            },
            ranks,
        )?,
    };
    if let Some(acc) = summary.final_test_acc {
        println!(
            "final test accuracy {:.2}% (best {:.2}%), run folder {}",
            100.0 * acc,
            100.0 * summary.best_test_acc.unwrap_or(acc),
            summary.run_dir.display()
        );
    }
    Ok(())
}
