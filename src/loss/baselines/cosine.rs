//! Cosine Loss (paper eq. 9): one minus the cosine between a feature and its class's PEDCC centroid,
//! the NaC loss without the norm-adaptive δ and without the square.
//!
//! ```text
//! c_b = ⟨x_b, p_{y_b}⟩ / (‖x_b‖ ‖p_{y_b}‖),   L = (1/B) Σ_b (1 − c_b)
//! ∂L/∂x_b = −(1/B) (p_{y_b} / (‖x_b‖ ‖p_{y_b}‖) − c_b x_b / ‖x_b‖²)
//! ```
//! A zero feature has no direction: its cosine is taken as 0 and it gets no gradient.

use crate::autograd::{Tape, Var};
use crate::loss::{cuda_labels, label_indices, scale_by_scalar_fwd};
use crate::ops::{assert_same_place, dispatch};
use crate::tensor::{Elem, Tensor};

/// Cosine loss [1] of features x [B, n] against the PEDCC p [K, n]; with `with_grad`, also ∂L/∂x.
pub fn cosine_loss_fwd(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    assert!(
        x.rank() == 2 && p.rank() == 2 && x.dim(1) == p.dim(1),
        "cosine_loss: x {:?} and P {:?} must be [B, n] and [K, n]",
        x.shape(),
        p.shape()
    );
    assert!(x.dim(0) > 0, "cosine_loss: empty batch");
    assert_same_place("cosine_loss", &[x, p]);
    dispatch!(
        x,
        cosine_loss_host,
        cosine_loss_cuda,
        x,
        p,
        labels,
        with_grad
    )
}

/// CUDA arm: `cuda/baselines.cu` (no copy to the host).
fn cosine_loss_cuda(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    crate::cuda::baseline_kernels::cosine_loss(x, p, &cuda_labels(labels, x), with_grad)
}

fn cosine_loss_host<T: Elem>(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let (b, n) = (x.dim(0), x.dim(1));
    let ys = label_indices(labels, b, p.dim(0));
    let (xs, ps) = (x.host::<T>(), p.host::<T>());
    let inv_b = T::of(1.0 / b as f64);
    let mut loss = 0.0f64;
    let mut dx = if with_grad {
        vec![T::zero(); b * n]
    } else {
        Vec::new()
    };
    for (i, &y) in ys.iter().enumerate() {
        let (xr, pr) = (&xs[i * n..(i + 1) * n], &ps[y * n..(y + 1) * n]);
        let r = xr.iter().map(|&u| u * u).sum::<T>().sqrt();
        let q = pr.iter().map(|&v| v * v).sum::<T>().sqrt();
        if r == T::zero() || q == T::zero() {
            loss += 1.0;
            continue;
        }
        let c = xr.iter().zip(pr).map(|(&u, &v)| u * v).sum::<T>() / (r * q);
        loss += 1.0 - c.f64();
        if with_grad {
            let (cp, cx) = (-inv_b / (r * q), inv_b * c / (r * r));
            for ((d, &u), &v) in dx[i * n..(i + 1) * n].iter_mut().zip(xr).zip(pr) {
                *d = cp * v + cx * u;
            }
        }
    }
    let loss = Tensor::from_vec(&[1], vec![T::of(loss / b as f64)]);
    (loss, with_grad.then(|| Tensor::from_vec(&[b, n], dx)))
}

/// The cosine loss on the tape (gradient into x only; P is frozen).
pub fn cosine_loss(t: &mut Tape, x: &Var, p: &Tensor, labels: &Tensor) -> Var {
    let with_grad = t.is_recording() && x.requires_grad();
    let (loss, dx) = cosine_loss_fwd(x.value(), p, labels, with_grad);
    t.op(loss, &[x], move || {
        let dx = dx.expect("gradient computed when recording");
        Box::new(move |g, _| vec![Some(scale_by_scalar_fwd(&dx, g))])
    })
}
