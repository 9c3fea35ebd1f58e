//! 2-D convolution (NCHW), with groups: plain, grouped and depthwise (MobileNetV2).
//!
//! CPU strategy: im2col per image and group, then one GEMM, with images spread over rayon threads (each
//! GEMM on its own thread, weight gradients accumulated per thread and summed). With fewer images than
//! threads the images run one after another and each GEMM is parallel instead. When an image has few
//! output positions (late layers), several images share one GEMM so that it is not too thin. 1×1
//! stride-1 unpadded convolutions skip im2col (the image already is the column matrix). Depthwise
//! convolutions (one input and one output channel per group) use a direct loop: their im2col would be
//! KH·KW times the input for a GEMM with a single output row.

use super::{assert_same_place, expect_host_nchw, store_bf16};
use crate::autograd::{Tape, Var};
use crate::cpu::{self, kernels};
use crate::cuda;
use crate::tensor::{DType, Elem, Layout, Tensor};
use rayon::prelude::*;

/// Stride, symmetric zero padding (each per axis: (height, width)) and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub groups: usize,
}

impl Conv2dSpec {
    /// Same stride and padding on both axes, one group.
    pub fn new(stride: usize, padding: usize) -> Conv2dSpec {
        Conv2dSpec {
            stride: (stride, stride),
            padding: (padding, padding),
            groups: 1,
        }
    }

    pub fn with_groups(self, groups: usize) -> Conv2dSpec {
        Conv2dSpec { groups, ..self }
    }
}

impl Default for Conv2dSpec {
    fn default() -> Self {
        Conv2dSpec::new(1, 0)
    }
}

/// Every size of one convolution, derived from the input shape, the weight shape and the spec.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub groups: usize,
    /// Input and output channels per group.
    pub cin_g: usize,
    pub cout_g: usize,
}

/// Output length of a sliding window along one axis.
fn out_len(input: usize, kernel: usize, stride: usize, pad: usize, what: &str) -> usize {
    assert!(stride >= 1, "{what}: stride must be at least 1");
    assert!(
        input + 2 * pad >= kernel,
        "{what}: kernel {kernel} larger than the padded input {input}+2·{pad}"
    );
    (input + 2 * pad - kernel) / stride + 1
}

impl ConvGeom {
    pub fn new(x_shape: &[usize], w_shape: &[usize], spec: Conv2dSpec) -> ConvGeom {
        assert_eq!(
            x_shape.len(),
            4,
            "conv2d: input must be NCHW, got {x_shape:?}"
        );
        assert_eq!(
            w_shape.len(),
            4,
            "conv2d: weight must be [Cout, Cin/groups, KH, KW], got {w_shape:?}"
        );
        let (n, cin, h, w) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
        let (cout, cin_g, kh, kw) = (w_shape[0], w_shape[1], w_shape[2], w_shape[3]);
        let groups = spec.groups;
        assert!(
            n >= 1 && cin >= 1 && cout >= 1,
            "conv2d: empty batch or channels (input {x_shape:?}, weight {w_shape:?})"
        );
        assert!(
            groups >= 1 && cin % groups == 0 && cout % groups == 0,
            "conv2d: {groups} groups do not divide Cin={cin} and Cout={cout}"
        );
        assert_eq!(
            cin_g,
            cin / groups,
            "conv2d: weight {w_shape:?} does not fit input {x_shape:?} with {groups} groups"
        );
        let oh = out_len(h, kh, spec.stride.0, spec.padding.0, "conv2d");
        let ow = out_len(w, kw, spec.stride.1, spec.padding.1, "conv2d");
        ConvGeom {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            oh,
            ow,
            sh: spec.stride.0,
            sw: spec.stride.1,
            ph: spec.padding.0,
            pw: spec.padding.1,
            groups,
            cin_g,
            cout_g: cout / groups,
        }
    }

    pub fn x_shape(&self) -> [usize; 4] {
        [self.n, self.cin, self.h, self.w]
    }
    pub fn y_shape(&self) -> [usize; 4] {
        [self.n, self.cout, self.oh, self.ow]
    }
    pub fn w_shape(&self) -> [usize; 4] {
        [self.cout, self.cin_g, self.kh, self.kw]
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    /// Rows of the im2col matrix of one group (= columns of its weight matrix).
    fn k_cols(&self) -> usize {
        self.cin_g * self.kh * self.kw
    }
    /// 1×1, stride 1, no padding: the input of a group is its own column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
    /// One input and one output channel per group.
    fn is_depthwise(&self) -> bool {
        self.cin_g == 1 && self.cout_g == 1
    }
}

/// Output positions `[lo, hi)` along one axis whose input index `o·stride + k − pad` lies in
/// `[0, in_len)`, for kernel offset `k`. Outside this range the window reads zero padding.
fn valid_range(
    k: usize,
    pad: usize,
    stride: usize,
    in_len: usize,
    out_len: usize,
) -> (usize, usize) {
    let lo = if pad > k {
        (pad - k).div_ceil(stride)
    } else {
        0
    };
    let hi = if in_len + pad > k {
        ((in_len - 1 + pad - k) / stride + 1).min(out_len)
    } else {
        0
    };
    (lo.min(hi), hi)
}

// ---- tensor-level entry points ----

/// y = conv(x, w) + b. x [N, Cin, H, W], w [Cout, Cin/groups, KH, KW], b [Cout].
pub fn conv2d_fwd(x: &Tensor, w: &Tensor, b: Option<&Tensor>, spec: Conv2dSpec) -> Tensor {
    let g = ConvGeom::new(x.shape(), w.shape(), spec);
    assert_same_place("conv2d", &[x, w]);
    expect_host_nchw("conv2d", &[x]);
    if let Some(b) = b {
        assert_eq!(
            b.shape(),
            &[g.cout],
            "conv2d: bias {:?} for {} output channels",
            b.shape(),
            g.cout
        );
        assert_same_place("conv2d", &[x, b]);
    }
    dispatch!(x, conv2d_host, conv2d_cuda, x, w, b, spec)
}

/// dx of a convolution, given dy, the weight and the input's shape.
pub fn conv2d_bwd_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], spec: Conv2dSpec) -> Tensor {
    let g = ConvGeom::new(x_shape, w.shape(), spec);
    assert_eq!(dy.shape(), &g.y_shape(), "conv2d_bwd_data: dy shape");
    assert_same_place("conv2d_bwd_data", &[dy, w]);
    expect_host_nchw("conv2d_bwd_data", &[dy]);
    dispatch!(
        dy,
        conv2d_bwd_data_host,
        conv2d_bwd_data_cuda,
        dy,
        w,
        x_shape,
        spec
    )
}

/// dw of a convolution, given the input, dy and the weight's shape.
pub fn conv2d_bwd_weight(x: &Tensor, dy: &Tensor, w_shape: &[usize], spec: Conv2dSpec) -> Tensor {
    let g = ConvGeom::new(x.shape(), w_shape, spec);
    assert_eq!(dy.shape(), &g.y_shape(), "conv2d_bwd_weight: dy shape");
    assert_same_place("conv2d_bwd_weight", &[x, dy]);
    expect_host_nchw("conv2d_bwd_weight", &[x]);
    dispatch!(
        x,
        conv2d_bwd_weight_host,
        conv2d_bwd_weight_cuda,
        x,
        dy,
        w_shape,
        spec
    )
}

/// db of a convolution: dy summed over batch and space, [N, C, H, W] → [C].
pub fn conv2d_bwd_bias(dy: &Tensor) -> Tensor {
    assert_eq!(
        dy.rank(),
        4,
        "conv2d_bwd_bias: dy must be NCHW, got {:?}",
        dy.shape()
    );
    dispatch!(dy, conv2d_bwd_bias_host, cuda::dnn::channel_sums, dy)
}

// ---- CUDA arms (cuDNN) ----

/// The cuDNN geometry of a spec (no dilation: podgpu's convolutions have none).
fn cuda_geom(spec: Conv2dSpec) -> cuda::dnn::ConvGeom {
    cuda::dnn::ConvGeom {
        stride: [spec.stride.0, spec.stride.1],
        pad: [spec.padding.0, spec.padding.1],
        dilation: [1, 1],
        groups: spec.groups,
    }
}

/// bf16 x and w (the bf16 step) take cuDNN's bf16 convolution, whose y is bf16. x, w and y share
/// a layout (NCHW, or NHWC with a KRSC w). A bias is refused on the bf16 path (the emulation adds
/// it in f32 before y's one rounding, which a bf16 y plus a bias would round twice) and in NHWC
/// (the bias kernels are NCHW); the ResNets, the models of both, have no convolution bias.
fn conv2d_cuda(x: &Tensor, w: &Tensor, b: Option<&Tensor>, spec: Conv2dSpec) -> Tensor {
    assert!(
        b.is_none() || x.layout() == Layout::RowMajor,
        "conv2d: a bias on NHWC GPU tensors is not supported (unset PODGPU_GPU_LAYOUT)"
    );
    if x.dtype() == DType::Bf16 {
        assert!(
            b.is_none(),
            "conv2d: a bias on the GPU's bf16 path is not supported (use --precision tf32)"
        );
        return cuda::dnn::conv2d_fwd_bf16(x, w, &cuda_geom(spec));
    }
    let y = cuda::dnn::conv2d_fwd(x, w, &cuda_geom(spec));
    match b {
        Some(b) => cuda::dnn::add_channel_bias(y, b),
        None => y,
    }
}

fn conv2d_bwd_data_cuda(dy: &Tensor, w: &Tensor, x_shape: &[usize], spec: Conv2dSpec) -> Tensor {
    if dy.dtype() == DType::Bf16 {
        return cuda::dnn::conv2d_bwd_data_bf16(dy, w, x_shape, &cuda_geom(spec));
    }
    cuda::dnn::conv2d_bwd_data(dy, w, x_shape, &cuda_geom(spec))
}

/// A bf16 x and dy give an f32 dw (the gradient of the f32 master weight). Channels-last x and dy
/// give cuDNN's dw in KRSC order, reordered here to the master weight's KCRS: a weight gradient is
/// NCHW whatever the activations' layout.
fn conv2d_bwd_weight_cuda(x: &Tensor, dy: &Tensor, w_shape: &[usize], spec: Conv2dSpec) -> Tensor {
    let dw = if x.dtype() == DType::Bf16 {
        cuda::dnn::conv2d_bwd_filter_bf16(x, dy, w_shape, &cuda_geom(spec))
    } else {
        cuda::dnn::conv2d_bwd_filter(x, dy, w_shape, &cuda_geom(spec))
    };
    super::to_layout_fwd(&dw, Layout::RowMajor)
}

// ---- tape-level op ----

/// A 2-D convolution on the tape; gradients for x (skipped when x needs none, e.g. the image), w and b.
/// On the bf16 path (`ops::store_bf16`) x, w (a cast copy of the f32 master weight), y, dy and dx
/// are bf16 (GPU) or rounded to bf16 (CPU emulation); dw and db stay f32.
pub fn conv2d(t: &mut Tape, x: &Var, w: &Var, b: Option<&Var>, spec: Conv2dSpec) -> Var {
    let bf16 = cpu::bf16::emulating();
    let sx = store_bf16(bf16, x.value());
    // A channels-last x on a GPU (`ops::gpu_nhwc`) takes its weight in KRSC order too: reordered
    // once per step here (with the bf16 cast, in one kernel) and kept for the backward.
    let sw = super::store_bf16_in_layout(bf16, w.value(), sx.layout());
    let y = conv2d_fwd(&sx, &sw, b.map(|b| b.value()), spec);
    let y = store_bf16(bf16, &y);
    let mut inputs = vec![x, w];
    inputs.extend(b);
    t.op(y, &inputs, move || {
        Box::new(move |g, needs| {
            let g = &store_bf16(bf16, g);
            let dx = needs[0].then(|| store_bf16(bf16, &conv2d_bwd_data(g, &sw, sx.shape(), spec)));
            let dw = needs[1].then(|| conv2d_bwd_weight(&sx, g, sw.shape(), spec));
            let mut grads = vec![dx, dw];
            if needs.len() == 3 {
                grads.push(needs[2].then(|| conv2d_bwd_bias(g)));
            }
            grads
        })
    })
}

// ---- host kernels ----

/// Fewest GEMM columns (output positions) worth one GEMM call. Late layers have few positions per
/// image (4×4 in ResNet's last stage on CIFAR) and a GEMM that thin spends its time packing the weights,
/// so several images share one GEMM, their column matrices side by side.
const MIN_GEMM_COLS: usize = 256;

/// How the images of a batch are spread over threads and GEMMs.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Images spread over rayon threads, each GEMM on one thread; otherwise the images run in turn and
    /// each GEMM is parallel (batches smaller than the thread count).
    batch_par: bool,
    /// Images per GEMM.
    nb: usize,
    /// Images per thread when `batch_par`: contiguous ranges, so that per-thread weight gradients are
    /// summed in a fixed order (deterministic for a given thread count).
    per_thread: usize,
}

/// Image ranges of the weight gradient in deterministic mode: a fixed number, so the partial sums and
/// the order they are added in do not depend on the thread count (at most this many threads share
/// the work).
const DETERMINISTIC_WEIGHT_RANGES: usize = 8;

impl Plan {
    /// The weight-gradient plan: like `new`, except that in deterministic mode (`cpu::deterministic`)
    /// the images are split into `DETERMINISTIC_WEIGHT_RANGES` ranges whatever the thread count.
    /// Forward and data gradient need no such care: each output is one dot product whose order does
    /// not depend on how the images are spread.
    fn for_weight_grad(g: &ConvGeom) -> Plan {
        if !cpu::deterministic() {
            return Plan::new(g);
        }
        let per_thread = g.n.div_ceil(DETERMINISTIC_WEIGHT_RANGES).max(1);
        Plan {
            batch_par: true,
            nb: MIN_GEMM_COLS.div_ceil(g.ohw()).clamp(1, per_thread),
            per_thread,
        }
    }

    fn new(g: &ConvGeom) -> Plan {
        let threads = rayon::current_num_threads();
        let batch_par = threads > 1 && g.n >= threads;
        let per_thread = if batch_par {
            g.n.div_ceil(threads)
        } else {
            g.n.max(1)
        };
        let nb = MIN_GEMM_COLS.div_ceil(g.ohw()).clamp(1, per_thread);
        Plan {
            batch_par,
            nb,
            per_thread,
        }
    }
}

/// Row-major C[m×n] = op(A)·op(B) + beta·C (op = transpose when the flag says so), like `cpu::gemm`;
/// on the calling thread with the process's kernels (`cpu::kernels`) unless `par` (then split over
/// rayon with matrixmultiply, for batches smaller than the thread count).
#[allow(clippy::too_many_arguments)]
fn gemm<T: Elem>(
    par: bool,
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    beta: T,
    c: &mut [T],
) {
    if par && rayon::current_num_threads() > 1 {
        cpu::gemm(m, k, n, T::one(), a, ta, b, tb, beta, c);
        return;
    }
    debug_assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    kernels::gemm_on_thread(kernels::current(), m, k, n, a, ta, b, tb, beta, c);
}

/// The weight gradient's product dW += dy · colsᵀ reads its right operand transposed. On few output
/// channels matrixmultiply packs that operand faster than the gemm crate (measured: 44 against 20
/// GFLOP/s at 16 channels, 90 against 52 at 64 with 1024 positions); from 128 channels on the gemm
/// crate is as fast or faster (110–130 against 63–114).
const WEIGHT_GRAD_FAST_MIN_COUT: usize = 128;

/// Column matrix [cin_g·KH·KW, nb·OHW] of group `grp` of a chunk of `nb` images x [nb, Cin, HW], the
/// images side by side (`ld` = nb·OHW columns).
fn fill_cols<T: Elem>(x: &[T], g: &ConvGeom, grp: usize, nb: usize, cols: &mut [T], ld: usize) {
    let (hw, ohw) = (g.hw(), g.ohw());
    for j in 0..nb {
        let xg = &x[(j * g.cin + grp * g.cin_g) * hw..][..g.cin_g * hw];
        if g.is_pointwise() {
            for (r, src) in xg.chunks(hw).enumerate() {
                cols[r * ld + j * ohw..r * ld + (j + 1) * ohw].copy_from_slice(src);
            }
        } else {
            im2col(xg, g, cols, ld, j * ohw);
        }
    }
}

/// Stride 1 and an output as large as the input ("same" padding, e.g. 3×3 with padding 1): one row
/// of the column matrix is the input plane shifted by a constant offset, so `im2col_same` copies it
/// with one `memcpy` per tap instead of one per output row.
fn is_same_stride1(g: &ConvGeom) -> bool {
    g.sh == 1 && g.sw == 1 && g.oh == g.h && g.ow == g.w
}

/// `im2col` for `is_same_stride1` geometries: for tap (kh, kw) the row is x shifted by
/// (kh − ph)·W + (kw − pw); the span of valid output rows is copied at once, then the entries that
/// wrapped around a row edge (the columns the tap reads from the padding) and the padded rows are
/// zeroed.
fn im2col_same<T: Elem>(x: &[T], g: &ConvGeom, cols: &mut [T], ld: usize, col0: usize) {
    let (hw, w) = (g.hw(), g.w);
    for ci in 0..g.cin_g {
        let plane = &x[ci * hw..(ci + 1) * hw];
        for kh in 0..g.kh {
            let (oh_lo, oh_hi) = valid_range(kh, g.ph, 1, g.h, g.oh);
            for kw in 0..g.kw {
                let (ow_lo, ow_hi) = valid_range(kw, g.pw, 1, g.w, g.ow);
                let r = (ci * g.kh + kh) * g.kw + kw;
                let row = &mut cols[r * ld + col0..r * ld + col0 + hw];
                if oh_lo == oh_hi || ow_lo == ow_hi {
                    row.fill(T::zero());
                    continue;
                }
                row[..oh_lo * w].fill(T::zero());
                row[oh_hi * w..].fill(T::zero());
                // Output position p reads input p + shift; copy the positions whose input exists.
                let shift =
                    (kh as isize - g.ph as isize) * w as isize + kw as isize - g.pw as isize;
                let a = ((oh_lo * w) as isize).max(-shift) as usize;
                let b = ((oh_hi * w) as isize).min(hw as isize - shift) as usize;
                if a < b {
                    let src0 = (a as isize + shift) as usize;
                    row[a..b].copy_from_slice(&plane[src0..src0 + (b - a)]);
                }
                // Positions of [oh_lo·W, oh_hi·W) outside [a, b), and those that wrapped from the
                // neighbouring row, are exactly the columns outside [ow_lo, ow_hi).
                if ow_lo > 0 || ow_hi < g.ow {
                    for oh in oh_lo..oh_hi {
                        let out = &mut row[oh * w..(oh + 1) * w];
                        cpu::zero_edge(&mut out[..ow_lo]);
                        cpu::zero_edge(&mut out[ow_hi..]);
                    }
                }
            }
        }
    }
}

/// Unfolds one group of one image, x [cin_g, H, W], into the columns `col0..col0 + OH·OW` of a column
/// matrix with `ld` columns and cin_g·KH·KW rows.
fn im2col<T: Elem>(x: &[T], g: &ConvGeom, cols: &mut [T], ld: usize, col0: usize) {
    if is_same_stride1(g) {
        im2col_same(x, g, cols, ld, col0);
        return;
    }
    let (hw, ohw) = (g.hw(), g.ohw());
    for ci in 0..g.cin_g {
        let plane = &x[ci * hw..(ci + 1) * hw];
        for kh in 0..g.kh {
            let (oh_lo, oh_hi) = valid_range(kh, g.ph, g.sh, g.h, g.oh);
            for kw in 0..g.kw {
                let (ow_lo, ow_hi) = valid_range(kw, g.pw, g.sw, g.w, g.ow);
                let r = (ci * g.kh + kh) * g.kw + kw;
                let row = &mut cols[r * ld + col0..r * ld + col0 + ohw];
                for oh in 0..g.oh {
                    let out = &mut row[oh * g.ow..(oh + 1) * g.ow];
                    if oh < oh_lo || oh >= oh_hi {
                        out.fill(T::zero());
                        continue;
                    }
                    let ih = oh * g.sh + kh - g.ph;
                    let xrow = &plane[ih * g.w..(ih + 1) * g.w];
                    cpu::zero_edge(&mut out[..ow_lo]);
                    cpu::zero_edge(&mut out[ow_hi..]);
                    if ow_lo == ow_hi {
                        continue;
                    }
                    let iw0 = ow_lo * g.sw + kw - g.pw;
                    let dst = &mut out[ow_lo..ow_hi];
                    if g.sw == 1 {
                        dst.copy_from_slice(&xrow[iw0..iw0 + dst.len()]);
                    } else {
                        for (o, &v) in dst.iter_mut().zip(xrow[iw0..].iter().step_by(g.sw)) {
                            *o = v;
                        }
                    }
                }
            }
        }
    }
}

/// Folds the columns `col0..col0 + OH·OW` of a column matrix (`ld` columns) back onto one group of one
/// image, dx [cin_g, H, W], accumulating.
fn col2im<T: Elem>(cols: &[T], ld: usize, col0: usize, g: &ConvGeom, dx: &mut [T]) {
    let (hw, ohw) = (g.hw(), g.ohw());
    for ci in 0..g.cin_g {
        let plane = &mut dx[ci * hw..(ci + 1) * hw];
        for kh in 0..g.kh {
            let (oh_lo, oh_hi) = valid_range(kh, g.ph, g.sh, g.h, g.oh);
            for kw in 0..g.kw {
                let (ow_lo, ow_hi) = valid_range(kw, g.pw, g.sw, g.w, g.ow);
                if ow_lo == ow_hi {
                    continue;
                }
                let r = (ci * g.kh + kh) * g.kw + kw;
                let row = &cols[r * ld + col0..r * ld + col0 + ohw];
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.sh + kh - g.ph;
                    let iw0 = ow_lo * g.sw + kw - g.pw;
                    let src = &row[oh * g.ow + ow_lo..oh * g.ow + ow_hi];
                    strided_axpy(
                        T::one(),
                        src,
                        &mut plane[ih * g.w + iw0..(ih + 1) * g.w],
                        g.sw,
                    );
                }
            }
        }
    }
}

/// Gathers group `grp` of dy for a chunk of images, [nb, Cout, OHW], into one matrix [Cout_g, nb·OHW].
fn gather_dy<T: Elem>(dy: &[T], g: &ConvGeom, grp: usize, nb: usize, out: &mut [T]) {
    let (ohw, ld) = (g.ohw(), nb * g.ohw());
    for co in 0..g.cout_g {
        for j in 0..nb {
            let src = (j * g.cout + grp * g.cout_g + co) * ohw;
            out[co * ld + j * ohw..co * ld + (j + 1) * ohw].copy_from_slice(&dy[src..src + ohw]);
        }
    }
}

/// Forward of a chunk of images: y [nb, Cout, OHW] from x [nb, Cin, HW].
fn conv_chunk<T: Elem>(
    x: &[T],
    w: &[T],
    g: &ConvGeom,
    par: bool,
    scratch: &mut Vec<T>,
    y: &mut [T],
) {
    let (k, ohw, hw) = (g.k_cols(), g.ohw(), g.hw());
    let nb = y.len() / (g.cout * ohw);
    let ld = nb * ohw;
    // One image writes straight into y (and a pointwise one reads straight from x).
    let single = nb == 1;
    let cols_len = if single && g.is_pointwise() {
        0
    } else {
        k * ld
    };
    let tmp_len = if single { 0 } else { g.cout_g * ld };
    // SAFETY: im2col / the row copies write every column entry (zeros included) and the GEMM
    // (beta = 0) every entry of tmp before either is read.
    unsafe { cpu::arena::resize_for_overwrite(scratch, cols_len + tmp_len) };
    let (cols, tmp) = scratch.split_at_mut(cols_len);
    for grp in 0..g.groups {
        let wg = &w[grp * g.cout_g * k..(grp + 1) * g.cout_g * k];
        let colm: &[T] = if cols_len == 0 {
            &x[grp * g.cin_g * hw..(grp + 1) * g.cin_g * hw]
        } else {
            fill_cols(x, g, grp, nb, cols, ld);
            cols
        };
        if single {
            let yg = &mut y[grp * g.cout_g * ohw..(grp + 1) * g.cout_g * ohw];
            gemm(par, g.cout_g, k, ohw, wg, false, colm, false, T::zero(), yg);
        } else {
            gemm(par, g.cout_g, k, ld, wg, false, colm, false, T::zero(), tmp);
            for co in 0..g.cout_g {
                for j in 0..nb {
                    let dst = (j * g.cout + grp * g.cout_g + co) * ohw;
                    y[dst..dst + ohw]
                        .copy_from_slice(&tmp[co * ld + j * ohw..co * ld + (j + 1) * ohw]);
                }
            }
        }
    }
}

fn conv2d_host<T: Elem>(x: &Tensor, w: &Tensor, b: Option<&Tensor>, spec: Conv2dSpec) -> Tensor {
    cpu::arena::keep_freed_buffers();
    let g = ConvGeom::new(x.shape(), w.shape(), spec);
    let (xs, ws) = (x.host::<T>(), w.host::<T>());
    let (x_img, y_img) = (g.cin * g.hw(), g.cout * g.ohw());
    let mut y = if g.is_depthwise() {
        vec![T::zero(); g.n * y_img] // depthwise_fwd accumulates into y
    } else {
        // SAFETY: every chunk's GEMMs (beta = 0) or copies write all of its outputs before any read.
        unsafe { cpu::arena::vec_for_overwrite(g.n * y_img) }
    };
    let plan = Plan::new(&g);
    let chunk = |c: usize, par: bool, s: &mut Vec<T>, yc: &mut [T]| {
        let (i0, nb) = (c * plan.nb, yc.len() / y_img);
        conv_chunk(&xs[i0 * x_img..(i0 + nb) * x_img], ws, &g, par, s, yc);
    };
    if let (Some(direct), Some(x32), Some(y32)) =
        (same_conv(&g, ws, &plan), as_f32(xs), as_f32_mut(&mut y))
    {
        // Small planes take several images per call; each thread keeps to its own images.
        let nb = direct.images_per_call().clamp(1, plan.per_thread);
        y32.par_chunks_mut(nb * y_img)
            .zip(x32.par_chunks(nb * x_img))
            .for_each_init(Vec::new, |s, (yc, xc)| direct.run(xc, s, yc));
    } else if g.is_depthwise() {
        depthwise_fwd(xs, ws, &g, &mut y);
    } else if plan.batch_par {
        y.par_chunks_mut(plan.nb * y_img)
            .enumerate()
            .for_each_init(Vec::new, |s, (c, yc)| chunk(c, false, s, yc));
    } else {
        let mut s = Vec::new();
        for (c, yc) in y.chunks_mut(plan.nb * y_img).enumerate() {
            chunk(c, true, &mut s, yc);
        }
    }
    if let Some(b) = b {
        let bs = b.host::<T>();
        let (ohw, cout) = (g.ohw(), g.cout);
        cpu::par_chunks(&mut y, ohw, ohw, |i, plane| {
            let bv = bs[i % cout];
            plane.iter_mut().for_each(|v| *v += bv);
        });
    }
    Tensor::from_vec(&g.y_shape(), y)
}

/// The direct kernel for this forward convolution (`cpu::conv_same`) when it applies
/// (`direct_applies`) and the images are spread over the threads (with fewer images than threads
/// the im2col path splits each GEMM instead).
fn same_conv<T: Elem>(g: &ConvGeom, w: &[T], plan: &Plan) -> Option<cpu::conv_same::SameConv> {
    let spread = plan.batch_par || rayon::current_num_threads() == 1;
    if !(spread && g.cin <= DIRECT_FWD_MAX_CIN && direct_applies::<T>(g)) {
        return None;
    }
    let w32 = as_f32(w)?;
    Some(same_geometry(g).with_weights(w32))
}

/// Whether the direct kernels (`cpu::conv_same`) can take this convolution: f32, one group, stride
/// 1 with "same" padding and a kernel larger than 1×1, an AVX-512 CPU with the fast kernels.
fn direct_applies<T: Elem>(g: &ConvGeom) -> bool {
    let fits = is_same_stride1(g) && g.groups == 1 && !g.is_pointwise();
    T::DTYPE == DType::F32 && fits && cpu::conv_same::available()
}

/// Where the direct kernels are faster than im2col + the gemm crate (`bench-cpu-conv`: one thread,
/// batch 32, 3×3, BENCHMARKS.md "Direct 3×3 convolutions"): the forward (and the backward-data, a
/// forward) below 512 input channels (at 512 channels on 4×4 planes 0.86–0.94×, 1.03–1.38×
/// elsewhere); the weight gradient on planes of at least 8×8 (1.03–1.9×; on 4×4 planes, one
/// vector per image, 0.8–0.92×).
const DIRECT_FWD_MAX_CIN: usize = 511;
const DIRECT_WGRAD_MIN_POSITIONS: usize = 64;

fn same_geometry(g: &ConvGeom) -> cpu::conv_same::SameConv {
    cpu::conv_same::SameConv::new(g.cout, g.cin, (g.kh, g.kw), (g.h, g.w))
}

/// `s` as f32 values when `T` is f32.
fn as_f32<T: Elem>(s: &[T]) -> Option<&[f32]> {
    (T::DTYPE == DType::F32).then(|| {
        // SAFETY: DTYPE F32 is implemented only by f32 (tensor::elem), so T is f32.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) }
    })
}

/// `s` as f32 values when `T` is f32.
fn as_f32_mut<T: Elem>(s: &mut [T]) -> Option<&mut [f32]> {
    (T::DTYPE == DType::F32).then(|| {
        // SAFETY: as `as_f32`.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
    })
}

/// dx of a chunk of images: dx [nb, Cin, HW] from dy [nb, Cout, OHW].
fn conv_bwd_data_chunk<T: Elem>(
    dy: &[T],
    w: &[T],
    g: &ConvGeom,
    par: bool,
    scratch: &mut Vec<T>,
    dx: &mut [T],
) {
    let (k, ohw, hw) = (g.k_cols(), g.ohw(), g.hw());
    let nb = dx.len() / (g.cin * hw);
    let ld = nb * ohw;
    let single = nb == 1;
    let dym_len = if single { 0 } else { g.cout_g * ld };
    let dcols_len = if single && g.is_pointwise() {
        0
    } else {
        k * ld
    };
    // SAFETY: gather_dy writes all of dym and the GEMM (beta = 0) all of dcols before they are read.
    unsafe { cpu::arena::resize_for_overwrite(scratch, dym_len + dcols_len) };
    let (dym, dcols) = scratch.split_at_mut(dym_len);
    for grp in 0..g.groups {
        let wg = &w[grp * g.cout_g * k..(grp + 1) * g.cout_g * k];
        let dyg: &[T] = if single {
            &dy[grp * g.cout_g * ohw..(grp + 1) * g.cout_g * ohw]
        } else {
            gather_dy(dy, g, grp, nb, dym);
            dym
        };
        // dcols [K, nb·OHW] = W_gᵀ · dy_g
        if dcols_len == 0 {
            let dxg = &mut dx[grp * g.cin_g * hw..(grp + 1) * g.cin_g * hw];
            gemm(par, k, g.cout_g, ohw, wg, true, dyg, false, T::zero(), dxg);
            continue;
        }
        gemm(par, k, g.cout_g, ld, wg, true, dyg, false, T::zero(), dcols);
        for j in 0..nb {
            let dxg = &mut dx[(j * g.cin + grp * g.cin_g) * hw..][..g.cin_g * hw];
            if g.is_pointwise() {
                for (r, dst) in dxg.chunks_mut(hw).enumerate() {
                    dst.copy_from_slice(&dcols[r * ld + j * ohw..r * ld + (j + 1) * ohw]);
                }
            } else {
                col2im(dcols, ld, j * ohw, g, dxg);
            }
        }
    }
}

fn conv2d_bwd_data_host<T: Elem>(
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    spec: Conv2dSpec,
) -> Tensor {
    let g = ConvGeom::new(x_shape, w.shape(), spec);
    cpu::arena::keep_freed_buffers();
    if is_same_stride1(&g) && !g.is_pointwise() && !g.is_depthwise() {
        return bwd_data_as_forward::<T>(dy, w, &g);
    }
    let (dys, ws) = (dy.host::<T>(), w.host::<T>());
    let (x_img, y_img) = (g.cin * g.hw(), g.cout * g.ohw());
    let mut dx = vec![T::zero(); g.n * x_img];
    let plan = Plan::new(&g);
    let chunk = |c: usize, par: bool, s: &mut Vec<T>, dxc: &mut [T]| {
        let (i0, nb) = (c * plan.nb, dxc.len() / x_img);
        conv_bwd_data_chunk(&dys[i0 * y_img..(i0 + nb) * y_img], ws, &g, par, s, dxc);
    };
    if g.is_depthwise() {
        depthwise_bwd_data(dys, ws, &g, &mut dx);
    } else if plan.batch_par {
        dx.par_chunks_mut(plan.nb * x_img)
            .enumerate()
            .for_each_init(Vec::new, |s, (c, dxc)| chunk(c, false, s, dxc));
    } else {
        let mut s = Vec::new();
        for (c, dxc) in dx.chunks_mut(plan.nb * x_img).enumerate() {
            chunk(c, true, &mut s, dxc);
        }
    }
    Tensor::from_vec(&g.x_shape(), dx)
}

/// dx of a stride-1 "same" convolution as a forward convolution of dy: dx[ci] = Σ_co dy[co] ⋆ W[co, ci]
/// flipped in both axes, with padding K − 1 − p (= p here). Uses the forward's im2col (one copy per
/// tap) and GEMM instead of a GEMM into a column matrix and a col2im that adds it back tap by tap
/// (the slowest piece of the backward pass in perf), and writes dx once instead of zeroing it first.
fn bwd_data_as_forward<T: Elem>(dy: &Tensor, w: &Tensor, g: &ConvGeom) -> Tensor {
    let ws = w.host::<T>();
    let (kh, kw, kk) = (g.kh, g.kw, g.kh * g.kw);
    // W' [Cin, Cout_g, KH, KW]: group grp's input channel ci reads output channel co of the same group,
    // its KH×KW taps flipped in both axes, which is the tap block reversed (tap (i, j) = i·KW + j
    // takes (KH−1−i)·KW + KW−1−j = KH·KW − 1 − (i·KW + j)). Written one input channel's row at a
    // time (sequential stores) and in parallel: with an index division per element this loop took a
    // third of the backward-data time of 512-channel convolutions on 4×4 planes.
    let per_ci = g.cout_g * kk;
    // SAFETY: every chunk of `per_ci` values is written whole below before the tensor is read.
    let mut wt = unsafe { cpu::arena::vec_for_overwrite(g.cin * per_ci) };
    cpu::par_chunks(&mut wt, per_ci, per_ci, |c, dst| {
        let (grp, ci) = (c / g.cin_g, c % g.cin_g);
        for (co, d) in dst.chunks_exact_mut(kk).enumerate() {
            let src = &ws[((grp * g.cout_g + co) * g.cin_g + ci) * kk..][..kk];
            d.iter_mut()
                .zip(src.iter().rev())
                .for_each(|(d, &s)| *d = s);
        }
    });
    let wt = Tensor::from_vec(&[g.cin, g.cout_g, kh, kw], wt);
    let spec = Conv2dSpec {
        stride: (1, 1),
        padding: (kh - 1 - g.ph, kw - 1 - g.pw),
        groups: g.groups,
    };
    conv2d_host::<T>(dy, &wt, None, spec)
}

/// Accumulates a chunk of images' contribution into dw [Cout, K]: dW_g += dy_g · colsᵀ, with the column
/// matrix [K, nb·OHW] read transposed by the GEMM's packing (no transpose pass; a pointwise
/// convolution of one image reads x itself).
fn conv_bwd_weight_chunk<T: Elem>(
    x: &[T],
    dy: &[T],
    g: &ConvGeom,
    par: bool,
    scratch: &mut Vec<T>,
    dw: &mut [T],
) {
    let (k, ohw, hw) = (g.k_cols(), g.ohw(), g.hw());
    let nb = x.len() / (g.cin * hw);
    let ld = nb * ohw;
    let single = nb == 1;
    let cols_len = if single && g.is_pointwise() {
        0
    } else {
        k * ld
    };
    let dym_len = if single { 0 } else { g.cout_g * ld };
    // SAFETY: fill_cols writes every column entry and gather_dy all of dym before they are read.
    unsafe { cpu::arena::resize_for_overwrite(scratch, cols_len + dym_len) };
    let (cols, dym) = scratch.split_at_mut(cols_len);
    let kernel = match kernels::current() {
        kernels::GemmKernel::Fast if g.cout_g >= WEIGHT_GRAD_FAST_MIN_COUT => {
            kernels::GemmKernel::Fast
        }
        _ => kernels::GemmKernel::Portable,
    };
    for grp in 0..g.groups {
        let colm: &[T] = if cols_len == 0 {
            &x[grp * g.cin_g * hw..(grp + 1) * g.cin_g * hw]
        } else {
            fill_cols(x, g, grp, nb, cols, ld);
            cols
        };
        let dyg: &[T] = if single {
            &dy[grp * g.cout_g * ohw..(grp + 1) * g.cout_g * ohw]
        } else {
            gather_dy(dy, g, grp, nb, dym);
            dym
        };
        let dwg = &mut dw[grp * g.cout_g * k..(grp + 1) * g.cout_g * k];
        // dW_g [Cout_g, K] += dy_g [Cout_g, nb·OHW] · colsᵀ [nb·OHW, K]
        if par && rayon::current_num_threads() > 1 {
            cpu::gemm(
                g.cout_g,
                ld,
                k,
                T::one(),
                dyg,
                false,
                colm,
                true,
                T::one(),
                dwg,
            );
        } else {
            kernels::gemm_on_thread(
                kernel,
                g.cout_g,
                ld,
                k,
                dyg,
                false,
                colm,
                true,
                T::one(),
                dwg,
            );
        }
    }
}

fn conv2d_bwd_weight_host<T: Elem>(
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    spec: Conv2dSpec,
) -> Tensor {
    let g = ConvGeom::new(x.shape(), w_shape, spec);
    cpu::arena::keep_freed_buffers();
    let (xs, dys) = (x.host::<T>(), dy.host::<T>());
    let (x_img, y_img) = (g.cin * g.hw(), g.cout * g.ohw());
    let w_len = g.cout * g.k_cols();
    let plan = Plan::for_weight_grad(&g);
    // Images [a, b) in chunks of `plan.nb`, accumulated into one dw.
    let range = |a: usize, b: usize, par: bool| {
        let mut dw = vec![T::zero(); w_len];
        let mut s = Vec::new();
        let mut i = a;
        while i < b {
            let e = (i + plan.nb).min(b);
            let (xc, dyc) = (&xs[i * x_img..e * x_img], &dys[i * y_img..e * y_img]);
            conv_bwd_weight_chunk(xc, dyc, &g, par, &mut s, &mut dw);
            i = e;
        }
        dw
    };
    let direct = (plan.batch_par || rayon::current_num_threads() == 1)
        && g.hw() >= DIRECT_WGRAD_MIN_POSITIONS
        && direct_applies::<T>(&g);
    let dw = if let (true, Some(x32), Some(dy32)) = (direct, as_f32(xs), as_f32(dys)) {
        let conv = same_geometry(&g);
        // Each thread adds its images into its own dw (`weight_grad_images_per_call` at a time);
        // the per-thread sums are added up in range order (`sum_in_order`), as below.
        let nb = conv.weight_grad_images_per_call().clamp(1, plan.per_thread);
        let range = |r: usize| {
            let (a, b) = (r * plan.per_thread, ((r + 1) * plan.per_thread).min(g.n));
            let (mut dw, mut s) = (vec![0.0f32; w_len], Vec::new());
            for i in (a..b).step_by(nb) {
                let e = (i + nb).min(b);
                let (xc, dyc) = (&x32[i * x_img..e * x_img], &dy32[i * y_img..e * y_img]);
                conv.weight_grad(xc, dyc, &mut s, &mut dw);
            }
            dw
        };
        let parts: Vec<Vec<f32>> = (0..g.n.div_ceil(plan.per_thread))
            .into_par_iter()
            .map(range)
            .collect();
        return Tensor::from_vec(&g.w_shape(), sum_in_order(parts));
    } else if g.is_depthwise() {
        let mut dw = vec![T::zero(); w_len];
        depthwise_bwd_weight(xs, dys, &g, &mut dw);
        dw
    } else if plan.batch_par {
        let per = plan.per_thread;
        let partial: Vec<Vec<T>> = (0..g.n.div_ceil(per))
            .into_par_iter()
            .map(|r| range(r * per, ((r + 1) * per).min(g.n), false))
            .collect();
        sum_in_order(partial)
    } else {
        range(0, g.n, true)
    };
    Tensor::from_vec(&g.w_shape(), dw)
}

/// The per-range weight gradients added up in range order (a fixed order for a given split).
fn sum_in_order<T: Elem>(parts: Vec<Vec<T>>) -> Vec<T> {
    let mut parts = parts.into_iter();
    let mut dw = parts.next().expect("at least one range");
    for p in parts {
        dw.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
    }
    dw
}

fn conv2d_bwd_bias_host<T: Elem>(dy: &Tensor) -> Tensor {
    let (n, c, hw) = (dy.dim(0), dy.dim(1), dy.dim(2) * dy.dim(3));
    let dys = dy.host::<T>();
    let mut db = vec![T::zero(); c];
    cpu::par_chunks(&mut db, 1, n * hw, |ch, out| {
        out[0] = (0..n)
            .map(|i| {
                dys[(i * c + ch) * hw..(i * c + ch + 1) * hw]
                    .iter()
                    .copied()
                    .sum::<T>()
            })
            .sum();
    });
    Tensor::from_vec(&[c], db)
}

// ---- depthwise: direct loops, one plane (image, channel) at a time ----
//
// For each tap (kh, kw), the valid output positions of a row form a contiguous range whose inputs sit at
// stride `sw` in one input row: the inner loops are zips of slices (no bounds checks, vectorised for
// stride 1).

/// Σ a[j]·b[j·stride] over j < a.len() (b starts at the first input).
#[inline(always)]
fn strided_dot<T: Elem>(a: &[T], b: &[T], stride: usize) -> T {
    let mut acc = T::zero();
    if stride == 1 {
        for (&u, &v) in a.iter().zip(&b[..a.len()]) {
            acc += u * v;
        }
    } else {
        for (&u, &v) in a.iter().zip(b.iter().step_by(stride)) {
            acc += u * v;
        }
    }
    acc
}

/// out[j·stride] += s·a[j] for j < a.len().
#[inline(always)]
fn strided_axpy<T: Elem>(s: T, a: &[T], out: &mut [T], stride: usize) {
    if stride == 1 {
        for (o, &v) in out[..a.len()].iter_mut().zip(a) {
            *o += s * v;
        }
    } else {
        for (o, &v) in out.iter_mut().step_by(stride).zip(a) {
            *o += s * v;
        }
    }
}

/// y[j] += s·x[j·stride] for j < y.len().
#[inline(always)]
fn gather_axpy<T: Elem>(s: T, x: &[T], y: &mut [T], stride: usize) {
    if stride == 1 {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += s * v;
        }
    } else {
        for (o, &v) in y.iter_mut().zip(x.iter().step_by(stride)) {
            *o += s * v;
        }
    }
}

/// Calls `f(tap, oh, ow_lo..ow_hi, input offset of (oh, ow_lo))` for every tap and output row with
/// valid inputs.
#[inline(always)]
fn for_each_tap_row(g: &ConvGeom, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
    for kh in 0..g.kh {
        let (oh_lo, oh_hi) = valid_range(kh, g.ph, g.sh, g.h, g.oh);
        for kw in 0..g.kw {
            let (ow_lo, ow_hi) = valid_range(kw, g.pw, g.sw, g.w, g.ow);
            if ow_lo == ow_hi {
                continue;
            }
            for oh in oh_lo..oh_hi {
                let x0 = (oh * g.sh + kh - g.ph) * g.w + ow_lo * g.sw + kw - g.pw;
                f(kh * g.kw + kw, oh, ow_lo, ow_hi, x0);
            }
        }
    }
}

/// y[n, c] = Σ_{kh,kw} w[c, kh, kw] · x[n, c] shifted; each output plane on its own.
fn depthwise_fwd<T: Elem>(x: &[T], w: &[T], g: &ConvGeom, y: &mut [T]) {
    let (hw, ohw, kk) = (g.hw(), g.ohw(), g.kh * g.kw);
    cpu::par_chunks(y, ohw, ohw * kk, |p, yp| {
        let (xp, wc) = (&x[p * hw..(p + 1) * hw], &w[(p % g.cout) * kk..][..kk]);
        for_each_tap_row(g, |tap, oh, lo, hi, x0| {
            gather_axpy(
                wc[tap],
                &xp[x0..],
                &mut yp[oh * g.ow + lo..oh * g.ow + hi],
                g.sw,
            );
        });
    });
}

fn depthwise_bwd_data<T: Elem>(dy: &[T], w: &[T], g: &ConvGeom, dx: &mut [T]) {
    let (hw, ohw, kk) = (g.hw(), g.ohw(), g.kh * g.kw);
    cpu::par_chunks(dx, hw, ohw * kk, |p, dxp| {
        let (dyp, wc) = (&dy[p * ohw..(p + 1) * ohw], &w[(p % g.cin) * kk..][..kk]);
        for_each_tap_row(g, |tap, oh, lo, hi, x0| {
            strided_axpy(
                wc[tap],
                &dyp[oh * g.ow + lo..oh * g.ow + hi],
                &mut dxp[x0..],
                g.sw,
            );
        });
    });
}

/// dw[c] = Σ_n Σ_{oh,ow} dy[n, c, oh, ow] · x[n, c, shifted]: one channel's KH×KW taps per task.
fn depthwise_bwd_weight<T: Elem>(x: &[T], dy: &[T], g: &ConvGeom, dw: &mut [T]) {
    let (hw, ohw, kk) = (g.hw(), g.ohw(), g.kh * g.kw);
    cpu::par_chunks(dw, kk, g.n * ohw * kk, |c, dwc| {
        for i in 0..g.n {
            let p = i * g.cin + c;
            let (xp, dyp) = (&x[p * hw..(p + 1) * hw], &dy[p * ohw..(p + 1) * ohw]);
            for_each_tap_row(g, |tap, oh, lo, hi, x0| {
                dwc[tap] += strided_dot(&dyp[oh * g.ow + lo..oh * g.ow + hi], &xp[x0..], g.sw);
            });
        }
    });
}
