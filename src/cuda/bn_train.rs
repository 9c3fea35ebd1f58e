//! Training-mode batch norm with our own kernels (`cuda/bn_train.cu`): the statistics in double in
//! a fixed order (as the host kernel computes them), and the affine map with the residual add and
//! the ReLU of a ResNet block's tail in the same pass. The op dispatch uses it for
//! `ops::batch_norm2d_relu` on a GPU (issue 12, "fused epilogues"): one pass over the activations
//! forward instead of cuDNN's batch norm, an add and a ReLU.
//!
//! Launchers:
//! - `train_fwd(x, γ, β, running_mean, running_var, residual, relu, momentum, eps) -> BatchNormTrainOut`
//!   (y, the batch's f32 mean and 1/σ for the backward, the new running statistics)
//! - `train_bwd(x, dy, γ, mean, invstd) -> (dx, dγ, dβ)`

use super::launch::{check, func, gpu_of, grid_1d, THREADS};
use super::{buf, tensor, Gpu};
use crate::ops::BatchNormTrainOut;
use crate::tensor::Tensor;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "bn_train";

/// (N, C, H·W) of an NCHW tensor.
fn dims(x: &Tensor) -> (usize, usize, usize) {
    assert_eq!(
        x.rank(),
        4,
        "bn_train: input must be NCHW, got {:?}",
        x.shape()
    );
    (x.dim(0), x.dim(1), x.dim(2) * x.dim(3))
}

/// How many chunks each channel's batch is split into: enough blocks for about four per SM, each
/// chunk at least one sample.
fn chunks(gpu: &Gpu, n: usize, c: usize) -> usize {
    let want = (gpu.info.multiprocessors.max(1) * 4).div_ceil(c.max(1));
    want.clamp(1, n.max(1))
}

/// `doubles` f64 values of pool memory (two f32 words each).
fn doubles(gpu: &Arc<Gpu>, doubles: usize) -> super::CudaBuf {
    gpu.alloc(2 * doubles.max(1))
}

fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn chunk_grid(c: usize, k: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (k as u32, c as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One `bn_chunk_sums_f32` launch (see the kernel for the modes).
#[allow(clippy::too_many_arguments)]
fn chunk_sums(
    gpu: &Arc<Gpu>,
    x: &Tensor,
    dy: Option<&Tensor>,
    mean_invstd: Option<(&Tensor, &Tensor)>,
    mode: i32,
    k: usize,
    part: u64,
    part2: u64,
) {
    let (n, c, hw) = dims(x);
    let f = func(gpu, MODULE, "bn_chunk_sums_f32");
    let (n32, c32, hw32, k32) = (n as i32, c as i32, hw as i32, k as i32);
    let null = super::launch::NULL;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(buf(x).raw());
    match dy {
        Some(d) => l.arg(buf(d).raw()),
        None => l.arg(&null),
    };
    match mean_invstd {
        Some((m, s)) => l.arg(buf(m).raw()).arg(buf(s).raw()),
        None => l.arg(&null).arg(&null),
    };
    l.arg(&n32)
        .arg(&c32)
        .arg(&hw32)
        .arg(&k32)
        .arg(&mode)
        .arg(&part)
        .arg(&part2);
    // SAFETY: matches bn_chunk_sums_f32(const float*, const float*, const float*, const float*,
    // int, int, int, int, int, double*, double*); part/part2 hold C·k doubles, the pointers a mode
    // does not read may be null.
    check(unsafe { l.launch(chunk_grid(c, k)) }, "bn_chunk_sums_f32");
}

/// Training-mode forward: y = [relu](bn(x) [+ residual]) with batch statistics; the running
/// statistics are returned, not modified.
#[allow(clippy::too_many_arguments)]
pub fn train_fwd(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    momentum: f64,
    eps: f64,
) -> BatchNormTrainOut {
    let gpu = gpu_of(x);
    let (n, c, hw) = dims(x);
    if let Some(r) = residual {
        assert_eq!(r.shape(), x.shape(), "bn_train: residual shape");
    }
    let total = n * c * hw;
    assert!(
        total < 1 << 32,
        "bn_train: {total} values; the kernels index with 32 bits"
    );
    let m = (n * hw) as f64;
    let k = chunks(&gpu, n, c);
    let (part, part_sq) = (doubles(&gpu, c * k), doubles(&gpu, c * k));
    let (scale, shift) = (gpu.alloc(c), gpu.alloc(c));
    let (mut mean, mut invstd) = (gpu.alloc(c), gpu.alloc(c));
    let (mut new_rm, mut new_rv) = (gpu.alloc(c), gpu.alloc(c));
    let mut y = gpu.alloc(total);
    let (c32, k32, hw32) = (c as i32, k as i32, hw as i32);
    // One pass for the statistics, then everything per channel.
    chunk_sums(
        &gpu,
        x,
        None,
        None,
        0,
        k,
        part.device_ptr(),
        part_sq.device_ptr(),
    );
    {
        let f = func(&gpu, MODULE, "bn_finish_fwd_f32");
        let (p, p2) = (part.device_ptr(), part_sq.device_ptr());
        let (scp, shp) = (scale.device_ptr(), shift.device_ptr());
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&p)
            .arg(&p2)
            .arg(&c32)
            .arg(&k32)
            .arg(&m)
            .arg(&eps)
            .arg(&momentum)
            .arg(&hw32)
            .arg(buf(x).raw())
            .arg(buf(gamma).raw())
            .arg(buf(beta).raw())
            .arg(buf(running_mean).raw())
            .arg(buf(running_var).raw())
            .arg(mean.raw_mut())
            .arg(invstd.raw_mut())
            .arg(new_rm.raw_mut())
            .arg(new_rv.raw_mut())
            .arg(&scp)
            .arg(&shp);
        // SAFETY: matches bn_finish_fwd_f32(const double*, const double*, int, int, double,
        // double, double, int, const float* x, 4 × const float*, 4 × float*, float*, float*);
        // every per-channel array holds C values, x its NCHW values.
        check(unsafe { l.launch(per_channel(c)) }, "bn_finish_fwd_f32");
    }
    if total > 0 {
        let f = func(&gpu, MODULE, "bn_apply_f32");
        let (t64, relu32) = (total as i64, i32::from(relu));
        let (scp, shp) = (scale.device_ptr(), shift.device_ptr());
        let null = super::launch::NULL;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut()).arg(buf(x).raw());
        match residual {
            Some(r) => l.arg(buf(r).raw()),
            None => l.arg(&null),
        };
        l.arg(&scp)
            .arg(&shp)
            .arg(&c32)
            .arg(&hw32)
            .arg(&t64)
            .arg(&relu32);
        // SAFETY: matches bn_apply_f32(float*, const float*, const float*, const float*,
        // const float*, int, int, long long, int); r may be null; y, x, r hold `total` floats.
        check(unsafe { l.launch(grid_1d(&gpu, total)) }, "bn_apply_f32");
    }
    BatchNormTrainOut {
        y: tensor(x.shape(), y),
        mean: tensor(&[c], mean),
        invstd: tensor(&[c], invstd),
        running_mean: tensor(&[c], new_rm),
        running_var: tensor(&[c], new_rv),
    }
}

/// Training-mode backward through the batch statistics (the host kernel's formulas): with
/// x̂ = (x − μ)σ⁻¹ and M values per channel, dβ = Σ dy, dγ = Σ dy·x̂,
/// dx = γσ⁻¹ (dy − dβ/M − x̂·dγ/M).
pub fn train_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    assert_eq!(x.shape(), dy.shape(), "bn_train_bwd: dy shape");
    let gpu = gpu_of(x);
    let (n, c, hw) = dims(x);
    let total = n * c * hw;
    let m = (n * hw) as f64;
    let k = chunks(&gpu, n, c);
    let (part_dy, part_dyx) = (doubles(&gpu, c * k), doubles(&gpu, c * k));
    let sums = doubles(&gpu, 2 * c);
    let (mut dgamma, mut dbeta) = (gpu.alloc(c), gpu.alloc(c));
    let mut dx = gpu.alloc(total);
    assert!(
        total < 1 << 32,
        "bn_train: {total} values; the kernels index with 32 bits"
    );
    chunk_sums(
        &gpu,
        x,
        Some(dy),
        Some((mean, invstd)),
        2,
        k,
        part_dy.device_ptr(),
        part_dyx.device_ptr(),
    );
    let (c32, k32) = (c as i32, k as i32);
    {
        let f = func(&gpu, MODULE, "bn_finish_bwd_f32");
        let (a, b, s) = (
            part_dy.device_ptr(),
            part_dyx.device_ptr(),
            sums.device_ptr(),
        );
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&a)
            .arg(&b)
            .arg(&c32)
            .arg(&k32)
            .arg(dgamma.raw_mut())
            .arg(dbeta.raw_mut())
            .arg(&s);
        // SAFETY: matches bn_finish_bwd_f32(const double*, const double*, int, int, float*, float*,
        // double*); the parts hold C·k doubles, sums 2C.
        check(unsafe { l.launch(per_channel(c)) }, "bn_finish_bwd_f32");
    }
    if total > 0 {
        let f = func(&gpu, MODULE, "bn_dx_f32");
        let (hw32, t64, s) = (hw as i32, total as i64, sums.device_ptr());
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(dy).raw())
            .arg(buf(gamma).raw())
            .arg(buf(mean).raw())
            .arg(buf(invstd).raw())
            .arg(&s)
            .arg(&m)
            .arg(&c32)
            .arg(&hw32)
            .arg(&t64);
        // SAFETY: matches bn_dx_f32(float*, const float*, const float*, 3 × const float*,
        // const double*, double, int, int, long long); the tensors hold `total` or C floats.
        check(unsafe { l.launch(grid_1d(&gpu, total)) }, "bn_dx_f32");
    }
    (
        tensor(x.shape(), dx),
        tensor(&[c], dgamma),
        tensor(&[c], dbeta),
    )
}
