//! The caching allocator: device memory is requested from CUDA once per size class and then reused.
//!
//! A training step allocates the same set of buffer sizes every time, so after the first step every
//! request is served from a free list and the step calls no cudaMalloc/cudaFree (the counters below
//! let a test check exactly that). Sizes are rounded up to a class (four classes per power of two,
//! so at most 25% is wasted); a buffer returns to its class's free list when its `CudaBuf` drops.
//! All work goes to one stream, so a block freed by the host and handed out again is only touched by
//! kernels queued after every kernel that used it before: no extra synchronisation is needed.

use cudarc::driver::{CudaSlice, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::Arc;

/// Allocation counters of one GPU's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held by live buffers (rounded to their size class).
    pub bytes_in_use: usize,
    /// The largest `bytes_in_use` seen since the last `reset_peak`.
    pub peak_bytes_in_use: usize,
    /// Bytes sitting in free lists, ready for reuse.
    pub bytes_cached: usize,
    /// Real device allocations (cuMemAlloc/cuMemAllocAsync) so far.
    pub device_allocs: u64,
    /// Real device frees so far (only when the cache is released, e.g. on out-of-memory).
    pub device_frees: u64,
    /// Requests served from a free list.
    pub reuses: u64,
}

pub struct Pool {
    free: HashMap<usize, Vec<CudaSlice<f32>>>,
    stats: PoolStats,
}

/// The element count a request of `n` f32 elements is rounded up to.
pub fn size_class(n: usize) -> usize {
    const MIN: usize = 64; // 256 bytes, the driver's allocation granularity for small blocks
    if n <= MIN {
        return MIN;
    }
    let top = usize::BITS - 1 - n.leading_zeros(); // floor(log2 n)
    let step = 1usize << (top - 2);
    n.div_ceil(step) * step
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            free: HashMap::new(),
            stats: PoolStats::default(),
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            bytes_cached: self.free.values().flatten().map(|s| s.len() * 4).sum(),
            ..self.stats
        }
    }

    pub fn reset_peak(&mut self) {
        self.stats.peak_bytes_in_use = self.stats.bytes_in_use;
    }

    /// A block of at least `n` f32 elements (its length is the size class). Contents are undefined.
    pub fn take(
        &mut self,
        stream: &Arc<CudaStream>,
        n: usize,
    ) -> Result<CudaSlice<f32>, DriverError> {
        let class = size_class(n);
        let slice = match self.free.get_mut(&class).and_then(Vec::pop) {
            Some(s) => {
                self.stats.reuses += 1;
                s
            }
            None => {
                // SAFETY: the memory is uninitialised f32s; every user writes before it reads
                // (the launchers fill outputs completely, `alloc_zeros` memsets).
                let fresh = unsafe { stream.alloc::<f32>(class) };
                let s = match fresh {
                    Ok(s) => s,
                    Err(_) => {
                        // Out of memory (or fragmentation): give cached blocks back and retry once.
                        self.release_cached(stream)?;
                        unsafe { stream.alloc::<f32>(class) }?
                    }
                };
                self.stats.device_allocs += 1;
                s
            }
        };
        self.stats.bytes_in_use += class * 4;
        self.stats.peak_bytes_in_use = self.stats.peak_bytes_in_use.max(self.stats.bytes_in_use);
        Ok(slice)
    }

    /// Returns a block taken with `take` to its free list.
    pub fn give_back(&mut self, slice: CudaSlice<f32>) {
        let class = slice.len();
        self.stats.bytes_in_use = self.stats.bytes_in_use.saturating_sub(class * 4);
        self.free.entry(class).or_default().push(slice);
    }

    /// Frees every cached block (waits for the stream first, so no queued kernel still uses one).
    pub fn release_cached(&mut self, stream: &Arc<CudaStream>) -> Result<(), DriverError> {
        stream.synchronize()?;
        for (_, list) in self.free.drain() {
            self.stats.device_frees += list.len() as u64;
            drop(list);
        }
        Ok(())
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_and_waste_at_most_a_quarter() {
        for n in (1..5000).chain([65_536, 65_537, 1 << 20, 3 << 20, (1 << 27) + 1]) {
            let c = size_class(n);
            assert!(c >= n, "class {c} < request {n}");
            if n > 64 {
                assert!(
                    (c - n) as f64 <= 0.25 * n as f64,
                    "class {c} wastes too much for {n}"
                );
            }
        }
        // Same request, same class; neighbours share classes (that is what makes reuse work).
        assert_eq!(size_class(1000), size_class(1000));
        assert_eq!(size_class(1000), size_class(1020));
    }
}
