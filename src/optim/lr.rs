//! Learning-rate schedules stepped per iteration: an optional linear warm-up, then the paper's step
//! decay or a cosine decay (timm's `CosineLRScheduler` with `t_in_epochs=False`).

use super::StepSchedule;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The decay after the warm-up (`--schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// ×γ at the milestone epochs (the paper's CNN recipe).
    Step,
    /// Half a cosine from the base lr down to `min_lr` at the end of the last epoch.
    Cosine,
}

/// lr(epoch, batch) for every training step.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub step: StepSchedule,
    pub decay: Decay,
    /// Linear warm-up length in epochs (may be fractional; 0: none).
    pub warmup_epochs: f64,
    /// The lr the warm-up starts from.
    pub warmup_lr: f64,
    /// The lr the cosine ends at.
    pub min_lr: f64,
    pub epochs: usize,
}

impl LrSchedule {
    pub fn new(
        step: StepSchedule,
        decay: Decay,
        warmup_epochs: f64,
        warmup_lr: f64,
        min_lr: f64,
        epochs: usize,
    ) -> Result<LrSchedule> {
        if !(warmup_epochs.is_finite() && warmup_epochs >= 0.0) {
            bail!("warm-up epochs must be a finite number >= 0, got {warmup_epochs}");
        }
        for (n, v) in [("warmup_lr", warmup_lr), ("min_lr", min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{n} must be a finite number >= 0, got {v}");
            }
        }
        Ok(LrSchedule {
            step,
            decay,
            warmup_epochs,
            warmup_lr,
            min_lr,
            epochs,
        })
    }

    /// The paper's schedule alone (no warm-up): the same lr for every step of an epoch.
    pub fn step_only(step: StepSchedule, epochs: usize) -> LrSchedule {
        LrSchedule {
            step,
            decay: Decay::Step,
            warmup_epochs: 0.0,
            warmup_lr: 0.0,
            min_lr: 0.0,
            epochs,
        }
    }

    /// The lr of batch `batch` (0-based) of 0-based epoch `epoch` with `batches` batches an epoch.
    /// The warm-up and the cosine count iterations: t = epoch + batch/batches, in epochs.
    pub fn lr(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        let t = epoch as f64 + batch as f64 / batches.max(1) as f64;
        if t < self.warmup_epochs {
            let base = self.decayed(t);
            return self.warmup_lr + (base - self.warmup_lr) * t / self.warmup_epochs;
        }
        self.decayed(t)
    }

    fn decayed(&self, t: f64) -> f64 {
        match self.decay {
            Decay::Step => self.step.lr_at(t.floor() as usize),
            Decay::Cosine => {
                let total = self.epochs as f64 - self.warmup_epochs;
                let x = if total > 0.0 {
                    ((t - self.warmup_epochs) / total).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                let base = self.step.base_lr();
                self.min_lr + 0.5 * (base - self.min_lr) * (1.0 + (std::f64::consts::PI * x).cos())
            }
        }
    }

    /// True when the step decay changes the lr at the start of `epoch`.
    pub fn is_milestone(&self, epoch: usize) -> bool {
        self.decay == Decay::Step && self.step.is_milestone(epoch)
    }
}
