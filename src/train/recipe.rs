//! What a run's recipe decides besides the loss: the optimiser and its weight-decay groups, the
//! per-iteration learning-rate schedule, the input size and its preprocessing, and the latent
//! dimension. The trainer asks here, so the transformer settings (issue 13) stay out of its loop.

use super::config::{OptimizerKind, TrainConfig};
use crate::autograd::ParamStore;
use crate::data::{Augment, Split};
use crate::optim::{self, AdamW, LrSchedule, Optimizer, Sgd, StepSchedule};
use anyhow::Result;

/// The latent dimension n: `--feature-dim`, else the transformer's own width (its pooled features,
/// no FC1), else the paper's recommendation for the class count.
pub fn feature_dim(cfg: &TrainConfig, classes: usize) -> usize {
    cfg.feature_dim
        .or_else(|| crate::nn::native_feature_dim(&cfg.model))
        .unwrap_or_else(|| crate::pedcc::recommended_dim(classes))
}

/// The optimiser of `cfg`. For the transformers, norms, biases, position embeddings, tokens and
/// relative-position tables are not decayed (timm's groups); the CNNs decay every trainable tensor
/// (the paper's recipe).
pub fn optimizer(cfg: &TrainConfig, ps: &ParamStore) -> Result<Optimizer> {
    let mut o = match cfg.optimizer {
        OptimizerKind::Sgd => {
            Optimizer::Sgd(Sgd::new(cfg.momentum, cfg.weight_decay, cfg.nesterov)?)
        }
        OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(
            cfg.adam_beta1,
            cfg.adam_beta2,
            cfg.adam_eps,
            cfg.weight_decay,
        )?),
    };
    if crate::nn::transformer_config(&cfg.model).is_some() {
        o.set_no_decay(optim::timm_no_decay(ps));
    }
    Ok(o)
}

/// The learning rate of every step.
pub fn lr_schedule(cfg: &TrainConfig) -> Result<LrSchedule> {
    let step = StepSchedule::new(cfg.lr, &cfg.milestones, cfg.gamma)?;
    LrSchedule::new(
        step,
        cfg.schedule,
        cfg.warmup_epochs,
        cfg.warmup_lr,
        cfg.min_lr,
        cfg.epochs,
    )
}

/// The learning rate of every step of a run with `ranks` ranks (`TrainConfig::lr_scaling`).
pub fn lr_schedule_for_ranks(cfg: &TrainConfig, ranks: usize) -> Result<LrSchedule> {
    let f = cfg.lr_scaling.factor(ranks);
    lr_schedule(&TrainConfig {
        lr: cfg.lr * f,
        min_lr: cfg.min_lr * f,
        ..cfg.clone()
    })
}

/// The network's input side: `--image-size`, else the stored one.
pub fn image_size(cfg: &TrainConfig, split: &Split) -> usize {
    cfg.image_size.unwrap_or(split.height())
}

fn resized(cfg: &TrainConfig, split: &Split) -> bool {
    let s = image_size(cfg, split);
    split.height() != s || split.width() != s
}

/// Training images: the paper's augmentation by stored size, or random-resized-crop + flip to
/// `--image-size` when that differs from the stored size.
pub fn train_augment(cfg: &TrainConfig, split: &Split) -> Augment {
    match resized(cfg, split) {
        true => Augment::train_at(image_size(cfg, split)),
        false => Augment::Auto,
    }
}

/// Test images: untouched, or resized (to `--test-resize` then centre-cropped) to `--image-size`.
pub fn test_augment(cfg: &TrainConfig, split: &Split) -> Augment {
    let size = image_size(cfg, split);
    match resized(cfg, split) || cfg.test_resize.is_some_and(|r| r != size) {
        true => Augment::ResizeCenterCrop {
            resize: cfg.test_resize.unwrap_or(size),
            size,
        },
        false => Augment::None,
    }
}

/// What the run does to the images' size, when it is not the stored size.
pub fn image_note(cfg: &TrainConfig, split: &Split) -> Option<String> {
    let size = image_size(cfg, split);
    resized(cfg, split).then(|| {
        format!(
            "images resized on the fly from {}×{} to {size}×{size} (training: random-resized-crop \
             + flip; test: resize{})",
            split.height(),
            split.width(),
            match cfg.test_resize {
                Some(r) if r != size => format!(" {r} + centre crop {size}"),
                _ => String::new(),
            }
        )
    })
}
