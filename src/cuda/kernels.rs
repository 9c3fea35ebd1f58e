//! Launchers for podgpu's own CUDA kernels (sources in `cuda/*.cu`), cuBLAS and cuDNN: the functions
//! the CUDA arm of each op's dispatch calls. All take and return GPU `Tensor`s (f32; `add`, `relu`,
//! `relu_bwd` and the pools also bf16, through `bf16_ops`), allocate their
//! outputs from the pool and queue work on the device's stream without synchronising.
//!
//! # The launchers and where they live
//!
//! Here: `add(a, b)`, `scale(x, s)`, `relu(x)`, `relu_bwd(y, dy)`, `relu6(x)`, `relu6_bwd(y, dy)`,
//! `matmul(a, ta, b, tb, m, k, n)` (cuBLAS, row-major, math mode from `cuda::math_mode()`),
//! `bias_add(y, b)`, `sum_rows(x)`.
//!
//! `cuda::dnn` (cuDNN; NCHW; `w` is [K, C/groups, R, S]; `geom` = `ConvGeom { stride, pad,
//! dilation, groups }`, each `[usize; 2]` as (h, w)):
//! - `conv2d_fwd(x, w, &geom) -> y`, `add_channel_bias(y, b) -> y`
//! - `conv2d_bwd_data(dy, w, x_shape, &geom) -> dx`
//! - `conv2d_bwd_filter(x, dy, w_shape, &geom) -> dw`, `channel_sums(dy) -> db`
//! - `batch_norm_fwd_train(x, gamma, beta, running_mean, running_var, momentum, eps) -> BnTrain
//!   { y, save_mean, save_invstd, running_mean, running_var }` (PyTorch semantics: biased batch
//!   variance to normalise, unbiased into the running variance, `momentum` = PyTorch's 0.1; new
//!   running tensors are returned, the inputs are not modified)
//! - `batch_norm_fwd_infer(x, gamma, beta, mean, var, eps) -> y`
//! - `batch_norm_bwd(x, dy, gamma, save_mean, save_invstd, eps) -> (dx, dgamma, dbeta)`
//! - `batch_norm_eval_bwd(x, dy, gamma, mean, var, eps) -> (dx, dgamma, dbeta)`, `mul(a, b)`
//!
//! `cuda::nn_kernels`:
//! - `max_pool2d_fwd(x, &geom) -> (y, argmax)`, `max_pool2d_bwd(dy, argmax, x_shape, &geom) -> dx`
//! - `avg_pool2d_fwd(x, &geom, count_include_pad)`, `avg_pool2d_bwd(dy, x_shape, &geom, cip)`
//!   (`geom` = `PoolGeom { kernel, stride, pad }`)
//! - `global_avg_pool_fwd(x) -> [N, C]`, `global_avg_pool_bwd(dy, x_shape) -> dx`
//! - `concat_channels(&[&Tensor]) -> y`, `split_channels(dy, &[channels]) -> Vec<dx>`
//! - `l2norm_rows_fwd(x, eps) -> (y, norms)`, `l2norm_rows_bwd(dy, y, norms, eps) -> dx`
//! - `gather_rows(src, labels) -> out`, `axpy_(y, a, x)` (in place), `scale_by(x, s_device_scalar)`,
//!   `fill(shape, v, &gpu)`
//!
//! `cuda::loss_kernels` (labels are i32 GPU tensors, see `labels_to_gpu`):
//! - `nac_fwd_bwd(x, p, labels, delta, nac_form) -> Nac { loss: [1], dx, norms }`
//! - `sc_fwd_bwd(x, p, labels, norm) -> Sc { loss: [1], dx }`, built from the SC pieces
//!   `sc_diff`, `col_sumsq`, `sc_loss`, `sc_grad` around cuBLAS Gram products
//! - `softmax_ce_fwd_bwd(logits, labels) -> (loss [1], dlogits)`
//! - `argmax_rows(logits, labels, correct)`, `pedcc_predict(x, p, labels, correct)` -> predictions
//! - `row_norms(x)`, `sum(x) -> [1]`, `accumulator(&gpu)`, `sum_into(acc, x, accumulate)`
//!   (device-side running sums), `labels_to_gpu(&gpu, &[i32])`, `ints_to_host(t)`
//! - `nac_form` (`NAC_PAPER`/`NAC_REFERENCE`) and the SC `norm` come from `crate::loss::Variant`
//!   (DESIGN §1.6); the launchers import nothing from `crate::loss`
//!
//! `cuda::optim`: `sgd_step(&[SgdParam], lr, momentum)` (one launch for all tensors; what
//! `optim::Sgd::step` uses when every parameter is on the GPU) and `sgd_update` (one tensor, any
//! SGD setting: Nesterov, no momentum).
//!
//! # Where each op is wired
//!
//! Every op's CUDA arm sits next to its host kernel in `src/ops/*.rs` / `src/loss/*.rs`, as a small
//! `*_cuda` function that adapts the op's arguments (`Conv2dSpec` → `ConvGeom`, `Pool2dSpec` →
//! `PoolGeom`, labels → i32) and calls the launchers above, e.g.
//! `dispatch!(x, conv2d_host, conv2d_cuda, x, w, b, spec)`. Launchers panic only on CUDA failures
//! (a broken device or a podgpu bug); validate user input before dispatching.
//! Memory figures for the trainer: `Gpu::pool_stats()` (bytes in use, peak, device allocations),
//! `Gpu::reset_peak_memory()`. Math mode: `cuda::set_math_mode(MathMode::Fp32 | MathMode::Tf32)`.

use super::launch::{check, column_tiles, elementwise, func, gpu_of, grid_1d};
use super::{blas, buf, tensor};
use crate::tensor::{DType, Tensor};
use cudarc::driver::PushKernelArg;

/// y = f(x) elementwise with kernel `name(y, x, n)` of elementwise.cu.
fn unary(x: &Tensor, name: &'static str) -> Tensor {
    elementwise("elementwise", name, &[x])
}

/// y = f(a, b) elementwise with kernel `name(y, a, b, n)` of elementwise.cu.
fn binary(a: &Tensor, b: &Tensor, name: &'static str) -> Tensor {
    elementwise("elementwise", name, &[a, b])
}

/// a + b; two bf16 tensors give a bf16 sum (`bf16_ops`: the bf16 step's residual adds and the
/// tape's sums of activation gradients).
pub fn add(a: &Tensor, b: &Tensor) -> Tensor {
    if a.dtype() == DType::Bf16 {
        return super::bf16_ops::add(a, b);
    }
    binary(a, b, "add_f32")
}

pub fn scale(x: &Tensor, s: f64) -> Tensor {
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "elementwise", "scale_f32");
        let (s32, n64) = (s as f32, n as i64);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(buf(x).raw()).arg(&s32).arg(&n64);
        // SAFETY: matches `scale_f32(float*, const float*, float, i64)`.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "scale_f32");
    }
    tensor(x.shape(), out).with_layout(x.layout())
}

pub fn relu(x: &Tensor) -> Tensor {
    if x.dtype() == DType::Bf16 {
        return super::bf16_ops::relu(x);
    }
    unary(x, "relu_f32")
}

pub fn relu_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    if y.dtype() == DType::Bf16 {
        return super::bf16_ops::relu_bwd(y, dy);
    }
    binary(y, dy, "relu_bwd_f32")
}

pub fn relu6(x: &Tensor) -> Tensor {
    unary(x, "relu6_f32")
}

pub fn relu6_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    binary(y, dy, "relu6_bwd_f32")
}

/// op(A)·op(B) → [m, n] with cuBLAS (see `blas::gemm` for the row-major mapping).
pub fn matmul(a: &Tensor, ta: bool, b: &Tensor, tb: bool, m: usize, k: usize, n: usize) -> Tensor {
    let gpu = gpu_of(a);
    let mut out = gpu.alloc(m * n);
    blas::gemm(&gpu, m, k, n, 1.0, buf(a), ta, buf(b), tb, 0.0, &mut out);
    tensor(&[m, n], out)
}

pub fn bias_add(y: &Tensor, b: &Tensor) -> Tensor {
    let gpu = gpu_of(y);
    let (rows, cols) = (y.dim(0), y.dim(1));
    let n = rows * cols;
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "elementwise", "bias_add_f32");
        let (rows64, cols32) = (rows as i64, cols as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(y).raw())
            .arg(buf(b).raw())
            .arg(&rows64)
            .arg(&cols32);
        // SAFETY: matches `bias_add_f32(float*, const float*, const float*, i64, int)`.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "bias_add_f32");
    }
    tensor(y.shape(), out)
}

pub fn sum_rows(x: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let (rows, cols) = (x.dim(0), x.dim(1));
    let mut out = gpu.alloc(cols);
    if cols > 0 {
        let f = func(&gpu, "reduce", "sum_rows_f32");
        let (r32, c32) = (rows as i32, cols as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(buf(x).raw()).arg(&r32).arg(&c32);
        // SAFETY: matches `sum_rows_f32(float*, const float*, int, int)`; out holds cols floats.
        check(unsafe { l.launch(column_tiles(cols)) }, "sum_rows_f32");
    }
    tensor(&[cols], out)
}
