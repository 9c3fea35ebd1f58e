//! Data-parallel training across processes (issue 16): the pieces that do not depend on how ranks
//! talk to each other.
//!
//! - `Collective`: what a group of ranks can do together (sum, broadcast, barrier). `Single` is one
//!   process (every operation a no-op); `local::LocalGroup` runs ranks as threads of one process (for
//!   tests, and to check the arithmetic without MPI); an MPI implementation (cargo feature
//!   `distributed`) is the production one.
//! - `shard`: which images a rank trains on in each global batch, so that every image is seen once
//!   per epoch across ranks, whatever the number of ranks.
//! - `grads`: the gradients of every rank combined into the gradient of the whole global batch
//!   (each rank's mean gradient weighted by its batch size), in reverse-parameter-order buckets.
//!
//! Every sum is made in rank order on every rank, so all ranks hold bit-identical results and a run
//! is deterministic for a given number of ranks and seed.

pub mod grads;
pub mod local;
#[cfg(feature = "distributed")]
pub mod mpi;
pub mod shard;

/// What a group of ranks can do together. Every rank must make the same calls in the same order.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// `v` becomes the element-wise sum of every rank's `v`, added in rank order (the same bits on
    /// every rank). All ranks pass vectors of the same length.
    fn all_reduce_sum(&self, v: &mut [f64]);
    /// Waits until every rank has arrived.
    fn barrier(&self);

    /// Whether this rank writes files (metrics, plots, checkpoints): rank 0 alone.
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: the collective operations change nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _v: &mut [f64]) {}
    fn barrier(&self) {}
}
