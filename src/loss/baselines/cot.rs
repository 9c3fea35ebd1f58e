//! The complement entropy of Complement Objective Training (Chen et al., ICLR 2019). COT alternates, for
//! every batch, a cross-entropy step with a step that flattens the predicted distribution over the
//! wrong classes; this file is the second objective, the trainer does the alternation.
//!
//! With ŷ = softmax(z), the normalised complement distribution of sample b is
//! P_bj = ŷ_bj / (1 − ŷ_{b,y_b}) for j ≠ y_b, which is exactly the softmax of the non-target logits, so it
//! is computed with a log-sum-exp over them (the official code adds 1e-7 and 1e-10 guards instead):
//!
//! ```text
//! L = (1/(B·K)) Σ_b Σ_{j≠y_b} P_bj log P_bj            (minus the complement entropy, scaled as the
//!                                                        official implementation does)
//! ∂L/∂z_bj = P_bj (log P_bj − Σ_{k≠y_b} P_bk log P_bk) / (B·K)   for j ≠ y_b,   0 for j = y_b
//! ```

use crate::autograd::{Tape, Var};
use crate::loss::{cuda_labels, label_indices, scale_by_scalar_fwd};
use crate::ops::dispatch;
use crate::tensor::{Elem, Tensor};

/// The complement-entropy loss [1] of logits [B, K]; with `with_grad`, also ∂L/∂logits.
pub fn complement_entropy_fwd(
    logits: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    assert_eq!(
        logits.rank(),
        2,
        "complement_entropy of {:?}; expected [B, K]",
        logits.shape()
    );
    assert!(
        logits.dim(0) > 0 && logits.dim(1) > 0,
        "complement_entropy of an empty {:?}",
        logits.shape()
    );
    dispatch!(
        logits,
        complement_entropy_host,
        complement_entropy_cuda,
        logits,
        labels,
        with_grad
    )
}

/// CUDA arm: `cuda/baselines.cu` (no copy to the host).
fn complement_entropy_cuda(
    logits: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    crate::cuda::baseline_kernels::complement_entropy(
        logits,
        &cuda_labels(labels, logits),
        with_grad,
    )
}

fn complement_entropy_host<T: Elem>(
    logits: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let (b, k) = (logits.dim(0), logits.dim(1));
    let ys = label_indices(labels, b, k);
    let zs = logits.host::<T>();
    let scale = T::of(1.0 / (b * k) as f64);
    let mut loss = 0.0f64;
    let mut dz = if with_grad {
        vec![T::zero(); b * k]
    } else {
        Vec::new()
    };
    let mut logp = vec![T::zero(); k];
    for (i, &y) in ys.iter().enumerate() {
        let z = &zs[i * k..(i + 1) * k];
        let others = || {
            z.iter()
                .enumerate()
                .filter(move |&(j, _)| j != y)
                .map(|(_, &v)| v)
        };
        let zmax = others().fold(T::neg_infinity(), |m, v| m.max(v));
        if zmax == T::neg_infinity() {
            continue; // K = 1: no complement classes.
        }
        let lse = zmax + others().map(|v| (v - zmax).exp()).sum::<T>().ln();
        let mut plogp = T::zero();
        for (j, (lp, &v)) in logp.iter_mut().zip(z).enumerate() {
            if j != y {
                *lp = v - lse;
                plogp += lp.exp() * *lp;
            }
        }
        loss += plogp.f64();
        if with_grad {
            for (j, d) in dz[i * k..(i + 1) * k].iter_mut().enumerate() {
                if j != y {
                    *d = logp[j].exp() * (logp[j] - plogp) * scale;
                }
            }
        }
    }
    let loss = Tensor::from_vec(&[1], vec![T::of(loss / (b * k) as f64)]);
    (loss, with_grad.then(|| Tensor::from_vec(&[b, k], dz)))
}

/// The complement-entropy loss on the tape.
pub fn complement_entropy(t: &mut Tape, logits: &Var, labels: &Tensor) -> Var {
    let with_grad = t.is_recording() && logits.requires_grad();
    let (loss, dz) = complement_entropy_fwd(logits.value(), labels, with_grad);
    t.op(loss, &[logits], move || {
        let dz = dz.expect("gradient computed when recording");
        Box::new(move |g, _| vec![Some(scale_by_scalar_fwd(&dz, g))])
    })
}
