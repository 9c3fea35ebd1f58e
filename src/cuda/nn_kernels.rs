//! Launchers of the layer kernels: pooling (pool.cu), channel concat/split and row gathers
//! (layout.cu), row L2-normalisation (head.cu), in-place accumulation and device-scalar scaling
//! (elementwise.cu). All tensors are f32 on one GPU, NCHW for images; the pools also take bf16
//! activations (the bf16 step), which they hand to `bf16_ops`, and NHWC ones, which they hand to
//! `nhwc`.

use super::launch::{check, func, gpu_of, grid_1d, per_row};
use super::{buf, tensor};
use crate::tensor::{DType, Layout, Tensor};
use cudarc::driver::PushKernelArg;

/// Window geometry of a 2-D pooling. Pairs are (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
}

impl PoolGeom {
    /// Output size (floor mode, as PyTorch's default `ceil_mode=False`).
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad[0] - self.kernel[0]) / self.stride[0] + 1,
            (w + 2 * self.pad[1] - self.kernel[1]) / self.stride[1] + 1,
        )
    }
}

fn nchw(t: &Tensor) -> [usize; 4] {
    match t.shape() {
        [n, c, h, w] => [*n, *c, *h, *w],
        s => panic!("expected an NCHW tensor, got shape {s:?}"),
    }
}

/// The 12 i32 geometry arguments of the pool kernels: N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw.
fn pool_args(x: [usize; 4], g: &PoolGeom) -> [i32; 12] {
    let (oh, ow) = g.out_hw(x[2], x[3]);
    [
        x[0],
        x[1],
        x[2],
        x[3],
        oh,
        ow,
        g.kernel[0],
        g.kernel[1],
        g.stride[0],
        g.stride[1],
        g.pad[0],
        g.pad[1],
    ]
    .map(|v| v as i32)
}

/// Max pooling → (y [N, C, OH, OW], argmax) where argmax holds, per output, the in-plane index
/// h·W + w of the chosen input as i32 words (for `max_pool2d_bwd`).
pub fn max_pool2d_fwd(x: &Tensor, g: &PoolGeom) -> (Tensor, Tensor) {
    let d = nchw(x);
    let a = pool_args(d, g);
    if x.layout() == Layout::Nhwc {
        return super::nhwc::max_pool2d_fwd(x, d, a);
    }
    if x.dtype() == DType::Bf16 {
        return super::bf16_ops::max_pool2d_fwd(x, d, a);
    }
    let gpu = gpu_of(x);
    let ys = [d[0], d[1], a[4] as usize, a[5] as usize];
    let n = ys.iter().product::<usize>();
    let mut y = gpu.alloc(n);
    let mut am = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", "maxpool2d_fwd_f32");
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut()).arg(am.raw_mut()).arg(buf(x).raw());
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches maxpool2d_fwd_f32(float*, int*, const float*, 12 x int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "maxpool2d_fwd_f32");
    }
    (tensor(&ys, y), tensor(&ys, am))
}

/// dx of max pooling; a bf16 dy gives a bf16 dx (`bf16_ops`).
pub fn max_pool2d_bwd(dy: &Tensor, argmax: &Tensor, x_shape: &[usize], g: &PoolGeom) -> Tensor {
    let d: [usize; 4] = x_shape
        .try_into()
        .expect("max_pool2d_bwd: x_shape must be NCHW");
    let a = pool_args(d, g);
    if dy.layout() == Layout::Nhwc {
        return super::nhwc::max_pool2d_bwd(dy, argmax, d, a);
    }
    if dy.dtype() == DType::Bf16 {
        return super::bf16_ops::max_pool2d_bwd(dy, argmax, d, a);
    }
    let gpu = gpu_of(dy);
    let n = d.iter().product::<usize>();
    let mut dx = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", "maxpool2d_bwd_f32");
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.raw_mut())
            .arg(buf(dy).raw())
            .arg(buf(argmax).raw());
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches maxpool2d_bwd_f32(float*, const float*, const int*, 12 x int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "maxpool2d_bwd_f32");
    }
    tensor(x_shape, dx)
}

/// Average pooling; `count_include_pad` as PyTorch's flag of that name (default true there).
pub fn avg_pool2d_fwd(x: &Tensor, g: &PoolGeom, count_include_pad: bool) -> Tensor {
    let gpu = gpu_of(x);
    let d = nchw(x);
    let a = pool_args(d, g);
    let ys = [d[0], d[1], a[4] as usize, a[5] as usize];
    let n = ys.iter().product::<usize>();
    let mut y = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", "avgpool2d_fwd_f32");
        let cip = count_include_pad as i32;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut()).arg(buf(x).raw());
        for v in &a {
            l.arg(v);
        }
        l.arg(&cip);
        // SAFETY: matches avgpool2d_fwd_f32(float*, const float*, 12 x int, int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "avgpool2d_fwd_f32");
    }
    tensor(&ys, y)
}

pub fn avg_pool2d_bwd(
    dy: &Tensor,
    x_shape: &[usize],
    g: &PoolGeom,
    count_include_pad: bool,
) -> Tensor {
    let gpu = gpu_of(dy);
    let d: [usize; 4] = x_shape
        .try_into()
        .expect("avg_pool2d_bwd: x_shape must be NCHW");
    let a = pool_args(d, g);
    let n = d.iter().product::<usize>();
    let mut dx = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", "avgpool2d_bwd_f32");
        let cip = count_include_pad as i32;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.raw_mut()).arg(buf(dy).raw());
        for v in &a {
            l.arg(v);
        }
        l.arg(&cip);
        // SAFETY: matches avgpool2d_bwd_f32(float*, const float*, 12 x int, int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "avgpool2d_bwd_f32");
    }
    tensor(x_shape, dx)
}

/// Mean over H·W: [N, C, H, W] → [N, C] (f32 also for a bf16 x: `bf16_ops`).
pub fn global_avg_pool_fwd(x: &Tensor) -> Tensor {
    let d = nchw(x);
    if x.layout() == Layout::Nhwc {
        return super::nhwc::global_avg_pool_fwd(x);
    }
    if x.dtype() == DType::Bf16 {
        return super::bf16_ops::global_avg_pool_fwd(x, d);
    }
    let gpu = gpu_of(x);
    let (planes, hw) = (d[0] * d[1], d[2] * d[3]);
    let mut y = gpu.alloc(planes);
    if planes > 0 {
        let f = func(&gpu, "pool", "global_avgpool_fwd_f32");
        let (p32, hw32) = (planes as i32, hw as i32);
        let warps_per_block = (super::launch::THREADS / 32) as usize;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (planes.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (super::launch::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut()).arg(buf(x).raw()).arg(&p32).arg(&hw32);
        // SAFETY: matches global_avgpool_fwd_f32(float*, const float*, int, int).
        check(unsafe { l.launch(cfg) }, "global_avgpool_fwd_f32");
    }
    tensor(&[d[0], d[1]], y)
}

pub fn global_avg_pool_bwd(dy: &Tensor, x_shape: &[usize]) -> Tensor {
    let gpu = gpu_of(dy);
    let d: [usize; 4] = x_shape
        .try_into()
        .expect("global_avg_pool_bwd: x_shape must be NCHW");
    let (planes, hw) = (d[0] * d[1], d[2] * d[3]);
    let n = planes * hw;
    let mut dx = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", "global_avgpool_bwd_f32");
        let (p32, hw32) = (planes as i32, hw as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.raw_mut()).arg(buf(dy).raw()).arg(&p32).arg(&hw32);
        // SAFETY: matches global_avgpool_bwd_f32(float*, const float*, int, int).
        check(
            unsafe { l.launch(grid_1d(&gpu, n)) },
            "global_avgpool_bwd_f32",
        );
    }
    tensor(x_shape, dx)
}

/// Concatenates NCHW tensors along channels (same N, H, W).
pub fn concat_channels(xs: &[&Tensor]) -> Tensor {
    assert!(!xs.is_empty(), "concat of nothing");
    let gpu = gpu_of(xs[0]);
    let d0 = nchw(xs[0]);
    let cy: usize = xs.iter().map(|x| nchw(x)[1]).sum();
    let hw = d0[2] * d0[3];
    let ys = [d0[0], cy, d0[2], d0[3]];
    let mut y = gpu.alloc(ys.iter().product());
    let f = func(&gpu, "layout", "concat_channels_f32");
    let mut off = 0usize;
    for x in xs {
        let d = nchw(x);
        assert!(
            d[0] == d0[0] && d[2] == d0[2] && d[3] == d0[3],
            "concat: {:?} vs {:?}",
            d,
            d0
        );
        let n = x.numel();
        if n > 0 {
            let a = [d[0] as i32, d[1] as i32, hw as i32, cy as i32, off as i32];
            let mut l = gpu.stream.launch_builder(&f);
            l.arg(y.raw_mut()).arg(buf(x).raw());
            for v in &a {
                l.arg(v);
            }
            // SAFETY: matches concat_channels_f32(float*, const float*, int x 5).
            check(unsafe { l.launch(grid_1d(&gpu, n)) }, "concat_channels_f32");
        }
        off += d[1];
    }
    tensor(&ys, y)
}

/// The backward of `concat_channels`: splits dy [N, ΣC, H, W] into parts of `channels[i]` channels.
pub fn split_channels(dy: &Tensor, channels: &[usize]) -> Vec<Tensor> {
    let gpu = gpu_of(dy);
    let d = nchw(dy);
    assert_eq!(
        channels.iter().sum::<usize>(),
        d[1],
        "split_channels: channel counts"
    );
    let hw = d[2] * d[3];
    let f = func(&gpu, "layout", "split_channels_f32");
    let mut off = 0usize;
    let mut out = Vec::with_capacity(channels.len());
    for &c in channels {
        let shape = [d[0], c, d[2], d[3]];
        let n = d[0] * c * hw;
        let mut dx = gpu.alloc(n);
        if n > 0 {
            let a = [d[0] as i32, c as i32, hw as i32, d[1] as i32, off as i32];
            let mut l = gpu.stream.launch_builder(&f);
            l.arg(dx.raw_mut()).arg(buf(dy).raw());
            for v in &a {
                l.arg(v);
            }
            // SAFETY: matches split_channels_f32(float*, const float*, int x 5).
            check(unsafe { l.launch(grid_1d(&gpu, n)) }, "split_channels_f32");
        }
        out.push(tensor(&shape, dx));
        off += c;
    }
    out
}

/// out[b, :] = src[idx[b], :]; `idx` is an i32 GPU tensor of B labels.
pub fn gather_rows(src: &Tensor, idx: &Tensor) -> Tensor {
    let gpu = gpu_of(src);
    let (rows, cols) = (idx.numel(), src.dim(1));
    let n = rows * cols;
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "layout", "gather_rows_f32");
        let (r32, c32) = (rows as i32, cols as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(src).raw())
            .arg(buf(idx).raw())
            .arg(&r32)
            .arg(&c32);
        // SAFETY: matches gather_rows_f32(float*, const float*, const int*, int, int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "gather_rows_f32");
    }
    tensor(&[rows, cols], out)
}

/// Row L2-normalisation y = x / max(‖x‖, eps) of a [rows, cols] tensor → (y, norms [rows]).
pub fn l2norm_rows_fwd(x: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let gpu = gpu_of(x);
    let (rows, cols) = (x.dim(0), x.dim(1));
    let mut y = gpu.alloc(rows * cols);
    let mut norms = gpu.alloc(rows);
    if rows > 0 {
        let f = func(&gpu, "head", "l2norm_rows_fwd_f32");
        let (r32, c32, e32) = (rows as i32, cols as i32, eps as f32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut())
            .arg(norms.raw_mut())
            .arg(buf(x).raw())
            .arg(&r32)
            .arg(&c32)
            .arg(&e32);
        // SAFETY: matches l2norm_rows_fwd_f32(float*, float*, const float*, int, int, float).
        check(unsafe { l.launch(per_row(rows)) }, "l2norm_rows_fwd_f32");
    }
    (tensor(x.shape(), y), tensor(&[rows], norms))
}

pub fn l2norm_rows_bwd(dy: &Tensor, y: &Tensor, norms: &Tensor, eps: f64) -> Tensor {
    let gpu = gpu_of(dy);
    let (rows, cols) = (dy.dim(0), dy.dim(1));
    let mut dx = gpu.alloc(rows * cols);
    if rows > 0 {
        let f = func(&gpu, "head", "l2norm_rows_bwd_f32");
        let (r32, c32, e32) = (rows as i32, cols as i32, eps as f32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.raw_mut())
            .arg(buf(dy).raw())
            .arg(buf(y).raw())
            .arg(buf(norms).raw())
            .arg(&r32)
            .arg(&c32)
            .arg(&e32);
        // SAFETY: matches l2norm_rows_bwd_f32(float*, const float*, const float*, const float*,
        // int, int, float).
        check(unsafe { l.launch(per_row(rows)) }, "l2norm_rows_bwd_f32");
    }
    tensor(dy.shape(), dx)
}

/// y += a·x in place (gradient accumulation). `y` must not share its buffer with another tensor
/// that is still needed (the tape's accumulators own theirs).
pub fn axpy_(y: &Tensor, a: f64, x: &Tensor) {
    assert_eq!(y.numel(), x.numel(), "axpy: sizes differ");
    let gpu = gpu_of(y);
    let n = y.numel();
    if n == 0 {
        return;
    }
    let f = func(&gpu, "elementwise", "axpy_f32");
    let (a32, n64) = (a as f32, n as i64);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(buf(y).raw()).arg(buf(x).raw()).arg(&a32).arg(&n64);
    // SAFETY: matches axpy_f32(float*, const float*, float, i64); the kernel writes y's buffer.
    check(unsafe { l.launch(grid_1d(&gpu, n)) }, "axpy_f32");
}

/// x · s[0] with the scale read on the device (an upstream scalar gradient).
pub fn scale_by(x: &Tensor, s: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "elementwise", "scale_dev_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(x).raw())
            .arg(buf(s).raw())
            .arg(&n64);
        // SAFETY: matches scale_dev_f32(float*, const float*, const float*, i64).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "scale_dev_f32");
    }
    tensor(x.shape(), out)
}

/// A tensor filled with one value.
pub fn fill(shape: &[usize], v: f32, gpu: &std::sync::Arc<super::Gpu>) -> Tensor {
    tensor(shape, fill_buf(crate::tensor::numel(shape), v, gpu))
}

/// `n` elements set to `v` (the tensor's `DeviceBackend::full_f32`).
pub fn fill_buf(n: usize, v: f32, gpu: &std::sync::Arc<super::Gpu>) -> super::CudaBuf {
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(gpu, "elementwise", "fill_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(&v).arg(&n64);
        // SAFETY: matches fill_f32(float*, float, i64).
        check(unsafe { l.launch(grid_1d(gpu, n)) }, "fill_f32");
    }
    out
}
