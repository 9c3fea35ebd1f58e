//! cuDNN: 2-D convolution (forward, backward data, backward filter; grouped and depthwise) and batch
//! normalisation (training forward, inference forward, backward), NCHW f32.
//!
//! `mod.rs` holds what every cuDNN call shares: the per-device handle behind its mutex (`with_dnn`),
//! descriptors, error handling. `conv` chooses and runs convolution algorithms, `bn` the batch norm
//! and per-channel helpers (both also with bf16 data and f32 compute, the bf16 path's pieces).
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
mod bn_ex;
mod conv;

pub use bn::{
    add_channel_bias, batch_norm_bwd, batch_norm_bwd_bf16, batch_norm_eval_bwd,
    batch_norm_fwd_infer, batch_norm_fwd_infer_bf16, batch_norm_fwd_train,
    batch_norm_fwd_train_bf16, channel_sums, mul, BnTrain,
};
pub use bn_ex::{bn_relu_bwd, bn_relu_fwd_train, BnReluTrain, Reserve};
pub use conv::{
    chosen_algorithms, conv2d_bwd_data, conv2d_bwd_data_bf16, conv2d_bwd_filter,
    conv2d_bwd_filter_bf16, conv2d_fwd, conv2d_fwd_bf16, ConvGeom, Pass,
};

use super::bf16::{bf16_buf, Bf16Buf};
use super::libs::{self, Lib};
use super::{buf, lock, tensor, CudaBuf, Gpu, OutOfMemory};
use crate::tensor::{DType, Layout, Tensor};
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

/// The element type of a cuDNN op's data tensors (compute and per-channel parameters are f32 for
/// both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    /// bf16 data (x, w, y, dx, dy) with f32 accumulation.
    Bf16,
}

impl Storage {
    fn cudnn(self) -> sys::cudnnDataType_t {
        match self {
            Storage::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            Storage::Bf16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        }
    }

    fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::Bf16 => DType::Bf16,
        }
    }
}

/// The output buffer of a cuDNN call, in its storage type.
enum OutBuf {
    F32(CudaBuf),
    Bf16(Bf16Buf),
}

impl OutBuf {
    fn alloc(gpu: &Arc<Gpu>, storage: Storage, n: usize) -> Result<OutBuf, Fail> {
        Ok(match storage {
            Storage::F32 => OutBuf::F32(alloc(gpu, n)?),
            Storage::Bf16 => OutBuf::Bf16(Bf16Buf::try_alloc(gpu, n)?),
        })
    }

    fn device_ptr(&self) -> u64 {
        match self {
            OutBuf::F32(b) => b.device_ptr(),
            OutBuf::Bf16(b) => b.device_ptr(),
        }
    }

    fn into_tensor(self, shape: &[usize]) -> Tensor {
        match self {
            OutBuf::F32(b) => tensor(shape, b),
            OutBuf::Bf16(b) => Tensor::from_device_buffer(shape, Box::new(b)),
        }
    }
}

/// The device and data address of a GPU input of `storage`'s type (f32 or bf16) in `layout`; a
/// tensor of another type or layout is a caller's bug, named in the panic.
fn input(t: &Tensor, storage: Storage, layout: Layout, what: &str) -> (Arc<Gpu>, *const c_void) {
    assert!(
        t.dtype() == storage.dtype() && t.layout() == layout,
        "{what}: expected a {:?} GPU tensor in {}, got {t:?}",
        storage.dtype(),
        layout.name()
    );
    match storage {
        Storage::F32 => {
            let b = crate::cuda::buf(t);
            (b.gpu.clone(), b.device_ptr() as *const c_void)
        }
        Storage::Bf16 => {
            let b = bf16_buf(t);
            (b.gpu().clone(), b.device_ptr() as *const c_void)
        }
    }
}

/// cuDNN's name of a layout (for tensors and, NHWC meaning KRSC, for filters).
fn format_of(layout: Layout) -> sys::cudnnTensorFormat_t {
    match layout {
        Layout::RowMajor => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout::Nhwc => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
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
    /// A descriptor of [N, C, H, W] = `d` stored in `layout` (NCHW, or NHWC for channels-last
    /// activations) with element type `ty` (f32, or bf16 for the bf16 path).
    fn of(d: [usize; 4], ty: sys::cudnnDataType_t, layout: Layout) -> Result<TensorDesc, String> {
        let t = TensorDesc(
            cudarc::cudnn::result::create_tensor_descriptor().map_err(|e| format!("{e:?}"))?,
        );
        // SAFETY: fresh descriptor.
        ok(
            unsafe {
                sys::cudnnSetTensor4dDescriptor(
                    t.0,
                    format_of(layout),
                    ty,
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
    bn: HashMap<([usize; 4], Storage, Layout), (TensorDesc, TensorDesc)>,
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
