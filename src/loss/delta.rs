//! The δ schedule of the NaC loss (DESIGN.md §1.3, §1.6.2): δ is fixed within an epoch and set from
//! the mean norm seen during the previous epoch.
//!
//! - paper:     δ for 1-based epoch e is α·e·M_{e−1}, M the mean ‖x‖ of the latent features over the
//!   training forward passes of epoch e−1, with M₀ = 0.05 (so δ = α·0.05 in the first epoch).
//! - reference: δ = 0.05 in the first epoch; after 0-based epoch i, δ = α·(i+1)·M with M the mean
//!   ‖x Pᵀ‖ of the logits over epoch i.
//!
//! The trainer sums the norms batch by batch (`loss::delta_norm_sum`), calls `end_epoch` with the mean,
//! and reads `delta()` for the next epoch. The state is two numbers, saved in checkpoints.

use super::Variant;
use anyhow::{bail, Result};

/// α of the paper and the reference code.
pub const ALPHA: f64 = 0.01;
/// The paper's M₀: the "previous mean norm" before the first epoch.
pub const INITIAL_MEAN_NORM: f64 = 0.05;
/// The reference code's δ in the first epoch.
pub const INITIAL_DELTA: f64 = 0.05;

/// Which norms a variant's schedule averages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormSource {
    /// ‖x_b‖, the latent features (paper).
    Features,
    /// ‖x_b Pᵀ‖, the logits (reference code).
    Logits,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeltaSchedule {
    variant: Variant,
    alpha: f64,
    /// Epochs completed so far.
    epochs_done: usize,
    /// The mean norm of the last completed epoch (M₀ before the first).
    mean_norm: f64,
}

impl DeltaSchedule {
    pub fn new(variant: Variant, alpha: f64) -> DeltaSchedule {
        DeltaSchedule::resume(variant, alpha, 0, INITIAL_MEAN_NORM)
    }

    /// A schedule restored from a checkpoint (`epochs_done`, `mean_norm`).
    pub fn resume(
        variant: Variant,
        alpha: f64,
        epochs_done: usize,
        mean_norm: f64,
    ) -> DeltaSchedule {
        DeltaSchedule {
            variant,
            alpha,
            epochs_done,
            mean_norm,
        }
    }

    /// Which norms `end_epoch` expects for this variant.
    pub fn norm_source(variant: Variant) -> NormSource {
        match variant {
            Variant::Paper => NormSource::Features,
            Variant::Reference => NormSource::Logits,
        }
    }

    /// δ for the current epoch (the one after `epochs_done` completed epochs).
    pub fn delta(&self) -> f64 {
        match self.variant {
            Variant::Paper => self.alpha * (self.epochs_done + 1) as f64 * self.mean_norm,
            Variant::Reference if self.epochs_done == 0 => INITIAL_DELTA,
            Variant::Reference => self.alpha * self.epochs_done as f64 * self.mean_norm,
        }
    }

    /// Closes an epoch with the mean norm over its training samples (see `norm_source`).
    pub fn end_epoch(&mut self, mean_norm: f64) -> Result<()> {
        if !mean_norm.is_finite() || mean_norm < 0.0 {
            bail!(
                "the mean feature norm of epoch {} is {mean_norm}; training diverged (lower the \
                 learning rate or check the data)",
                self.epochs_done + 1
            );
        }
        self.epochs_done += 1;
        self.mean_norm = mean_norm;
        Ok(())
    }

    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// The mean norm the current δ was computed from (for checkpoints).
    pub fn mean_norm(&self) -> f64 {
        self.mean_norm
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 * b.abs().max(1.0)
    }

    #[test]
    fn paper_schedule_is_alpha_times_epoch_times_previous_mean_norm() {
        let mut s = DeltaSchedule::new(Variant::Paper, 0.01);
        // Epoch 1 uses M₀ = 0.05.
        assert!(close(s.delta(), 0.01 * 1.0 * 0.05));
        s.end_epoch(3.0).unwrap(); // mean ‖x‖ of epoch 1
        assert!(close(s.delta(), 0.01 * 2.0 * 3.0)); // epoch 2
        s.end_epoch(7.5).unwrap();
        assert!(close(s.delta(), 0.01 * 3.0 * 7.5)); // epoch 3
        assert_eq!(s.epochs_done(), 2);
        assert_eq!(
            DeltaSchedule::norm_source(Variant::Paper),
            NormSource::Features
        );
    }

    #[test]
    fn reference_schedule_starts_at_0_05_then_alpha_times_zero_based_epoch_plus_one() {
        let mut s = DeltaSchedule::new(Variant::Reference, 0.01);
        assert!(close(s.delta(), 0.05));
        s.end_epoch(40.0).unwrap(); // after 0-based epoch 0: α·1·M
        assert!(close(s.delta(), 0.01 * 1.0 * 40.0));
        s.end_epoch(60.0).unwrap(); // after 0-based epoch 1: α·2·M
        assert!(close(s.delta(), 0.01 * 2.0 * 60.0));
        assert_eq!(
            DeltaSchedule::norm_source(Variant::Reference),
            NormSource::Logits
        );
    }

    #[test]
    fn resume_continues_where_it_stopped_and_nan_is_refused() {
        let mut a = DeltaSchedule::new(Variant::Paper, 0.02);
        a.end_epoch(2.0).unwrap();
        a.end_epoch(4.0).unwrap();
        let b = DeltaSchedule::resume(Variant::Paper, 0.02, a.epochs_done(), a.mean_norm());
        assert_eq!(a, b);
        assert!(a.end_epoch(f64::NAN).is_err());
        assert_eq!(
            a.epochs_done(),
            2,
            "a refused epoch must not advance the schedule"
        );
    }
}
