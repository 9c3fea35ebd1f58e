//! A training step captured once as a CUDA graph and replayed: one launch per step instead of
//! hundreds, with no host work between the step's kernels.
//!
//! A capture records what the step's host code queues on the GPU's stream: kernels with their
//! arguments, cuDNN and cuBLAS calls, copies and memsets. A replay runs exactly that again, with
//! the same arguments and the same buffers. So what a captured step may do is narrower than an
//! eager step, and the pieces of podgpu that make it so are:
//!
//! - **Memory** (`pool`): blocks used during the capture are reserved for the graph until it is
//!   dropped; a capture takes no stream-ordered allocation (see `pool`).
//! - **State at fixed addresses**: parameters, momentum buffers (SGD updates them in place) and
//!   batch norm's running statistics (`ops::store_running_stats` writes into the store's buffers)
//!   keep their memory across steps. Callers check this (`ParamStore::device_addresses`).
//! - **Inputs**: per-step data (images, labels) is copied by the caller into buffers made before
//!   the capture, before each replay; an upload inside the capture is refused
//!   (`Gpu::upload_owned`), since a replay would copy the capture's data again.
//!   Pointer tables of multi-tensor kernels are constants of the graph (`Gpu::upload_constant`).
//! - **No waits**: reading to the host or synchronising inside the capture is refused with a
//!   message (`Gpu::synchronize`). cuDNN's algorithm search allocates and waits: an eager step of
//!   the same shapes must run first, which is also what fills the pool's cache.
//! - **Scalars are frozen**: kernel arguments such as the learning rate are recorded as captured,
//!   so a caller whose scalars change per step must re-capture (or keep them on the device).
//!
//! The capture runs in relaxed mode (the pool may still need a synchronous allocation), and a
//! step that fails or panics during it ends the capture, releases its memory and comes back as an
//! error: the caller can go on with eager steps.

use super::pinned::PinnedWords;
use super::{lock, Gpu};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, DriverError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The text of a panic's payload (a message, or out-of-memory's description).
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| {
            p.downcast_ref::<super::OutOfMemory>()
                .map(|o| o.to_string())
        })
        .unwrap_or_else(|| "the step panicked".into())
}

/// A captured step, replayed with `replay`. Dropping it gives its memory back to the pool.
pub struct StepGraph {
    graph: Option<CudaGraph>,
    gpu: Arc<Gpu>,
    id: u64,
    keep: Vec<PinnedWords>,
}

static NEXT_GRAPH: AtomicU64 = AtomicU64::new(1);

/// Ends a capture however the step ended: the stream leaves capture mode and the pool and the GPU
/// stop treating allocations and uploads as the graph's.
struct CaptureScope<'a> {
    gpu: &'a Arc<Gpu>,
    id: u64,
    ended: Option<Result<Option<CudaGraph>, DriverError>>,
}

impl CaptureScope<'_> {
    fn end(&mut self) -> Result<Option<CudaGraph>, DriverError> {
        if let Some(r) = self.ended.take() {
            return r;
        }
        let r = self.gpu.stream.end_capture(CUgraphInstantiate_flags(0));
        self.gpu.set_capturing(false);
        lock(&self.gpu.pool).end_capture();
        r
    }
}

impl Drop for CaptureScope<'_> {
    fn drop(&mut self) {
        if self.ended.is_none() && self.gpu.is_capturing() {
            // Unwinding out of the step: end the capture, forget its graph and memory.
            let _ = self.end();
            lock(&self.gpu.pool).release_graph(self.id);
            lock(&self.gpu.capture_keep).clear();
        }
    }
}

impl StepGraph {
    /// Captures what `step` queues on `gpu`'s stream. `step` must have run eagerly once with the
    /// same shapes (see the module comment). Returns the graph and `step`'s result, whose device
    /// buffers the graph rewrites at every replay (outputs such as the loss are read from them).
    /// A step that panics or fails to capture gives an error and leaves the GPU as before.
    pub fn capture<R>(gpu: &Arc<Gpu>, step: impl FnOnce() -> R) -> Result<(StepGraph, R), String> {
        let id = NEXT_GRAPH.fetch_add(1, Ordering::Relaxed);
        lock(&gpu.pool).begin_capture(id);
        lock(&gpu.capture_keep).clear();
        gpu.set_capturing(true);
        let mut scope = CaptureScope {
            gpu,
            id,
            ended: None,
        };
        if let Err(e) = gpu
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        {
            scope.ended = Some(Ok(None));
            gpu.set_capturing(false);
            let mut pool = lock(&gpu.pool);
            pool.end_capture();
            pool.release_graph(id);
            return Err(format!("cuda:{}: CUDA graph capture: {e}", gpu.ordinal));
        }
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
        let ended = scope.end();
        scope.ended = Some(Ok(None));
        let keep = std::mem::take(&mut *lock(&gpu.capture_keep));
        let fail = |why: String| {
            lock(&gpu.pool).release_graph(id);
            Err(format!(
                "cuda:{}: the step could not be captured as a CUDA graph: {why}",
                gpu.ordinal
            ))
        };
        match (out, ended) {
            (Ok(r), Ok(Some(graph))) => Ok((
                StepGraph {
                    graph: Some(graph),
                    gpu: gpu.clone(),
                    id,
                    keep,
                },
                r,
            )),
            (Ok(_), Ok(None)) => fail("nothing was recorded".into()),
            (Ok(_), Err(e)) => fail(format!("{e}")),
            (Err(p), _) => fail(panic_text(p.as_ref())),
        }
    }

    /// Queues one replay of the captured step (no wait).
    pub fn replay(&self) -> Result<(), String> {
        let g = self.graph.as_ref().expect("a live graph");
        g.launch()
            .map_err(|e| format!("cuda:{}: CUDA graph launch: {e}", self.gpu.ordinal))
    }

    /// The pool's id of this graph's memory.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        // The last replay may still read the pinned constants: wait for it before freeing them.
        if !self.keep.is_empty() {
            let _ = self.gpu.synchronize();
        }
        drop(self.graph.take());
        self.keep.clear();
        lock(&self.gpu.pool).release_graph(self.id);
    }
}

/// The device addresses of GPU tensors' buffers (f32 or bf16), for checking that a capture left
/// state where it was.
pub fn addresses<'a>(tensors: impl Iterator<Item = &'a crate::tensor::Tensor>) -> Vec<u64> {
    tensors
        .map(|t| match t.dtype() {
            crate::tensor::DType::Bf16 => super::bf16::bf16_buf(t).device_ptr(),
            _ => super::buf(t).device_ptr(),
        })
        .collect()
}

/// The per-step scalars of a replayed training step, in device memory made before the capture:
/// the learning rate (f32, word 0) and the 1-based global step (i64, words 2–3). Kernels given
/// their addresses (`Sgd::set_device_lr`, `StepLedger::set_device_step`) read them at every replay;
/// `set` writes them before each replay (a copy queued on the stream, no wait).
pub struct StepScalars {
    words: crate::tensor::Tensor,
}

impl StepScalars {
    pub fn new(gpu: &Arc<Gpu>) -> StepScalars {
        StepScalars {
            words: super::tensor(&[4], gpu.alloc_zeros(4)),
        }
    }

    /// Queues the values of the next replay.
    pub fn set(&mut self, lr: f64, step: u64) {
        let s = step.to_le_bytes();
        let words = vec![
            lr as f32,
            0.0,
            f32::from_bits(u32::from_le_bytes([s[0], s[1], s[2], s[3]])),
            f32::from_bits(u32::from_le_bytes([s[4], s[5], s[6], s[7]])),
        ];
        let gpu = super::buf(&self.words).gpu.clone();
        let fresh = gpu.upload_owned(words);
        super::buf_mut(&mut self.words).copy_from_buf(&fresh);
    }

    pub fn lr_ptr(&self) -> u64 {
        super::buf(&self.words).device_ptr()
    }

    pub fn step_ptr(&self) -> u64 {
        super::buf(&self.words).device_ptr() + 8
    }
}
