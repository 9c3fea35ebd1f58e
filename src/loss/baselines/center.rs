//! Center Loss (Wen et al., ECCV 2016): a squared distance of every feature to its class centre, and the
//! centres' own update rule.
//!
//! ```text
//! L_C = (1/(2B)) Σ_b ‖x_b − c_{y_b}‖²          ∂L_C/∂x_b = (x_b − c_{y_b}) / B
//! Δc_j = Σ_{b: y_b = j} (c_j − x_b) / (1 + n_j),   c_j ← c_j − α·Δc_j      (n_j: samples of class j)
//! ```
//! The mean over the batch is what Wen et al.'s Caffe layer computes; the centres get no gradient
//! (they are a buffer moved by the update rule, α = 0.5 by default). Training minimises
//! softmax CE + λ·L_C with λ = 0.003. The same distance against the fixed PEDCC is the MSE term of
//! PEDCC-Loss.

use crate::autograd::{Tape, Var};
use crate::loss::{cuda_labels, label_indices, scale_by_scalar_fwd};
use crate::ops::{assert_same_place, dispatch};
use crate::tensor::{Elem, Tensor};

fn check_shapes(op: &str, x: &Tensor, centers: &Tensor) {
    assert!(
        x.rank() == 2 && centers.rank() == 2 && x.dim(1) == centers.dim(1),
        "{op}: features {:?} and centres {:?} must be [B, n] and [K, n]",
        x.shape(),
        centers.shape()
    );
    assert!(x.dim(0) > 0, "{op}: empty batch");
    assert_same_place(op, &[x, centers]);
}

/// L_C [1] of features x [B, n] against centres [K, n]; with `with_grad`, also ∂L_C/∂x [B, n].
pub fn center_loss_fwd(
    x: &Tensor,
    centers: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    check_shapes("center_loss", x, centers);
    dispatch!(
        x,
        center_loss_host,
        center_loss_cuda,
        x,
        centers,
        labels,
        with_grad
    )
}

/// CUDA arm: `cuda/baselines.cu` (no copy to the host).
fn center_loss_cuda(
    x: &Tensor,
    c: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    crate::cuda::baseline_kernels::center_loss(x, c, &cuda_labels(labels, x), with_grad)
}

fn center_loss_host<T: Elem>(
    x: &Tensor,
    centers: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let (b, n) = (x.dim(0), x.dim(1));
    let ys = label_indices(labels, b, centers.dim(0));
    let (xs, cs) = (x.host::<T>(), centers.host::<T>());
    let inv_b = T::of(1.0 / b as f64);
    let mut loss = 0.0f64;
    let mut dx = if with_grad {
        vec![T::zero(); b * n]
    } else {
        Vec::new()
    };
    for (i, &y) in ys.iter().enumerate() {
        let (xr, cr) = (&xs[i * n..(i + 1) * n], &cs[y * n..(y + 1) * n]);
        loss += xr
            .iter()
            .zip(cr)
            .map(|(&u, &v)| (u - v) * (u - v))
            .sum::<T>()
            .f64();
        if with_grad {
            for ((d, &u), &v) in dx[i * n..(i + 1) * n].iter_mut().zip(xr).zip(cr) {
                *d = (u - v) * inv_b;
            }
        }
    }
    let loss = Tensor::from_vec(&[1], vec![T::of(loss / (2.0 * b as f64))]);
    (loss, with_grad.then(|| Tensor::from_vec(&[b, n], dx)))
}

/// L_C on the tape (gradient into x only; the centres are constants of the step).
pub fn center_loss(t: &mut Tape, x: &Var, centers: &Tensor, labels: &Tensor) -> Var {
    let with_grad = t.is_recording() && x.requires_grad();
    let (loss, dx) = center_loss_fwd(x.value(), centers, labels, with_grad);
    t.op(loss, &[x], move || {
        let dx = dx.expect("gradient computed when recording");
        Box::new(move |g, _| vec![Some(scale_by_scalar_fwd(&dx, g))])
    })
}

/// The centres after one update with the batch's features x [B, n] (Wen et al.'s rule, rate α).
pub fn center_update_fwd(centers: &Tensor, x: &Tensor, labels: &Tensor, alpha: f64) -> Tensor {
    check_shapes("center_update", x, centers);
    dispatch!(
        centers,
        center_update_host,
        center_update_cuda,
        centers,
        x,
        labels,
        alpha
    )
}

/// CUDA arm: `cuda/baselines.cu` (no copy to the host).
fn center_update_cuda(c: &Tensor, x: &Tensor, labels: &Tensor, alpha: f64) -> Tensor {
    crate::cuda::baseline_kernels::center_update(c, x, &cuda_labels(labels, x), alpha)
}

fn center_update_host<T: Elem>(
    centers: &Tensor,
    x: &Tensor,
    labels: &Tensor,
    alpha: f64,
) -> Tensor {
    let (b, n, k) = (x.dim(0), x.dim(1), centers.dim(0));
    let ys = label_indices(labels, b, k);
    let (xs, cs) = (x.host::<T>(), centers.host::<T>());
    // Σ_b (c_j − x_b) and n_j per class.
    let mut diff = vec![T::zero(); k * n];
    let mut count = vec![0usize; k];
    for (i, &y) in ys.iter().enumerate() {
        count[y] += 1;
        for ((d, &c), &u) in diff[y * n..(y + 1) * n]
            .iter_mut()
            .zip(&cs[y * n..(y + 1) * n])
            .zip(&xs[i * n..(i + 1) * n])
        {
            *d += c - u;
        }
    }
    let mut out = cs.to_vec();
    for j in 0..k {
        let rate = T::of(alpha / (1.0 + count[j] as f64));
        for (o, &d) in out[j * n..(j + 1) * n]
            .iter_mut()
            .zip(&diff[j * n..(j + 1) * n])
        {
            *o -= rate * d;
        }
    }
    Tensor::from_vec(centers.shape(), out)
}
