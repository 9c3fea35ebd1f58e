//! Launchers of the channels-last kernels (cuda/nhwc.cu; max pooling's are pool.cu's): layout
//! changes between NCHW and NHWC and the pools over NHWC activations, for f32 and bf16 GPU
//! tensors alike (the kernel is picked by the tensor's dtype). The NCHW launchers (`nn_kernels`,
//! `bf16_ops`) hand NHWC tensors to these, so an op's dispatch stays one call whatever the layout.

use super::launch::{check, func, gpu_of, grid_1d, words, Out};
use super::{buf, tensor};
use crate::tensor::{DType, Layout, Tensor};
use cudarc::driver::PushKernelArg;

/// The kernel name for a tensor's storage: `{base}_f32` or `{base}_bf16`.
fn kernel(base: &'static str, dtype: DType) -> &'static str {
    // The names are spelled out so that tests/cuda_nvrtc.rs finds every one in this file.
    match (base, dtype) {
        ("nchw_to_nhwc", DType::Bf16) => "nchw_to_nhwc_bf16",
        ("nchw_to_nhwc", _) => "nchw_to_nhwc_f32",
        ("nhwc_to_nchw", DType::Bf16) => "nhwc_to_nchw_bf16",
        ("nhwc_to_nchw", _) => "nhwc_to_nchw_f32",
        ("maxpool2d_fwd_nhwc", DType::Bf16) => "maxpool2d_fwd_nhwc_bf16",
        ("maxpool2d_fwd_nhwc", _) => "maxpool2d_fwd_nhwc_f32",
        ("maxpool2d_bwd_nhwc", DType::Bf16) => "maxpool2d_bwd_nhwc_bf16",
        ("maxpool2d_bwd_nhwc", _) => "maxpool2d_bwd_nhwc_f32",
        ("global_avgpool_fwd_nhwc", DType::Bf16) => "global_avgpool_fwd_nhwc_bf16",
        ("global_avgpool_fwd_nhwc", _) => "global_avgpool_fwd_nhwc_f32",
        ("global_avgpool_bwd_nhwc", DType::Bf16) => "global_avgpool_bwd_nhwc_bf16",
        ("global_avgpool_bwd_nhwc", _) => "global_avgpool_bwd_nhwc_f32",
        _ => unreachable!("no NHWC kernel {base}"),
    }
}

fn nchw(shape: &[usize], what: &str) -> [usize; 4] {
    shape
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: expected a 4-d [N, C, H, W] tensor, got {shape:?}"))
}

/// A 4-d GPU tensor (f32 or bf16) reordered into `layout`: the same tensor when it is there already.
pub fn to_layout(x: &Tensor, layout: Layout) -> Tensor {
    if x.layout() == layout {
        return x.clone();
    }
    let d = nchw(x.shape(), "to_layout");
    let base = match layout {
        Layout::Nhwc => "nchw_to_nhwc",
        Layout::RowMajor => "nhwc_to_nchw",
    };
    let name = kernel(base, x.dtype());
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut y = Out::alloc(&gpu, x.dtype(), n);
    if n > 0 {
        let f = func(&gpu, "nhwc", name);
        let a = d.map(|v| v as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.words_mut()).arg(words(x));
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches name(T*, const T*, int N, int C, int H, int W) for T the storage type of
        // both buffers (n elements each).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, name);
    }
    y.into_tensor(x.shape(), layout)
}

/// An f32 NCHW tensor (a convolution's KCRS master weight) as bf16 in NHWC (KRSC) order: the bf16
/// cast and the reorder in one kernel, the values of `to_layout(to_bf16(x), Nhwc)`.
pub fn to_nhwc_bf16(x: &Tensor) -> Tensor {
    assert!(
        x.dtype() == DType::F32 && x.layout() == Layout::RowMajor,
        "to_nhwc_bf16: an f32 NCHW tensor, got {x:?}"
    );
    let d = nchw(x.shape(), "the bf16 weight reorder");
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut y = Out::alloc(&gpu, DType::Bf16, n);
    if n > 0 {
        let f = func(&gpu, "nhwc", "nchw_f32_to_nhwc_bf16");
        let a = d.map(|v| v as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.words_mut()).arg(words(x));
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches nchw_f32_to_nhwc_bf16(unsigned short*, const float*, int N, int C, int H,
        // int W); y holds n bf16 values, x n floats.
        check(
            unsafe { l.launch(grid_1d(&gpu, n)) },
            "nchw_f32_to_nhwc_bf16",
        );
    }
    y.into_tensor(x.shape(), Layout::Nhwc)
}

/// Max pooling of an NHWC x → (NHWC y in x's storage, argmax as i32 words, NHWC order). `a` are
/// the 12 pool geometry arguments (`nn_kernels::pool_args`).
pub fn max_pool2d_fwd(x: &Tensor, d: [usize; 4], a: [i32; 12]) -> (Tensor, Tensor) {
    let name = kernel("maxpool2d_fwd_nhwc", x.dtype());
    let gpu = gpu_of(x);
    let ys = [d[0], d[1], a[4] as usize, a[5] as usize];
    let n = ys.iter().product::<usize>();
    let mut y = Out::alloc(&gpu, x.dtype(), n);
    let mut am = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "pool", name);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.words_mut()).arg(am.raw_mut()).arg(words(x));
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches name(T*, int*, const T*, 12 x int); y and argmax hold n elements.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, name);
    }
    (
        y.into_tensor(&ys, Layout::Nhwc),
        tensor(&ys, am).with_layout(Layout::Nhwc),
    )
}

/// dx (NHWC, dy's storage) of max pooling from an NHWC dy and the forward's argmax.
pub fn max_pool2d_bwd(dy: &Tensor, argmax: &Tensor, d: [usize; 4], a: [i32; 12]) -> Tensor {
    let name = kernel("maxpool2d_bwd_nhwc", dy.dtype());
    let gpu = gpu_of(dy);
    let n = d.iter().product::<usize>();
    let mut dx = Out::alloc(&gpu, dy.dtype(), n);
    if n > 0 {
        let f = func(&gpu, "pool", name);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.words_mut()).arg(words(dy)).arg(buf(argmax).raw());
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches name(T*, const T*, const int*, 12 x int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, name);
    }
    dx.into_tensor(&d, Layout::Nhwc)
}

/// Mean over H·W of an NHWC x (f32 or bf16) → f32 [N, C].
pub fn global_avg_pool_fwd(x: &Tensor) -> Tensor {
    let d = nchw(x.shape(), "global_avg_pool");
    let name = kernel("global_avgpool_fwd_nhwc", x.dtype());
    let gpu = gpu_of(x);
    let (planes, hw) = (d[0] * d[1], d[2] * d[3]);
    let mut y = gpu.alloc(planes);
    if planes > 0 {
        let f = func(&gpu, "nhwc", name);
        let (n32, c32, hw32) = (d[0] as i32, d[1] as i32, hw as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.raw_mut())
            .arg(words(x))
            .arg(&n32)
            .arg(&c32)
            .arg(&hw32);
        // SAFETY: matches name(float*, const T*, int, int, int); y holds N·C floats.
        check(unsafe { l.launch(grid_1d(&gpu, planes)) }, name);
    }
    tensor(&[d[0], d[1]], y)
}

/// dx = dy / (H·W) of the global pool as an NHWC tensor of shape `x_shape` in `dtype`'s storage,
/// from an f32 dy [N, C].
pub fn global_avg_pool_bwd(dy: &Tensor, x_shape: &[usize], dtype: DType) -> Tensor {
    let d = nchw(x_shape, "global_avg_pool_bwd");
    let name = kernel("global_avgpool_bwd_nhwc", dtype);
    let gpu = gpu_of(dy);
    let hw = d[2] * d[3];
    let n = d.iter().product::<usize>();
    let mut dx = Out::alloc(&gpu, dtype, n);
    if n > 0 {
        let f = func(&gpu, "nhwc", name);
        let (n32, c32, hw32) = (d[0] as i32, d[1] as i32, hw as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(dx.words_mut())
            .arg(buf(dy).raw())
            .arg(&n32)
            .arg(&c32)
            .arg(&hw32);
        // SAFETY: matches name(T*, const float*, int, int, int).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, name);
    }
    dx.into_tensor(&d, Layout::Nhwc)
}
