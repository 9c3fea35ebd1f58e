//! cuDNN: 2-D convolution (forward, backward data, backward filter; grouped and depthwise) and batch
//! normalisation (training forward, inference forward, backward), NCHW f32.
//!
//! Per convolution shape a plan is built once and cached: the descriptors and, per direction, the
//! algorithm cuDNN's heuristics rank first among those that fit the workspace limit and match the
//! math mode (fp32: FMA-only kernels; tf32: tensor-op kernels). Workspaces come from the pool, so a
//! steady training step allocates nothing.
//!
//! We call cuDNN's C API through `cudarc::cudnn::sys` rather than cudarc's safe wrapper because that
//! wrapper is not `Send` and does not expose group counts and math types on all paths; the handle
//! lives behind the device's mutex.

use super::launch::gpu_of;
use super::libs::{self, Lib};
use super::{buf, math_mode, tensor, Gpu, MathMode};
use crate::tensor::{numel, Tensor};
use cudarc::cudnn::sys;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;

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

/// Most workspace a convolution algorithm may ask for.
const WORKSPACE_LIMIT: usize = 1 << 30;

fn ok(s: sys::cudnnStatus_t, what: &str) -> Result<(), String> {
    s.result().map_err(|e| format!("cuDNN {what}: {e:?}"))
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
struct FilterDesc(sys::cudnnFilterDescriptor_t);
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl TensorDesc {
    fn nchw(d: [usize; 4]) -> Result<TensorDesc, String> {
        let t = TensorDesc(
            cudarc::cudnn::result::create_tensor_descriptor().map_err(|e| format!("{e:?}"))?,
        );
        // SAFETY: fresh descriptor.
        ok(
            unsafe {
                sys::cudnnSetTensor4dDescriptor(
                    t.0,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    d[0] as i32,
                    d[1] as i32,
                    d[2] as i32,
                    d[3] as i32,
                )
            },
            "cudnnSetTensor4dDescriptor",
        )?;
        Ok(t)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        unsafe { sys::cudnnDestroyTensorDescriptor(self.0) };
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { sys::cudnnDestroyFilterDescriptor(self.0) };
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { sys::cudnnDestroyConvolutionDescriptor(self.0) };
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ConvKey {
    x: [usize; 4],
    w: [usize; 4],
    geom: ConvGeom,
    mode: u8,
}

/// Descriptors and chosen algorithms of one convolution shape. One convolution descriptor per
/// direction, because each direction's algorithm may need its own math type.
struct ConvPlan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    y_shape: [usize; 4],
    conv: [ConvDesc; 3],
    fwd: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
    bwd_data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    bwd_filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

/// A device's cuDNN handle and caches.
pub struct Dnn {
    handle: sys::cudnnHandle_t,
    plans: HashMap<ConvKey, ConvPlan>,
    bn: HashMap<[usize; 4], (TensorDesc, TensorDesc)>,
}

// SAFETY: the handle is only used under the device's `dnn` mutex, one thread at a time, which is
// what cuDNN requires of a handle.
unsafe impl Send for Dnn {}

impl Dnn {
    fn new(gpu: &Gpu) -> Result<Dnn, String> {
        let report = libs::ensure_loaded();
        if !report.has(Lib::Cudnn) {
            return Err(format!(
                "cuDNN is not available ({})",
                report.missing_message(&[Lib::Cudnn])
            ));
        }
        gpu.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let handle =
            cudarc::cudnn::result::create_handle().map_err(|e| format!("cudnnCreate: {e:?}"))?;
        // SAFETY: fresh handle; the stream belongs to this device's context.
        unsafe { cudarc::cudnn::result::set_stream(handle, gpu.stream.cu_stream() as _) }
            .map_err(|e| format!("cudnnSetStream: {e:?}"))?;
        Ok(Dnn {
            handle,
            plans: HashMap::new(),
            bn: HashMap::new(),
        })
    }
}

/// cuDNN's version (e.g. 92100), loading it if needed.
pub fn version() -> Result<usize, String> {
    let report = libs::ensure_loaded();
    if !report.has(Lib::Cudnn) {
        return Err(format!(
            "cuDNN is not available ({})",
            report.missing_message(&[Lib::Cudnn])
        ));
    }
    Ok(cudarc::cudnn::result::get_version())
}

/// Runs `f` with the device's cuDNN state (created at first use), holding its lock.
fn with_dnn<R>(gpu: &Gpu, f: impl FnOnce(&mut Dnn) -> Result<R, String>) -> R {
    let mut slot = gpu.dnn.lock().unwrap();
    if slot.is_none() {
        *slot = Some(Dnn::new(gpu));
    }
    match slot.as_mut().unwrap() {
        Ok(d) => {
            gpu.ctx
                .bind_to_thread()
                .unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
            f(d).unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal))
        }
        Err(e) => panic!("cuda:{}: {e}", gpu.ordinal),
    }
}

fn cudnn_math(mode: MathMode) -> sys::cudnnMathType_t {
    match mode {
        MathMode::Fp32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        MathMode::Tf32 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

impl Dnn {
    fn plan(
        &mut self,
        x: [usize; 4],
        w: [usize; 4],
        geom: &ConvGeom,
    ) -> Result<&mut ConvPlan, String> {
        let mode = math_mode();
        let key = ConvKey {
            x,
            w,
            geom: *geom,
            mode: mode as u8,
        };
        Ok(match self.plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(build_plan(x, w, geom, mode)?),
        })
    }
}

fn build_plan(
    x: [usize; 4],
    w: [usize; 4],
    g: &ConvGeom,
    mode: MathMode,
) -> Result<ConvPlan, String> {
    let (oh, ow) = g.out_hw(x[2], x[3], w[2], w[3]);
    let y_shape = [x[0], w[0], oh, ow];
    let xd = TensorDesc::nchw(x)?;
    let yd = TensorDesc::nchw(y_shape)?;
    let wd = FilterDesc(
        cudarc::cudnn::result::create_filter_descriptor().map_err(|e| format!("{e:?}"))?,
    );
    // SAFETY: fresh descriptors, configured once.
    unsafe {
        ok(
            sys::cudnnSetFilter4dDescriptor(
                wd.0,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                w[0] as i32,
                w[1] as i32,
                w[2] as i32,
                w[3] as i32,
            ),
            "cudnnSetFilter4dDescriptor",
        )?;
    }
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
                sys::cudnnSetConvolutionMathType(c.0, cudnn_math(mode)),
                "cudnnSetConvolutionMathType",
            )?;
        }
        Ok(c)
    };
    let conv = [mk_conv()?, mk_conv()?, mk_conv()?];
    // Check our output shape against cuDNN's.
    let (mut n, mut c, mut h, mut wo) = (0, 0, 0, 0);
    // SAFETY: configured descriptors; writes four ints.
    unsafe {
        ok(
            sys::cudnnGetConvolution2dForwardOutputDim(
                conv[0].0, xd.0, wd.0, &mut n, &mut c, &mut h, &mut wo,
            ),
            "cudnnGetConvolution2dForwardOutputDim",
        )?;
    }
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
        fwd: None,
        bwd_data: None,
        bwd_filter: None,
    })
}

/// The algorithm and workspace bytes cuDNN's heuristics chose for one convolution shape in the
/// current math mode, per direction (forward, backward data, backward filter) as cuDNN's enum names;
/// `None` for a direction that has not run on that shape yet. For `bench-conv`.
pub fn chosen_algorithms(
    gpu: &Gpu,
    x: [usize; 4],
    w: [usize; 4],
    geom: &ConvGeom,
) -> [Option<(String, usize)>; 3] {
    let slot = gpu.dnn.lock().unwrap();
    let key = ConvKey {
        x,
        w,
        geom: *geom,
        mode: math_mode() as u8,
    };
    match slot.as_ref().and_then(|d| d.as_ref().ok()?.plans.get(&key)) {
        Some(p) => [
            p.fwd.map(|(a, ws)| (format!("{a:?}"), ws)),
            p.bwd_data.map(|(a, ws)| (format!("{a:?}"), ws)),
            p.bwd_filter.map(|(a, ws)| (format!("{a:?}"), ws)),
        ],
        None => [None, None, None],
    }
}

/// Picks from cuDNN's ranked heuristic results: the first that succeeded, fits the workspace limit
/// and uses the wanted math type; else the first that succeeded and fits. Returns (algo, workspace
/// bytes, math type).
fn pick<A: Copy>(
    perfs: &[(A, sys::cudnnStatus_t, usize, sys::cudnnMathType_t)],
    want: sys::cudnnMathType_t,
    what: &str,
) -> Result<(A, usize, sys::cudnnMathType_t), String> {
    let usable = |p: &&(A, sys::cudnnStatus_t, usize, sys::cudnnMathType_t)| {
        p.1 == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.2 <= WORKSPACE_LIMIT
    };
    perfs
        .iter()
        .filter(usable)
        .find(|p| p.3 == want)
        .or_else(|| perfs.iter().find(usable))
        .map(|p| (p.0, p.2, p.3))
        .ok_or_else(|| format!("cuDNN found no usable {what} algorithm"))
}

fn dims4(t: &Tensor, what: &str) -> [usize; 4] {
    let s = t.shape();
    assert_eq!(s.len(), 4, "{what}: expected an NCHW tensor, got {s:?}");
    [s[0], s[1], s[2], s[3]]
}

fn ptr(t: &Tensor) -> *const c_void {
    buf(t).device_ptr() as *const c_void
}

const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn one() -> *const c_void {
    &ONE as *const f32 as *const c_void
}

fn zero() -> *const c_void {
    &ZERO as *const f32 as *const c_void
}

/// y = conv2d(x, w): x [N, C, H, W], w [K, C/groups, R, S] → y [N, K, OH, OW].
pub fn conv2d_fwd(x: &Tensor, w: &Tensor, geom: &ConvGeom) -> Tensor {
    let gpu = gpu_of(x);
    let (xs, ws) = (dims4(x, "conv2d x"), dims4(w, "conv2d w"));
    with_dnn(&gpu, |d| {
        let handle = d.handle;
        let want = cudnn_math(math_mode());
        let p = d.plan(xs, ws, geom)?;
        if p.fwd.is_none() {
            const N: usize = 8;
            let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; N];
            let mut got = 0;
            // SAFETY: configured descriptors; cuDNN writes at most N results.
            ok(
                unsafe {
                    sys::cudnnGetConvolutionForwardAlgorithm_v7(
                        handle,
                        p.x.0,
                        p.w.0,
                        p.conv[0].0,
                        p.y.0,
                        N as i32,
                        &mut got,
                        perf.as_mut_ptr(),
                    )
                },
                "cudnnGetConvolutionForwardAlgorithm_v7",
            )?;
            let list: Vec<_> = perf[..got as usize]
                .iter()
                .map(|q| (q.algo, q.status, q.memory, q.mathType))
                .collect();
            let (algo, ws_bytes, m) = pick(&list, want, "forward convolution")?;
            // SAFETY: configured descriptor.
            ok(
                unsafe { sys::cudnnSetConvolutionMathType(p.conv[0].0, m) },
                "cudnnSetConvolutionMathType",
            )?;
            p.fwd = Some((algo, ws_bytes));
        }
        let (algo, ws_bytes) = p.fwd.unwrap();
        let y = gpu.alloc(numel(&p.y_shape));
        let ws = gpu.alloc(ws_bytes.div_ceil(4));
        // SAFETY: buffers match the descriptors (x, w from the tensors, y and the workspace sized
        // from the plan); all on the handle's stream.
        ok(
            unsafe {
                sys::cudnnConvolutionForward(
                    handle,
                    one(),
                    p.x.0,
                    ptr(x),
                    p.w.0,
                    ptr(w),
                    p.conv[0].0,
                    algo,
                    ws.device_ptr() as *mut c_void,
                    ws_bytes,
                    zero(),
                    p.y.0,
                    y.device_ptr() as *mut c_void,
                )
            },
            "cudnnConvolutionForward",
        )?;
        Ok(tensor(&p.y_shape, y))
    })
}

/// dx of a convolution: dy [N, K, OH, OW], w [K, C/groups, R, S] → dx of shape `x_shape`.
pub fn conv2d_bwd_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], geom: &ConvGeom) -> Tensor {
    let gpu = gpu_of(dy);
    let xs: [usize; 4] = x_shape
        .try_into()
        .expect("conv2d_bwd_data: x_shape must be NCHW");
    let ws = dims4(w, "conv2d w");
    with_dnn(&gpu, |d| {
        let handle = d.handle;
        let want = cudnn_math(math_mode());
        let p = d.plan(xs, ws, geom)?;
        assert_eq!(dy.shape(), &p.y_shape, "conv2d_bwd_data: dy shape");
        if p.bwd_data.is_none() {
            const N: usize = 8;
            let mut perf =
                [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; N];
            let mut got = 0;
            // SAFETY: configured descriptors; at most N results.
            ok(
                unsafe {
                    sys::cudnnGetConvolutionBackwardDataAlgorithm_v7(
                        handle,
                        p.w.0,
                        p.y.0,
                        p.conv[1].0,
                        p.x.0,
                        N as i32,
                        &mut got,
                        perf.as_mut_ptr(),
                    )
                },
                "cudnnGetConvolutionBackwardDataAlgorithm_v7",
            )?;
            let list: Vec<_> = perf[..got as usize]
                .iter()
                .map(|q| (q.algo, q.status, q.memory, q.mathType))
                .collect();
            let (algo, ws_bytes, m) = pick(&list, want, "backward-data convolution")?;
            // SAFETY: configured descriptor.
            ok(
                unsafe { sys::cudnnSetConvolutionMathType(p.conv[1].0, m) },
                "cudnnSetConvolutionMathType",
            )?;
            p.bwd_data = Some((algo, ws_bytes));
        }
        let (algo, ws_bytes) = p.bwd_data.unwrap();
        let dx = gpu.alloc(numel(&xs));
        let wsb = gpu.alloc(ws_bytes.div_ceil(4));
        // SAFETY: as in conv2d_fwd.
        ok(
            unsafe {
                sys::cudnnConvolutionBackwardData(
                    handle,
                    one(),
                    p.w.0,
                    ptr(w),
                    p.y.0,
                    ptr(dy),
                    p.conv[1].0,
                    algo,
                    wsb.device_ptr() as *mut c_void,
                    ws_bytes,
                    zero(),
                    p.x.0,
                    dx.device_ptr() as *mut c_void,
                )
            },
            "cudnnConvolutionBackwardData",
        )?;
        Ok(tensor(&xs, dx))
    })
}

/// dw of a convolution: x [N, C, H, W], dy [N, K, OH, OW] → dw of shape `w_shape`.
pub fn conv2d_bwd_filter(x: &Tensor, dy: &Tensor, w_shape: &[usize], geom: &ConvGeom) -> Tensor {
    let gpu = gpu_of(x);
    let xs = dims4(x, "conv2d x");
    let ws: [usize; 4] = w_shape
        .try_into()
        .expect("conv2d_bwd_filter: w_shape must be 4-D");
    with_dnn(&gpu, |d| {
        let handle = d.handle;
        let want = cudnn_math(math_mode());
        let p = d.plan(xs, ws, geom)?;
        assert_eq!(dy.shape(), &p.y_shape, "conv2d_bwd_filter: dy shape");
        if p.bwd_filter.is_none() {
            const N: usize = 8;
            let mut perf =
                [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; N];
            let mut got = 0;
            // SAFETY: configured descriptors; at most N results.
            ok(
                unsafe {
                    sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                        handle,
                        p.x.0,
                        p.y.0,
                        p.conv[2].0,
                        p.w.0,
                        N as i32,
                        &mut got,
                        perf.as_mut_ptr(),
                    )
                },
                "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
            )?;
            let list: Vec<_> = perf[..got as usize]
                .iter()
                .map(|q| (q.algo, q.status, q.memory, q.mathType))
                .collect();
            let (algo, ws_bytes, m) = pick(&list, want, "backward-filter convolution")?;
            // SAFETY: configured descriptor.
            ok(
                unsafe { sys::cudnnSetConvolutionMathType(p.conv[2].0, m) },
                "cudnnSetConvolutionMathType",
            )?;
            p.bwd_filter = Some((algo, ws_bytes));
        }
        let (algo, ws_bytes) = p.bwd_filter.unwrap();
        let dw = gpu.alloc(numel(&ws));
        let wsb = gpu.alloc(ws_bytes.div_ceil(4));
        // SAFETY: as in conv2d_fwd.
        ok(
            unsafe {
                sys::cudnnConvolutionBackwardFilter(
                    handle,
                    one(),
                    p.x.0,
                    ptr(x),
                    p.y.0,
                    ptr(dy),
                    p.conv[2].0,
                    algo,
                    wsb.device_ptr() as *mut c_void,
                    ws_bytes,
                    zero(),
                    p.w.0,
                    dw.device_ptr() as *mut c_void,
                )
            },
            "cudnnConvolutionBackwardFilter",
        )?;
        Ok(tensor(&ws, dw))
    })
}

/// Outputs of a training-mode batch-norm forward.
pub struct BnTrain {
    pub y: Tensor,
    /// Batch mean per channel [C].
    pub save_mean: Tensor,
    /// 1 / sqrt(batch variance + eps) per channel [C] (the biased variance).
    pub save_invstd: Tensor,
    /// Updated running statistics [C]: (1 − momentum)·old + momentum·batch (unbiased variance).
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// x as NCHW dims: [N, C, H, W] as is, [N, C] as [N, C, 1, 1] (BatchNorm1d).
fn bn_dims(x: &Tensor) -> [usize; 4] {
    match x.shape() {
        [n, c] => [*n, *c, 1, 1],
        [n, c, h, w] => [*n, *c, *h, *w],
        s => panic!("batch norm of a tensor of shape {s:?}: expected [N, C] or [N, C, H, W]"),
    }
}

const BN_MODE: sys::cudnnBatchNormMode_t = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

impl Dnn {
    /// (x descriptor, derived per-channel descriptor) for this shape.
    fn bn_descs(
        &mut self,
        d: [usize; 4],
    ) -> Result<(sys::cudnnTensorDescriptor_t, sys::cudnnTensorDescriptor_t), String> {
        if let Entry::Vacant(slot) = self.bn.entry(d) {
            let xd = TensorDesc::nchw(d)?;
            let bd = TensorDesc(
                cudarc::cudnn::result::create_tensor_descriptor().map_err(|e| format!("{e:?}"))?,
            );
            // SAFETY: fresh descriptor derived from a configured one.
            ok(
                unsafe { sys::cudnnDeriveBNTensorDescriptor(bd.0, xd.0, BN_MODE) },
                "cudnnDeriveBNTensorDescriptor",
            )?;
            slot.insert((xd, bd));
        }
        let (xd, bd) = &self.bn[&d];
        Ok((xd.0, bd.0))
    }
}

/// Copies a GPU tensor into a fresh buffer (running statistics are updated on copies).
fn copy_of(t: &Tensor) -> super::CudaBuf {
    buf(t).duplicate()
}

/// Training-mode batch norm over N·H·W per channel (cuDNN, spatial mode). `eps` must be ≥ 1e-5
/// (cuDNN's minimum).
pub fn batch_norm_fwd_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> BnTrain {
    let gpu = gpu_of(x);
    let d = bn_dims(x);
    let c = d[1];
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs(d)?;
        let y = gpu.alloc(x.numel());
        let rm = copy_of(running_mean);
        let rv = copy_of(running_var);
        let sm = gpu.alloc(c);
        let si = gpu.alloc(c);
        // SAFETY: x/y match xd; gamma, beta, running stats and saved stats hold C floats (bd).
        ok(
            unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    handle,
                    BN_MODE,
                    one(),
                    zero(),
                    xd,
                    ptr(x),
                    xd,
                    y.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    ptr(beta),
                    momentum,
                    rm.device_ptr() as *mut c_void,
                    rv.device_ptr() as *mut c_void,
                    eps.max(1e-5),
                    sm.device_ptr() as *mut c_void,
                    si.device_ptr() as *mut c_void,
                )
            },
            "cudnnBatchNormalizationForwardTraining",
        )?;
        Ok(BnTrain {
            y: tensor(x.shape(), y),
            save_mean: tensor(&[c], sm),
            save_invstd: tensor(&[c], si),
            running_mean: tensor(&[c], rm),
            running_var: tensor(&[c], rv),
        })
    })
}

/// Inference-mode batch norm with the running statistics.
pub fn batch_norm_fwd_infer(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Tensor {
    let gpu = gpu_of(x);
    let d = bn_dims(x);
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs(d)?;
        let y = gpu.alloc(x.numel());
        // SAFETY: as in batch_norm_fwd_train.
        ok(
            unsafe {
                sys::cudnnBatchNormalizationForwardInference(
                    handle,
                    BN_MODE,
                    one(),
                    zero(),
                    xd,
                    ptr(x),
                    xd,
                    y.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    ptr(beta),
                    ptr(mean),
                    ptr(var),
                    eps.max(1e-5),
                )
            },
            "cudnnBatchNormalizationForwardInference",
        )?;
        Ok(tensor(x.shape(), y))
    })
}

/// Backward of training-mode batch norm: (dx, dgamma, dbeta), using the statistics saved by
/// `batch_norm_fwd_train`.
pub fn batch_norm_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    let gpu = gpu_of(x);
    let d = bn_dims(x);
    let c = d[1];
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs(d)?;
        let dx = gpu.alloc(x.numel());
        let dg = gpu.alloc(c);
        let db = gpu.alloc(c);
        // SAFETY: as in batch_norm_fwd_train.
        ok(
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    handle,
                    BN_MODE,
                    one(),
                    zero(),
                    one(),
                    zero(),
                    xd,
                    ptr(x),
                    xd,
                    ptr(dy),
                    xd,
                    dx.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    dg.device_ptr() as *mut c_void,
                    db.device_ptr() as *mut c_void,
                    eps.max(1e-5),
                    ptr(save_mean),
                    ptr(save_invstd),
                )
            },
            "cudnnBatchNormalizationBackward",
        )?;
        Ok((tensor(x.shape(), dx), tensor(&[c], dg), tensor(&[c], db)))
    })
}

// ---- per-channel helpers: the convolution bias and evaluation-mode batch-norm backward ----

/// x as per-channel dims for the helpers below: [N, C, H, W] as is, [N, C] as [N, C, 1, 1].
fn channel_dims(x: &Tensor, what: &str) -> [usize; 4] {
    match x.shape() {
        [n, c] => [*n, *c, 1, 1],
        [n, c, h, w] => [*n, *c, *h, *w],
        s => panic!("{what}: expected [N, C] or [N, C, H, W], got {s:?}"),
    }
}

/// y[n, c, :, :] += b[c] (a convolution's bias) with cudnnAddTensor. `y` is updated in place when
/// it owns its buffer (the fresh output of a convolution); a shared buffer is copied first.
pub fn add_channel_bias(y: Tensor, b: &Tensor) -> Tensor {
    let gpu = gpu_of(&y);
    let d = channel_dims(&y, "add_channel_bias");
    assert_eq!(
        b.shape(),
        &[d[1]],
        "add_channel_bias: bias {:?} for output {:?}",
        b.shape(),
        y.shape()
    );
    let mut y = y;
    let yp = y.cuda_buf_mut().device_ptr();
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        // The BN per-channel descriptor is exactly the [1, C, 1, 1] bias descriptor.
        let (yd, bd) = dnn.bn_descs(d)?;
        // SAFETY: y matches yd and is owned by `y` alone (cuda_buf_mut); b holds C floats.
        ok(
            unsafe { sys::cudnnAddTensor(handle, one(), bd, ptr(b), one(), yd, yp as *mut c_void) },
            "cudnnAddTensor",
        )
    });
    y
}

/// Per-channel sums over batch and space, [N, C, H, W] (or [N, C]) → [C]: the gradient of a
/// convolution's bias (cudnnConvolutionBackwardBias).
pub fn channel_sums(x: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let d = channel_dims(x, "channel_sums");
    let c = d[1];
    let out = gpu.alloc(c);
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs(d)?;
        // SAFETY: x matches xd; out holds C floats (bd); beta = 0 so out is only written.
        ok(
            unsafe {
                sys::cudnnConvolutionBackwardBias(
                    handle,
                    one(),
                    xd,
                    ptr(x),
                    zero(),
                    bd,
                    out.device_ptr() as *mut c_void,
                )
            },
            "cudnnConvolutionBackwardBias",
        )
    });
    tensor(&[c], out)
}

struct OpDesc(sys::cudnnOpTensorDescriptor_t);

impl Drop for OpDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateOpTensorDescriptor, destroyed once.
        unsafe { sys::cudnnDestroyOpTensorDescriptor(self.0) };
    }
}

/// a ∘ b elementwise for two tensors of the same NCHW (or [N, C]) shape, with cudnnOpTensor.
pub fn mul(a: &Tensor, b: &Tensor) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "mul: shapes differ");
    let gpu = gpu_of(a);
    let d = channel_dims(a, "mul");
    // Zero-filled, so that the result does not depend on how cuDNN treats beta = 0.
    let out = gpu.alloc_zeros(a.numel());
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, _) = dnn.bn_descs(d)?;
        let mut raw: sys::cudnnOpTensorDescriptor_t = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle.
        ok(
            unsafe { sys::cudnnCreateOpTensorDescriptor(&mut raw) },
            "cudnnCreateOpTensorDescriptor",
        )?;
        let op = OpDesc(raw);
        // SAFETY: fresh descriptor.
        ok(
            unsafe {
                sys::cudnnSetOpTensorDescriptor(
                    op.0,
                    sys::cudnnOpTensorOp_t::CUDNN_OP_TENSOR_MUL,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                )
            },
            "cudnnSetOpTensorDescriptor",
        )?;
        // SAFETY: a, b and out all match xd.
        ok(
            unsafe {
                sys::cudnnOpTensor(
                    handle,
                    op.0,
                    one(),
                    xd,
                    ptr(a),
                    one(),
                    xd,
                    ptr(b),
                    zero(),
                    xd,
                    out.device_ptr() as *mut c_void,
                )
            },
            "cudnnOpTensor",
        )
    });
    tensor(a.shape(), out)
}

/// Backward of inference-mode batch norm y = γ(x − μ)/√(σ² + eps) + β with fixed μ, σ²
/// (a per-channel affine map): dx = γ·dy/√(σ² + eps), dγ = Σ dy·x̂, dβ = Σ dy. Built from cuDNN
/// calls: x̂ and dx are inference-mode batch norms themselves (x̂ with γ = 1, β = 0; dx of dy
/// with μ = 0, β = 0), the sums are `channel_sums`.
pub fn batch_norm_eval_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    assert_eq!(x.shape(), dy.shape(), "batch_norm_eval_bwd: dy shape");
    let gpu = gpu_of(x);
    let c = channel_dims(x, "batch_norm_eval_bwd")[1];
    let ones = super::nn_kernels::fill(&[c], 1.0, &gpu);
    let zeros = tensor(&[c], gpu.alloc_zeros(c));
    let xhat = batch_norm_fwd_infer(x, &ones, &zeros, mean, var, eps);
    let dx = batch_norm_fwd_infer(dy, gamma, &zeros, &zeros, var, eps);
    let dgamma = channel_sums(&mul(dy, &xhat));
    let dbeta = channel_sums(dy);
    (dx, dgamma, dbeta)
}
