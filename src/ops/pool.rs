//! Pooling over NCHW tensors: max pool, average pool (zero padding counted, PyTorch's default
//! `count_include_pad=True`) and global average pool ([N, C, H, W] → [N, C]).
//!
//! Max-pool backward finds each window's argmax again from the saved input (the first maximum in
//! row-major window order, as PyTorch's CPU kernel picks it) instead of saving indices; this is the
//! (x, y, dy) signature cuDNN's pooling backward has too. The CUDA arm does the same: its backward
//! reruns the forward kernel for the argmax (same rule, deterministic) and routes dy through it, so
//! both devices share one tensor-level API and the tape saves only x and y.

use super::{assert_same_place, expect_host_nchw, expect_layout, store_bf16};
use crate::autograd::{Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{DType, Elem, Layout, Tensor};

/// Kernel, stride and symmetric padding of a pooling window, each per axis: (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dSpec {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl Pool2dSpec {
    /// Square window, same stride and padding on both axes.
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Pool2dSpec {
        Pool2dSpec {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (padding, padding),
        }
    }

    /// Output shape for an NCHW input (PyTorch's rules: floor mode, padding at most half the window).
    pub fn out_shape(&self, x_shape: &[usize], op: &str) -> [usize; 4] {
        assert_eq!(
            x_shape.len(),
            4,
            "{op}: input must be NCHW, got {x_shape:?}"
        );
        let axis = |input: usize, k: usize, s: usize, p: usize| {
            assert!(
                k >= 1 && s >= 1,
                "{op}: kernel and stride must be at least 1"
            );
            assert!(
                p <= k / 2,
                "{op}: padding {p} must be at most half the kernel {k}"
            );
            assert!(
                input + 2 * p >= k,
                "{op}: window {k} larger than the padded input {input}+2·{p}"
            );
            (input + 2 * p - k) / s + 1
        };
        [
            x_shape[0],
            x_shape[1],
            axis(x_shape[2], self.kernel.0, self.stride.0, self.padding.0),
            axis(x_shape[3], self.kernel.1, self.stride.1, self.padding.1),
        ]
    }
}

/// Input index range `[lo, hi)` covered by output position `o` along one axis (clipped to the input).
fn window(o: usize, k: usize, s: usize, p: usize, len: usize) -> (usize, usize) {
    let start = (o * s) as isize - p as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + k as isize).max(0) as usize).min(len);
    (lo, hi)
}

// ---- tensor-level entry points ----

pub fn max_pool2d_fwd(x: &Tensor, spec: Pool2dSpec) -> Tensor {
    spec.out_shape(x.shape(), "max_pool2d");
    expect_host_nchw("max_pool2d", &[x]);
    dispatch!(x, max_pool_host, max_pool_cuda, x, spec)
}

/// dx of a max pool: each dy goes to its window's argmax in x (y is the forward's output).
pub fn max_pool2d_bwd(x: &Tensor, y: &Tensor, dy: &Tensor, spec: Pool2dSpec) -> Tensor {
    let ys = spec.out_shape(x.shape(), "max_pool2d_bwd");
    assert_eq!(dy.shape(), &ys, "max_pool2d_bwd: dy shape");
    assert_eq!(y.shape(), &ys, "max_pool2d_bwd: y shape");
    assert_same_place("max_pool2d_bwd", &[x, y, dy]);
    expect_host_nchw("max_pool2d_bwd", &[x]);
    dispatch!(x, max_pool_bwd_host, max_pool_bwd_cuda, x, y, dy, spec)
}

pub fn avg_pool2d_fwd(x: &Tensor, spec: Pool2dSpec) -> Tensor {
    spec.out_shape(x.shape(), "avg_pool2d");
    expect_layout("avg_pool2d", Layout::RowMajor, &[x]);
    dispatch!(x, avg_pool_host, avg_pool_cuda, x, spec)
}

pub fn avg_pool2d_bwd(dy: &Tensor, x_shape: &[usize], spec: Pool2dSpec) -> Tensor {
    let ys = spec.out_shape(x_shape, "avg_pool2d_bwd");
    assert_eq!(dy.shape(), &ys, "avg_pool2d_bwd: dy shape");
    expect_layout("avg_pool2d_bwd", Layout::RowMajor, &[dy]);
    dispatch!(dy, avg_pool_bwd_host, avg_pool_bwd_cuda, dy, x_shape, spec)
}

/// Mean over space: [N, C, H, W] → [N, C].
pub fn global_avg_pool_fwd(x: &Tensor) -> Tensor {
    assert_eq!(
        x.rank(),
        4,
        "global_avg_pool: input must be NCHW, got {:?}",
        x.shape()
    );
    expect_host_nchw("global_avg_pool", &[x]);
    dispatch!(x, gap_host, cuda::nn_kernels::global_avg_pool_fwd, x)
}

pub fn global_avg_pool_bwd(dy: &Tensor, x_shape: &[usize]) -> Tensor {
    assert_eq!(
        x_shape.len(),
        4,
        "global_avg_pool_bwd: x must be NCHW, got {x_shape:?}"
    );
    assert_eq!(dy.shape(), &x_shape[..2], "global_avg_pool_bwd: dy shape");
    dispatch!(
        dy,
        gap_bwd_host,
        cuda::nn_kernels::global_avg_pool_bwd,
        dy,
        x_shape
    )
}

// ---- tape-level ops ----

/// Max pooling on the tape. On the bf16 path the incoming gradient is bf16 (on the GPU it is
/// stored so: the sum of the next layers' bf16 gradients), and the windows' overlapping
/// contributions are summed in f32 and rounded once.
pub fn max_pool2d(t: &mut Tape, x: &Var, spec: Pool2dSpec) -> Var {
    let bf16 = cpu::bf16::emulating();
    let y = max_pool2d_fwd(x.value(), spec);
    let (sx, sy) = (x.value().clone(), y.clone());
    t.op(y, &[x], move || {
        Box::new(move |g, _| {
            let g = &store_bf16(bf16, g);
            let dx = max_pool2d_bwd(&sx, &sy, g, spec);
            vec![Some(store_bf16(bf16, &dx))]
        })
    })
}

pub fn avg_pool2d(t: &mut Tape, x: &Var, spec: Pool2dSpec) -> Var {
    let y = avg_pool2d_fwd(x.value(), spec);
    let shape = x.shape().to_vec();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(avg_pool2d_bwd(g, &shape, spec))])
    })
}

/// Global average pooling on the tape: f32 features [N, C] whatever x's storage and layout. On a
/// GPU the gradient goes back in x's storage and layout (bf16: `cuda::bf16_ops`; NHWC:
/// `cuda::nhwc`); the emulation rounds that gradient where the next op back stores it.
pub fn global_avg_pool(t: &mut Tape, x: &Var) -> Var {
    let y = global_avg_pool_fwd(x.value());
    let shape = x.shape().to_vec();
    let (gpu, dtype, layout) = (x.value().is_cuda(), x.value().dtype(), x.value().layout());
    t.op(y, &[x], move || {
        Box::new(move |g, _| {
            let d = [shape[0], shape[1], shape[2], shape[3]];
            let dx = match (gpu, dtype, layout) {
                (true, _, Layout::Nhwc) => cuda::nhwc::global_avg_pool_bwd(g, &shape, dtype),
                (true, DType::Bf16, _) => cuda::bf16_ops::global_avg_pool_bwd(g, d),
                _ => global_avg_pool_bwd(g, &shape),
            };
            vec![Some(dx)]
        })
    })
}

// ---- CUDA arms ----

fn cuda_geom(spec: Pool2dSpec) -> cuda::nn_kernels::PoolGeom {
    cuda::nn_kernels::PoolGeom {
        kernel: [spec.kernel.0, spec.kernel.1],
        stride: [spec.stride.0, spec.stride.1],
        pad: [spec.padding.0, spec.padding.1],
    }
}

fn max_pool_cuda(x: &Tensor, spec: Pool2dSpec) -> Tensor {
    cuda::nn_kernels::max_pool2d_fwd(x, &cuda_geom(spec)).0
}

fn max_pool_bwd_cuda(x: &Tensor, _y: &Tensor, dy: &Tensor, spec: Pool2dSpec) -> Tensor {
    let g = cuda_geom(spec);
    let (_, argmax) = cuda::nn_kernels::max_pool2d_fwd(x, &g);
    cuda::nn_kernels::max_pool2d_bwd(dy, &argmax, x.shape(), &g)
}

// The host divides by the full window (`count_include_pad`): with padding at most half the window
// (checked by `out_shape`) no window reaches past the padded input, so PyTorch's clipped count is
// the full window too.
fn avg_pool_cuda(x: &Tensor, spec: Pool2dSpec) -> Tensor {
    cuda::nn_kernels::avg_pool2d_fwd(x, &cuda_geom(spec), true)
}

fn avg_pool_bwd_cuda(dy: &Tensor, x_shape: &[usize], spec: Pool2dSpec) -> Tensor {
    cuda::nn_kernels::avg_pool2d_bwd(dy, x_shape, &cuda_geom(spec), true)
}

// ---- host kernels: one (image, channel) plane per task ----

/// Row-major index in the plane of the first maximum of output (oh, ow)'s window.
fn argmax<T: Elem>(
    plane: &[T],
    oh: usize,
    ow: usize,
    spec: &Pool2dSpec,
    h: usize,
    w: usize,
) -> usize {
    let (h0, h1) = window(oh, spec.kernel.0, spec.stride.0, spec.padding.0, h);
    let (w0, w1) = window(ow, spec.kernel.1, spec.stride.1, spec.padding.1, w);
    let mut best = h0 * w + w0;
    for ih in h0..h1 {
        for iw in w0..w1 {
            let i = ih * w + iw;
            // NaN propagates like PyTorch: it wins over every number.
            if plane[i] > plane[best] || plane[i].is_nan() {
                best = i;
            }
        }
    }
    best
}

fn max_pool_host<T: Elem>(x: &Tensor, spec: Pool2dSpec) -> Tensor {
    let ys = spec.out_shape(x.shape(), "max_pool2d");
    let (h, w, oh, ow) = (x.dim(2), x.dim(3), ys[2], ys[3]);
    let kk = spec.kernel.0 * spec.kernel.1;
    let xs = x.host::<T>();
    let mut y = vec![T::zero(); ys.iter().product()];
    cpu::par_chunks(&mut y, oh * ow, oh * ow * kk, |p, yp| {
        let plane = &xs[p * h * w..(p + 1) * h * w];
        for i in 0..oh {
            for j in 0..ow {
                yp[i * ow + j] = plane[argmax(plane, i, j, &spec, h, w)];
            }
        }
    });
    Tensor::from_vec(&ys, y)
}

fn max_pool_bwd_host<T: Elem>(x: &Tensor, _y: &Tensor, dy: &Tensor, spec: Pool2dSpec) -> Tensor {
    let (h, w, oh, ow) = (x.dim(2), x.dim(3), dy.dim(2), dy.dim(3));
    let kk = spec.kernel.0 * spec.kernel.1;
    let (xs, dys) = (x.host::<T>(), dy.host::<T>());
    let mut dx = vec![T::zero(); xs.len()];
    cpu::par_chunks(&mut dx, h * w, oh * ow * kk, |p, dxp| {
        let plane = &xs[p * h * w..(p + 1) * h * w];
        let dyp = &dys[p * oh * ow..(p + 1) * oh * ow];
        for i in 0..oh {
            for j in 0..ow {
                dxp[argmax(plane, i, j, &spec, h, w)] += dyp[i * ow + j];
            }
        }
    });
    Tensor::from_vec(x.shape(), dx)
}

fn avg_pool_host<T: Elem>(x: &Tensor, spec: Pool2dSpec) -> Tensor {
    let ys = spec.out_shape(x.shape(), "avg_pool2d");
    let (h, w, oh, ow) = (x.dim(2), x.dim(3), ys[2], ys[3]);
    let kk = spec.kernel.0 * spec.kernel.1;
    // Padding counts as zeros: the divisor is always the full window.
    let inv = T::of(1.0 / kk as f64);
    let xs = x.host::<T>();
    let mut y = vec![T::zero(); ys.iter().product()];
    cpu::par_chunks(&mut y, oh * ow, oh * ow * kk, |p, yp| {
        let plane = &xs[p * h * w..(p + 1) * h * w];
        for i in 0..oh {
            let (h0, h1) = window(i, spec.kernel.0, spec.stride.0, spec.padding.0, h);
            for j in 0..ow {
                let (w0, w1) = window(j, spec.kernel.1, spec.stride.1, spec.padding.1, w);
                let mut acc = T::zero();
                for ih in h0..h1 {
                    acc += plane[ih * w + w0..ih * w + w1].iter().copied().sum::<T>();
                }
                yp[i * ow + j] = acc * inv;
            }
        }
    });
    Tensor::from_vec(&ys, y)
}

fn avg_pool_bwd_host<T: Elem>(dy: &Tensor, x_shape: &[usize], spec: Pool2dSpec) -> Tensor {
    let (h, w, oh, ow) = (x_shape[2], x_shape[3], dy.dim(2), dy.dim(3));
    let kk = spec.kernel.0 * spec.kernel.1;
    let inv = T::of(1.0 / kk as f64);
    let dys = dy.host::<T>();
    let mut dx = vec![T::zero(); x_shape.iter().product()];
    cpu::par_chunks(&mut dx, h * w, oh * ow * kk, |p, dxp| {
        let dyp = &dys[p * oh * ow..(p + 1) * oh * ow];
        for i in 0..oh {
            let (h0, h1) = window(i, spec.kernel.0, spec.stride.0, spec.padding.0, h);
            for j in 0..ow {
                let (w0, w1) = window(j, spec.kernel.1, spec.stride.1, spec.padding.1, w);
                let g = dyp[i * ow + j] * inv;
                for ih in h0..h1 {
                    dxp[ih * w + w0..ih * w + w1]
                        .iter_mut()
                        .for_each(|v| *v += g);
                }
            }
        }
    });
    Tensor::from_vec(x_shape, dx)
}

fn gap_host<T: Elem>(x: &Tensor) -> Tensor {
    let (n, c, hw) = (x.dim(0), x.dim(1), x.dim(2) * x.dim(3));
    let inv = T::of(1.0 / hw as f64);
    let xs = x.host::<T>();
    let mut y = vec![T::zero(); n * c];
    cpu::par_chunks(&mut y, 1, hw, |p, o| {
        o[0] = xs[p * hw..(p + 1) * hw].iter().copied().sum::<T>() * inv;
    });
    Tensor::from_vec(&[n, c], y)
}

fn gap_bwd_host<T: Elem>(dy: &Tensor, x_shape: &[usize]) -> Tensor {
    let hw = x_shape[2] * x_shape[3];
    let inv = T::of(1.0 / hw as f64);
    let dys = dy.host::<T>();
    let mut dx = vec![T::zero(); x_shape.iter().product()];
    cpu::par_chunks(&mut dx, hw, hw, |p, o| o.fill(dys[p] * inv));
    Tensor::from_vec(x_shape, dx)
}
