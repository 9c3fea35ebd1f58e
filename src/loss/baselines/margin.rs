//! Margin softmax cross-entropy over cosines: AM-Softmax, ArcFace and the combined margin of InsightFace,
//! one fused op. From the cosines c [B, K] between normalised features and normalised class weights (or
//! the PEDCC), the target class's cosine is replaced by a margin function f and everything is scaled by s:
//!
//! ```text
//! f(c) = cos(m1·θ + m2) − m3,  θ = arccos c        z_bk = s·c_bk (k ≠ y_b),  z_{b,y_b} = s·f(c_{b,y_b})
//! L = (1/B) Σ_b (log Σ_k e^{z_bk} − z_{b,y_b})
//! ∂L/∂c_bk = s·(softmax(z_b)_k − [k = y_b]) / B · (f'(c) at k = y_b, else 1)
//! f'(c) = m1·sin(m1·θ + m2) / sin θ
//! ```
//! AM-Softmax is (m1, m2, m3) = (1, 0, m), ArcFace (1, m, 0), the combined margin (m1, m2, m3).
//! Where m1·θ + m2 passes π, cos(m1·θ + m2) would turn back up and reward a larger angle; beyond
//! θ_t = (π − m2)/m1 the target logit therefore continues as c − m3 − (1 + cos θ_t), which is continuous
//! at θ_t and keeps decreasing with the angle (InsightFace's ArcFace uses the similar c − m·sin m).
//! sin θ in f' is floored at 1e-6 so that a cosine of exactly ±1 gives a finite gradient.

use crate::autograd::{Tape, Var};
use crate::loss::{cuda_labels, label_indices, scale_by_scalar_fwd};
use crate::ops::dispatch;
use crate::tensor::{Elem, Tensor};
use std::f64::consts::PI;

/// The three margins of f(c) = cos(m1·θ + m2) − m3.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Margin {
    pub m1: f64,
    pub m2: f64,
    pub m3: f64,
}

impl Margin {
    /// AM-Softmax (CosFace): cos θ − m.
    pub fn additive_cosine(m: f64) -> Margin {
        Margin {
            m1: 1.0,
            m2: 0.0,
            m3: m,
        }
    }

    /// ArcFace: cos(θ + m).
    pub fn additive_angular(m: f64) -> Margin {
        Margin {
            m1: 1.0,
            m2: m,
            m3: 0.0,
        }
    }

    /// InsightFace's combined margin: cos(m1·θ + m2) − m3.
    pub fn combined(m1: f64, m2: f64, m3: f64) -> Margin {
        Margin { m1, m2, m3 }
    }

    /// f(c) and f'(c) for a cosine c (clamped to [−1, 1]).
    pub fn target_logit(&self, c: f64) -> (f64, f64) {
        let c = c.clamp(-1.0, 1.0);
        if self.m1 == 1.0 && self.m2 == 0.0 {
            return (c - self.m3, 1.0);
        }
        let theta = c.acos();
        let a = self.m1 * theta + self.m2;
        if a <= PI {
            let f = a.cos() - self.m3;
            let fp = self.m1 * a.sin() / theta.sin().max(1e-6);
            (f, fp)
        } else {
            let c_t = ((PI - self.m2) / self.m1).cos();
            (c - self.m3 - (1.0 + c_t), 1.0)
        }
    }
}

/// The loss [1] and, with `with_grad`, ∂L/∂cos [B, K].
pub fn margin_softmax_ce_fwd(
    cos: &Tensor,
    labels: &Tensor,
    margin: Margin,
    scale: f64,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    assert_eq!(
        cos.rank(),
        2,
        "margin_softmax_ce of {:?}; expected [B, K]",
        cos.shape()
    );
    assert!(
        cos.dim(0) > 0 && cos.dim(1) > 0,
        "margin_softmax_ce of an empty {:?}",
        cos.shape()
    );
    assert!(margin.m1 > 0.0, "margin m1 = {} must be > 0", margin.m1);
    dispatch!(
        cos,
        margin_softmax_ce_host,
        margin_softmax_ce_cuda,
        cos,
        labels,
        margin,
        scale,
        with_grad
    )
}

/// CUDA arm: `cuda/baselines.cu` (no copy to the host).
fn margin_softmax_ce_cuda(
    cos: &Tensor,
    labels: &Tensor,
    margin: Margin,
    scale: f64,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    crate::cuda::baseline_kernels::margin_ce(
        cos,
        &cuda_labels(labels, cos),
        (margin.m1, margin.m2, margin.m3),
        scale,
        with_grad,
    )
}

fn margin_softmax_ce_host<T: Elem>(
    cos: &Tensor,
    labels: &Tensor,
    margin: Margin,
    scale: f64,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let (b, k) = (cos.dim(0), cos.dim(1));
    let ys = label_indices(labels, b, k);
    let cs = cos.host::<T>();
    let s = T::of(scale);
    let inv_b = T::of(1.0 / b as f64);
    let mut loss = 0.0f64;
    let mut dc = if with_grad {
        vec![T::zero(); b * k]
    } else {
        Vec::new()
    };
    let mut z = vec![T::zero(); k];
    for (i, &y) in ys.iter().enumerate() {
        let row = &cs[i * k..(i + 1) * k];
        let (f, fp) = margin.target_logit(row[y].f64());
        for (zj, &c) in z.iter_mut().zip(row) {
            *zj = s * c;
        }
        z[y] = s * T::of(f);
        let zmax = z.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let lse = zmax + z.iter().map(|&v| (v - zmax).exp()).sum::<T>().ln();
        loss += (lse - z[y]).f64();
        if with_grad {
            for (j, d) in dc[i * k..(i + 1) * k].iter_mut().enumerate() {
                let p = (z[j] - lse).exp();
                *d = if j == y {
                    s * (p - T::one()) * T::of(fp) * inv_b
                } else {
                    s * p * inv_b
                };
            }
        }
    }
    let loss = Tensor::from_vec(&[1], vec![T::of(loss / b as f64)]);
    (loss, with_grad.then(|| Tensor::from_vec(&[b, k], dc)))
}

/// Margin softmax cross-entropy of cosines [B, K] on the tape.
pub fn margin_softmax_ce(
    t: &mut Tape,
    cos: &Var,
    labels: &Tensor,
    margin: Margin,
    scale: f64,
) -> Var {
    let with_grad = t.is_recording() && cos.requires_grad();
    let (loss, dc) = margin_softmax_ce_fwd(cos.value(), labels, margin, scale, with_grad);
    t.op(loss, &[cos], move || {
        let dc = dc.expect("gradient computed when recording");
        Box::new(move |g, _| vec![Some(scale_by_scalar_fwd(&dc, g))])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_reduce_to_their_textbook_forms() {
        let c = 0.3f64;
        let theta = c.acos();
        assert!((Margin::additive_cosine(0.35).target_logit(c).0 - (c - 0.35)).abs() < 1e-15);
        assert!(
            (Margin::additive_angular(0.5).target_logit(c).0 - (theta + 0.5).cos()).abs() < 1e-15
        );
        let f = Margin::combined(0.9, 0.4, 0.15).target_logit(c).0;
        assert!((f - ((0.9 * theta + 0.4).cos() - 0.15)).abs() < 1e-15);
    }

    #[test]
    fn the_target_logit_keeps_falling_past_the_turning_angle() {
        let m = Margin::additive_angular(0.5);
        let theta_t = PI - 0.5;
        let (at, _) = m.target_logit(theta_t.cos());
        let (before, _) = m.target_logit((theta_t - 1e-9).cos());
        let (after, _) = m.target_logit((theta_t + 1e-9).cos());
        assert!((at + 1.0).abs() < 1e-9 && (before - at).abs() < 1e-6 && (after - at).abs() < 1e-6);
        let mut last = f64::INFINITY;
        for i in 0..=200 {
            let (f, fp) = m.target_logit(1.0 - 2.0 * i as f64 / 200.0);
            assert!(f <= last + 1e-12 && fp >= 0.0, "not monotone at step {i}");
            last = f;
        }
    }
}
