//! cuDNN: 2-D convolution (forward, backward data, backward filter; grouped and depthwise) and batch
//! normalisation (training forward, inference forward, backward), NCHW f32.
//!
//! `mod.rs` holds what every cuDNN call shares: the per-device handle behind its mutex (`with_dnn`),
//! descriptors, error handling. `conv` chooses and runs convolution algorithms, `bn` the batch norm
//! and per-channel helpers, `conv_bf16` the bf16 forward convolution (the bf16 path's first piece).
//!
//! We call cuDNN's C API through `cudarc::cudnn::sys` rather than cudarc's safe wrapper because that
//! wrapper is not `Send` and does not expose group counts and math types on all paths; the handle
//! lives behind the device's mutex.
//!
//! Failures: a cuDNN error or an out-of-memory inside the lock is returned from `with_dnn` first and
//! raised only after the lock is released (the launchers have no error path), so one failing call
//! never poisons the handle for the calls after it, and out-of-memory keeps its `OutOfMemory`
//! payload for `cuda::catch_oom`.

mod algo_cache;
mod bn;
mod conv;
mod conv_bf16;

pub use bn::{
    add_channel_bias, batch_norm_bwd, batch_norm_eval_bwd, batch_norm_fwd_infer,
    batch_norm_fwd_train, channel_sums, mul, BnTrain,
};
pub use conv::{chosen_algorithms, conv2d_bwd_data, conv2d_bwd_filter, conv2d_fwd, ConvGeom, Pass};
pub use conv_bf16::conv2d_fwd_bf16;

use super::libs::{self, Lib};
use super::{buf, lock, CudaBuf, Gpu, OutOfMemory};
use crate::tensor::Tensor;
use cudarc::cudnn::sys;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// Why a cuDNN call did not happen.
pub(crate) enum Fail {
    /// cuDNN or the driver refused (a message naming the call and the shape).
    Msg(String),
    /// A buffer could not be allocated.
    Oom(OutOfMemory),
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::Msg(s)
    }
}

impl From<OutOfMemory> for Fail {
    fn from(o: OutOfMemory) -> Fail {
        Fail::Oom(o)
    }
}

fn ok(s: sys::cudnnStatus_t, what: &str) -> Result<(), String> {
    s.result().map_err(|e| format!("cuDNN {what}: {e:?}"))
}

/// A device buffer for a cuDNN output or workspace (out-of-memory as an error, not a panic).
fn alloc(gpu: &Arc<Gpu>, n: usize) -> Result<CudaBuf, Fail> {
    Ok(gpu.try_alloc(n)?)
}

pub(crate) struct TensorDesc(sys::cudnnTensorDescriptor_t);
pub(crate) struct FilterDesc(sys::cudnnFilterDescriptor_t);
pub(crate) struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

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

/// A device's cuDNN handle and caches.
pub struct Dnn {
    handle: sys::cudnnHandle_t,
    plans: HashMap<conv::ConvKey, conv::ConvPlan>,
    bn: HashMap<[usize; 4], (TensorDesc, TensorDesc)>,
    /// Measured convolution algorithms, in memory and on disk (`algo_cache`).
    algos: algo_cache::AlgoCache,
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
        let cudnn = cudarc::cudnn::result::get_version();
        let path = algo_cache::file_for(
            &libs::cache_root(),
            &gpu.info.name,
            gpu.info.compute_capability,
            cudnn,
        );
        let (algos, warning) = algo_cache::AlgoCache::open(Some(path), &gpu.info.name, cudnn);
        if let Some(w) = warning {
            eprintln!("note: cuDNN algorithm cache: {w}");
        }
        Ok(Dnn {
            handle,
            plans: HashMap::new(),
            bn: HashMap::new(),
            algos,
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

/// Runs `f` with the device's cuDNN state (created at first use), holding its lock, and returns its
/// result after the lock is released.
fn try_with_dnn<R>(gpu: &Gpu, f: impl FnOnce(&mut Dnn) -> Result<R, Fail>) -> Result<R, Fail> {
    let mut slot = lock(&gpu.dnn);
    if slot.is_none() {
        *slot = Some(Dnn::new(gpu));
    }
    match slot.as_mut().expect("set above") {
        Ok(d) => {
            gpu.ctx
                .bind_to_thread()
                .map_err(|e| Fail::Msg(format!("cuda:{}: {e}", gpu.ordinal)))?;
            f(d)
        }
        Err(e) => Err(Fail::Msg(e.clone())),
    }
}

/// `try_with_dnn` for the launchers, which have no error path: a failure is raised after the lock
/// is released — out-of-memory as an `OutOfMemory` payload (`cuda::catch_oom`), anything else as a
/// panic naming the device and the call.
fn with_dnn<R>(gpu: &Gpu, f: impl FnOnce(&mut Dnn) -> Result<R, Fail>) -> R {
    match try_with_dnn(gpu, f) {
        Ok(r) => r,
        Err(Fail::Oom(o)) => std::panic::panic_any(o),
        Err(Fail::Msg(m)) => panic!("cuda:{}: {m}", gpu.ordinal),
    }
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
