//! Ranks as MPI processes (cargo feature `distributed`): `mpirun -np N podgpu …` or `srun` under
//! Slurm. MPI carries the collectives of CPU ranks (and, later, exchanges NCCL's unique id for GPU
//! ranks). Sums are made from an all-gather in rank order on every rank, so every rank holds the same
//! bits and a run repeats bit for bit for a given number of ranks, whatever MPI's own reduction order.

use super::{Collective, RankFailed};
use mpi::traits::*;

/// The MPI world of this process.
pub struct MpiWorld {
    // Finalises MPI when dropped; keep it alive as long as the world is used.
    _universe: mpi::environment::Universe,
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
}

pub use super::launched_by_mpi;

impl MpiWorld {
    /// Initialises MPI. `Err` says why (MPI already initialised, or the library failed).
    pub fn init() -> Result<MpiWorld, String> {
        let universe = mpi::initialize().ok_or("MPI was already initialised in this process")?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiWorld {
            _universe: universe,
            world,
            rank,
            size,
        })
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<(), RankFailed> {
        let mut all = vec![0f64; v.len() * self.size];
        self.world.all_gather_into(&v[..], &mut all[..]);
        v.fill(0.0);
        for part in all.chunks_exact(v.len().max(1)).take(self.size) {
            for (a, b) in v.iter_mut().zip(part) {
                *a += b;
            }
        }
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), RankFailed> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        // In pieces of at most 1 GiB: MPI counts are 32-bit.
        for piece in bytes.chunks_mut(1 << 30) {
            root.broadcast_into(piece);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), RankFailed> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, message: &str) {
        // A blocked MPI call cannot be woken: the message, then MPI_Abort, which makes the launcher
        // stop every rank. Checkpoints are written atomically, so the last good one stays intact.
        eprintln!("error: rank {} of {}: {message}", self.rank, self.size);
        eprintln!("stopping all {} ranks", self.size);
        self.world.abort(1)
    }
}
