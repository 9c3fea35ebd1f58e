//! Page-locked host memory of f32 words: the source of a CUDA graph's constant uploads
//! (`Gpu::upload_constant`) and the host side of the input stager (`cuda::stager`). Copies from
//! page-locked memory are true asynchronous DMA: they can run beside kernels, and a captured graph
//! can replay them.

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, DriverError};
use std::sync::Arc;

/// Page-locked host memory holding `len` f32 words.
pub struct PinnedWords {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the memory is owned by this value alone; the host writes it only while no queued copy
// reads it (the owners' events), and the device only reads it.
unsafe impl Send for PinnedWords {}
unsafe impl Sync for PinnedWords {}

impl PinnedWords {
    /// `len` (> 0) words of page-locked memory, zeroed.
    pub fn zeroed(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedWords, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: a fresh allocation of `len` f32s, zeroed below before any read.
        let ptr = unsafe { cudarc::driver::result::malloc_host(len * 4, 0)? } as *mut f32;
        // SAFETY: `ptr` holds `len` f32s.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(PinnedWords {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    /// Page-locked memory holding a copy of `words` (non-empty).
    pub fn copy_of(ctx: &Arc<CudaContext>, words: &[f32]) -> Result<PinnedWords, DriverError> {
        let mut p = PinnedWords::zeroed(ctx, words.len())?;
        p.as_mut_slice().copy_from_slice(words);
        Ok(p)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The words, to write. The caller makes sure no queued copy still reads them.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `ptr` holds `len` f32s owned by this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Queues a copy of the first `n` words into the start of `dst` on `stream`. The words must
    /// not change until the copy has run.
    pub fn copy_prefix_to(
        &self,
        n: usize,
        dst: &mut CudaSlice<f32>,
        stream: &CudaStream,
    ) -> Result<(), DriverError> {
        assert!(n <= self.len && dst.len() >= n, "pinned copy: sizes");
        let (d, _sync) = dst.device_ptr_mut(stream);
        // SAFETY: `ptr` holds `len` ≥ n f32s that live as long as this value.
        let src = unsafe { std::slice::from_raw_parts(self.ptr, n) };
        // SAFETY: `d` is a device buffer of at least `n` f32s.
        unsafe { cudarc::driver::result::memcpy_htod_async(d, src, stream.cu_stream()) }
    }

    /// Queues a copy of all the words into the start of `dst` on `stream`.
    pub fn copy_to(
        &self,
        dst: &mut CudaSlice<f32>,
        stream: &CudaStream,
    ) -> Result<(), DriverError> {
        self.copy_prefix_to(self.len, dst, stream)
    }
}

impl Drop for PinnedWords {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_host in `zeroed`; the owner has made sure no queued copy
            // still reads it (`StepGraph` waits for its last replay, the stager for its copies).
            let _ = unsafe { cudarc::driver::result::free_host(self.ptr as _) };
        }
    }
}
