//! Data-parallel training across processes (issue 16): the pieces that do not depend on how ranks
//! talk to each other.
//!
//! - `Collective`: what a group of ranks can do together (sum, broadcast, barrier, abort). `Single`
//!   is one process (every operation a no-op); `local::group` runs ranks as threads of one process
//!   (for tests, and to check the arithmetic without MPI); an MPI implementation (cargo feature
//!   `distributed`) is the production one.
//! - `shard`: which images a rank trains on in each global batch, so that every image is seen once
//!   per epoch across ranks, whatever the number of ranks.
//! - `grads`: the gradients of every rank combined into the gradient of the whole global batch
//!   (each rank's mean gradient weighted by its batch size), in reverse-parameter-order buckets
//!   (`buckets`: the plan, and the schedule that starts a bucket during the backward pass).
//! - `sync_bn`: batch-norm statistics summed across ranks (`--sync-bn`).
//! - `vote`: what the ranks agree on at every step (the global batch, a non-finite value on some
//!   rank, a stop request on some rank), so that they all stop at the same step with one message.
//!
//! Every sum is made in rank order on every rank, so all ranks hold bit-identical results and a run
//! is deterministic for a given number of ranks and seed.

pub mod buckets;
pub mod grads;
pub mod local;
#[cfg(feature = "distributed")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shard;
pub mod sync_bn;
pub mod vote;

/// Another rank failed: what every collective of the other ranks returns once it has (the failing
/// rank called `Collective::abort`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("rank {rank} of {size} failed: {message}")]
pub struct RankFailed {
    pub rank: usize,
    pub size: usize,
    pub message: String,
}

/// What a group of ranks can do together. Every rank must make the same calls in the same order.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// `v` becomes the element-wise sum of every rank's `v`, added in rank order (the same bits on
    /// every rank). All ranks pass vectors of the same length.
    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<(), RankFailed>;
    /// Every rank's `bytes` becomes rank 0's (whatever length the others passed).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), RankFailed>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<(), RankFailed>;
    /// This rank failed with `message` and will make no more collective calls: the other ranks'
    /// collectives, pending or later, return `RankFailed` naming it (thread ranks), or the whole
    /// job is stopped after the message is printed (MPI, whose blocked calls cannot be woken).
    fn abort(&self, message: &str);

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
    fn all_reduce_sum(&self, _v: &mut [f64]) -> Result<(), RankFailed> {
        Ok(())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>) -> Result<(), RankFailed> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), RankFailed> {
        Ok(())
    }
    fn abort(&self, _message: &str) {}
}

/// The rank of this process among the ranks of its machine, from the launcher's environment (Open
/// MPI, Slurm, MPICH/Intel MPI), for `cuda:<local rank>`; None when no launcher says.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
        "MPI_LOCALRANKID",
        "PMI_LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Whether this process was started by an MPI launcher (Open MPI's mpirun, a PMI launcher such as
/// Slurm's srun). Without one, podgpu runs as a single process and never initialises MPI.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// The number of ranks the launcher started, where it says (Open MPI, PMI); None otherwise.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}
