//! PEDCC-Loss (Zhu et al. 2019; the POD paper's eq. 2–4): AM-Softmax over the frozen PEDCC head plus a
//! root of the squared distance to the class centroid.
//!
//! ```text
//! c_bk   = ⟨x̃_b, p_k⟩,  x̃_b = x_b / ‖x_b‖                       cosines to the (unit) PEDCC rows
//! L_AM   = AM-Softmax(c; margin m, scale s)                       (eq. 2; m = 0.5)
//! L_MSE  = (1/(2B)) Σ_b ‖x_b − p_{y_b}‖²                          (eq. 3)
//! L      = L_AM + λ · L_MSE^(1/q)                                 (eq. 4; λ = 1, q = 1)
//! ```
//! L_MSE is taken as the batch mean with the ½ of the Center Loss it derives from (the public PEDCC-Loss
//! code sums over the batch instead, which ties its weight to the batch size). The scale s defaults to
//! 15, the public PEDCC-Loss code's default.

use super::center::center_loss;
use super::margin::{margin_softmax_ce, Margin};
use crate::autograd::{Tape, Var};
use crate::loss::pedcc_logits;
use crate::ops::{self, dispatch};
use crate::tensor::{Elem, Tensor};

/// The PEDCC-Loss settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PedccLossConfig {
    /// AM-Softmax margin m.
    pub margin: f64,
    /// AM-Softmax scale s.
    pub scale: f64,
    /// Weight λ of the MSE term.
    pub lambda: f64,
    /// q of the root L_MSE^(1/q).
    pub root: f64,
}

impl Default for PedccLossConfig {
    fn default() -> Self {
        PedccLossConfig {
            margin: 0.5,
            scale: 15.0,
            lambda: 1.0,
            root: 1.0,
        }
    }
}

/// The loss and its two parts (for logging).
pub struct PedccLoss {
    pub loss: Var,
    pub am_softmax: Var,
    pub mse: Var,
}

/// PEDCC-Loss of features x [B, n] against the frozen PEDCC p [K, n] (unit rows).
pub fn pedcc_loss(
    t: &mut Tape,
    x: &Var,
    p: &Tensor,
    labels: &Tensor,
    cfg: &PedccLossConfig,
) -> PedccLoss {
    let xn = ops::row_normalize(t, x);
    let cos = pedcc_logits(t, &xn, p);
    let am_softmax = margin_softmax_ce(
        t,
        &cos,
        labels,
        Margin::additive_cosine(cfg.margin),
        cfg.scale,
    );
    let mse = center_loss(t, x, p, labels);
    let rooted = scalar_pow(t, &mse, 1.0 / cfg.root);
    let weighted = ops::scale(t, &rooted, cfg.lambda);
    let loss = ops::add(t, &am_softmax, &weighted);
    PedccLoss {
        loss,
        am_softmax,
        mse,
    }
}

/// v^e of a one-element tensor.
pub fn scalar_pow_fwd(v: &Tensor, e: f64) -> Tensor {
    assert_eq!(v.numel(), 1, "scalar_pow of {:?}", v.shape());
    dispatch!(v, scalar_pow_host, scalar_pow_cuda, v, e)
}

/// CUDA arm: `cuda/baselines.cu` (no copy to the host).
fn scalar_pow_cuda(v: &Tensor, e: f64) -> Tensor {
    crate::cuda::baseline_kernels::scalar_pow(v, e)
}

fn scalar_pow_host<T: Elem>(v: &Tensor, e: f64) -> Tensor {
    let x = v.host::<T>()[0];
    Tensor::from_vec(v.shape(), vec![x.powf(T::of(e))])
}

/// v^e on the tape; e = 1 records nothing. ∂/∂v = e·v^(e−1).
pub fn scalar_pow(t: &mut Tape, v: &Var, e: f64) -> Var {
    if e == 1.0 {
        return v.clone();
    }
    let y = scalar_pow_fwd(v.value(), e);
    let saved = v.value().clone();
    t.op(y, &[v], move || {
        Box::new(move |g, _| {
            let d = ops::scale_fwd(&scalar_pow_fwd(&saved, e - 1.0), e);
            vec![Some(crate::loss::scale_by_scalar_fwd(&d, g))]
        })
    })
}
