//! Launchers of the ops on bf16 activations (kernels in cuda/bf16.cu, the pools in cuda/pool.cu):
//! what the GPU's bf16 step (`--precision bf16`) runs between its convolutions and batch norms,
//! which are cuDNN's bf16 calls (`dnn::conv2d_fwd_bf16`, `dnn::batch_norm_fwd_train_bf16`, …).
//! Every tensor here is a `DType::Bf16` GPU tensor (`Bf16Buf`) unless said otherwise; each kernel
//! computes in f32 and rounds its result once, where the CPU emulation (`cpu::bf16`) rounds the
//! same f32 value.
//!
//! The f32 launchers (`kernels::add`, `kernels::relu`, `nn_kernels::max_pool2d_fwd`, …) hand bf16
//! tensors to these, so an op's dispatch stays one call whatever the storage.

use super::bf16::{bf16_buf, Bf16Buf};
use super::launch::{check, elementwise, func, gpu_of, grid_1d, THREADS};
use super::{buf, tensor};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

fn expect_bf16(op: &str, ts: &[&Tensor]) {
    for t in ts {
        assert_eq!(
            t.dtype(),
            DType::Bf16,
            "{op}: expected bf16 tensors, got {t:?}"
        );
    }
}

/// y = bf16(a + b): the residual add and the tape's sum of two activation gradients.
pub fn add(a: &Tensor, b: &Tensor) -> Tensor {
    expect_bf16("add", &[a, b]);
    elementwise("bf16", "add_bf16", &[a, b])
}

pub fn relu(x: &Tensor) -> Tensor {
    expect_bf16("relu", &[x]);
    elementwise("bf16", "relu_bf16", &[x])
}

/// dx = dy where y > 0 (y the ReLU's bf16 output, dy bf16).
pub fn relu_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    expect_bf16("relu_bwd", &[y, dy]);
    elementwise("bf16", "relu_bwd_bf16", &[y, dy])
}

/// Max pooling of a bf16 x → (bf16 y, argmax as i32 words), as `nn_kernels::max_pool2d_fwd`.
pub fn max_pool2d_fwd(x: &Tensor, d: [usize; 4], a: [i32; 12]) -> (Tensor, Tensor) {
    expect_bf16("max_pool2d", &[x]);
    let gpu = gpu_of(x);
    let ys = [d[0], d[1], a[4] as usize, a[5] as usize];
    let n = ys.iter().product::<usize>();
    let mut y = Bf16Buf::alloc(&gpu, n);
    let mut am = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", "maxpool2d_fwd_bf16");
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.words_mut().raw_mut())
            .arg(am.raw_mut())
            .arg(bf16_buf(x).words().raw());
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches maxpool2d_fwd_bf16(unsigned short*, int*, const unsigned short*,
        // 12 x int); y and argmax hold n elements.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "maxpool2d_fwd_bf16");
    }
    (y.into_tensor(&ys), tensor(&ys, am))
}

/// dx (bf16) of max pooling from a bf16 dy and the forward's argmax.
pub fn max_pool2d_bwd(dy: &Tensor, argmax: &Tensor, d: [usize; 4], a: [i32; 12]) -> Tensor {
    expect_bf16("max_pool2d_bwd", &[dy]);
    let gpu = gpu_of(dy);
    let n = d.iter().product::<usize>();
    let mut dx = Bf16Buf::alloc(&gpu, n);
    if n > 0 {
        let f = func(&gpu, "pool", "maxpool2d_bwd_bf16");
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.words_mut().raw_mut())
            .arg(bf16_buf(dy).words().raw())
            .arg(buf(argmax).raw());
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches maxpool2d_bwd_bf16(unsigned short*, const unsigned short*, const int*,
        // 12 x int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "maxpool2d_bwd_bf16");
    }
    dx.into_tensor(&d)
}

/// Mean over H·W of a bf16 [N, C, H, W] → **f32** [N, C] (the features FC1 reads).
pub fn global_avg_pool_fwd(x: &Tensor, d: [usize; 4]) -> Tensor {
    expect_bf16("global_avg_pool", &[x]);
    let gpu = gpu_of(x);
    let (planes, hw) = (d[0] * d[1], d[2] * d[3]);
    let mut y = gpu.alloc(planes);
    if planes > 0 {
        let f = func(&gpu, "pool", "global_avgpool_fwd_bf16");
        let (p32, hw32) = (planes as i32, hw as i32);
        let warps_per_block = (THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (planes.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut())
            .arg(bf16_buf(x).words().raw())
            .arg(&p32)
            .arg(&hw32);
        // SAFETY: matches global_avgpool_fwd_bf16(float*, const unsigned short*, int, int); one
        // warp per plane.
        check(unsafe { l.launch(cfg) }, "global_avgpool_fwd_bf16");
    }
    tensor(&[d[0], d[1]], y)
}

/// dx = bf16(dy / (H·W)) of the global average pool, from an f32 dy [N, C].
pub fn global_avg_pool_bwd(dy: &Tensor, d: [usize; 4]) -> Tensor {
    assert_eq!(
        dy.dtype(),
        DType::F32,
        "global_avg_pool_bwd_bf16: dy is f32"
    );
    let gpu = gpu_of(dy);
    let (planes, hw) = (d[0] * d[1], d[2] * d[3]);
    let n = planes * hw;
    let mut dx = Bf16Buf::alloc(&gpu, n);
    if n > 0 {
        let f = func(&gpu, "pool", "global_avgpool_bwd_bf16");
        let (p32, hw32) = (planes as i32, hw as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.words_mut().raw_mut())
            .arg(buf(dy).raw())
            .arg(&p32)
            .arg(&hw32);
        // SAFETY: matches global_avgpool_bwd_bf16(unsigned short*, const float*, int, int).
        check(
            unsafe { l.launch(grid_1d(&gpu, n)) },
            "global_avgpool_bwd_bf16",
        );
    }
    dx.into_tensor(&d)
}
