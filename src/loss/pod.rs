//! POD = NaC + λ·SC (paper eq. 20; DESIGN.md §1.5).

use super::{nac, sc, ScForm, Variant};
use crate::autograd::{Tape, Var};
use crate::ops;
use crate::tensor::Tensor;

/// The POD loss settings that stay fixed over a run (δ changes per epoch: `DeltaSchedule`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PodConfig {
    pub variant: Variant,
    /// Weight of SC (paper: 1).
    pub lambda: f64,
    /// Which product SC uses (the result does not depend on it).
    pub sc_form: ScForm,
}

impl Default for PodConfig {
    fn default() -> Self {
        PodConfig {
            variant: Variant::Paper,
            lambda: 1.0,
            sc_form: ScForm::Auto,
        }
    }
}

/// The POD loss and its two parts (for logging).
#[derive(Clone, Debug)]
pub struct PodLoss {
    /// NaC + λ·SC: the value to call `backward` on.
    pub loss: Var,
    pub nac: Var,
    pub sc: Var,
}

/// POD loss of features x [B, n] against the frozen PEDCC p [K, n], labels [B] and this epoch's δ.
pub fn pod(
    t: &mut Tape,
    x: &Var,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    cfg: &PodConfig,
) -> PodLoss {
    let nac = nac(t, x, p, labels, delta, cfg.variant);
    let sc = sc(t, x, p, labels, cfg.variant, cfg.sc_form);
    let weighted = ops::scale(t, &sc, cfg.lambda);
    let loss = ops::add(t, &nac, &weighted);
    PodLoss { loss, nac, sc }
}
