//! The caching allocator: device memory is requested from CUDA once per size class and then reused.
//!
//! A training step allocates the same set of buffer sizes every time, so after the first step every
//! request is served from a free list and the step calls no cudaMalloc/cudaFree (the counters below
//! let a test check exactly that). Sizes are rounded up to a class (four classes per power of two,
//! so at most 25% is wasted); a buffer returns to its class's free list when its `CudaBuf` drops.
//! All work goes to one stream, so a block freed by the host and handed out again is only touched by
//! kernels queued after every kernel that used it before: no extra synchronisation is needed.
//!
//! **CUDA graphs** (`cuda::graph`). A captured step bakes its blocks' addresses into the graph, and
//! every replay writes them again; so a block the capture used must never be handed to other work
//! afterwards, or a replay would overwrite it. While a graph is being captured, every block taken
//! is *reserved* for that graph; a reserved block that is given back goes to the graph's own free
//! lists (reusable by that graph's capture only, as stream order allows), never to the shared ones.
//! Dropping the graph (`release_graph`) returns its blocks to the shared lists. Blocks the capture
//! needs beyond the cache come from the driver's synchronous allocator (`fresh` below): a stream
//! allocation inside a capture would become a node of the graph, not memory the pool owns.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError};
use std::collections::HashMap;
use std::sync::Arc;

/// Allocation counters of one GPU's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held by live buffers (rounded to their size class).
    pub bytes_in_use: usize,
    /// The largest `bytes_in_use` seen since the last `reset_peak`.
    pub peak_bytes_in_use: usize,
    /// Bytes sitting in the shared free lists, ready for reuse.
    pub bytes_cached: usize,
    /// Bytes sitting in CUDA graphs' own free lists (reserved until their graph is dropped).
    pub bytes_reserved_for_graphs: usize,
    /// Real device allocations (cuMemAlloc/cuMemAllocAsync) so far.
    pub device_allocs: u64,
    /// Real device frees so far (only when the cache is released, e.g. on out-of-memory).
    pub device_frees: u64,
    /// Requests served from a free list.
    pub reuses: u64,
}

/// What the pool needs to know of a block: its device address and its length in f32 elements.
pub trait Block {
    fn addr(&self) -> u64;
    fn elems(&self) -> usize;
}

impl Block for CudaSlice<f32> {
    fn addr(&self) -> u64 {
        let (p, _sync) = self.device_ptr(self.stream());
        p
    }
    fn elems(&self) -> usize {
        self.len()
    }
}

/// Free lists by size class.
type FreeLists<B> = HashMap<usize, Vec<B>>;

pub struct Pool<B: Block = CudaSlice<f32>> {
    free: FreeLists<B>,
    stats: PoolStats,
    /// The graph being captured, if any: blocks taken now are reserved for it.
    capturing: Option<u64>,
    /// Reserved blocks (free or in use) by address → their graph.
    reserved: HashMap<u64, u64>,
    /// Each graph's own free lists.
    graph_free: HashMap<u64, FreeLists<B>>,
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

fn pop<B>(lists: &mut FreeLists<B>, class: usize) -> Option<B> {
    lists.get_mut(&class).and_then(Vec::pop)
}

fn bytes<B: Block>(lists: &FreeLists<B>) -> usize {
    lists.values().flatten().map(|b| b.elems() * 4).sum()
}

impl<B: Block> Pool<B> {
    pub fn new() -> Pool<B> {
        Pool {
            free: HashMap::new(),
            stats: PoolStats::default(),
            capturing: None,
            reserved: HashMap::new(),
            graph_free: HashMap::new(),
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            bytes_cached: bytes(&self.free),
            bytes_reserved_for_graphs: self.graph_free.values().map(bytes).sum(),
            ..self.stats
        }
    }

    pub fn reset_peak(&mut self) {
        self.stats.peak_bytes_in_use = self.stats.bytes_in_use;
    }

    /// A block of at least `n` f32 elements (its length is the size class), from a free list or
    /// else from `fresh(class)` (the driver). Contents are undefined. During a capture the graph's
    /// own free list is tried first, then the shared one, and the block is reserved for the graph.
    pub fn take_with<E>(
        &mut self,
        n: usize,
        fresh: impl FnOnce(usize) -> Result<B, E>,
    ) -> Result<B, E> {
        let class = size_class(n);
        let cached = match self.capturing {
            Some(g) => self
                .graph_free
                .get_mut(&g)
                .and_then(|l| pop(l, class))
                .or_else(|| pop(&mut self.free, class)),
            None => pop(&mut self.free, class),
        };
        let block = match cached {
            Some(b) => {
                self.stats.reuses += 1;
                b
            }
            None => {
                let b = fresh(class)?;
                self.stats.device_allocs += 1;
                b
            }
        };
        if let Some(g) = self.capturing {
            self.reserved.insert(block.addr(), g);
        }
        self.stats.bytes_in_use += class * 4;
        self.stats.peak_bytes_in_use = self.stats.peak_bytes_in_use.max(self.stats.bytes_in_use);
        Ok(block)
    }

    /// Returns a block taken with `take_with` to its free list: its graph's, when it is reserved.
    pub fn give_back(&mut self, block: B) {
        let class = block.elems();
        self.stats.bytes_in_use = self.stats.bytes_in_use.saturating_sub(class * 4);
        let lists = match self.reserved.get(&block.addr()) {
            Some(g) => self.graph_free.entry(*g).or_default(),
            None => &mut self.free,
        };
        lists.entry(class).or_default().push(block);
    }

    /// From now on blocks taken are reserved for graph `id` (one capture at a time).
    pub fn begin_capture(&mut self, id: u64) {
        assert!(
            self.capturing.is_none(),
            "a CUDA graph capture is already in progress"
        );
        self.capturing = Some(id);
        self.graph_free.entry(id).or_default();
    }

    /// Ends the capture; the blocks stay reserved until `release_graph`.
    pub fn end_capture(&mut self) {
        self.capturing = None;
    }

    /// Whether a capture is in progress.
    pub fn is_capturing(&self) -> bool {
        self.capturing.is_some()
    }

    /// Graph `id` is gone: its free blocks go back to the shared lists, and blocks of it still in
    /// use go there when they are given back.
    pub fn release_graph(&mut self, id: u64) {
        if self.capturing == Some(id) {
            self.capturing = None;
        }
        self.reserved.retain(|_, g| *g != id);
        for (class, list) in self.graph_free.remove(&id).unwrap_or_default() {
            self.free.entry(class).or_default().extend(list);
        }
    }

    /// Blocks in the shared free lists, for `release_cached`.
    fn drain_shared(&mut self) -> Vec<B> {
        self.free.drain().flat_map(|(_, l)| l).collect()
    }
}

impl Pool<CudaSlice<f32>> {
    /// `take_with` from the driver: a stream-ordered allocation, or, during a capture, a
    /// synchronous one (see the module comment). Out of memory outside a capture gives the cached
    /// blocks back and retries once; inside a capture nothing may wait, so it fails.
    pub fn take(
        &mut self,
        stream: &Arc<CudaStream>,
        n: usize,
    ) -> Result<CudaSlice<f32>, DriverError> {
        if self.capturing.is_some() {
            return self.take_with(n, |class| {
                stream.context().bind_to_thread()?;
                // SAFETY: a fresh device allocation of `class` f32s owned by the returned slice
                // (freed by its drop); contents are undefined as for every pool block.
                unsafe {
                    let p = cudarc::driver::result::malloc_sync(class * 4)?;
                    Ok(stream.upgrade_device_ptr::<f32>(p, class))
                }
            });
        }
        // SAFETY: the memory is uninitialised f32s; every user writes before it reads
        // (the launchers fill outputs completely, `alloc_zeros` memsets).
        let fresh = |class| unsafe { stream.alloc::<f32>(class) };
        match self.take_with(n, fresh) {
            Ok(b) => Ok(b),
            Err(_) => {
                // Out of memory (or fragmentation): give cached blocks back and retry once.
                self.release_cached(stream)?;
                self.take_with(n, fresh)
            }
        }
    }

    /// Frees every block of the shared free lists (waits for the stream first, so no queued
    /// kernel still uses one). Graphs' reserved blocks stay.
    pub fn release_cached(&mut self, stream: &Arc<CudaStream>) -> Result<(), DriverError> {
        if self.capturing.is_some() {
            return Ok(()); // nothing may wait during a capture
        }
        stream.synchronize()?;
        let blocks = self.drain_shared();
        self.stats.device_frees += blocks.len() as u64;
        drop(blocks);
        Ok(())
    }
}

impl<B: Block> Default for Pool<B> {
    fn default() -> Self {
        Pool::new()
    }
}

#[cfg(test)]
mod tests {
    use super::{size_class, Block, Pool};

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

    /// A stand-in block: an address and a length, as the pool sees a device allocation.
    #[derive(Debug, PartialEq)]
    struct Fake(u64, usize);
    impl Block for Fake {
        fn addr(&self) -> u64 {
            self.0
        }
        fn elems(&self) -> usize {
            self.1
        }
    }

    /// A driver that hands out fresh addresses.
    struct Driver(u64);
    impl Driver {
        fn take(&mut self, pool: &mut Pool<Fake>, n: usize) -> Fake {
            let next = &mut self.0;
            pool.take_with(n, |class| {
                *next += 1 << 20;
                Ok::<_, ()>(Fake(*next, class))
            })
            .unwrap()
        }
    }

    #[test]
    fn a_steady_step_reuses_every_block() {
        let (mut pool, mut drv) = (Pool::new(), Driver(0));
        for step in 0..3 {
            let a = drv.take(&mut pool, 1000);
            let b = drv.take(&mut pool, 5000);
            pool.give_back(a);
            pool.give_back(b);
            assert_eq!(pool.stats().device_allocs, 2, "step {step}");
        }
        assert_eq!(pool.stats().bytes_in_use, 0);
    }

    #[test]
    fn blocks_a_capture_used_stay_with_its_graph_until_it_is_released() {
        let (mut pool, mut drv) = (Pool::new(), Driver(0));
        // An eager step fills the cache.
        let warm = drv.take(&mut pool, 1000);
        let warm_addr = warm.addr();
        pool.give_back(warm);
        // The capture takes the cached block (no new allocation) and gives it back: it goes to
        // the graph's own list, so the capture can reuse it...
        pool.begin_capture(7);
        let a = drv.take(&mut pool, 1000);
        assert_eq!(a.addr(), warm_addr);
        pool.give_back(a);
        let a2 = drv.take(&mut pool, 1000);
        assert_eq!(a2.addr(), warm_addr, "the graph reuses its own block");
        // ...and one it still holds at the end (an output the host reads after each replay).
        let out = drv.take(&mut pool, 64);
        pool.give_back(a2);
        pool.end_capture();
        assert!(!pool.is_capturing());
        assert_eq!(pool.stats().device_allocs, 2);
        assert_eq!(pool.stats().bytes_cached, 0);
        assert!(pool.stats().bytes_reserved_for_graphs > 0);
        // Other work after the capture never gets the graph's blocks: it allocates afresh.
        let other = drv.take(&mut pool, 1000);
        assert_ne!(other.addr(), warm_addr);
        pool.give_back(other);
        // The output, dropped by the host, also returns to the graph.
        let out_addr = out.addr();
        pool.give_back(out);
        let other = drv.take(&mut pool, 64);
        assert_ne!(other.addr(), out_addr);
        pool.give_back(other);
        // Once the graph is gone its blocks are everyone's again.
        pool.release_graph(7);
        assert_eq!(pool.stats().bytes_reserved_for_graphs, 0);
        let allocs = pool.stats().device_allocs;
        let again = drv.take(&mut pool, 1000);
        let small = drv.take(&mut pool, 64);
        assert_eq!(pool.stats().device_allocs, allocs, "served from the cache");
        pool.give_back(again);
        pool.give_back(small);
        assert_eq!(pool.stats().bytes_in_use, 0);
    }

    #[test]
    fn a_block_in_use_when_its_graph_is_released_returns_to_the_shared_lists() {
        let (mut pool, mut drv) = (Pool::new(), Driver(0));
        pool.begin_capture(1);
        let out = drv.take(&mut pool, 100);
        pool.end_capture();
        pool.release_graph(1);
        let addr = out.addr();
        pool.give_back(out);
        assert_eq!(drv.take(&mut pool, 100).addr(), addr);
    }

    #[test]
    #[should_panic(expected = "already in progress")]
    fn one_capture_at_a_time() {
        let mut pool = Pool::<Fake>::new();
        pool.begin_capture(1);
        pool.begin_capture(2);
    }
}
