//! Softmax cross-entropy, mean over the batch, from logits [B, K] and labels [B]:
//!
//! ```text
//! L = (1/B) Σ_b (log Σ_k e^{z_bk} − z_{b,y_b})        ∂L/∂z_bk = (softmax(z_b)_k − [k = y_b]) / B
//! ```
//! Stable: the row maximum is subtracted before exponentiating. Forward and backward are one fused pass
//! per row; the gradient for an upstream gradient of 1 is saved and only scaled in backward.

use super::{cuda_labels, label_indices, scale_by_scalar_fwd};
use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::ops::dispatch;
use crate::tensor::{Elem, Tensor};

/// The loss [1] and, with `with_grad`, ∂L/∂logits [B, K].
pub fn softmax_ce_fwd(
    logits: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    assert_eq!(
        logits.rank(),
        2,
        "softmax_ce of {:?}; expected [B, K]",
        logits.shape()
    );
    assert!(
        logits.dim(0) > 0 && logits.dim(1) > 0,
        "softmax_ce of an empty {:?}",
        logits.shape()
    );
    dispatch!(
        logits,
        softmax_ce_host,
        softmax_ce_cuda,
        logits,
        labels,
        with_grad
    )
}

fn softmax_ce_cuda(logits: &Tensor, labels: &Tensor, with_grad: bool) -> (Tensor, Option<Tensor>) {
    let b = logits.dim(0);
    assert_eq!(
        labels.shape(),
        &[b],
        "softmax_ce: labels must be [{b}], got {:?}",
        labels.shape()
    );
    let (loss, dz) = cuda::loss_kernels::softmax_ce_fwd_bwd(logits, &cuda_labels(labels, logits));
    (loss, with_grad.then_some(dz))
}

fn softmax_ce_host<T: Elem>(
    logits: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let (b, k) = (logits.dim(0), logits.dim(1));
    let ys = label_indices(labels, b, k);
    let zs = logits.host::<T>();
    let inv_b = T::of(1.0 / b as f64);
    let mut loss = 0.0f64;
    let mut dz = if with_grad {
        vec![T::zero(); b * k]
    } else {
        Vec::new()
    };
    for (i, &y) in ys.iter().enumerate() {
        let z = &zs[i * k..(i + 1) * k];
        let zmax = z.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let sum = z.iter().map(|&v| (v - zmax).exp()).sum::<T>();
        let lse = zmax + sum.ln();
        loss += (lse - z[y]).f64();
        if with_grad {
            for (j, (d, &v)) in dz[i * k..(i + 1) * k].iter_mut().zip(z).enumerate() {
                let onehot = if j == y { T::one() } else { T::zero() };
                *d = ((v - lse).exp() - onehot) * inv_b;
            }
        }
    }
    let loss = Tensor::from_vec(&[1], vec![T::of(loss / b as f64)]);
    (loss, with_grad.then(|| Tensor::from_vec(&[b, k], dz)))
}

/// Softmax cross-entropy on the tape.
pub fn softmax_cross_entropy(t: &mut Tape, logits: &Var, labels: &Tensor) -> Var {
    let with_grad = t.is_recording() && logits.requires_grad();
    let (loss, dz) = softmax_ce_fwd(logits.value(), labels, with_grad);
    t.op(loss, &[logits], move || {
        let dz = dz.expect("gradient computed when recording");
        Box::new(move |g, _| vec![Some(scale_by_scalar_fwd(&dz, g))])
    })
}
