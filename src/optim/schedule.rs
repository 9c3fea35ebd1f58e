//! The step learning-rate schedule of the paper: lr 0.1, ×0.1 at epochs 30, 60 and 90.

use anyhow::{bail, Result};

/// `lr_at(e) = base_lr · γ^(number of milestones ≤ e)`, with `e` the 0-based index of the epoch about
/// to be trained (= the number of epochs already completed). This is PyTorch's `MultiStepLR` stepped
/// once after every epoch: with milestones [30, 60, 90], epochs 0..=29 train at 0.1, 30..=59 at 0.01.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSchedule {
    base_lr: f64,
    milestones: Vec<usize>,
    gamma: f64,
}

impl StepSchedule {
    /// Errors on a non-finite or non-positive lr or γ, and on milestones that are not strictly
    /// increasing.
    pub fn new(base_lr: f64, milestones: &[usize], gamma: f64) -> Result<StepSchedule> {
        if !(base_lr.is_finite() && base_lr > 0.0) {
            bail!("learning rate must be a finite number > 0, got {base_lr}");
        }
        if !(gamma.is_finite() && gamma > 0.0) {
            bail!("lr decay factor gamma must be a finite number > 0, got {gamma}");
        }
        if milestones.windows(2).any(|w| w[0] >= w[1]) {
            bail!("lr milestones must be strictly increasing epochs, got {milestones:?}");
        }
        Ok(StepSchedule {
            base_lr,
            milestones: milestones.to_vec(),
            gamma,
        })
    }

    /// The paper's schedule: 0.1, ×0.1 at epochs 30, 60, 90.
    pub fn paper() -> StepSchedule {
        StepSchedule::new(0.1, &[30, 60, 90], 0.1).expect("valid constants")
    }

    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    pub fn milestones(&self) -> &[usize] {
        &self.milestones
    }

    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// Learning rate for the 0-based epoch `epoch`. Multiplies γ in one step at a time, as PyTorch's
    /// scheduler does, so the values match its f64 lr bit for bit.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let mut lr = self.base_lr;
        for _ in self.milestones.iter().filter(|&&m| m <= epoch) {
            lr *= self.gamma;
        }
        lr
    }

    /// True when the lr changes at the start of 0-based epoch `epoch` (the reference variant
    /// re-creates its optimizer there, DESIGN.md §1.6.4).
    pub fn is_milestone(&self, epoch: usize) -> bool {
        self.milestones.contains(&epoch)
    }
}
