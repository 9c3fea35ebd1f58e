//! cuDNN convolutions: the three passes share one plan per shape and one way of choosing an
//! algorithm.
//!
//! Per convolution shape (and math mode and determinism) a plan is built once and cached: the tensor,
//! filter and per-pass convolution descriptors, and per pass an algorithm. By default it is the one
//! cuDNN *measures* fastest on the real buffers (`cudnnFind…AlgorithmEx`), once per shape, remembered
//! on disk per device and cuDNN version (`algo_cache`) so that later runs do not measure again; with
//! `--deterministic` (and with `PODGPU_CONV_ALGO=heuristic`) it is cuDNN's heuristic ranking instead,
//! the same choice every time. Either way the candidates pass the rules of `pick`: fp32 accepts only FMA kernels (on Hopper cuDNN's default math
//! may use TF32, which would make "fp32" silently TF32), tf32 prefers tensor-op kernels and never
//! takes the ones that down-convert to fp16, deterministic mode (`cpu::deterministic()`, set by
//! `--deterministic`) only deterministic algorithms, and every workspace fits `WORKSPACE_LIMIT`.
//! Workspaces come from the pool, so a steady training step allocates nothing.
//!
//! The bf16 path (issue 12) uses the same plans, rules and disk cache, keyed by the storage type
//! too: x, w, y, dx and dy stored in bf16 (`CUDNN_DATA_BFLOAT16`), f32 compute (the convolution
//! descriptor's type), picked with tf32's preference (tensor-op kernels first, never the fp16
//! down-conversion, which would lose bf16's range). Its weight gradient stays f32, as the CPU
//! emulation keeps it (`cpu::bf16`): cuDNN's legacy API wants dw in the type of x and dy, and a bf16
//! dw would add a rounding that the f32 master weights' gradient must not have, so
//! `conv2d_bwd_filter_bf16` widens x and dy to f32 (exact) and runs the f32 plan with TF32 tensor
//! ops. That is exact arithmetic for bf16 values (an 8-bit significand fits TF32's 11 bits, and the
//! product of two fits f32), so the dw is the emulation's f32 sum up to summation order; the cost is
//! the widening copies and TF32's rate (half of bf16's) for this one pass.

use super::algo_cache::{self, AlgoCache};
use super::{
    alloc, dims4, format_of, input, ok, one, with_dnn, zero, ConvDesc, Fail, FilterDesc, OutBuf,
};
use super::{Storage, TensorDesc};
use crate::cuda::bf16::to_f32;
use crate::cuda::{math_mode, Gpu, MathMode};
use crate::tensor::{numel, Layout, Tensor};
use cudarc::cudnn::sys;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

/// Geometry of a 2-D convolution. Pairs are (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvGeom {
    /// Output height and width for an input of `h`×`w` and a filter of `r`×`s`.
    pub fn out_hw(&self, h: usize, w: usize, r: usize, s: usize) -> (usize, usize) {
        let oh = (h + 2 * self.pad[0] - (self.dilation[0] * (r - 1) + 1)) / self.stride[0] + 1;
        let ow = (w + 2 * self.pad[1] - (self.dilation[1] * (s - 1) + 1)) / self.stride[1] + 1;
        (oh, ow)
    }
}

/// The three passes of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// y = conv(x, w)
    Forward,
    /// dx from dy and w
    BackwardData,
    /// dw from x and dy
    BackwardFilter,
}

impl Pass {
    const ALL: [Pass; 3] = [Pass::Forward, Pass::BackwardData, Pass::BackwardFilter];

    fn index(self) -> usize {
        self as usize
    }

    fn what(self) -> &'static str {
        match self {
            Pass::Forward => "forward convolution",
            Pass::BackwardData => "backward-data convolution",
            Pass::BackwardFilter => "backward-filter convolution",
        }
    }
}

/// Most workspace a convolution algorithm may ask for.
pub const WORKSPACE_LIMIT: usize = 1 << 30;

/// The math types in cuDNN's `cudnnMathType_t`, as the numbers cuDNN writes.
mod math {
    pub const DEFAULT: u32 = 0;
    pub const TENSOR_OP: u32 = 1;
    pub const TENSOR_OP_ALLOW_CONVERSION: u32 = 2;
    pub const FMA: u32 = 3;
}

/// One ranked result of cuDNN's heuristics, read as plain numbers (the three passes' perf structs
/// share this layout), so that a value the bindings do not know is never read as a Rust enum.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Candidate {
    pub algo: u32,
    pub status: u32,
    pub time: f32,
    pub memory: usize,
    pub determinism: u32,
    pub math: u32,
    pub reserved: [i32; 3],
}

// The three perf structs must have exactly this layout for the casts in `heuristics`.
const _: () = {
    assert!(
        std::mem::size_of::<Candidate>()
            == std::mem::size_of::<sys::cudnnConvolutionFwdAlgoPerf_t>()
    );
    assert!(
        std::mem::size_of::<Candidate>()
            == std::mem::size_of::<sys::cudnnConvolutionBwdDataAlgoPerf_t>()
    );
    assert!(
        std::mem::size_of::<Candidate>()
            == std::mem::size_of::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>()
    );
};

/// What the chosen algorithm must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Rules {
    pub mode: MathMode,
    pub deterministic: bool,
}

impl Rules {
    fn current() -> Rules {
        Rules {
            mode: math_mode(),
            deterministic: crate::cpu::deterministic(),
        }
    }

    /// The rules of the bf16 path whatever the math mode: tensor-op kernels first (bf16 inputs are
    /// exact in TF32 and on the tensor cores), never the fp16 down-conversion.
    fn tensor_op() -> Rules {
        Rules {
            mode: MathMode::Tf32,
            ..Rules::current()
        }
    }

    /// The descriptor math type to ask the heuristics with.
    fn descriptor_math(self) -> sys::cudnnMathType_t {
        match self.mode {
            MathMode::Fp32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            MathMode::Tf32 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        }
    }
}

/// Chooses from cuDNN's ranked results: the best-ranked one that succeeded, fits the workspace
/// limit, is deterministic when that is asked for, and has an allowed math type — fp32: FMA only;
/// tf32: tensor-op first, then default or FMA math (more precise, never worse), never the fp16
/// down-conversion. The error says which rule left nothing, for `what` (a pass and a shape).
pub(crate) fn pick(cands: &[Candidate], rules: Rules, what: &str) -> Result<Candidate, String> {
    let succeeded: Vec<&Candidate> = cands.iter().filter(|c| c.status == 0).collect();
    if succeeded.is_empty() {
        return Err(format!(
            "cuDNN offers no {what} algorithm for this shape ({} candidates, none succeeded)",
            cands.len()
        ));
    }
    let fits: Vec<&Candidate> = succeeded
        .into_iter()
        .filter(|c| c.memory <= WORKSPACE_LIMIT)
        .collect();
    if fits.is_empty() {
        return Err(format!(
            "every cuDNN {what} algorithm for this shape needs more than {} MiB of workspace",
            WORKSPACE_LIMIT >> 20
        ));
    }
    let allowed: Vec<&Candidate> = fits
        .into_iter()
        .filter(|c| !rules.deterministic || c.determinism == 1)
        .collect();
    if allowed.is_empty() {
        return Err(format!(
            "cuDNN has no deterministic {what} algorithm for this shape; run without \
             --deterministic (GPU results then vary slightly from run to run)"
        ));
    }
    let preference: &[u32] = match rules.mode {
        MathMode::Fp32 => &[math::FMA],
        MathMode::Tf32 => &[math::TENSOR_OP, math::DEFAULT, math::FMA],
    };
    preference
        .iter()
        .find_map(|m| allowed.iter().find(|c| c.math == *m))
        .map(|c| **c)
        .ok_or_else(|| match rules.mode {
            MathMode::Fp32 => format!(
                "cuDNN offers no true-fp32 (FMA-only) {what} algorithm for this shape, only \
                 ones that may use TF32; to accept TF32 run with --precision tf32 (train) or \
                 --math tf32 (fidelity, bench tools)"
            ),
            MathMode::Tf32 => {
                format!("cuDNN offers only {what} algorithms that convert to fp16 for this shape")
            }
        })
}

fn math_type(m: u32) -> sys::cudnnMathType_t {
    match m {
        math::TENSOR_OP => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        math::TENSOR_OP_ALLOW_CONVERSION => {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
        }
        math::FMA => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
    }
}

/// An algorithm of one pass, as the enum cuDNN's run call takes.
#[derive(Clone, Copy, Debug)]
enum Algo {
    Fwd(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

impl Algo {
    /// The enum for cuDNN's number of an algorithm of `pass`; `None` for a number the bindings do
    /// not know (never transmuted).
    fn of(pass: Pass, n: u32) -> Option<Algo> {
        use sys::cudnnConvolutionBwdDataAlgo_t as D;
        use sys::cudnnConvolutionBwdFilterAlgo_t as W;
        use sys::cudnnConvolutionFwdAlgo_t as F;
        Some(match (pass, n) {
            (Pass::Forward, 0) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM),
            (Pass::Forward, 1) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM),
            (Pass::Forward, 2) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_GEMM),
            (Pass::Forward, 3) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT),
            (Pass::Forward, 4) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_FFT),
            (Pass::Forward, 5) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING),
            (Pass::Forward, 6) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD),
            (Pass::Forward, 7) => Algo::Fwd(F::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED),
            (Pass::BackwardData, 0) => Algo::Data(D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0),
            (Pass::BackwardData, 1) => Algo::Data(D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1),
            (Pass::BackwardData, 2) => Algo::Data(D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT),
            (Pass::BackwardData, 3) => Algo::Data(D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING),
            (Pass::BackwardData, 4) => Algo::Data(D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD),
            (Pass::BackwardData, 5) => {
                Algo::Data(D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED)
            }
            (Pass::BackwardFilter, 0) => Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0),
            (Pass::BackwardFilter, 1) => Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1),
            (Pass::BackwardFilter, 2) => Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT),
            (Pass::BackwardFilter, 3) => Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3),
            (Pass::BackwardFilter, 4) => {
                Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD)
            }
            (Pass::BackwardFilter, 5) => {
                Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED)
            }
            (Pass::BackwardFilter, 6) => {
                Algo::Filter(W::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING)
            }
            _ => return None,
        })
    }

    fn name(self) -> String {
        match self {
            Algo::Fwd(a) => format!("{a:?}"),
            Algo::Data(a) => format!("{a:?}"),
            Algo::Filter(a) => format!("{a:?}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    x: [usize; 4],
    w: [usize; 4],
    geom: ConvGeom,
    rules: Rules,
    storage: Storage,
    /// NCHW, or NHWC activations with a KRSC filter (channels last).
    layout: Layout,
}

/// Descriptors and chosen algorithms of one convolution shape. One convolution descriptor per pass,
/// because each pass's algorithm may need its own math type.
pub(crate) struct ConvPlan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    y_shape: [usize; 4],
    conv: [ConvDesc; 3],
    /// Per pass: the algorithm and its workspace bytes, once chosen.
    algo: [Option<(Algo, usize)>; 3],
}

fn plan_in(plans: &mut HashMap<ConvKey, ConvPlan>, key: ConvKey) -> Result<&mut ConvPlan, String> {
    Ok(match plans.entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(v) => v.insert(build_plan(&key)?),
    })
}

/// How algorithms are chosen when no rule forces the heuristics: `PODGPU_CONV_ALGO=heuristic` or
/// `measured` (the default).
fn measure_by_default() -> bool {
    static MEASURED: OnceLock<bool> = OnceLock::new();
    *MEASURED.get_or_init(|| match std::env::var("PODGPU_CONV_ALGO").as_deref() {
        Ok("heuristic") => false,
        Ok("measured") | Err(_) => true,
        Ok(other) => {
            eprintln!(
                "warning: PODGPU_CONV_ALGO={other:?} is neither heuristic nor measured; measuring"
            );
            true
        }
    })
}

fn build_plan(key: &ConvKey) -> Result<ConvPlan, String> {
    let (x, w, g) = (key.x, key.w, &key.geom);
    let (oh, ow) = g.out_hw(x[2], x[3], w[2], w[3]);
    let y_shape = [x[0], w[0], oh, ow];
    let ty = key.storage.cudnn();
    let xd = TensorDesc::of(x, ty, key.layout)?;
    let yd = TensorDesc::of(y_shape, ty, key.layout)?;
    let wd = FilterDesc(
        cudarc::cudnn::result::create_filter_descriptor().map_err(|e| format!("{e:?}"))?,
    );
    // SAFETY: fresh descriptor, configured once.
    ok(
        unsafe {
            sys::cudnnSetFilter4dDescriptor(
                wd.0,
                ty,
                format_of(key.layout),
                w[0] as i32,
                w[1] as i32,
                w[2] as i32,
                w[3] as i32,
            )
        },
        "cudnnSetFilter4dDescriptor",
    )?;
    let mk_conv = || -> Result<ConvDesc, String> {
        let c = ConvDesc(
            cudarc::cudnn::result::create_convolution_descriptor().map_err(|e| format!("{e:?}"))?,
        );
        // SAFETY: fresh descriptor.
        unsafe {
            ok(
                sys::cudnnSetConvolution2dDescriptor(
                    c.0,
                    g.pad[0] as i32,
                    g.pad[1] as i32,
                    g.stride[0] as i32,
                    g.stride[1] as i32,
                    g.dilation[0] as i32,
                    g.dilation[1] as i32,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "cudnnSetConvolution2dDescriptor",
            )?;
            ok(
                sys::cudnnSetConvolutionGroupCount(c.0, g.groups as i32),
                "cudnnSetConvolutionGroupCount",
            )?;
            ok(
                sys::cudnnSetConvolutionMathType(c.0, key.rules.descriptor_math()),
                "cudnnSetConvolutionMathType",
            )?;
        }
        Ok(c)
    };
    let conv = [mk_conv()?, mk_conv()?, mk_conv()?];
    // Check our output shape against cuDNN's.
    let (mut n, mut c, mut h, mut wo) = (0, 0, 0, 0);
    // SAFETY: configured descriptors; writes four ints.
    ok(
        unsafe {
            sys::cudnnGetConvolution2dForwardOutputDim(
                conv[0].0, xd.0, wd.0, &mut n, &mut c, &mut h, &mut wo,
            )
        },
        "cudnnGetConvolution2dForwardOutputDim",
    )?;
    let cudnn_y = [n as usize, c as usize, h as usize, wo as usize];
    if cudnn_y != y_shape {
        return Err(format!(
            "conv output shape: ours {y_shape:?}, cuDNN {cudnn_y:?} (x {x:?}, w {w:?}, {g:?})"
        ));
    }
    Ok(ConvPlan {
        x: xd,
        w: wd,
        y: yd,
        y_shape,
        conv,
        algo: [None; 3],
    })
}

/// cuDNN's ranked heuristic results for one pass of a plan.
fn heuristics(
    handle: sys::cudnnHandle_t,
    p: &ConvPlan,
    pass: Pass,
) -> Result<Vec<Candidate>, String> {
    // More than any pass has algorithms (8, 6, 7), so nothing is cut off.
    const N: usize = 16;
    let mut out = [Candidate::default(); N];
    let mut got = 0i32;
    let cd = p.conv[pass.index()].0;
    // SAFETY: configured descriptors; cuDNN writes at most N results into a buffer of N structs of
    // the perf structs' layout (checked at compile time above).
    let status = unsafe {
        match pass {
            Pass::Forward => sys::cudnnGetConvolutionForwardAlgorithm_v7(
                handle,
                p.x.0,
                p.w.0,
                cd,
                p.y.0,
                N as i32,
                &mut got,
                out.as_mut_ptr() as *mut sys::cudnnConvolutionFwdAlgoPerf_t,
            ),
            Pass::BackwardData => sys::cudnnGetConvolutionBackwardDataAlgorithm_v7(
                handle,
                p.w.0,
                p.y.0,
                cd,
                p.x.0,
                N as i32,
                &mut got,
                out.as_mut_ptr() as *mut sys::cudnnConvolutionBwdDataAlgoPerf_t,
            ),
            Pass::BackwardFilter => sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                handle,
                p.x.0,
                p.y.0,
                cd,
                p.w.0,
                N as i32,
                &mut got,
                out.as_mut_ptr() as *mut sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            ),
        }
    };
    ok(status, &format!("heuristics of the {}", pass.what()))?;
    Ok(out[..(got.max(0) as usize).min(N)].to_vec())
}

/// cuDNN's results of running every algorithm of one pass on the real buffers (`io`: the pass's two
/// inputs and its output, in the run call's order), fastest first. The search workspace is the limit,
/// or a quarter of the free memory when that is less.
fn measure(
    handle: sys::cudnnHandle_t,
    gpu: &Arc<Gpu>,
    p: &ConvPlan,
    pass: Pass,
    io: Io,
) -> Result<Vec<Candidate>, Fail> {
    const N: usize = 16;
    let free = gpu.mem_info().map(|m| m.0).unwrap_or(WORKSPACE_LIMIT);
    let ws_bytes = WORKSPACE_LIMIT.min(free / 4);
    let ws = alloc(gpu, ws_bytes.div_ceil(4))?;
    let wsp = ws.device_ptr() as *mut c_void;
    let mut out = [Candidate::default(); N];
    let mut got = 0i32;
    let cd = p.conv[pass.index()].0;
    // SAFETY: the buffers match the plan's descriptors (as in `convolve`); the output is only
    // written (it is computed again afterwards); at most N results of the perf structs' layout.
    let status = unsafe {
        match pass {
            Pass::Forward => sys::cudnnFindConvolutionForwardAlgorithmEx(
                handle,
                p.x.0,
                io.a,
                p.w.0,
                io.b,
                cd,
                p.y.0,
                io.out,
                N as i32,
                &mut got,
                out.as_mut_ptr() as *mut sys::cudnnConvolutionFwdAlgoPerf_t,
                wsp,
                ws_bytes,
            ),
            Pass::BackwardData => sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                handle,
                p.w.0,
                io.a,
                p.y.0,
                io.b,
                cd,
                p.x.0,
                io.out,
                N as i32,
                &mut got,
                out.as_mut_ptr() as *mut sys::cudnnConvolutionBwdDataAlgoPerf_t,
                wsp,
                ws_bytes,
            ),
            Pass::BackwardFilter => sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                handle,
                p.x.0,
                io.a,
                p.y.0,
                io.b,
                cd,
                p.w.0,
                io.out,
                N as i32,
                &mut got,
                out.as_mut_ptr() as *mut sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                wsp,
                ws_bytes,
            ),
        }
    };
    ok(status, &format!("measuring the {}", pass.what()))?;
    Ok(out[..(got.max(0) as usize).min(N)].to_vec())
}

/// The device addresses of one pass's two inputs and its output.
#[derive(Clone, Copy)]
struct Io {
    a: *const c_void,
    b: *const c_void,
    out: *mut c_void,
}

/// The algorithm of `pass` for the plan (chosen at first use, then kept in the plan), with its math
/// type set on the pass's descriptor: measured (or taken from the disk cache of measurements) unless
/// deterministic mode or `PODGPU_CONV_ALGO=heuristic` asks for the heuristic ranking.
fn algorithm(
    handle: sys::cudnnHandle_t,
    gpu: &Arc<Gpu>,
    p: &mut ConvPlan,
    key: &ConvKey,
    pass: Pass,
    io: Io,
    algos: &mut AlgoCache,
) -> Result<(Algo, usize), Fail> {
    if let Some(a) = p.algo[pass.index()] {
        return Ok(a);
    }
    let what = format!(
        "{}{} (x {:?}, w {:?}, stride {:?}, pad {:?}, dilation {:?}, groups {})",
        if key.storage == Storage::Bf16 {
            "bf16 "
        } else {
            ""
        },
        pass.what(),
        key.x,
        key.w,
        key.geom.stride,
        key.geom.pad,
        key.geom.dilation,
        key.geom.groups
    );
    let c = if measure_by_default() && !key.rules.deterministic {
        let ck = algo_cache::key(
            pass,
            key.x,
            key.w,
            &key.geom,
            key.rules.mode,
            key.storage,
            key.layout,
        );
        // A remembered choice still has to pass today's rules and name a known algorithm.
        let remembered = algos.get(&ck).map(|c| Candidate {
            algo: c.algo,
            memory: c.workspace,
            math: c.math,
            determinism: 1,
            ..Candidate::default()
        });
        match remembered
            .filter(|c| Algo::of(pass, c.algo).is_some())
            .and_then(|c| pick(&[c], key.rules, &what).ok())
        {
            Some(c) => c,
            None => {
                let c = pick(&measure(handle, gpu, p, pass, io)?, key.rules, &what)?;
                let choice = algo_cache::Choice {
                    algo: c.algo,
                    workspace: c.memory,
                    math: c.math,
                };
                if let Err(e) = algos.insert(ck, choice) {
                    eprintln!(
                        "note: cuDNN algorithm cache not saved ({e}); the next run measures again"
                    );
                }
                c
            }
        }
    } else {
        pick(&heuristics(handle, p, pass)?, key.rules, &what)?
    };
    let algo = Algo::of(pass, c.algo).ok_or_else(|| {
        format!(
            "cuDNN chose algorithm number {} for the {what}, which podgpu does not know",
            c.algo
        )
    })?;
    // SAFETY: configured descriptor.
    ok(
        unsafe { sys::cudnnSetConvolutionMathType(p.conv[pass.index()].0, math_type(c.math)) },
        "cudnnSetConvolutionMathType",
    )?;
    p.algo[pass.index()] = Some((algo, c.memory));
    Ok((algo, c.memory))
}

/// One pass of a convolution: `a` and `b` are its two inputs in cuDNN's argument order (forward:
/// x, w; backward data: w, dy; backward filter: x, dy), stored as `storage` says; returns its
/// output (y, dx or dw) in the same storage, chosen under `rules`.
#[allow(clippy::too_many_arguments)]
fn convolve(
    pass: Pass,
    a: &Tensor,
    b: &Tensor,
    x: [usize; 4],
    w: [usize; 4],
    geom: &ConvGeom,
    storage: Storage,
    rules: Rules,
) -> Tensor {
    let layout = a.layout();
    let (gpu, ap) = input(a, storage, layout, pass.what());
    let (_, bp) = input(b, storage, layout, pass.what());
    let key = ConvKey {
        x,
        w,
        geom: *geom,
        rules,
        storage,
        layout,
    };
    with_dnn(&gpu, |d| {
        let handle = d.handle;
        let p = plan_in(&mut d.plans, key)?;
        let out_shape = match pass {
            Pass::Forward => p.y_shape,
            Pass::BackwardData => x,
            Pass::BackwardFilter => w,
        };
        let dy_shape = match pass {
            Pass::Forward => None,
            Pass::BackwardData => Some(b.shape()),
            Pass::BackwardFilter => Some(b.shape()),
        };
        if let Some(s) = dy_shape {
            if s != p.y_shape {
                return Err(Fail::Msg(format!(
                    "{}: dy is {s:?}, the convolution's output is {:?}",
                    pass.what(),
                    p.y_shape
                )));
            }
        }
        let out = OutBuf::alloc(&gpu, storage, numel(&out_shape))?;
        let io = Io {
            a: ap,
            b: bp,
            out: out.device_ptr() as *mut c_void,
        };
        let (algo, ws_bytes) = algorithm(handle, &gpu, p, &key, pass, io, &mut d.algos)?;
        let ws = alloc(&gpu, ws_bytes.div_ceil(4))?;
        let (wsp, outp) = (
            ws.device_ptr() as *mut c_void,
            out.device_ptr() as *mut c_void,
        );
        let cd = p.conv[pass.index()].0;
        // SAFETY: the buffers match the plan's descriptors (inputs from tensors of those shapes,
        // the output and the workspace sized from the plan); all on the handle's stream.
        let status = unsafe {
            match algo {
                Algo::Fwd(al) => sys::cudnnConvolutionForward(
                    handle,
                    one(),
                    p.x.0,
                    ap,
                    p.w.0,
                    bp,
                    cd,
                    al,
                    wsp,
                    ws_bytes,
                    zero(),
                    p.y.0,
                    outp,
                ),
                Algo::Data(al) => sys::cudnnConvolutionBackwardData(
                    handle,
                    one(),
                    p.w.0,
                    ap,
                    p.y.0,
                    bp,
                    cd,
                    al,
                    wsp,
                    ws_bytes,
                    zero(),
                    p.x.0,
                    outp,
                ),
                Algo::Filter(al) => sys::cudnnConvolutionBackwardFilter(
                    handle,
                    one(),
                    p.x.0,
                    ap,
                    p.y.0,
                    bp,
                    cd,
                    al,
                    wsp,
                    ws_bytes,
                    zero(),
                    p.w.0,
                    outp,
                ),
            }
        };
        ok(status, &format!("{} with {}", pass.what(), algo.name()))?;
        Ok(out.into_tensor(&out_shape).with_layout(layout))
    })
}

/// y = conv2d(x, w): x [N, C, H, W], w [K, C/groups, R, S] → y [N, K, OH, OW].
pub fn conv2d_fwd(x: &Tensor, w: &Tensor, geom: &ConvGeom) -> Tensor {
    let (xs, ws) = (dims4(x, "conv2d x"), dims4(w, "conv2d w"));
    let rules = Rules::current();
    convolve(Pass::Forward, x, w, xs, ws, geom, Storage::F32, rules)
}

/// dx of a convolution: dy [N, K, OH, OW], w [K, C/groups, R, S] → dx of shape `x_shape`.
pub fn conv2d_bwd_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], geom: &ConvGeom) -> Tensor {
    let xs: [usize; 4] = x_shape
        .try_into()
        .expect("conv2d_bwd_data: x_shape must be NCHW");
    let ws = dims4(w, "conv2d w");
    convolve(
        Pass::BackwardData,
        w,
        dy,
        xs,
        ws,
        geom,
        Storage::F32,
        Rules::current(),
    )
}

/// dw of a convolution: x [N, C, H, W], dy [N, K, OH, OW] → dw of shape `w_shape`.
pub fn conv2d_bwd_filter(x: &Tensor, dy: &Tensor, w_shape: &[usize], geom: &ConvGeom) -> Tensor {
    let ws: [usize; 4] = w_shape
        .try_into()
        .expect("conv2d_bwd_filter: w_shape must be 4-D");
    let xs = dims4(x, "conv2d x");
    convolve(
        Pass::BackwardFilter,
        x,
        dy,
        xs,
        ws,
        geom,
        Storage::F32,
        Rules::current(),
    )
}

/// y = conv2d(x, w) with bf16 x [N, C, H, W] and w [K, C/groups, R, S] → bf16 y [N, K, OH, OW]
/// (f32 compute; y rounded once to bf16, as the CPU emulation rounds it).
pub fn conv2d_fwd_bf16(x: &Tensor, w: &Tensor, geom: &ConvGeom) -> Tensor {
    let (xs, ws) = (dims4(x, "conv2d_fwd_bf16 x"), dims4(w, "conv2d_fwd_bf16 w"));
    convolve(
        Pass::Forward,
        x,
        w,
        xs,
        ws,
        geom,
        Storage::Bf16,
        Rules::tensor_op(),
    )
}

/// dx of a bf16 convolution: bf16 dy [N, K, OH, OW] and w → bf16 dx of shape `x_shape` (f32
/// compute, dx rounded once to bf16, as the CPU emulation rounds it).
pub fn conv2d_bwd_data_bf16(dy: &Tensor, w: &Tensor, x_shape: &[usize], geom: &ConvGeom) -> Tensor {
    let xs: [usize; 4] = x_shape
        .try_into()
        .expect("conv2d_bwd_data_bf16: x_shape must be NCHW");
    let ws = dims4(w, "conv2d_bwd_data_bf16 w");
    convolve(
        Pass::BackwardData,
        w,
        dy,
        xs,
        ws,
        geom,
        Storage::Bf16,
        Rules::tensor_op(),
    )
}

/// dw of a bf16 convolution: bf16 x and dy → an **f32** dw of shape `w_shape`, the gradient of the
/// f32 master weights. x and dy are widened to f32 (exact) and the f32 plan runs with TF32 tensor
/// ops, exact for bf16 values (see the module header for why not a bf16 dw).
pub fn conv2d_bwd_filter_bf16(
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    geom: &ConvGeom,
) -> Tensor {
    let ws: [usize; 4] = w_shape
        .try_into()
        .expect("conv2d_bwd_filter_bf16: w_shape must be 4-D");
    let xs = dims4(x, "conv2d_bwd_filter_bf16 x");
    let (x32, dy32) = (to_f32(x), to_f32(dy));
    let rules = Rules::tensor_op();
    convolve(
        Pass::BackwardFilter,
        &x32,
        &dy32,
        xs,
        ws,
        geom,
        Storage::F32,
        rules,
    )
}

/// The algorithm and workspace bytes chosen for one convolution shape under the current math mode
/// and determinism, in `storage` and `layout`, per pass (forward, backward data, backward filter)
/// as cuDNN's enum names; `None` for a pass that has not run on that shape yet. (A bf16
/// convolution's backward filter runs the f32 plan with tensor ops, as `conv2d_bwd_filter_bf16`
/// says.) For `bench-conv`.
pub fn chosen_algorithms(
    gpu: &crate::cuda::Gpu,
    x: [usize; 4],
    w: [usize; 4],
    geom: &ConvGeom,
    storage: Storage,
    layout: Layout,
) -> [Option<(String, usize)>; 3] {
    let slot = crate::cuda::lock(&gpu.dnn);
    let rules = match storage {
        Storage::F32 => Rules::current(),
        Storage::Bf16 => Rules::tensor_op(),
    };
    let key = |storage| ConvKey {
        x,
        w,
        geom: *geom,
        rules,
        storage,
        layout,
    };
    let chosen = |storage, pass: Pass| {
        let plan = slot.as_ref()?.as_ref().ok()?.plans.get(&key(storage))?;
        plan.algo[pass.index()].map(|(a, ws)| (a.name(), ws))
    };
    Pass::ALL.map(|pass| match pass {
        Pass::BackwardFilter => chosen(Storage::F32, pass),
        _ => chosen(storage, pass),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(algo: u32, math: u32, deterministic: bool, memory: usize) -> Candidate {
        Candidate {
            algo,
            status: 0,
            memory,
            determinism: deterministic as u32,
            math,
            ..Candidate::default()
        }
    }

    const FP32: Rules = Rules {
        mode: MathMode::Fp32,
        deterministic: false,
    };
    const TF32: Rules = Rules {
        mode: MathMode::Tf32,
        deterministic: false,
    };

    #[test]
    fn fp32_takes_only_fma_kernels() {
        // On Hopper the best-ranked kernels are tensor-op or default math (which may use TF32).
        let list = [
            cand(1, math::TENSOR_OP, true, 0),
            cand(0, math::DEFAULT, true, 0),
            cand(6, math::FMA, true, 0),
        ];
        assert_eq!(pick(&list, FP32, "fwd").unwrap().algo, 6);
        let e = pick(&list[..2], FP32, "forward convolution").unwrap_err();
        assert!(e.contains("FMA") && e.contains("--math tf32"), "{e}");
    }

    #[test]
    fn tf32_prefers_tensor_ops_and_never_down_converts() {
        let list = [
            cand(1, math::TENSOR_OP_ALLOW_CONVERSION, true, 0),
            cand(0, math::FMA, true, 0),
            cand(2, math::TENSOR_OP, true, 0),
        ];
        assert_eq!(pick(&list, TF32, "fwd").unwrap().algo, 2);
        assert_eq!(pick(&list[..2], TF32, "fwd").unwrap().algo, 0);
        assert!(pick(&list[..1], TF32, "fwd").is_err());
    }

    #[test]
    fn bf16_takes_tensor_op_kernels_even_in_fp32_mode() {
        // The default math mode is fp32 (FMA only); bf16 data must still get tensor-op kernels
        // and never the fp16 down-conversion.
        let r = Rules::tensor_op();
        assert_eq!(r.mode, MathMode::Tf32);
        let list = [
            cand(1, math::TENSOR_OP_ALLOW_CONVERSION, true, 0),
            cand(0, math::FMA, true, 0),
            cand(2, math::TENSOR_OP, true, 0),
        ];
        assert_eq!(pick(&list, r, "bf16 fwd").unwrap().algo, 2);
        assert!(pick(&list[..1], r, "bf16 fwd").is_err());
    }

    #[test]
    fn failed_oversized_and_nondeterministic_candidates_are_skipped() {
        let mut failed = cand(0, math::FMA, true, 0);
        failed.status = 3000;
        let list = [
            failed,
            cand(1, math::FMA, true, WORKSPACE_LIMIT + 1),
            cand(2, math::FMA, false, 0),
            cand(3, math::FMA, true, 64),
        ];
        assert_eq!(pick(&list, FP32, "fwd").unwrap().algo, 2);
        let det = Rules {
            deterministic: true,
            ..FP32
        };
        assert_eq!(pick(&list, det, "fwd").unwrap().algo, 3);
        let e = pick(&list[..3], det, "backward-filter convolution").unwrap_err();
        assert!(
            e.contains("deterministic") && e.contains("--deterministic"),
            "{e}"
        );
        assert!(pick(&[failed], FP32, "fwd")
            .unwrap_err()
            .contains("none succeeded"));
        assert!(pick(&list[1..2], FP32, "fwd")
            .unwrap_err()
            .contains("workspace"));
    }

    #[test]
    fn algorithm_numbers_map_to_the_bindings_enums() {
        for (pass, count) in [
            (Pass::Forward, 8),
            (Pass::BackwardData, 6),
            (Pass::BackwardFilter, 7),
        ] {
            for n in 0..count {
                let a = Algo::of(pass, n).unwrap_or_else(|| panic!("{pass:?} {n}"));
                // The enum's own number is the one cuDNN wrote.
                let v = match a {
                    Algo::Fwd(x) => x as u32,
                    Algo::Data(x) => x as u32,
                    Algo::Filter(x) => x as u32,
                };
                assert_eq!(v, n, "{pass:?}");
            }
            assert!(
                Algo::of(pass, count).is_none(),
                "{pass:?}: the COUNT value is no algorithm"
            );
        }
    }
}
