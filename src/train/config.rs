//! `TrainConfig`: every knob of `podgpu train`, with the paper's recipe as defaults (DESIGN.md §1.7).
//! Loaded from TOML (any subset of the fields; the rest keep their defaults), overridden by flags,
//! validated, and saved as `config.toml` in the run folder.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which loss trains the model (`--loss`): POD and the baselines of the paper's Table IV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// NaC + λ·SC over the frozen PEDCC head (the paper's method).
    Pod,
    /// Softmax cross-entropy over a trainable classifier (the baseline).
    Softmax,
    /// Softmax + λ·Center Loss, centres updated as in Wen et al. 2016.
    Center,
    /// AM-Softmax (cos θ − m, scale s) over a trainable normalised classifier.
    AmSoftmax,
    /// ArcFace (cos(θ + m), scale s) over a trainable normalised classifier.
    Arcface,
    /// Combined margin cos(m1·θ + m2) − m3 over a trainable normalised classifier.
    CombinedMargin,
    /// Complement Objective Training: a cross-entropy step and a complement-entropy step per batch.
    Cot,
    /// AM-Softmax over the frozen PEDCC plus λ·(MSE to the class centroid)^(1/q).
    PedccLoss,
    /// 1 − cos to the class's PEDCC centroid (paper eq. 9).
    Cosine,
    /// The norm-adaptive cosine loss alone (paper eq. 17), with the δ schedule.
    Nac,
}

/// What sits on top of FC1 for a loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadKind {
    /// The frozen PEDCC; classification by cosine argmax.
    Pedcc,
    /// A trainable linear classifier with bias; classification by logits argmax.
    Linear,
    /// A trainable classifier with normalised weights; classification by cosine argmax.
    Cosine,
}

impl LossKind {
    pub const ALL: [LossKind; 10] = [
        LossKind::Softmax,
        LossKind::Center,
        LossKind::AmSoftmax,
        LossKind::Arcface,
        LossKind::CombinedMargin,
        LossKind::Cot,
        LossKind::PedccLoss,
        LossKind::Cosine,
        LossKind::Nac,
        LossKind::Pod,
    ];

    /// The `--loss` value.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Pod => "pod",
            LossKind::Softmax => "softmax",
            LossKind::Center => "center",
            LossKind::AmSoftmax => "am-softmax",
            LossKind::Arcface => "arcface",
            LossKind::CombinedMargin => "combined-margin",
            LossKind::Cot => "cot",
            LossKind::PedccLoss => "pedcc-loss",
            LossKind::Cosine => "cosine",
            LossKind::Nac => "nac",
        }
    }

    /// The name the paper's tables use.
    pub fn paper_name(self) -> &'static str {
        match self {
            LossKind::Pod => "POD Loss",
            LossKind::Softmax => "Softmax Loss",
            LossKind::Center => "Center Loss",
            LossKind::AmSoftmax => "AM-Softmax",
            LossKind::Arcface => "ArcFace",
            LossKind::CombinedMargin => "Combined Margin",
            LossKind::Cot => "COT",
            LossKind::PedccLoss => "PEDCC-Loss",
            LossKind::Cosine => "Cosine Loss",
            LossKind::Nac => "NaC Loss",
        }
    }

    pub fn head(self) -> HeadKind {
        match self {
            LossKind::Pod | LossKind::PedccLoss | LossKind::Cosine | LossKind::Nac => {
                HeadKind::Pedcc
            }
            LossKind::Softmax | LossKind::Center | LossKind::Cot => HeadKind::Linear,
            LossKind::AmSoftmax | LossKind::Arcface | LossKind::CombinedMargin => HeadKind::Cosine,
        }
    }

    /// Whether the head is the frozen PEDCC (the run folder then keeps `pedcc.safetensors`).
    pub fn uses_pedcc(self) -> bool {
        self.head() == HeadKind::Pedcc
    }

    /// Whether the loss has the norm-adaptive δ (and so the δ schedule).
    pub fn uses_delta(self) -> bool {
        matches!(self, LossKind::Pod | LossKind::Nac)
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<LossKind> {
        LossKind::ALL
            .into_iter()
            .find(|l| l.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = LossKind::ALL.iter().map(|l| l.name()).collect();
                anyhow::anyhow!("unknown loss `{s}`; podgpu has {}", names.join(", "))
            })
    }
}

pub use crate::loss::Variant;

/// GPU math mode (DESIGN.md §2): fp32 (true fp32: cuBLAS default math, FMA-only cuDNN kernels) or
/// tf32 (tensor cores for convolutions and matrix products); the CPU computes both in f32. bf16:
/// mixed precision (bf16 convolution/GEMM inputs and activations, f32 master weights, gradients,
/// optimizer state, statistics and loss): bf16 storage on a GPU for the ResNets (`ops::store_bf16`,
/// `cuda::bf16_ops`), emulated on the CPU (`cpu::bf16`); see docs/GPU.md "fast path".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Tf32,
    Bf16,
}

/// The optimiser (`--optimizer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (PyTorch's), the paper's.
    Sgd,
    /// AdamW with decoupled weight decay (the Swin recipe).
    Adamw,
}

pub use crate::optim::Decay;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model name (resnet18, resnet50, ...).
    pub model: String,
    /// Base channel width of the network (64 in the paper; smaller for quick CPU runs).
    pub width: usize,
    /// Dataset file (`.bin`); None → the small dataset shipped in `datasets/`.
    pub data: Option<PathBuf>,
    pub loss: LossKind,
    pub variant: Variant,
    /// `auto` (CUDA when usable, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// 0-based epochs at which the lr is multiplied by `gamma`.
    pub milestones: Vec<usize>,
    pub gamma: f64,
    /// α of the δ schedule δ(e, M) = α·e·M.
    pub alpha: f64,
    /// λ weighting SC in POD = NaC + λ·SC.
    pub lambda: f64,
    /// M₀, the mean norm assumed before the first epoch (paper) / the first epoch's δ (reference).
    pub initial_mean_norm: f64,
    /// Latent dimension n; None → from the class count (DESIGN.md §1.1).
    pub feature_dim: Option<usize>,
    /// PEDCC centroids from a file instead of generated from the seed.
    pub pedcc: Option<PathBuf>,
    /// Allow K > n+1 classes with the approximate repelling-points PEDCC.
    pub pedcc_repulsion: bool,
    /// Train on the first N (shuffled) training images only, for quick runs.
    pub limit_train: Option<usize>,
    /// Evaluate on the first N test images only.
    pub limit_test: Option<usize>,
    /// Run folder; None → chosen by the trainer.
    pub out: Option<PathBuf>,
    /// CPU threads (augmentation and CPU kernels); None → all cores.
    pub threads: Option<usize>,
    /// Evaluate on the test split every N epochs (and always after the last).
    pub eval_every: usize,
    /// Batches prepared ahead of the GPU.
    pub prefetch: usize,
    pub precision: Precision,
    /// Bit-identical results for a seed whatever the thread count (slower on the GPU).
    pub deterministic: bool,
    /// Find the first op that produces a non-finite value (slow).
    pub detect_anomaly: bool,
    /// Center Loss: weight λ of the centre term (Wen et al.: 0.003).
    pub center_lambda: f64,
    /// Center Loss: rate α of the centre update (Wen et al.: 0.5).
    pub center_alpha: f64,
    /// Scale s of AM-Softmax, ArcFace and the combined margin.
    pub margin_scale: f64,
    /// AM-Softmax margin m (cos θ − m).
    pub am_margin: f64,
    /// ArcFace margin m (cos(θ + m)).
    pub arc_margin: f64,
    /// Combined margin cos(m1·θ + m2) − m3.
    pub cm_m1: f64,
    pub cm_m2: f64,
    pub cm_m3: f64,
    /// PEDCC-Loss: AM-Softmax margin m over the PEDCC.
    pub pedcc_margin: f64,
    /// PEDCC-Loss: AM-Softmax scale s.
    pub pedcc_scale: f64,
    /// PEDCC-Loss: weight λ of the MSE term.
    pub pedcc_lambda: f64,
    /// PEDCC-Loss: the MSE term is L_MSE^(1/q).
    pub pedcc_root: f64,
    /// The recipe the settings started from (`--recipe`), for the record.
    pub recipe: Option<String>,
    /// Side of the square images fed to the network; None → the stored size. Another size resizes
    /// on the fly (training: random-resized-crop + flip; test: resize, see `test_resize`).
    pub image_size: Option<usize>,
    /// Test images: resize to this side, then the centre `image_size` crop (e.g. 256 for 224);
    /// None → resize straight to `image_size`.
    pub test_resize: Option<usize>,
    /// Start the backbone from a timm state dict (safetensors; `nn::pretrained`).
    pub init: Option<PathBuf>,
    pub optimizer: OptimizerKind,
    /// AdamW's β1, β2 and ε.
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// The decay after the warm-up: step (milestones × gamma) or cosine (to `min_lr`).
    pub schedule: Decay,
    /// Linear warm-up from `warmup_lr`, in epochs (fractional allowed), stepped per iteration.
    pub warmup_epochs: f64,
    pub warmup_lr: f64,
    /// Where the cosine decay ends.
    pub min_lr: f64,
    /// Clip the gradients to this global L2 norm before each update.
    pub clip_grad: Option<f64>,
    /// Stochastic depth rate of the transformers (None → timm's default: ViT 0, Swin 0.1).
    pub drop_path: Option<f64>,
    /// Data-parallel runs (`mpirun -np N`): how the lr follows the global batch of N × batch_size.
    pub lr_scaling: LrScaling,
    /// Data-parallel runs: batch-norm statistics over the global batch (summed across ranks)
    /// instead of each rank's own (the default, as DDP).
    pub sync_bn: bool,
}

/// How the learning rate follows the number of ranks of a data-parallel run (`--lr-scaling`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// The same lr whatever the number of ranks.
    #[default]
    None,
    /// lr (and the cosine's final lr) × N, the global batch being N × batch_size; a warm-up
    /// (`--warmup-epochs`) still starts from `--warmup-lr`, so that `--warmup-lr` = `--lr` gives
    /// Goyal et al.'s gradual warm-up from the one-rank lr to N × lr.
    Linear,
}

impl LrScaling {
    /// The factor on the lr with `ranks` ranks.
    pub fn factor(self, ranks: usize) -> f64 {
        match self {
            LrScaling::None => 1.0,
            LrScaling::Linear => ranks as f64,
        }
    }
}

impl Default for TrainConfig {
    /// The paper's recipe (§4): ResNet50, SGD 0.1 / 0.9 / 5e-4, ×0.1 at 30, 60, 90, 100 epochs,
    /// batch 128, α 0.01, λ 1, M₀ 0.05.
    fn default() -> TrainConfig {
        TrainConfig {
            model: "resnet50".into(),
            width: 64,
            data: None,
            loss: LossKind::Pod,
            variant: Variant::Paper,
            device: "auto".into(),
            seed: 0,
            epochs: 100,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
            milestones: vec![30, 60, 90],
            gamma: 0.1,
            alpha: 0.01,
            lambda: 1.0,
            initial_mean_norm: 0.05,
            feature_dim: None,
            pedcc: None,
            pedcc_repulsion: false,
            limit_train: None,
            limit_test: None,
            out: None,
            threads: None,
            eval_every: 1,
            prefetch: 4,
            precision: Precision::Fp32,
            deterministic: false,
            detect_anomaly: false,
            center_lambda: 0.003,
            center_alpha: 0.5,
            // s = 30 for all three normalised-softmax baselines: AM-Softmax's paper value, and the
            // ArcFace default of the widely used arcface-pytorch implementation (InsightFace's 64 is
            // tuned for 85k-identity face sets; with 10–200 classes s = 30 already saturates softmax).
            margin_scale: 30.0,
            am_margin: 0.35,
            arc_margin: 0.5,
            cm_m1: 0.9,
            cm_m2: 0.4,
            cm_m3: 0.15,
            pedcc_margin: 0.5,
            pedcc_scale: 15.0,
            pedcc_lambda: 1.0,
            pedcc_root: 1.0,
            recipe: None,
            image_size: None,
            test_resize: None,
            init: None,
            optimizer: OptimizerKind::Sgd,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            schedule: Decay::Step,
            warmup_epochs: 0.0,
            warmup_lr: 0.0,
            min_lr: 0.0,
            clip_grad: None,
            drop_path: None,
            lr_scaling: LrScaling::None,
            sync_bn: false,
        }
    }
}

/// The named recipes of `--recipe` (DESIGN.md §1.8).
pub const RECIPES: &[&str] = &["paper", "vit-finetune", "swin"];

impl TrainConfig {
    /// Applies a named recipe over the current settings (flags given afterwards override it):
    /// - `paper`: the paper's CNN recipe (the defaults).
    /// - `vit-finetune`: SGD momentum 0.9, weight decay 0 (none on norms, biases, position
    ///   embeddings and tokens anyway), lr 0.01, batch 128, 10 epochs, a one-epoch linear warm-up
    ///   then cosine decay stepped per iteration, gradients clipped to norm 1 (the ViT paper's
    ///   fine-tuning, as the POD paper's §4).
    /// - `swin`: AdamW lr 1e-3, weight decay 0.05, β (0.9, 0.999), batch 256, 300 epochs, 20
    ///   warm-up epochs from 1e-6, cosine decay to 1e-5, gradients clipped to norm 5, drop path
    ///   0.5 for Swin-B (the Swin paper's ImageNet recipe; timm's default 0.1 otherwise).
    pub fn apply_recipe(&mut self, name: &str) -> Result<()> {
        let base = TrainConfig {
            model: self.model.clone(),
            data: self.data.clone(),
            ..TrainConfig::default()
        };
        match name {
            "paper" => *self = base,
            "vit-finetune" => {
                *self = TrainConfig {
                    optimizer: OptimizerKind::Sgd,
                    lr: 0.01,
                    momentum: 0.9,
                    weight_decay: 0.0,
                    batch_size: 128,
                    epochs: 10,
                    milestones: vec![],
                    schedule: Decay::Cosine,
                    warmup_epochs: 1.0,
                    warmup_lr: 0.0,
                    min_lr: 0.0,
                    clip_grad: Some(1.0),
                    ..base
                }
            }
            "swin" => {
                *self = TrainConfig {
                    optimizer: OptimizerKind::Adamw,
                    lr: 1e-3,
                    weight_decay: 0.05,
                    batch_size: 256,
                    epochs: 300,
                    milestones: vec![],
                    schedule: Decay::Cosine,
                    warmup_epochs: 20.0,
                    warmup_lr: 1e-6,
                    min_lr: 1e-5,
                    clip_grad: Some(5.0),
                    drop_path: match base.model.as_str() {
                        "swin_b" | "swin_base_patch4_window7_224" => Some(0.5),
                        _ => None,
                    },
                    ..base
                }
            }
            other => bail!(
                "unknown recipe `{other}`; podgpu has {}",
                RECIPES.join(", ")
            ),
        }
        self.recipe = Some(name.to_string());
        Ok(())
    }

    /// The optimiser and schedule settings, one line (printed at the start of a run).
    pub fn recipe_line(&self) -> String {
        let opt = match self.optimizer {
            OptimizerKind::Sgd => format!(
                "SGD lr {} momentum {} weight decay {}{}",
                self.lr,
                self.momentum,
                self.weight_decay,
                if self.nesterov { " nesterov" } else { "" }
            ),
            OptimizerKind::Adamw => format!(
                "AdamW lr {} betas ({}, {}) eps {} weight decay {}",
                self.lr, self.adam_beta1, self.adam_beta2, self.adam_eps, self.weight_decay
            ),
        };
        let sched = match self.schedule {
            Decay::Step => format!("×{} at epochs {:?}", self.gamma, self.milestones),
            Decay::Cosine => format!("cosine to {}", self.min_lr),
        };
        let warm = match self.warmup_epochs > 0.0 {
            true => format!(
                ", linear warm-up {} epochs from {}",
                self.warmup_epochs, self.warmup_lr
            ),
            false => String::new(),
        };
        let clip = self.clip_grad.map_or(String::new(), |c| {
            format!(", gradients clipped to norm {c}")
        });
        format!(
            "recipe {}: {opt}, {sched}{warm}{clip}, batch {}, {} epochs",
            self.recipe.as_deref().unwrap_or("custom"),
            self.batch_size,
            self.epochs
        )
    }

    /// Parses TOML; fields left out keep their defaults, unknown fields are an error.
    pub fn from_toml_str(text: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }

    /// Reads and validates a TOML config file.
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = crate::fsutil::read_regular_to_string(path)
            .with_context(|| format!("could not read config file {}", path.display()))?;
        let cfg = TrainConfig::from_toml_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))?;
        cfg.validate()
            .with_context(|| format!("config file {}", path.display()))?;
        Ok(cfg)
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a TrainConfig always serializes to TOML")
    }

    /// Writes the config as TOML, atomically (the run folder's `config.toml`).
    pub fn save(&self, path: &Path) -> Result<()> {
        super::write_atomic(path, self.to_toml_string().as_bytes())
    }

    /// The config as a JSON value, for checkpoint metadata.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a TrainConfig always serializes to JSON")
    }

    pub fn from_json(v: &serde_json::Value) -> Result<TrainConfig> {
        serde_json::from_value(v.clone()).context("the saved training configuration is not valid")
    }

    /// Checks every field; the error lists every problem found, one per line.
    pub fn validate(&self) -> Result<()> {
        let mut bad: Vec<String> = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                bad.push(msg)
            }
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;

        need(
            !self.model.trim().is_empty(),
            "model must be named (e.g. resnet50)".into(),
        );
        need(
            crate::device::parse(&self.device).is_ok(),
            format!(
                "device must be auto, cpu, cuda or cuda:N, got `{}`",
                self.device
            ),
        );
        need(self.epochs >= 1, "epochs must be at least 1, got 0".into());
        need(self.width >= 1, "width must be at least 1, got 0".into());
        need(
            self.batch_size >= 1,
            "batch_size must be at least 1, got 0".into(),
        );
        need(
            positive(self.lr),
            format!("lr must be a finite number > 0, got {}", self.lr),
        );
        need(
            non_negative(self.momentum) && self.momentum <= 1.0,
            format!("momentum must be in [0, 1], got {}", self.momentum),
        );
        need(
            non_negative(self.weight_decay),
            format!(
                "weight_decay must be a finite number >= 0, got {}",
                self.weight_decay
            ),
        );
        need(
            !self.nesterov || self.momentum > 0.0,
            "nesterov needs momentum > 0".into(),
        );
        need(
            positive(self.gamma),
            format!("gamma must be a finite number > 0, got {}", self.gamma),
        );
        need(
            self.milestones.windows(2).all(|w| w[0] < w[1]),
            format!(
                "milestones must be strictly increasing epochs, got {:?}",
                self.milestones
            ),
        );
        need(
            non_negative(self.alpha),
            format!("alpha must be a finite number >= 0, got {}", self.alpha),
        );
        need(
            non_negative(self.lambda),
            format!("lambda must be a finite number >= 0, got {}", self.lambda),
        );
        need(
            non_negative(self.initial_mean_norm),
            format!(
                "initial_mean_norm must be a finite number >= 0, got {}",
                self.initial_mean_norm
            ),
        );
        need(
            self.feature_dim.is_none_or(|n| n >= 2),
            format!(
                "feature_dim must be at least 2, got {}",
                self.feature_dim.unwrap_or(0)
            ),
        );
        need(
            self.limit_train != Some(0),
            "limit_train must be at least 1 (leave it out to use every image)".into(),
        );
        need(
            self.limit_test != Some(0),
            "limit_test must be at least 1 (leave it out to use every image)".into(),
        );
        need(
            self.threads != Some(0),
            "threads must be at least 1 (leave it out to use every core)".into(),
        );
        need(self.eval_every >= 1, "eval_every must be at least 1".into());
        for (name, v) in [
            ("center_lambda", self.center_lambda),
            ("am_margin", self.am_margin),
            ("arc_margin", self.arc_margin),
            ("cm_m2", self.cm_m2),
            ("cm_m3", self.cm_m3),
            ("pedcc_margin", self.pedcc_margin),
            ("pedcc_lambda", self.pedcc_lambda),
        ] {
            need(
                non_negative(v),
                format!("{name} must be a finite number >= 0, got {v}"),
            );
        }
        for (name, v) in [
            ("margin_scale", self.margin_scale),
            ("cm_m1", self.cm_m1),
            ("pedcc_scale", self.pedcc_scale),
            ("pedcc_root", self.pedcc_root),
        ] {
            need(
                positive(v),
                format!("{name} must be a finite number > 0, got {v}"),
            );
        }
        need(
            non_negative(self.center_alpha) && self.center_alpha <= 1.0,
            format!("center_alpha must be in [0, 1], got {}", self.center_alpha),
        );
        need(
            (1..=1024).contains(&self.prefetch),
            format!(
                "prefetch must be between 1 and 1024 batches, got {}",
                self.prefetch
            ),
        );
        need(
            self.image_size.is_none_or(|s| s >= 8),
            format!(
                "image_size must be at least 8, got {}",
                self.image_size.unwrap_or(0)
            ),
        );
        need(
            self.test_resize
                .is_none_or(|r| self.image_size.is_some_and(|s| r >= s)),
            "test_resize needs image_size and must be at least image_size".into(),
        );
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            need(
                v.is_finite() && (0.0..1.0).contains(&v),
                format!("{name} must be in [0, 1), got {v}"),
            );
        }
        need(
            positive(self.adam_eps),
            format!(
                "adam_eps must be a finite number > 0, got {}",
                self.adam_eps
            ),
        );
        for (name, v) in [
            ("warmup_epochs", self.warmup_epochs),
            ("warmup_lr", self.warmup_lr),
            ("min_lr", self.min_lr),
        ] {
            need(
                non_negative(v),
                format!("{name} must be a finite number >= 0, got {v}"),
            );
        }
        need(
            self.clip_grad.is_none_or(positive),
            format!(
                "clip_grad must be a finite number > 0, got {}",
                self.clip_grad.unwrap_or(0.0)
            ),
        );
        need(
            self.drop_path
                .is_none_or(|p| p.is_finite() && (0.0..1.0).contains(&p)),
            format!(
                "drop_path must be in [0, 1), got {}",
                self.drop_path.unwrap_or(0.0)
            ),
        );

        if bad.is_empty() {
            return Ok(());
        }
        let mut msg = String::from("invalid training configuration:");
        for b in &bad {
            msg.push_str("\n  - ");
            msg.push_str(b);
        }
        bail!(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_recipe_and_valid() {
        let c = TrainConfig::default();
        assert_eq!((c.epochs, c.batch_size), (100, 128));
        assert_eq!(
            (c.lr, c.momentum, c.weight_decay, c.gamma),
            (0.1, 0.9, 5e-4, 0.1)
        );
        assert_eq!(c.milestones, vec![30, 60, 90]);
        assert_eq!((c.alpha, c.lambda), (0.01, 1.0));
        assert_eq!((c.loss, c.variant), (LossKind::Pod, Variant::Paper));
        c.validate().unwrap();
    }

    #[test]
    fn toml_round_trip_keeps_every_field() {
        let c = TrainConfig {
            model: "resnet18".into(),
            data: Some("data/cifar10.bin".into()),
            loss: LossKind::Softmax,
            variant: Variant::Reference,
            device: "cuda:1".into(),
            seed: 12345678901234,
            epochs: 3,
            batch_size: 64,
            lr: 0.05,
            weight_decay: 1e-4,
            milestones: vec![1, 2],
            alpha: 0.1 + 0.2,
            feature_dim: Some(256),
            limit_train: Some(2000),
            out: Some("runs/a b".into()),
            threads: Some(2),
            precision: Precision::Tf32,
            deterministic: true,
            ..TrainConfig::default()
        };
        let text = c.to_toml_string();
        assert_eq!(TrainConfig::from_toml_str(&text).unwrap(), c);
        assert_eq!(TrainConfig::from_json(&c.to_json()).unwrap(), c);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        c.save(&path).unwrap();
        assert_eq!(TrainConfig::load(&path).unwrap(), c);
    }

    #[test]
    fn bf16_is_a_valid_precision() {
        // Whether the chosen device runs it is decided when the device is (trainer::prepare).
        let c = TrainConfig {
            precision: Precision::Bf16,
            ..TrainConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let c =
            TrainConfig::from_toml_str("model = \"resnet18\"\nepochs = 2\nloss = \"softmax\"\n")
                .unwrap();
        assert_eq!(
            c,
            TrainConfig {
                model: "resnet18".into(),
                epochs: 2,
                loss: LossKind::Softmax,
                ..TrainConfig::default()
            }
        );
    }

    #[test]
    fn unknown_fields_and_names_are_errors_that_name_them() {
        let e = TrainConfig::from_toml_str("learning_rate = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = TrainConfig::from_toml_str("loss = \"triplet\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("triplet") && e.contains("pod"), "{e}");
        let e = TrainConfig::from_toml_str("batch_size = -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn validation_lists_every_problem() {
        let c = TrainConfig {
            epochs: 0,
            batch_size: 0,
            lr: f64::NAN,
            momentum: -0.5,
            weight_decay: -1e-4,
            gamma: 0.0,
            alpha: f64::INFINITY,
            lambda: -1.0,
            milestones: vec![60, 30],
            device: "tpu".into(),
            feature_dim: Some(1),
            limit_train: Some(0),
            threads: Some(0),
            eval_every: 0,
            ..TrainConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        for needle in [
            "epochs must be at least 1",
            "batch_size must be at least 1",
            "lr must be a finite number > 0, got NaN",
            "momentum must be in [0, 1], got -0.5",
            "weight_decay must be a finite number >= 0, got -0.0001",
            "gamma must be a finite number > 0, got 0",
            "alpha must be a finite number >= 0, got inf",
            "lambda must be a finite number >= 0, got -1",
            "milestones must be strictly increasing epochs, got [60, 30]",
            "device must be auto, cpu, cuda or cuda:N, got `tpu`",
            "feature_dim must be at least 2",
            "limit_train must be at least 1",
            "threads must be at least 1",
            "eval_every must be at least 1",
        ] {
            assert!(e.contains(needle), "missing `{needle}` in:\n{e}");
        }
    }

    #[test]
    fn loading_a_file_with_bad_values_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "lr = -0.1\n").unwrap();
        let e = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains("lr must be"), "{e}");
        let e = format!(
            "{:#}",
            TrainConfig::load(&dir.path().join("none.toml")).unwrap_err()
        );
        assert!(e.contains("could not read config file"), "{e}");
    }
}
