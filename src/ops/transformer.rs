//! The math ops of the transformers (ViT, Swin): layer norm over the last axis, GELU (the exact erf
//! form, as timm's `nn.GELU()`), softmax over the last axis, batched matrix products and scaled
//! dot-product attention with an optional additive bias (Swin's relative-position bias) and mask
//! (Swin's shifted-window mask).
//!
//! Each op has its host kernel (generic over f32/f64) next to its dispatch; the CUDA arms are in
//! `cuda::transformer` (our kernels in `cuda/transformer.cu`, cuBLAS strided-batched GEMMs).

use super::assert_same_place;
use crate::autograd::{Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

// ---- erf (for the exact GELU) ----

/// The error function in f64, a port of fdlibm's `s_erf.c` (error below 1 ulp): Rust's std has no
/// erf. The CUDA kernels use the device's `erff`.
pub fn erf(x: f64) -> f64 {
    const ERX: f64 = 8.450_629_115_104_675e-1;
    const EFX8: f64 = 1.027_033_336_764_101;
    const PP: [f64; 5] = [
        1.283_791_670_955_125_6e-1,
        -3.250_421_072_470_015e-1,
        -2.848_174_957_559_851e-2,
        -5.770_270_296_489_442e-3,
        -2.376_301_665_665_016_3e-5,
    ];
    const QQ: [f64; 5] = [
        3.979_172_239_591_553_5e-1,
        6.502_224_998_876_73e-2,
        5.081_306_281_875_766e-3,
        1.324_947_380_043_216_4e-4,
        -3.960_228_278_775_368e-6,
    ];
    const PA: [f64; 7] = [
        -2.362_118_560_752_659_5e-3,
        4.148_561_186_837_483e-1,
        -3.722_078_760_357_013e-1,
        3.183_466_199_011_617_5e-1,
        -1.108_946_942_823_966_8e-1,
        3.547_830_432_561_823_6e-2,
        -2.166_375_594_868_791e-3,
    ];
    const QA: [f64; 6] = [
        1.064_208_804_008_442_3e-1,
        5.403_979_177_021_71e-1,
        7.182_865_441_419_627e-2,
        1.261_712_198_087_616_4e-1,
        1.363_708_391_202_905e-2,
        1.198_449_984_679_910_8e-2,
    ];
    const RA: [f64; 8] = [
        -9.864_944_034_847_148e-3,
        -6.938_585_727_071_818e-1,
        -1.055_862_622_532_329_1e1,
        -6.237_533_245_032_601e1,
        -1.623_966_694_625_734_7e2,
        -1.846_050_929_067_110_3e2,
        -8.128_743_550_630_66e1,
        -9.814_329_344_169_145,
    ];
    const SA: [f64; 8] = [
        1.965_127_166_743_925_7e1,
        1.376_577_541_435_190_4e2,
        4.345_658_774_752_292_3e2,
        6.453_872_717_332_679e2,
        4.290_081_400_275_678_3e2,
        1.086_350_055_417_794_2e2,
        6.570_249_770_319_282,
        -6.042_441_521_485_81e-2,
    ];
    const RB: [f64; 7] = [
        -9.864_942_924_700_1e-3,
        -7.992_832_376_805_23e-1,
        -1.775_795_491_775_475_2e1,
        -1.606_363_848_558_219_2e2,
        -6.375_664_433_683_896e2,
        -1.025_095_131_611_077_2e3,
        -4.835_191_916_086_514e2,
    ];
    const SB: [f64; 7] = [
        3.033_806_074_348_246e1,
        3.257_925_129_965_739e2,
        1.536_729_586_084_437e3,
        3.199_858_219_508_596e3,
        2.553_050_406_433_164_4e3,
        4.745_285_412_069_554e2,
        -2.244_095_244_658_582e1,
    ];
    if x.is_nan() {
        return x;
    }
    let (sign, a) = if x < 0.0 { (-1.0, -x) } else { (1.0, x) };
    if a < 0.84375 {
        if a < 2.0f64.powi(-28) {
            return x + x * (EFX8 / 8.0);
        }
        let z = x * x;
        let r = PP[0] + z * (PP[1] + z * (PP[2] + z * (PP[3] + z * PP[4])));
        let s = 1.0 + z * (QQ[0] + z * (QQ[1] + z * (QQ[2] + z * (QQ[3] + z * QQ[4]))));
        return x + x * (r / s);
    }
    if a < 1.25 {
        let s = a - 1.0;
        let p =
            PA[0] + s * (PA[1] + s * (PA[2] + s * (PA[3] + s * (PA[4] + s * (PA[5] + s * PA[6])))));
        let q =
            1.0 + s * (QA[0] + s * (QA[1] + s * (QA[2] + s * (QA[3] + s * (QA[4] + s * QA[5])))));
        return sign * (ERX + p / q);
    }
    if a >= 6.0 {
        return sign * (1.0 - f64::MIN_POSITIVE);
    }
    let s = 1.0 / (a * a);
    let (r, ss) = if a < 1.0 / 0.35 {
        (
            RA[0]
                + s * (RA[1]
                    + s * (RA[2]
                        + s * (RA[3] + s * (RA[4] + s * (RA[5] + s * (RA[6] + s * RA[7])))))),
            1.0 + s
                * (SA[0]
                    + s * (SA[1]
                        + s * (SA[2]
                            + s * (SA[3] + s * (SA[4] + s * (SA[5] + s * (SA[6] + s * SA[7]))))))),
        )
    } else {
        (
            RB[0] + s * (RB[1] + s * (RB[2] + s * (RB[3] + s * (RB[4] + s * (RB[5] + s * RB[6]))))),
            1.0 + s
                * (SB[0]
                    + s * (SB[1]
                        + s * (SB[2] + s * (SB[3] + s * (SB[4] + s * (SB[5] + s * SB[6])))))),
        )
    };
    // z = a with the low 32 bits cleared, as fdlibm does, for an accurate exp(-z²).
    let z = f64::from_bits(a.to_bits() & 0xffff_ffff_0000_0000);
    let e = (-z * z - 0.5625).exp() * ((z - a) * (z + a) + r / ss).exp();
    sign * (1.0 - e / a)
}

const CHUNK: usize = 1 << 14;

// ---- GELU ----

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)), elementwise.
pub fn gelu_fwd(x: &Tensor) -> Tensor {
    dispatch!(x, gelu_host, cuda::transformer::gelu, x)
}

fn gelu_host<T: Elem>(x: &Tensor) -> Tensor {
    let xs = x.host::<T>();
    let mut out = vec![T::zero(); xs.len()];
    cpu::par_chunks(&mut out, CHUNK, CHUNK * 8, |i, o| {
        for (o, &v) in o.iter_mut().zip(&xs[i * CHUNK..]) {
            let v = v.f64();
            *o = T::of(0.5 * v * (1.0 + erf(v * std::f64::consts::FRAC_1_SQRT_2)));
        }
    });
    Tensor::from_vec(x.shape(), out)
}

/// dx = dy·(Φ(x) + x·φ(x)).
pub fn gelu_bwd(x: &Tensor, dy: &Tensor) -> Tensor {
    assert_same_place("gelu_bwd", &[x, dy]);
    assert_eq!(x.shape(), dy.shape(), "gelu_bwd: shapes");
    dispatch!(x, gelu_bwd_host, cuda::transformer::gelu_bwd, x, dy)
}

fn gelu_bwd_host<T: Elem>(x: &Tensor, dy: &Tensor) -> Tensor {
    let (xs, gs) = (x.host::<T>(), dy.host::<T>());
    let mut out = vec![T::zero(); xs.len()];
    let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    cpu::par_chunks(&mut out, CHUNK, CHUNK * 8, |i, o| {
        let s = i * CHUNK;
        for ((o, &v), &g) in o.iter_mut().zip(&xs[s..]).zip(&gs[s..]) {
            let v = v.f64();
            let cdf = 0.5 * (1.0 + erf(v * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = inv_sqrt_2pi * (-0.5 * v * v).exp();
            *o = T::of(g.f64() * (cdf + v * pdf));
        }
    });
    Tensor::from_vec(x.shape(), out)
}

pub fn gelu(t: &mut Tape, x: &Var) -> Var {
    let y = gelu_fwd(x.value());
    let saved = x.value().clone();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(gelu_bwd(&saved, g))])
    })
}

// ---- layer norm ----

/// Rows and columns of a tensor normalised over its last axis.
fn rows_cols(x: &Tensor) -> (usize, usize) {
    let c = *x.shape().last().expect("a tensor of rank ≥ 1");
    (x.numel() / c.max(1), c)
}

/// Layer norm over the last axis (PyTorch's `nn.LayerNorm(C)`: biased variance, `eps` inside the
/// root): y = (x − μ)/√(σ² + eps)·γ + β. Returns y, and the per-row mean and 1/√(σ² + eps) that the
/// backward uses.
pub fn layer_norm_fwd(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    let (_, c) = rows_cols(x);
    assert_eq!(gamma.shape(), &[c], "layer_norm: weight shape for {x:?}");
    assert_eq!(beta.shape(), &[c], "layer_norm: bias shape for {x:?}");
    assert_same_place("layer_norm", &[x, gamma, beta]);
    dispatch!(
        x,
        ln_host,
        cuda::transformer::layer_norm_fwd,
        x,
        gamma,
        beta,
        eps
    )
}

fn ln_host<T: Elem>(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    let (rows, c) = rows_cols(x);
    let (xs, g, b) = (x.host::<T>(), gamma.host::<T>(), beta.host::<T>());
    let mut y = vec![T::zero(); xs.len()];
    let mut stats = vec![(T::zero(), T::zero()); rows];
    let eps = T::of(eps);
    let cn = T::of(c as f64);
    y.par_chunks_mut(c.max(1))
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(r, (yr, st))| {
            let xr = &xs[r * c..(r + 1) * c];
            let mean = xr.iter().copied().sum::<T>() / cn;
            let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / cn;
            let rstd = T::one() / (var + eps).sqrt();
            for j in 0..c {
                yr[j] = (xr[j] - mean) * rstd * g[j] + b[j];
            }
            *st = (mean, rstd);
        });
    let shape_r = [rows];
    (
        Tensor::from_vec(x.shape(), y),
        Tensor::from_vec(&shape_r, stats.iter().map(|s| s.0).collect()),
        Tensor::from_vec(&shape_r, stats.iter().map(|s| s.1).collect()),
    )
}

/// The gradients of layer norm: (dx, dγ, dβ).
pub fn layer_norm_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    assert_eq!(x.shape(), dy.shape(), "layer_norm_bwd: shapes");
    assert_same_place("layer_norm_bwd", &[x, dy, gamma, mean, rstd]);
    dispatch!(
        x,
        ln_bwd_host,
        cuda::transformer::layer_norm_bwd,
        x,
        dy,
        gamma,
        mean,
        rstd
    )
}

fn ln_bwd_host<T: Elem>(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let (rows, c) = rows_cols(x);
    let (xs, gs, g) = (x.host::<T>(), dy.host::<T>(), gamma.host::<T>());
    let (mu, rs) = (mean.host::<T>(), rstd.host::<T>());
    let mut dx = vec![T::zero(); xs.len()];
    let cn = T::of(c as f64);
    dx.par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(r, dxr)| {
            let (xr, gr) = (&xs[r * c..(r + 1) * c], &gs[r * c..(r + 1) * c]);
            let (m, s) = (mu[r], rs[r]);
            // dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = dy·γ.
            let mut sum_g = T::zero();
            let mut sum_gx = T::zero();
            for j in 0..c {
                let gh = gr[j] * g[j];
                sum_g += gh;
                sum_gx += gh * (xr[j] - m) * s;
            }
            let (mg, mgx) = (sum_g / cn, sum_gx / cn);
            for j in 0..c {
                let xh = (xr[j] - m) * s;
                dxr[j] = s * (gr[j] * g[j] - mg - xh * mgx);
            }
        });
    // dγ and dβ: column sums over the rows, in row order (the same whatever the thread count).
    let mut dg = vec![T::zero(); c];
    let mut db = vec![T::zero(); c];
    for r in 0..rows {
        let (m, s) = (mu[r], rs[r]);
        for j in 0..c {
            let gv = gs[r * c + j];
            dg[j] += gv * (xs[r * c + j] - m) * s;
            db[j] += gv;
        }
    }
    (
        Tensor::from_vec(x.shape(), dx),
        Tensor::from_vec(&[c], dg),
        Tensor::from_vec(&[c], db),
    )
}

/// Layer norm over the last axis with weight γ and bias β.
pub fn layer_norm(t: &mut Tape, x: &Var, gamma: &Var, beta: &Var, eps: f64) -> Var {
    let (y, mean, rstd) = layer_norm_fwd(x.value(), gamma.value(), beta.value(), eps);
    let (xs, gs) = (x.value().clone(), gamma.value().clone());
    t.op(y, &[x, gamma, beta], move || {
        Box::new(move |g, needs| {
            let (dx, dg, db) = layer_norm_bwd(&xs, g, &gs, &mean, &rstd);
            vec![
                needs[0].then_some(dx),
                needs[1].then_some(dg),
                needs[2].then_some(db),
            ]
        })
    })
}

// ---- softmax over the last axis ----

pub fn softmax_fwd(x: &Tensor) -> Tensor {
    dispatch!(x, softmax_host, cuda::transformer::softmax, x)
}

fn softmax_host<T: Elem>(x: &Tensor) -> Tensor {
    let (_, c) = rows_cols(x);
    let mut y = x.host::<T>().to_vec();
    softmax_rows_inplace(&mut y, c);
    Tensor::from_vec(x.shape(), y)
}

fn softmax_rows_inplace<T: Elem>(y: &mut [T], c: usize) {
    let work = |row: &mut [T]| {
        let m = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut s = T::zero();
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        for v in row.iter_mut() {
            *v = *v / s;
        }
    };
    if y.len() * 4 < cpu::PAR_MIN_WORK {
        y.chunks_mut(c.max(1)).for_each(work);
    } else {
        y.par_chunks_mut(c.max(1)).for_each(work);
    }
}

/// dx = y ∘ (dy − Σ_j dy_j y_j) per row, from the softmax output y.
pub fn softmax_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    assert_eq!(y.shape(), dy.shape(), "softmax_bwd: shapes");
    assert_same_place("softmax_bwd", &[y, dy]);
    dispatch!(y, softmax_bwd_host, cuda::transformer::softmax_bwd, y, dy)
}

fn softmax_bwd_host<T: Elem>(y: &Tensor, dy: &Tensor) -> Tensor {
    let (_, c) = rows_cols(y);
    let mut dx = dy.host::<T>().to_vec();
    softmax_bwd_rows_inplace(y.host::<T>(), &mut dx, c);
    Tensor::from_vec(y.shape(), dx)
}

/// `dx` holds dy on entry and dx on return.
fn softmax_bwd_rows_inplace<T: Elem>(y: &[T], dx: &mut [T], c: usize) {
    let c = c.max(1);
    let work = |(r, row): (usize, &mut [T])| {
        let yr = &y[r * c..(r + 1) * c];
        let dot: T = row.iter().zip(yr).map(|(&g, &p)| g * p).sum();
        for (g, &p) in row.iter_mut().zip(yr) {
            *g = p * (*g - dot);
        }
    };
    if dx.len() * 4 < cpu::PAR_MIN_WORK {
        dx.chunks_mut(c).enumerate().for_each(work);
    } else {
        dx.par_chunks_mut(c).enumerate().for_each(work);
    }
}

/// Softmax over the last axis.
pub fn softmax(t: &mut Tape, x: &Var) -> Var {
    let y = softmax_fwd(x.value());
    let saved = y.clone();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(softmax_bwd(&saved, g))])
    })
}

// ---- batched matrix products ----

/// Shapes of a batched product: (batch, m, k, n) for op(A) [m, k] and op(B) [k, n].
fn bmm_dims(a: &[usize], ta: bool, b: &[usize], tb: bool) -> (usize, usize, usize, usize) {
    assert!(a.len() == 3 && b.len() == 3, "bmm of {a:?} and {b:?}");
    assert_eq!(a[0], b[0], "bmm: batch sizes differ ({a:?}, {b:?})");
    let (m, k) = if ta { (a[2], a[1]) } else { (a[1], a[2]) };
    let (k2, n) = if tb { (b[2], b[1]) } else { (b[1], b[2]) };
    assert_eq!(
        k, k2,
        "bmm: inner dimensions differ ({a:?} ta={ta}, {b:?} tb={tb})"
    );
    (a[0], m, k, n)
}

/// C[g] = op(A[g])·op(B[g]) for 3-D tensors [G, ·, ·] (cuBLAS strided-batched on the GPU).
pub fn bmm_fwd(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Tensor {
    assert_same_place("bmm", &[a, b]);
    let (g, m, k, n) = bmm_dims(a.shape(), ta, b.shape(), tb);
    dispatch!(
        a,
        bmm_host,
        cuda::transformer::bmm,
        a,
        ta,
        b,
        tb,
        g,
        m,
        k,
        n
    )
}

#[allow(clippy::too_many_arguments)]
fn bmm_host<T: Elem>(
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    g: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Tensor {
    let mut c = vec![T::zero(); g * m * n];
    bmm_slices(
        a.host::<T>(),
        ta,
        b.host::<T>(),
        tb,
        g,
        m,
        k,
        n,
        T::one(),
        &mut c,
    );
    Tensor::from_vec(&[g, m, n], c)
}

/// C[g] = alpha·op(A[g])·op(B[g]) over host slices (C overwritten), parallel over the batch.
#[allow(clippy::too_many_arguments)]
fn bmm_slices<T: Elem>(
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    g: usize,
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    c: &mut [T],
) {
    if m * n == 0 {
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    let one = |i: usize, cb: &mut [T]| {
        T::gemm(
            m,
            k,
            n,
            alpha,
            &a[i * m * k..(i + 1) * m * k],
            rsa,
            csa,
            &b[i * k * n..(i + 1) * k * n],
            rsb,
            csb,
            T::zero(),
            cb,
            n as isize,
            1,
        )
    };
    if g * m * n * k.max(1) < cpu::PAR_MIN_WORK * 4 {
        c.chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, cb)| one(i, cb));
    } else {
        c.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, cb)| one(i, cb));
    }
}

/// Batched op(A)·op(B) on the tape.
pub fn bmm(t: &mut Tape, a: &Var, ta: bool, b: &Var, tb: bool) -> Var {
    let y = bmm_fwd(a.value(), ta, b.value(), tb);
    let (sa, sb) = (a.value().clone(), b.value().clone());
    t.op(y, &[a, b], move || {
        Box::new(move |g, needs| {
            let da = needs[0].then(|| {
                if ta {
                    bmm_fwd(&sb, tb, g, true)
                } else {
                    bmm_fwd(g, false, &sb, !tb)
                }
            });
            let db = needs[1].then(|| {
                if tb {
                    bmm_fwd(g, true, &sa, ta)
                } else {
                    bmm_fwd(&sa, !ta, g, false)
                }
            });
            vec![da, db]
        })
    })
}

// ---- scaled dot-product attention ----

/// The layout of one attention call. `qkv` is [3, G, N, d] (q, k, v stacked; G = batch·heads, or
/// windows·batch·heads for Swin, with the head index fastest); the scores of group g get
/// `bias[g % heads]` and `mask[(g / heads) % windows]` added before the softmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub heads: usize,
    /// Windows per image (the mask's first dimension); 1 without a mask.
    pub windows: usize,
    /// Multiplies q·kᵀ (timm: head_dim^-0.5).
    pub scale: f64,
}

fn attn_dims(qkv: &Tensor) -> (usize, usize, usize) {
    assert!(
        qkv.rank() == 4 && qkv.dim(0) == 3,
        "attention: qkv must be [3, G, N, d], got {:?}",
        qkv.shape()
    );
    (qkv.dim(1), qkv.dim(2), qkv.dim(3))
}

fn check_attn(qkv: &Tensor, bias: Option<&Tensor>, mask: Option<&Tensor>, spec: &AttnSpec) {
    let (g, n, _) = attn_dims(qkv);
    assert!(
        spec.heads >= 1 && g % spec.heads == 0,
        "attention: {g} groups for {} heads",
        spec.heads
    );
    if let Some(b) = bias {
        assert_eq!(b.shape(), &[spec.heads, n, n], "attention: bias shape");
        assert_same_place("attention", &[qkv, b]);
    }
    if let Some(m) = mask {
        assert_eq!(m.shape(), &[spec.windows, n, n], "attention: mask shape");
        assert!(
            (g / spec.heads).is_multiple_of(spec.windows),
            "attention: {g} groups for {} windows",
            spec.windows
        );
        assert_same_place("attention", &[qkv, m]);
    }
}

/// softmax(scale·q kᵀ + bias + mask)·v for every group: returns the output [G, N, d] and the
/// probabilities [G, N, N] (saved for the backward).
pub fn attention_fwd(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
    spec: AttnSpec,
) -> (Tensor, Tensor) {
    check_attn(qkv, bias, mask, &spec);
    dispatch!(
        qkv,
        attention_host,
        cuda::transformer::attention_fwd,
        qkv,
        bias,
        mask,
        spec
    )
}

fn attention_host<T: Elem>(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
    spec: AttnSpec,
) -> (Tensor, Tensor) {
    let (g, n, d) = attn_dims(qkv);
    let all = qkv.host::<T>();
    let per = g * n * d;
    let (q, k, v) = (&all[..per], &all[per..2 * per], &all[2 * per..]);
    let mut p = vec![T::zero(); g * n * n];
    bmm_slices(q, false, k, true, g, n, d, n, T::of(spec.scale), &mut p);
    add_attn_bias::<T>(&mut p, bias, mask, &spec, n);
    softmax_rows_inplace(&mut p, n);
    let mut out = vec![T::zero(); per];
    bmm_slices(&p, false, v, false, g, n, n, d, T::one(), &mut out);
    (
        Tensor::from_vec(&[g, n, d], out),
        Tensor::from_vec(&[g, n, n], p),
    )
}

fn add_attn_bias<T: Elem>(
    s: &mut [T],
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
    spec: &AttnSpec,
    n: usize,
) {
    let nn = n * n;
    let (b, m) = (bias.map(|b| b.host::<T>()), mask.map(|m| m.host::<T>()));
    if b.is_none() && m.is_none() {
        return;
    }
    s.par_chunks_mut(nn).enumerate().for_each(|(gi, sg)| {
        if let Some(b) = b {
            let h = gi % spec.heads;
            for (x, &y) in sg.iter_mut().zip(&b[h * nn..(h + 1) * nn]) {
                *x += y;
            }
        }
        if let Some(m) = m {
            let w = (gi / spec.heads) % spec.windows;
            for (x, &y) in sg.iter_mut().zip(&m[w * nn..(w + 1) * nn]) {
                *x += y;
            }
        }
    });
}

/// The backward of `attention_fwd`: d(qkv) [3, G, N, d] and, when `want_bias`, d(bias) [heads, N, N].
pub fn attention_bwd(
    qkv: &Tensor,
    probs: &Tensor,
    dout: &Tensor,
    spec: AttnSpec,
    want_bias: bool,
) -> (Tensor, Option<Tensor>) {
    let (g, n, d) = attn_dims(qkv);
    assert_eq!(probs.shape(), &[g, n, n], "attention_bwd: probabilities");
    assert_eq!(dout.shape(), &[g, n, d], "attention_bwd: output gradient");
    assert_same_place("attention_bwd", &[qkv, probs, dout]);
    dispatch!(
        qkv,
        attention_bwd_host,
        cuda::transformer::attention_bwd,
        qkv,
        probs,
        dout,
        spec,
        want_bias
    )
}

fn attention_bwd_host<T: Elem>(
    qkv: &Tensor,
    probs: &Tensor,
    dout: &Tensor,
    spec: AttnSpec,
    want_bias: bool,
) -> (Tensor, Option<Tensor>) {
    let (g, n, d) = attn_dims(qkv);
    let all = qkv.host::<T>();
    let per = g * n * d;
    let (q, k, v) = (&all[..per], &all[per..2 * per], &all[2 * per..]);
    let (p, go) = (probs.host::<T>(), dout.host::<T>());
    let mut dqkv = vec![T::zero(); 3 * per];
    // dV = Pᵀ dO; dP = dO Vᵀ; dS = softmax_bwd(P, dP); dQ = scale dS K; dK = scale dSᵀ Q.
    let mut ds = vec![T::zero(); g * n * n];
    bmm_slices(go, false, v, true, g, n, d, n, T::one(), &mut ds);
    softmax_bwd_rows_inplace(p, &mut ds, n);
    let (dq, rest) = dqkv.split_at_mut(per);
    let (dk, dv) = rest.split_at_mut(per);
    bmm_slices(p, true, go, false, g, n, n, d, T::one(), dv);
    let sc = T::of(spec.scale);
    bmm_slices(&ds, false, k, false, g, n, n, d, sc, dq);
    bmm_slices(&ds, true, q, false, g, n, n, d, sc, dk);
    let dbias = want_bias.then(|| {
        let nn = n * n;
        let mut db = vec![T::zero(); spec.heads * nn];
        for gi in 0..g {
            let h = gi % spec.heads;
            for (o, &x) in db[h * nn..(h + 1) * nn]
                .iter_mut()
                .zip(&ds[gi * nn..(gi + 1) * nn])
            {
                *o += x;
            }
        }
        Tensor::from_vec(&[spec.heads, n, n], db)
    });
    (Tensor::from_vec(&[3, g, n, d], dqkv), dbias)
}

/// Scaled dot-product attention over packed `qkv` [3, G, N, d] → [G, N, d], with an optional
/// trainable additive `bias` [heads, N, N] and a constant additive `mask` [windows, N, N].
pub fn attention(
    t: &mut Tape,
    qkv: &Var,
    bias: Option<&Var>,
    mask: Option<&Tensor>,
    spec: AttnSpec,
) -> Var {
    let (out, probs) = attention_fwd(qkv.value(), bias.map(|b| b.value()), mask, spec);
    let saved = qkv.value().clone();
    let mut inputs = vec![qkv];
    if let Some(b) = bias {
        inputs.push(b);
    }
    let has_bias = bias.is_some();
    t.op(out, &inputs, move || {
        Box::new(move |g, needs| {
            let want_bias = has_bias && needs[1];
            let (dqkv, db) = attention_bwd(&saved, &probs, g, spec, want_bias);
            let mut v = vec![needs[0].then_some(dqkv)];
            if has_bias {
                v.push(db);
            }
            v
        })
    })
}
