//! SC, the self-correlation constraint (paper eq. 18–19; DESIGN.md §1.4, §1.6.3).
//!
//! ```text
//! x̃_b = x_b / max(‖x_b‖, 1e-12)           (ops::row_normalize, with its own backward)
//! D   = X̃ − P_Y                          B×n, row b is x̃_b − p_{y_b}
//! R   = DᵀD / (B−1)                        n×n
//! L   = Σ_{i≠j} R_ij²                      (reference code: divided by n−1 as well)
//! ```
//! With C = DᵀD, s_i = C_ii = Σ_b D_bi² and c = 1/(B−1)² [·1/(n−1)]:
//! `L = c·(‖C‖_F² − ‖s‖²)`, and since ‖DᵀD‖_F = ‖DDᵀ‖_F, C can be replaced by the B×B Gram G = DDᵀ:
//! computing G costs B²n instead of Bn², the win when n > B (n = 512…2048 at B = 128).
//!
//! Gradient: ∂‖DᵀD‖_F²/∂D = 4·D·DᵀD = 4·G·D, and ∂‖s‖²/∂D_bi = 2s_i·2D_bi, so
//! `∂L/∂D = 4c·(G·D − D∘s)` (s broadcast over rows), with G·D = D·C in the n×n form. P is frozen, so
//! ∂L/∂x̃ = ∂L/∂D.
//!
//! The op is a composite of tensor-level pieces so that on the GPU the two products (the Gram and G·D)
//! go to cuBLAS and the rest are the small kernels of `cuda::loss_kernels` (the same ones its fused
//! `sc_fwd_bwd` chains): centroid subtraction (`sc_diff`), column sums of squares (`col_sumsq`), the
//! value (`sc_loss`) and the gradient combination (`sc_grad`). Both devices accumulate the value in
//! f64, and the two products run in true fp32 even in TF32 mode (see `sc_of_normalized`).

use super::{cuda_labels, label_indices, Variant};
use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::ops::dispatch;
use crate::ops::{self, assert_same_place};
use crate::tensor::{Elem, Tensor};

/// Which product SC is computed with; both give the same value and gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScForm {
    /// The B×B Gram DDᵀ when n > B, else the n×n DᵀD (the cheaper one).
    #[default]
    Auto,
    /// Always the B×B Gram DDᵀ.
    Gram,
    /// Always the n×n DᵀD.
    Covariance,
}

impl ScForm {
    pub(super) fn uses_gram(self, batch: usize, dim: usize) -> bool {
        match self {
            ScForm::Auto => dim > batch,
            ScForm::Gram => true,
            ScForm::Covariance => false,
        }
    }
}

/// c in L = c·(‖C‖_F² − ‖s‖²): 1/(B−1)², and for the reference code also 1/(n−1).
pub fn sc_coefficient(batch: usize, dim: usize, variant: Variant) -> f64 {
    assert!(
        batch >= 2,
        "the SC loss needs a batch of at least 2 samples (its covariance divides by B−1); got {batch}"
    );
    let c = 1.0 / ((batch - 1) as f64).powi(2);
    match variant {
        Variant::Paper => c,
        Variant::Reference => {
            assert!(
                dim >= 2,
                "the reference SC divides by n−1 and needs n ≥ 2; got n = {dim}"
            );
            c / (dim - 1) as f64
        }
    }
}

// ---- D = X̃ − P_Y ----

/// D [B, n] = xn − P[labels] (row b minus the centroid of its class).
pub fn sub_class_centroids_fwd(xn: &Tensor, p: &Tensor, labels: &Tensor) -> Tensor {
    assert!(
        xn.rank() == 2 && p.rank() == 2 && xn.dim(1) == p.dim(1),
        "sub_class_centroids: x {:?}, P {:?}",
        xn.shape(),
        p.shape()
    );
    assert_same_place("sub_class_centroids", &[xn, p]);
    dispatch!(
        xn,
        sub_class_centroids_host,
        sub_class_centroids_cuda,
        xn,
        p,
        labels
    )
}

fn sub_class_centroids_cuda(xn: &Tensor, p: &Tensor, labels: &Tensor) -> Tensor {
    assert_eq!(
        labels.shape(),
        &[xn.dim(0)],
        "sub_class_centroids: labels must be [{}], got {:?}",
        xn.dim(0),
        labels.shape()
    );
    cuda::loss_kernels::sc_diff(xn, p, &cuda_labels(labels, xn))
}

fn sub_class_centroids_host<T: Elem>(xn: &Tensor, p: &Tensor, labels: &Tensor) -> Tensor {
    let (b, n) = (xn.dim(0), xn.dim(1));
    let ys = label_indices(labels, b, p.dim(0));
    let ps = p.host::<T>();
    let mut d = xn.host::<T>().to_vec();
    for (row, &y) in d.chunks_exact_mut(n.max(1)).zip(&ys) {
        for (v, &c) in row.iter_mut().zip(&ps[y * n..(y + 1) * n]) {
            *v -= c;
        }
    }
    Tensor::from_vec(&[b, n], d)
}

// ---- s = column sums of squares ----

/// s [n] with s_i = Σ_b D_bi² (the diagonal of DᵀD).
pub fn col_sumsq_fwd(d: &Tensor) -> Tensor {
    assert_eq!(d.rank(), 2, "col_sumsq of {:?}", d.shape());
    dispatch!(d, col_sumsq_host, cuda::loss_kernels::col_sumsq, d)
}

fn col_sumsq_host<T: Elem>(d: &Tensor) -> Tensor {
    let n = d.dim(1);
    let mut s = vec![T::zero(); n];
    for row in d.host::<T>().chunks_exact(n.max(1)) {
        for (o, &v) in s.iter_mut().zip(row) {
            *o += v * v;
        }
    }
    Tensor::from_vec(&[n], s)
}

// ---- value ----

/// coef·(Σ m² − Σ s²) → [1], where m is DDᵀ or DᵀD. Accumulates in f64: the two sums nearly cancel
/// when the off-diagonal correlations are small.
pub fn sc_value_fwd(m: &Tensor, s: &Tensor, coef: f64) -> Tensor {
    assert_same_place("sc_value", &[m, s]);
    dispatch!(m, sc_value_host, cuda::loss_kernels::sc_loss, m, s, coef)
}

fn sc_value_host<T: Elem>(m: &Tensor, s: &Tensor, coef: f64) -> Tensor {
    let sq = |v: &[T]| v.iter().map(|&a| a.f64() * a.f64()).sum::<f64>();
    let v = coef * (sq(m.host::<T>()) - sq(s.host::<T>()));
    Tensor::from_vec(&[1], vec![T::of(v)])
}

// ---- gradient ----

/// ∂L/∂D = coef4·g·(md − D∘s), with md = G·D (= D·C), s broadcast over rows, g the upstream
/// gradient [1] and coef4 = 4c.
pub fn sc_grad_fwd(md: &Tensor, d: &Tensor, s: &Tensor, g: &Tensor, coef4: f64) -> Tensor {
    assert_eq!(md.shape(), d.shape(), "sc_grad: G·D and D shapes differ");
    assert_eq!(s.shape(), &[d.dim(1)], "sc_grad: s must be [n]");
    assert_eq!(
        g.numel(),
        1,
        "sc_grad: the upstream gradient must be a scalar"
    );
    assert_same_place("sc_grad", &[md, d, s, g]);
    dispatch!(md, sc_grad_host, sc_grad_cuda, md, d, s, g, coef4)
}

/// The kernel computes 4·norm·(md − D∘s); the upstream scalar g is applied on the device.
fn sc_grad_cuda(md: &Tensor, d: &Tensor, s: &Tensor, g: &Tensor, coef4: f64) -> Tensor {
    let dd = cuda::loss_kernels::sc_grad(md, d, s, coef4 / 4.0);
    cuda::nn_kernels::scale_by(&dd, g)
}

fn sc_grad_host<T: Elem>(md: &Tensor, d: &Tensor, s: &Tensor, g: &Tensor, coef4: f64) -> Tensor {
    let n = d.dim(1);
    let k = T::of(coef4) * g.host::<T>()[0];
    let ss = s.host::<T>();
    let mut out = vec![T::zero(); d.numel()];
    for ((o, mr), dr) in out
        .chunks_exact_mut(n.max(1))
        .zip(md.host::<T>().chunks_exact(n.max(1)))
        .zip(d.host::<T>().chunks_exact(n.max(1)))
    {
        for (((o, &a), &dv), &sv) in o.iter_mut().zip(mr).zip(dr).zip(ss) {
            *o = k * (a - dv * sv);
        }
    }
    Tensor::from_vec(d.shape(), out)
}

/// SC's product of D [B, n]: the Gram matrix G = DDᵀ (B×B) or the covariance C = DᵀD (n×n).
pub(super) fn sc_product(d: &Tensor, gram: bool) -> Tensor {
    if gram {
        ops::matmul_fwd(d, false, d, true)
    } else {
        ops::matmul_fwd(d, true, d, false)
    }
}

/// The backward's product of `sc_product`'s M with D: G·D or D·C, [B, n].
pub(super) fn sc_product_back(m: &Tensor, d: &Tensor, gram: bool) -> Tensor {
    if gram {
        ops::matmul_fwd(m, false, d, false)
    } else {
        ops::matmul_fwd(d, false, m, false)
    }
}

// ---- on the tape ----

/// The SC loss of features x [B, n] (normalised inside) against PEDCC p [K, n] and labels [B].
pub fn sc(
    t: &mut Tape,
    x: &Var,
    p: &Tensor,
    labels: &Tensor,
    variant: Variant,
    form: ScForm,
) -> Var {
    let xn = ops::row_normalize(t, x);
    sc_of_normalized(t, &xn, p, labels, variant, form)
}

/// The SC loss of already-normalised features x̃ [B, n].
pub fn sc_of_normalized(
    t: &mut Tape,
    xn: &Var,
    p: &Tensor,
    labels: &Tensor,
    variant: Variant,
    form: ScForm,
) -> Var {
    let (b, n) = (xn.shape()[0], xn.shape()[1]);
    let coef = sc_coefficient(b, n, variant);
    let gram = form.uses_gram(b, n);
    let d = sub_class_centroids_fwd(xn.value(), p, labels);
    // The value and the gradient keep what is left after large terms cancel (‖G‖² − ‖s‖²,
    // G·D − D∘s): with TF32 inputs that would be mostly rounding error, so these small products
    // run in true fp32 whatever the math mode.
    let fp32 = cuda::math_mode_scope(cuda::MathMode::Fp32);
    let m = sc_product(&d, gram);
    let s = col_sumsq_fwd(&d);
    let loss = sc_value_fwd(&m, &s, coef);
    drop(fp32);
    t.op(loss, &[xn], move || {
        Box::new(move |g, _| {
            let _fp32 = cuda::math_mode_scope(cuda::MathMode::Fp32);
            let md = sc_product_back(&m, &d, gram);
            vec![Some(sc_grad_fwd(&md, &d, &s, g, 4.0 * coef))]
        })
    })
}
