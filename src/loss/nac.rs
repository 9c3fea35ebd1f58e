//! NaC, the norm-adaptive cosine loss (paper eq. 16–17; DESIGN.md §1.3, §1.6.1).
//!
//! ```text
//! a_b = ⟨x_b, p_{y_b}⟩,  r_b = ‖x_b‖
//! paper:      q_b = r_b + δ            ∂q/∂x = x/r
//! reference:  q_b = √(r_b² + δ²)       ∂q/∂x = x/q
//! c_b = a_b / q_b,       L = (1/B) Σ_b (1 − c_b)²
//! ∂c_b/∂x_b = p_{y_b}/q_b − a_b/q_b² · ∂q/∂x
//! ∂L/∂x_b   = −(2/B)(1 − c_b) ∂c_b/∂x_b
//! ```
//! δ is a constant of the step and P is frozen, so x is the only input with a gradient. Forward and
//! backward are one fused pass over each row (two dot products, then one axpy): the gradient for an
//! upstream gradient of 1 is computed with the loss and saved, and backward only scales it.

use super::{cuda_labels, label_indices, scale_by_scalar_fwd, Variant};
use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::ops::assert_same_place;
use crate::ops::dispatch;
use crate::tensor::{Elem, Tensor};

/// NaC loss [1] of features x [B, n] against PEDCC p [K, n] and labels [B]; with `with_grad`, also
/// ∂L/∂x [B, n].
pub fn nac_fwd(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    variant: Variant,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    assert!(
        x.rank() == 2 && p.rank() == 2,
        "nac: x {:?}, P {:?}",
        x.shape(),
        p.shape()
    );
    assert_eq!(
        x.dim(1),
        p.dim(1),
        "nac: feature dim of x {:?} and P {:?} differ",
        x.shape(),
        p.shape()
    );
    assert!(x.dim(0) > 0, "nac: empty batch");
    assert!(
        delta.is_finite() && delta >= 0.0,
        "nac: δ = {delta} must be finite and ≥ 0"
    );
    assert_same_place("nac", &[x, p]);
    dispatch!(x, nac_host, nac_cuda, x, p, labels, delta, variant, with_grad)
}

/// The fused kernel always makes the gradient (it costs one more write of x's size).
fn nac_cuda(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    variant: Variant,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    assert_eq!(
        labels.shape(),
        &[x.dim(0)],
        "nac: labels must be [{}], got {:?}",
        x.dim(0),
        labels.shape()
    );
    let out =
        cuda::loss_kernels::nac_fwd_bwd(x, p, &cuda_labels(labels, x), delta, variant.nac_form());
    (out.loss, with_grad.then_some(out.dx))
}

fn nac_host<T: Elem>(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    variant: Variant,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let (b, n) = (x.dim(0), x.dim(1));
    let ys = label_indices(labels, b, p.dim(0));
    let (xs, ps) = (x.host::<T>(), p.host::<T>());
    let delta = T::of(delta);
    let two_over_b = T::of(2.0 / b as f64);
    let mut loss = 0.0f64;
    let mut dx = if with_grad {
        vec![T::zero(); b * n]
    } else {
        Vec::new()
    };
    for (i, &y) in ys.iter().enumerate() {
        let xr = &xs[i * n..(i + 1) * n];
        let pr = &ps[y * n..(y + 1) * n];
        let a = xr.iter().zip(pr).map(|(&u, &v)| u * v).sum::<T>();
        let r2 = xr.iter().map(|&u| u * u).sum::<T>();
        let r = r2.sqrt();
        // q and the factor k with ∂q/∂x = k·x.
        let (q, k) = match variant {
            Variant::Paper => {
                let k = if r > T::zero() { r.recip() } else { T::zero() };
                (r + delta, k)
            }
            Variant::Reference => {
                let q = (r2 + delta * delta).sqrt();
                (q, q.recip())
            }
        };
        let c = a / q;
        let e = T::one() - c;
        loss += (e * e).f64();
        if with_grad {
            // ∂L/∂x = −(2/B)·e·(p/q − (a/q²)·k·x)
            let g = -two_over_b * e;
            let cp = g / q;
            let cx = -g * a / (q * q) * k;
            for ((d, &u), &v) in dx[i * n..(i + 1) * n].iter_mut().zip(xr).zip(pr) {
                *d = cp * v + cx * u;
            }
        }
    }
    let loss = Tensor::from_vec(&[1], vec![T::of(loss / b as f64)]);
    (loss, with_grad.then(|| Tensor::from_vec(&[b, n], dx)))
}

/// The NaC loss on the tape (gradient into x only).
pub fn nac(
    t: &mut Tape,
    x: &Var,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    variant: Variant,
) -> Var {
    let with_grad = t.is_recording() && x.requires_grad();
    let (loss, dx) = nac_fwd(x.value(), p, labels, delta, variant, with_grad);
    t.op(loss, &[x], move || {
        let dx = dx.expect("gradient computed when recording");
        Box::new(move |g, _| vec![Some(scale_by_scalar_fwd(&dx, g))])
    })
}
