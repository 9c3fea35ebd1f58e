//! Ranks as MPI processes (cargo feature `distributed`): `mpirun -np N podgpu …` or `srun` under
//! Slurm. MPI carries the collectives of CPU ranks (and, later, exchanges NCCL's unique id for GPU
//! ranks). Sums are made from an all-gather in rank order on every rank, so every rank holds the same
//! bits and a run repeats bit for bit for a given number of ranks, whatever MPI's own reduction order.

use super::Collective;
use mpi::traits::*;

/// The MPI world of this process.
pub struct MpiWorld {
    // Finalises MPI when dropped; keep it alive as long as the world is used.
    _universe: mpi::environment::Universe,
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
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

    fn all_reduce_sum(&self, v: &mut [f64]) {
        let mut all = vec![0f64; v.len() * self.size];
        self.world.all_gather_into(&v[..], &mut all[..]);
        v.fill(0.0);
        for part in all.chunks_exact(v.len().max(1)).take(self.size) {
            for (a, b) in v.iter_mut().zip(part) {
                *a += b;
            }
        }
    }

    fn barrier(&self) {
        self.world.barrier();
    }
}
