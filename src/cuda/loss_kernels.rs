//! Launchers of the loss and head kernels (loss.cu, head.cu, reduce.cu): NaC and softmax CE fused
//! forward+backward, the SC loss around two cuBLAS Gram products, PEDCC prediction with accuracy
//! counting, and the device-side running sums the trainer reads once per epoch.
//!
//! Labels, predictions and counters are i32 values stored bit for bit in a GPU tensor's 32-bit
//! words (`labels_to_gpu`, `ints_to_host`); such a tensor must not be read as f32 data.

use super::launch::{check, column_tiles, func, gpu_of, grid_1d, one_block, per_row, NULL};
use super::nn_kernels::{l2norm_rows_bwd, l2norm_rows_fwd};
use super::{blas, buf, tensor, Gpu};
use crate::tensor::Tensor;
use cudarc::driver::PushKernelArg;
use std::sync::Arc;

/// The eps of x̃ = x / max(‖x‖, eps) in SC (PyTorch's F.normalize default).
pub const SC_NORMALIZE_EPS: f64 = 1e-12;

/// The NaC denominator the kernel computes (DESIGN.md §1.6): the paper's ‖x‖ + δ …
pub const NAC_PAPER: i32 = 0;
/// … or the reference code's √(‖x‖² + δ²). `loss::Variant::nac_form` picks one.
pub const NAC_REFERENCE: i32 = 1;

/// i32 values (labels) into a GPU tensor of shape [len].
pub fn labels_to_gpu(gpu: &Arc<Gpu>, labels: &[i32]) -> Tensor {
    tensor(&[labels.len()], gpu.upload_i32(labels))
}

/// The i32 values of a labels/predictions/counter tensor.
pub fn ints_to_host(t: &Tensor) -> Vec<i32> {
    buf(t).to_host_i32()
}

/// A zeroed [1] accumulator (f32 sum, or i32 counter: zero bits are zero in both).
pub fn accumulator(gpu: &Arc<Gpu>) -> Tensor {
    tensor(&[1], gpu.alloc_zeros(1))
}

/// acc[0] = (accumulate ? acc[0] : 0) + Σ x, on the device (deterministic single-block sum).
pub fn sum_into(acc: &Tensor, x: &Tensor, accumulate: bool) {
    let gpu = gpu_of(acc);
    let f = func(&gpu, "reduce", "sum_into_f32");
    let (n64, a32) = (x.numel() as i64, accumulate as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(buf(acc).raw()).arg(buf(x).raw()).arg(&n64).arg(&a32);
    // SAFETY: matches sum_into_f32(float*, const float*, i64, int); acc holds one float.
    check(unsafe { l.launch(one_block()) }, "sum_into_f32");
}

/// Σ x as a new [1] tensor.
pub fn sum(x: &Tensor) -> Tensor {
    let acc = tensor(&[1], gpu_of(x).alloc(1));
    sum_into(&acc, x, false);
    acc
}

/// ‖x_r‖ per row of a [rows, cols] tensor → [rows].
pub fn row_norms(x: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let (rows, cols) = (x.dim(0), x.dim(1));
    let mut out = gpu.alloc(rows);
    if rows > 0 {
        let f = func(&gpu, "reduce", "row_norms_f32");
        let (r32, c32) = (rows as i32, cols as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(buf(x).raw()).arg(&r32).arg(&c32);
        // SAFETY: matches row_norms_f32(float*, const float*, int, int).
        check(unsafe { l.launch(per_row(rows)) }, "row_norms_f32");
    }
    tensor(&[rows], out)
}

/// NaC loss and its gradient, from one pass over x.
pub struct Nac {
    /// L_NaC = (1/B) Σ (1 − c_b)², shape [1].
    pub loss: Tensor,
    /// ∂L_NaC/∂x, [B, n].
    pub dx: Tensor,
    /// ‖x_b‖ per row [B] (for the δ schedule's mean ‖x‖).
    pub norms: Tensor,
}

/// NaC forward and backward: x [B, n], p [K, n] (PEDCC, unit rows), labels i32 [B], δ ≥ 0.
pub fn nac_fwd_bwd(x: &Tensor, p: &Tensor, labels: &Tensor, delta: f64, nac_form: i32) -> Nac {
    let rows = nac_rows(x, p, labels, delta, nac_form, false);
    Nac {
        loss: sum(&rows.row_loss),
        dx: rows.dx,
        norms: rows.norms,
    }
}

/// What one pass of `nac_fwd_bwd_f32` over the rows leaves.
pub struct NacRows {
    /// Each row's share of L_NaC, [B].
    pub row_loss: Tensor,
    /// ∂L_NaC/∂x, [B, n].
    pub dx: Tensor,
    /// ‖x_b‖, [B].
    pub norms: Tensor,
    /// With `with_d`: SC's D = x̃ − P[labels], [B, n] (x̃ = x / max(‖x‖, `SC_NORMALIZE_EPS`)).
    pub d: Option<Tensor>,
}

/// The NaC row pass, and with `with_d` also SC's D in the same pass (the fused POD head,
/// `cuda::pod_head`).
pub fn nac_rows(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    delta: f64,
    nac_form: i32,
    with_d: bool,
) -> NacRows {
    let gpu = gpu_of(x);
    let (b, n) = (x.dim(0), x.dim(1));
    assert_eq!(p.dim(1), n, "nac: PEDCC width {} vs features {n}", p.dim(1));
    assert_eq!(
        labels.numel(),
        b,
        "nac: {} labels for {b} rows",
        labels.numel()
    );
    let mut row_loss = gpu.alloc(b);
    let mut dx = gpu.alloc(b * n);
    let mut norms = gpu.alloc(b);
    let mut d = with_d.then(|| gpu.alloc(b * n));
    if b > 0 {
        let f = func(&gpu, "loss", "nac_fwd_bwd_f32");
        let (b32, n32, d32) = (b as i32, n as i32, delta as f32);
        assert!(
            nac_form == NAC_PAPER || nac_form == NAC_REFERENCE,
            "nac: unknown form {nac_form}"
        );
        let (v32, eps) = (nac_form, SC_NORMALIZE_EPS as f32);
        let d_ptr = d.as_ref().map_or(NULL, |d| d.device_ptr());
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(row_loss.raw_mut())
            .arg(dx.raw_mut())
            .arg(norms.raw_mut())
            .arg(&d_ptr)
            .arg(buf(x).raw())
            .arg(buf(p).raw())
            .arg(buf(labels).raw())
            .arg(&b32)
            .arg(&n32)
            .arg(&d32)
            .arg(&v32)
            .arg(&eps);
        // SAFETY: matches nac_fwd_bwd_f32(float*, float*, float*, float*, const float*, const
        // float*, const int*, int, int, float, int, float); D is null or B·n floats; labels index
        // rows of p (validated by the data loader).
        check(unsafe { l.launch(per_row(b)) }, "nac_fwd_bwd_f32");
    }
    NacRows {
        row_loss: tensor(&[b], row_loss),
        dx: tensor(&[b, n], dx),
        norms: tensor(&[b], norms),
        d: d.take().map(|d| tensor(&[b, n], d)),
    }
}

/// SC loss and its gradient with respect to x.
pub struct Sc {
    /// L_SC, shape [1].
    pub loss: Tensor,
    /// ∂L_SC/∂x, [B, n].
    pub dx: Tensor,
}

/// SC step 1: D = x̃ − P[labels], [B, n] (each normalised row minus its class centroid).
pub fn sc_diff(xt: &Tensor, p: &Tensor, labels: &Tensor) -> Tensor {
    let gpu = gpu_of(xt);
    let (b, n) = (xt.dim(0), xt.dim(1));
    assert_eq!(
        p.dim(1),
        n,
        "sc_diff: PEDCC width {} vs features {n}",
        p.dim(1)
    );
    assert_eq!(
        labels.numel(),
        b,
        "sc_diff: {} labels for {b} rows",
        labels.numel()
    );
    let mut d = gpu.alloc(b * n);
    if b * n > 0 {
        let f = func(&gpu, "loss", "sc_diff_f32");
        let (b32, n32) = (b as i32, n as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(d.raw_mut())
            .arg(buf(xt).raw())
            .arg(buf(p).raw())
            .arg(buf(labels).raw())
            .arg(&b32)
            .arg(&n32);
        // SAFETY: matches sc_diff_f32(float*, const float*, const float*, const int*, int, int);
        // labels index rows of p (validated by the data loader).
        check(unsafe { l.launch(grid_1d(&gpu, b * n)) }, "sc_diff_f32");
    }
    tensor(&[b, n], d)
}

/// SC step 2: s[c] = Σ_b D[b, c]² → [n] (the diagonal of DᵀD).
pub fn col_sumsq(d: &Tensor) -> Tensor {
    let gpu = gpu_of(d);
    let (b, n) = (d.dim(0), d.dim(1));
    let mut s = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "loss", "col_sumsq_f32");
        let (b32, n32) = (b as i32, n as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(s.raw_mut()).arg(buf(d).raw()).arg(&b32).arg(&n32);
        // SAFETY: matches col_sumsq_f32(float*, const float*, int, int); s holds n floats.
        check(unsafe { l.launch(column_tiles(n)) }, "col_sumsq_f32");
    }
    tensor(&[n], s)
}

/// SC step 3: norm·(‖M‖²_F − ‖s‖²) → [1], for a square M (the B×B Gram DDᵀ or the n×n DᵀD: both
/// have the same Frobenius norm) and s [n] from `col_sumsq`.
pub fn sc_loss(m: &Tensor, s: &Tensor, norm: f64) -> Tensor {
    let gpu = gpu_of(m);
    let side = m.dim(0);
    assert_eq!(
        m.shape(),
        &[side, side],
        "sc_loss: M must be square, got {:?}",
        m.shape()
    );
    let (side32, n32) = (side as i32, s.numel() as i32);
    let mut loss = gpu.alloc(1);
    let f = func(&gpu, "loss", "sc_loss_f32");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(loss.raw_mut())
        .arg(buf(m).raw())
        .arg(buf(s).raw())
        .arg(&side32)
        .arg(&n32)
        .arg(&norm);
    // SAFETY: matches sc_loss_f32(float*, const float*, const float*, int, int, double): M holds
    // side² floats, s holds n.
    check(unsafe { l.launch(one_block()) }, "sc_loss_f32");
    tensor(&[1], loss)
}

/// SC step 4: ∂L/∂D = 4·norm·(MD − D∘s) → [B, n], with MD = G·D (Gram form) or D·C (n×n form).
pub fn sc_grad(md: &Tensor, d: &Tensor, s: &Tensor, norm: f64) -> Tensor {
    let gpu = gpu_of(d);
    let (b, n) = (d.dim(0), d.dim(1));
    assert_eq!(md.shape(), d.shape(), "sc_grad: MD and D shapes differ");
    assert_eq!(s.numel(), n, "sc_grad: s must have {n} values");
    let mut dd = gpu.alloc(b * n);
    if b * n > 0 {
        let f = func(&gpu, "loss", "sc_grad_f32");
        let (b32, n32, norm32) = (b as i32, n as i32, norm as f32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dd.raw_mut())
            .arg(buf(md).raw())
            .arg(buf(d).raw())
            .arg(buf(s).raw())
            .arg(&b32)
            .arg(&n32)
            .arg(&norm32);
        // SAFETY: matches sc_grad_f32(float*, const float*, const float*, const float*, int, int,
        // float).
        check(unsafe { l.launch(grid_1d(&gpu, b * n)) }, "sc_grad_f32");
    }
    tensor(&[b, n], dd)
}

/// SC forward and backward (DESIGN.md §1.4) through the B×B Gram matrix:
/// x̃ = x/max(‖x‖, 1e-12); D = x̃ − P_Y; s = column sums of D²; G = D Dᵀ (cuBLAS);
/// L = (‖G‖²_F − Σ s²)·norm; ∂L/∂D = 4·norm·(G D − D∘s) (G D by cuBLAS); ∂L/∂x through the
/// normalisation. norm = 1/(B−1)² (paper) or 1/((B−1)²(n−1)) (reference): the caller's
/// `loss::sc::sc_coefficient`. Needs B ≥ 2.
pub fn sc_fwd_bwd(x: &Tensor, p: &Tensor, labels: &Tensor, norm: f64) -> Sc {
    let gpu = gpu_of(x);
    let (b, n) = (x.dim(0), x.dim(1));
    assert!(b >= 2, "SC needs a batch of at least 2 rows, got {b}");
    let (xt, norms) = l2norm_rows_fwd(x, SC_NORMALIZE_EPS);
    let d = sc_diff(&xt, p, labels);
    let s = col_sumsq(&d);
    // True fp32 for both products whatever the math mode: the value and the gradient are what is
    // left after large terms cancel (see loss::sc).
    let _fp32 = super::math_mode_scope(super::MathMode::Fp32);
    // G = D Dᵀ  [B, B]
    let mut g = gpu.alloc(b * b);
    blas::gemm(
        &gpu,
        b,
        n,
        b,
        1.0,
        buf(&d),
        false,
        buf(&d),
        true,
        0.0,
        &mut g,
    );
    let g = tensor(&[b, b], g);
    let loss = sc_loss(&g, &s, norm);
    // GD = G D  [B, n]
    let mut gd = gpu.alloc(b * n);
    blas::gemm(
        &gpu,
        b,
        b,
        n,
        1.0,
        buf(&g),
        false,
        buf(&d),
        false,
        0.0,
        &mut gd,
    );
    let dd = sc_grad(&tensor(&[b, n], gd), &d, &s, norm);
    let dx = l2norm_rows_bwd(&dd, &xt, &norms, SC_NORMALIZE_EPS);
    Sc { loss, dx }
}

/// Softmax cross-entropy forward and backward: logits [B, K], labels i32 [B] →
/// (mean loss [1], ∂loss/∂logits [B, K]).
pub fn softmax_ce_fwd_bwd(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let gpu = gpu_of(logits);
    let (b, k) = (logits.dim(0), logits.dim(1));
    assert_eq!(
        labels.numel(),
        b,
        "softmax_ce: {} labels for {b} rows",
        labels.numel()
    );
    let mut row_loss = gpu.alloc(b);
    let mut dz = gpu.alloc(b * k);
    if b > 0 {
        let f = func(&gpu, "loss", "softmax_ce_f32");
        let (b32, k32) = (b as i32, k as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(row_loss.raw_mut())
            .arg(dz.raw_mut())
            .arg(buf(logits).raw())
            .arg(buf(labels).raw())
            .arg(&b32)
            .arg(&k32);
        // SAFETY: matches softmax_ce_f32(float*, float*, const float*, const int*, int, int).
        check(unsafe { l.launch(per_row(b)) }, "softmax_ce_f32");
    }
    let row_loss = tensor(&[b], row_loss);
    (sum(&row_loss), tensor(&[b, k], dz))
}

/// Predictions argmax_k logits[r, k] → i32 [rows]. With `labels` and `correct` (an i32 [1]
/// accumulator, see `accumulator`), adds the number of correct predictions to `correct` on the device.
pub fn argmax_rows(logits: &Tensor, labels: Option<&Tensor>, correct: Option<&Tensor>) -> Tensor {
    let gpu = gpu_of(logits);
    let (rows, k) = (logits.dim(0), logits.dim(1));
    let mut pred = gpu.alloc(rows);
    if rows > 0 {
        let f = func(&gpu, "head", "argmax_rows_f32");
        let (r32, k32) = (rows as i32, k as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(pred.raw_mut());
        match correct {
            Some(c) => l.arg(buf(c).raw()),
            None => l.arg(&NULL),
        };
        l.arg(buf(logits).raw());
        match labels {
            Some(y) => l.arg(buf(y).raw()),
            None => l.arg(&NULL),
        };
        l.arg(&r32).arg(&k32);
        // SAFETY: matches argmax_rows_f32(int*, int*, const float*, const int*, int, int); null
        // pointers are allowed for the optional two.
        check(unsafe { l.launch(per_row(rows)) }, "argmax_rows_f32");
    }
    tensor(&[rows], pred)
}

/// PEDCC prediction without materialising the logits: argmax_k ⟨x_r, p_k⟩ → i32 [rows]; counts
/// correct predictions into `correct` like `argmax_rows`.
pub fn pedcc_predict(
    x: &Tensor,
    p: &Tensor,
    labels: Option<&Tensor>,
    correct: Option<&Tensor>,
) -> Tensor {
    let gpu = gpu_of(x);
    let (rows, n) = (x.dim(0), x.dim(1));
    let k = p.dim(0);
    assert_eq!(
        p.dim(1),
        n,
        "pedcc_predict: PEDCC width {} vs features {n}",
        p.dim(1)
    );
    let mut pred = gpu.alloc(rows);
    if rows > 0 {
        let f = func(&gpu, "head", "pedcc_predict_f32");
        let (r32, n32, k32) = (rows as i32, n as i32, k as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(pred.raw_mut());
        match correct {
            Some(c) => l.arg(buf(c).raw()),
            None => l.arg(&NULL),
        };
        l.arg(buf(x).raw()).arg(buf(p).raw());
        match labels {
            Some(y) => l.arg(buf(y).raw()),
            None => l.arg(&NULL),
        };
        l.arg(&r32).arg(&n32).arg(&k32);
        // SAFETY: matches pedcc_predict_f32(int*, int*, const float*, const float*, const int*,
        // int, int, int).
        check(unsafe { l.launch(per_row(rows)) }, "pedcc_predict_f32");
    }
    tensor(&[rows], pred)
}
