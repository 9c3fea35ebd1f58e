//! The backend boundary: what the tensor needs from a device's memory, and nothing more.
//!
//! A host tensor owns a `Vec` (see `Storage`). A device tensor owns a `DeviceBuffer`, a trait object
//! that a device backend implements; the CUDA backend (`crate::cuda`) is the only one today. The
//! tensor never names the backend's types: it reaches device memory through the two traits below,
//! and a backend registers itself here when it opens a device (`register_cuda`, called by
//! `cuda::Gpu::get`). So `src/tensor` imports nothing from `src/cuda`, and a reader sees the whole
//! boundary in this file (compare candle's `BackendStorage`/`BackendDevice`).
//!
//! The backend's own launchers still take and return `Tensor`s; they reach their concrete buffer
//! type with `DeviceBuffer::as_any` (e.g. `cuda::buf`).

use super::{DType, Device};
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// Memory on a device, holding `len()` elements of `dtype()`. Unwind-safe like a `Vec`, so a
/// tensor can cross `catch_unwind` (the out-of-memory retry, tests of failing ops).
pub trait DeviceBuffer:
    Send + Sync + std::panic::RefUnwindSafe + std::panic::UnwindSafe + 'static
{
    /// The device the memory is on.
    fn device(&self) -> Device;
    /// Element count.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element type of the stored values.
    fn dtype(&self) -> DType;
    /// The values as f32 on the host (waits for the device).
    fn to_host_f32(&self) -> Vec<f32>;
    /// A copy in fresh device memory (queued on the device, no wait).
    fn duplicate(&self) -> Box<dyn DeviceBuffer>;
    /// Overwrites this buffer's elements with `src`'s (same device, dtype and length), keeping this
    /// buffer's memory (queued on the device, no wait): state that must stay at one address, such
    /// as batch norm's running statistics under a CUDA graph, is updated this way.
    fn copy_from(&mut self, src: &dyn DeviceBuffer);
    /// The concrete buffer, for the backend that made it.
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// One opened device: makes its buffers.
pub trait DeviceBackend: Send + Sync {
    /// `n` f32 elements set to `value`, made on the device (no host buffer, no copy).
    fn full_f32(&self, n: usize, value: f32) -> Box<dyn DeviceBuffer>;
    /// Copies host f32 values to the device; `values` is kept alive until the copy has read it,
    /// so this does not wait for the device.
    fn upload_f32(&self, values: Vec<f32>) -> Box<dyn DeviceBuffer>;
}

/// Opens CUDA device `ordinal` (the backend's own error when it cannot).
pub type OpenCuda = fn(usize) -> Result<Arc<dyn DeviceBackend>, String>;

static CUDA: OnceLock<OpenCuda> = OnceLock::new();

/// Registers the CUDA backend. The CUDA module calls this when it opens its first device; the
/// first registration wins (there is one CUDA backend).
pub fn register_cuda(open: OpenCuda) {
    let _ = CUDA.set(open);
}

/// The backend of `device`, or why there is none. Host tensors need no backend.
pub fn backend_of(device: Device) -> Result<Arc<dyn DeviceBackend>, String> {
    match device {
        Device::Cpu => Err("the CPU has no device backend: host tensors own a Vec".into()),
        Device::Cuda(i) => match CUDA.get() {
            Some(open) => open(i),
            None => Err(format!(
                "cuda:{i} requested but no CUDA device has been opened in this process; select \
                 the device first (podgpu::device::select, or podgpu::cuda::Gpu::get)"
            )),
        },
    }
}
