//! POD = NaC + λ·SC (paper eq. 20; DESIGN.md §1.5).

use super::{nac, sc, ScForm, Variant};
use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::ops;
use crate::tensor::{DType, Tensor};

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
    if let Some(fused) = pod_gpu(t, x, p, labels, delta, cfg) {
        return fused;
    }
    let nac = nac(t, x, p, labels, delta, cfg.variant);
    let sc = sc(t, x, p, labels, cfg.variant, cfg.sc_form);
    let weighted = ops::scale(t, &sc, cfg.lambda);
    let loss = ops::add(t, &nac, &weighted);
    PodLoss { loss, nac, sc }
}

/// `pod` for f32 features on a GPU: the same loss and gradient in seven launches instead of about
/// sixteen (`cuda::pod_head`): NaC's row pass also writes SC's D, one kernel finishes the value,
/// one the gradient. NaC and SC come back as constants (their values, for logging). SC's two
/// products run in true fp32 whatever the math mode, as in `sc::sc_of_normalized`.
fn pod_gpu(
    t: &mut Tape,
    x: &Var,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    cfg: &PodConfig,
) -> Option<PodLoss> {
    let xv = x.value();
    if !xv.is_cuda() || xv.dtype() != DType::F32 || p.dtype() != DType::F32 || xv.rank() != 2 {
        return None;
    }
    ops::assert_same_place("pod", &[xv, p]);
    let (b, n) = (xv.dim(0), xv.dim(1));
    assert!(
        delta.is_finite() && delta >= 0.0,
        "pod: δ = {delta} must be finite and ≥ 0"
    );
    let labels = super::cuda_labels(labels, xv);
    let rows = cuda::loss_kernels::nac_rows(xv, p, &labels, delta, cfg.variant.nac_form(), true);
    let d = rows.d.expect("asked for D");
    let norm = super::sc::sc_coefficient(b, n, cfg.variant);
    let gram = cfg.sc_form.uses_gram(b, n);
    let fp32 = cuda::math_mode_scope(cuda::MathMode::Fp32);
    let m = super::sc::sc_product(&d, gram);
    let s = super::sc::col_sumsq_fwd(&d);
    let [loss, nac, sc] = cuda::pod_head::loss(&rows.row_loss, &m, &s, norm, cfg.lambda);
    drop(fp32);
    let (saved_x, dx_nac, norms, lambda) = (xv.clone(), rows.dx, rows.norms, cfg.lambda);
    let loss = t.op(loss, &[x], move || {
        Box::new(move |g, _| {
            let _fp32 = cuda::math_mode_scope(cuda::MathMode::Fp32);
            let md = super::sc::sc_product_back(&m, &d, gram);
            let eps = cuda::loss_kernels::SC_NORMALIZE_EPS;
            let dx =
                cuda::pod_head::dx(g, &dx_nac, &md, &d, &s, &saved_x, &norms, norm, lambda, eps);
            vec![Some(dx)]
        })
    });
    Some(PodLoss {
        loss,
        nac: t.constant(nac),
        sc: t.constant(sc),
    })
}
