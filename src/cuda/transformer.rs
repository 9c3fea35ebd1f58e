//! Launchers of the transformer ops (`cuda/transformer.cu` and cuBLAS strided-batched GEMMs): the
//! CUDA arms of `ops::transformer` and `ops::tokens`. Same rules as `cuda::kernels`: GPU tensors in,
//! GPU tensors out, work queued on the device's stream without a synchronisation.
//!
//! - `gelu(x)`, `gelu_bwd(x, dy)`
//! - `layer_norm_fwd(x, g, b, eps) -> (y, mean, rstd)`, `layer_norm_bwd(x, dy, g, mean, rstd) ->
//!   (dx, dg, db)`
//! - `softmax(x)`, `softmax_bwd(y, dy)` (rows of the last axis)
//! - `bmm(a, ta, b, tb, g, m, k, n)` (cuBLAS `sgemmStridedBatched`)
//! - `attention_fwd(qkv, bias, mask, spec) -> (out, probs)`, `attention_bwd(qkv, probs, dout, spec,
//!   want_bias) -> (dqkv, dbias)`
//! - `permute(x, dims)`, `narrow(x, axis, start, len)`, `narrow_bwd(dy, full, axis, start)`,
//!   `roll2d(x, sh, sw)`, `gather_rows(table, idx)`, `scatter_rows(dy, idx)`, `scale_rows(x, s)`

use super::launch::{check, column_tiles, func, gpu_of, grid_1d, per_row, NULL};
use super::libs::{self, Lib};
use super::{buf, math_mode, tensor, Gpu};
use crate::ops::{AttnSpec, RowIndex};
use crate::tensor::Tensor;
use cudarc::driver::PushKernelArg;

fn unary(x: &Tensor, name: &'static str) -> Tensor {
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "transformer", name);
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(buf(x).raw()).arg(&n64);
        // SAFETY: matches `name(float*, const float*, i64)`; both buffers hold n floats.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, name);
    }
    tensor(x.shape(), out)
}

pub fn gelu(x: &Tensor) -> Tensor {
    unary(x, "gelu_f32")
}

pub fn gelu_bwd(x: &Tensor, dy: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "transformer", "gelu_bwd_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(dy).raw())
            .arg(&n64);
        // SAFETY: matches `gelu_bwd_f32(float*, const float*, const float*, i64)`.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "gelu_bwd_f32");
    }
    tensor(x.shape(), out)
}

fn rows_cols(x: &Tensor) -> (usize, usize) {
    let c = *x.shape().last().expect("rank ≥ 1");
    (x.numel() / c.max(1), c)
}

pub fn layer_norm_fwd(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let gpu = gpu_of(x);
    let (rows, c) = rows_cols(x);
    let mut y = gpu.alloc(rows * c);
    let mut mean = gpu.alloc(rows);
    let mut rstd = gpu.alloc(rows);
    if rows > 0 && c > 0 {
        let f = func(&gpu, "transformer", "layer_norm_fwd_f32");
        let (r32, c32, e32) = (rows as i32, c as i32, eps as f32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut())
            .arg(mean.raw_mut())
            .arg(rstd.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(g).raw())
            .arg(buf(b).raw())
            .arg(&r32)
            .arg(&c32)
            .arg(&e32);
        // SAFETY: matches layer_norm_fwd_f32(float* x3, const float* x3, int, int, float).
        check(unsafe { l.launch(per_row(rows)) }, "layer_norm_fwd_f32");
    }
    (
        tensor(x.shape(), y),
        tensor(&[rows], mean),
        tensor(&[rows], rstd),
    )
}

pub fn layer_norm_bwd(
    x: &Tensor,
    dy: &Tensor,
    g: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let gpu = gpu_of(x);
    let (rows, c) = rows_cols(x);
    let mut dx = gpu.alloc(rows * c);
    let mut dg = gpu.alloc(c);
    let mut db = gpu.alloc(c);
    if rows > 0 && c > 0 {
        let (r32, c32) = (rows as i32, c as i32);
        let f = func(&gpu, "transformer", "layer_norm_bwd_dx_f32");
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(dy).raw())
            .arg(buf(g).raw())
            .arg(buf(mean).raw())
            .arg(buf(rstd).raw())
            .arg(&r32)
            .arg(&c32);
        // SAFETY: matches layer_norm_bwd_dx_f32(float*, const float* x5, int, int).
        check(unsafe { l.launch(per_row(rows)) }, "layer_norm_bwd_dx_f32");
        let f = func(&gpu, "transformer", "layer_norm_bwd_params_f32");
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dg.raw_mut())
            .arg(db.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(dy).raw())
            .arg(buf(mean).raw())
            .arg(buf(rstd).raw())
            .arg(&r32)
            .arg(&c32);
        // SAFETY: matches layer_norm_bwd_params_f32(float* x2, const float* x4, int, int).
        check(
            unsafe { l.launch(column_tiles(c)) },
            "layer_norm_bwd_params_f32",
        );
    }
    (tensor(x.shape(), dx), tensor(&[c], dg), tensor(&[c], db))
}

/// Softmax of `rows` rows of `c` values at `src` into `dst` (may be the same address).
fn softmax_rows_raw(gpu: &std::sync::Arc<Gpu>, dst: u64, src: u64, rows: usize, c: usize) {
    if rows == 0 || c == 0 {
        return;
    }
    let f = func(gpu, "transformer", "softmax_rows_f32");
    let (r32, c32) = (rows as i32, c as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&dst).arg(&src).arg(&r32).arg(&c32);
    // SAFETY: matches softmax_rows_f32(float*, const float*, int, int); both hold rows·c floats.
    check(unsafe { l.launch(per_row(rows)) }, "softmax_rows_f32");
}

fn softmax_bwd_raw(gpu: &std::sync::Arc<Gpu>, dx: u64, y: u64, dy: u64, rows: usize, c: usize) {
    if rows == 0 || c == 0 {
        return;
    }
    let f = func(gpu, "transformer", "softmax_bwd_rows_f32");
    let (r32, c32) = (rows as i32, c as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&dx).arg(&y).arg(&dy).arg(&r32).arg(&c32);
    // SAFETY: matches softmax_bwd_rows_f32(float*, const float*, const float*, int, int).
    check(unsafe { l.launch(per_row(rows)) }, "softmax_bwd_rows_f32");
}

pub fn softmax(x: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let (rows, c) = rows_cols(x);
    let out = gpu.alloc(rows * c);
    softmax_rows_raw(&gpu, out.device_ptr(), buf(x).device_ptr(), rows, c);
    tensor(x.shape(), out)
}

pub fn softmax_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    let gpu = gpu_of(y);
    let (rows, c) = rows_cols(y);
    let out = gpu.alloc(rows * c);
    softmax_bwd_raw(
        &gpu,
        out.device_ptr(),
        buf(y).device_ptr(),
        buf(dy).device_ptr(),
        rows,
        c,
    );
    tensor(y.shape(), out)
}

/// Row-major strided-batched `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]` on device addresses
/// (op(A) [m, k], op(B) [k, n], C [m, n]; strides in elements), with the column-major mapping of
/// `blas::gemm`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided_batched(
    gpu: &Gpu,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: (u64, bool, usize),
    b: (u64, bool, usize),
    beta: f32,
    c: (u64, usize),
) {
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    let report = libs::ensure_loaded();
    assert!(
        report.has(Lib::Cublas),
        "cuBLAS is not available ({})",
        report.missing_message(&[Lib::Cublas])
    );
    let blas = super::blas::handle(gpu).unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
    gpu.ctx
        .bind_to_thread()
        .unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
    blas.set_mode(math_mode());
    let ((pa, ta, sa), (pb, tb, sb), (pc, sc)) = (a, b, c);
    let (op_b, ld_b) = super::blas::col_major_operand(tb, k, n);
    let (op_a, ld_a) = super::blas::col_major_operand(ta, m, k);
    // SAFETY: the addresses point into live device buffers holding `batch` matrices at the given
    // strides (checked by the callers); the handle is bound to their stream.
    let r = unsafe {
        cudarc::cublas::result::sgemm_strided_batched(
            blas.raw(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            &alpha,
            pb as *const f32,
            ld_b.max(1) as i32,
            sb as i64,
            pa as *const f32,
            ld_a.max(1) as i32,
            sa as i64,
            &beta,
            pc as *mut f32,
            n as i32,
            sc as i64,
            batch as i32,
        )
    };
    r.unwrap_or_else(|e| {
        panic!("cuBLAS sgemmStridedBatched (batch={batch} m={m} k={k} n={n}) failed: {e:?}")
    });
}

#[allow(clippy::too_many_arguments)]
pub fn bmm(
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    g: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Tensor {
    let gpu = gpu_of(a);
    let out = gpu.alloc(g * m * n);
    gemm_strided_batched(
        &gpu,
        g,
        m,
        k,
        n,
        1.0,
        (buf(a).device_ptr(), ta, m * k),
        (buf(b).device_ptr(), tb, k * n),
        0.0,
        (out.device_ptr(), m * n),
    );
    tensor(&[g, m, n], out)
}

pub fn attention_fwd(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
    spec: AttnSpec,
) -> (Tensor, Tensor) {
    let gpu = gpu_of(qkv);
    let (g, n, d) = (qkv.dim(1), qkv.dim(2), qkv.dim(3));
    let per = g * n * d;
    let base = buf(qkv).device_ptr();
    let (q, k, v) = (base, base + 4 * per as u64, base + 8 * per as u64);
    let probs = gpu.alloc(g * n * n);
    let p = probs.device_ptr();
    let scale = spec.scale as f32;
    gemm_strided_batched(
        &gpu,
        g,
        n,
        d,
        n,
        scale,
        (q, false, n * d),
        (k, true, n * d),
        0.0,
        (p, n * n),
    );
    if bias.is_some() || mask.is_some() {
        let f = func(&gpu, "transformer", "attn_bias_add_f32");
        let bp = bias.map_or(NULL, |b| buf(b).device_ptr());
        let mp = mask.map_or(NULL, |m| buf(m).device_ptr());
        let (g32, h32, w32, nn32) = (
            g as i32,
            spec.heads as i32,
            spec.windows as i32,
            (n * n) as i32,
        );
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&p)
            .arg(&bp)
            .arg(&mp)
            .arg(&g32)
            .arg(&h32)
            .arg(&w32)
            .arg(&nn32);
        // SAFETY: matches attn_bias_add_f32(float*, const float*, const float*, int x4); the bias
        // and mask hold heads·nn and windows·nn floats (checked by the op).
        check(
            unsafe { l.launch(grid_1d(&gpu, g * n * n)) },
            "attn_bias_add_f32",
        );
    }
    softmax_rows_raw(&gpu, p, p, g * n, n);
    let out = gpu.alloc(per);
    gemm_strided_batched(
        &gpu,
        g,
        n,
        n,
        d,
        1.0,
        (p, false, n * n),
        (v, false, n * d),
        0.0,
        (out.device_ptr(), n * d),
    );
    (tensor(&[g, n, d], out), tensor(&[g, n, n], probs))
}

pub fn attention_bwd(
    qkv: &Tensor,
    probs: &Tensor,
    dout: &Tensor,
    spec: AttnSpec,
    want_bias: bool,
) -> (Tensor, Option<Tensor>) {
    let gpu = gpu_of(qkv);
    let (g, n, d) = (qkv.dim(1), qkv.dim(2), qkv.dim(3));
    let per = g * n * d;
    let base = buf(qkv).device_ptr();
    let (q, k, v) = (base, base + 4 * per as u64, base + 8 * per as u64);
    let (p, go) = (buf(probs).device_ptr(), buf(dout).device_ptr());
    let ds = gpu.alloc(g * n * n);
    let dsp = ds.device_ptr();
    // dP = dO Vᵀ, then dS = softmax_bwd(P, dP) in place.
    gemm_strided_batched(
        &gpu,
        g,
        n,
        d,
        n,
        1.0,
        (go, false, n * d),
        (v, true, n * d),
        0.0,
        (dsp, n * n),
    );
    softmax_bwd_raw(&gpu, dsp, p, dsp, g * n, n);
    let dqkv = gpu.alloc(3 * per);
    let dbase = dqkv.device_ptr();
    let (dq, dk, dv) = (dbase, dbase + 4 * per as u64, dbase + 8 * per as u64);
    let sc = spec.scale as f32;
    gemm_strided_batched(
        &gpu,
        g,
        n,
        n,
        d,
        1.0,
        (p, true, n * n),
        (go, false, n * d),
        0.0,
        (dv, n * d),
    );
    gemm_strided_batched(
        &gpu,
        g,
        n,
        n,
        d,
        sc,
        (dsp, false, n * n),
        (k, false, n * d),
        0.0,
        (dq, n * d),
    );
    gemm_strided_batched(
        &gpu,
        g,
        n,
        n,
        d,
        sc,
        (dsp, true, n * n),
        (q, false, n * d),
        0.0,
        (dk, n * d),
    );
    let dbias = want_bias.then(|| {
        let mut db = gpu.alloc(spec.heads * n * n);
        let f = func(&gpu, "transformer", "attn_bias_grad_f32");
        let (g32, h32, nn32) = (g as i32, spec.heads as i32, (n * n) as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(db.raw_mut()).arg(&dsp).arg(&g32).arg(&h32).arg(&nn32);
        // SAFETY: matches attn_bias_grad_f32(float*, const float*, int, int, int).
        check(
            unsafe { l.launch(grid_1d(&gpu, spec.heads * n * n)) },
            "attn_bias_grad_f32",
        );
        tensor(&[spec.heads, n, n], db)
    });
    // Dropping `ds` while kernels that read it are queued is safe: the pool hands its block only to
    // work queued later on the same stream.
    drop(ds);
    (tensor(&[3, g, n, d], dqkv), dbias)
}

pub fn permute(x: &Tensor, dims: &[usize]) -> Tensor {
    let (oshape, istr) = crate::ops::permute_plan(x.shape(), dims);
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        // Pad to 6 axes at the front: size 1, stride 0.
        let pad = crate::ops::MAX_PERMUTE_RANK - oshape.len();
        let mut d = [1i64; 6];
        let mut s = [0i64; 6];
        for i in 0..oshape.len() {
            d[pad + i] = oshape[i] as i64;
            s[pad + i] = istr[i] as i64;
        }
        let f = func(&gpu, "transformer", "permute_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(buf(x).raw()).arg(&n64);
        for v in d.iter().chain(s.iter()) {
            l.arg(v);
        }
        // SAFETY: matches permute_f32(float*, const float*, i64, i64 x 12).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "permute_f32");
    }
    tensor(&oshape, out)
}

fn around(shape: &[usize], axis: usize) -> (i64, i64, i64) {
    (
        shape[..axis].iter().product::<usize>() as i64,
        shape[axis] as i64,
        shape[axis + 1..].iter().product::<usize>() as i64,
    )
}

pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Tensor {
    let gpu = gpu_of(x);
    let (outer, dim, inner) = around(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    let n = crate::tensor::numel(&shape);
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "transformer", "narrow_f32");
        let (s64, l64) = (start as i64, len as i64);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(x).raw())
            .arg(&outer)
            .arg(&dim)
            .arg(&inner)
            .arg(&s64)
            .arg(&l64);
        // SAFETY: matches narrow_f32(float*, const float*, i64 x 5).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "narrow_f32");
    }
    tensor(&shape, out)
}

pub fn narrow_bwd(dy: &Tensor, full: &[usize], axis: usize, start: usize) -> Tensor {
    let gpu = gpu_of(dy);
    let (outer, dim, inner) = around(full, axis);
    let n = crate::tensor::numel(full);
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "transformer", "narrow_bwd_f32");
        let (s64, l64) = (start as i64, dy.dim(axis) as i64);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(dy).raw())
            .arg(&outer)
            .arg(&dim)
            .arg(&inner)
            .arg(&s64)
            .arg(&l64);
        // SAFETY: matches narrow_bwd_f32(float*, const float*, i64 x 5).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "narrow_bwd_f32");
    }
    tensor(full, out)
}

pub fn roll2d(x: &Tensor, sh: isize, sw: isize) -> Tensor {
    let gpu = gpu_of(x);
    let (b, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "transformer", "roll2d_f32");
        let a = [
            b as i32,
            h as i32,
            w as i32,
            c as i32,
            sh.rem_euclid(h as isize) as i32,
            sw.rem_euclid(w as isize) as i32,
        ];
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(buf(x).raw());
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches roll2d_f32(float*, const float*, int x 6).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "roll2d_f32");
    }
    tensor(x.shape(), out)
}

fn ints(gpu: &std::sync::Arc<Gpu>, v: &[usize]) -> Tensor {
    let words: Vec<i32> = v.iter().map(|&x| x as i32).collect();
    tensor(&[words.len()], gpu.upload_i32(&words))
}

pub fn gather_rows(table: &Tensor, idx: &RowIndex) -> Tensor {
    let gpu = gpu_of(table);
    super::nn_kernels::gather_rows(table, &ints(&gpu, &idx.index))
}

pub fn scatter_rows(dy: &Tensor, idx: &RowIndex) -> Tensor {
    let gpu = gpu_of(dy);
    let c = dy.dim(1);
    let n = idx.table_rows * c;
    let mut out = gpu.alloc(n);
    if n > 0 {
        let (offsets, inverse) = (ints(&gpu, &idx.offsets), ints(&gpu, &idx.inverse));
        let f = func(&gpu, "transformer", "scatter_rows_csr_f32");
        let (t32, c32) = (idx.table_rows as i32, c as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(dy).raw())
            .arg(buf(&offsets).raw())
            .arg(buf(&inverse).raw())
            .arg(&t32)
            .arg(&c32);
        // SAFETY: matches scatter_rows_csr_f32(float*, const float*, const int*, const int*, int, int);
        // offsets hold table_rows + 1 ints and inverse the dy rows' indices.
        check(
            unsafe { l.launch(grid_1d(&gpu, n)) },
            "scatter_rows_csr_f32",
        );
    }
    tensor(&[idx.table_rows, c], out)
}

pub fn scale_rows(x: &Tensor, s: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "transformer", "scale_rows_f32");
        let (rows, inner) = (s.numel() as i64, (n / s.numel()) as i64);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(s).raw())
            .arg(&rows)
            .arg(&inner);
        // SAFETY: matches scale_rows_f32(float*, const float*, const float*, i64, i64).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "scale_rows_f32");
    }
    tensor(x.shape(), out)
}
