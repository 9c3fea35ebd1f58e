//! Ranks as threads of one process: the same `Collective` contract as MPI, for tests and for checking
//! the data-parallel arithmetic without launching processes.

use super::Collective;
use std::sync::{Arc, Barrier, Mutex, PoisonError};

struct Shared {
    size: usize,
    barrier: Barrier,
    /// Each rank's contribution to the collective in progress.
    slots: Mutex<Vec<Option<Vec<f64>>>>,
}

/// One rank of a `LocalGroup`; move it into its thread.
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// `n` ranks that run as threads (one `LocalRank` each).
pub fn group(n: usize) -> Vec<LocalRank> {
    assert!(n >= 1, "a group needs a rank");
    let shared = Arc::new(Shared {
        size: n,
        barrier: Barrier::new(n),
        slots: Mutex::new(vec![None; n]),
    });
    (0..n)
        .map(|rank| LocalRank {
            rank,
            shared: shared.clone(),
        })
        .collect()
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, v: &mut [f64]) {
        let slots = || {
            self.shared
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        slots()[self.rank] = Some(v.to_vec());
        self.shared.barrier.wait();
        {
            let all = slots();
            // Every rank adds in rank order: bit-identical results everywhere.
            v.fill(0.0);
            for (r, s) in all.iter().enumerate() {
                let s = s.as_ref().expect("every rank deposited");
                assert_eq!(
                    s.len(),
                    v.len(),
                    "rank {r} reduced {} values, rank {} {}",
                    s.len(),
                    self.rank,
                    v.len()
                );
                for (a, b) in v.iter_mut().zip(s) {
                    *a += b;
                }
            }
        }
        self.shared.barrier.wait();
        if self.rank == 0 {
            slots().iter_mut().for_each(|s| *s = None);
        }
        self.shared.barrier.wait();
    }

    fn barrier(&self) {
        self.shared.barrier.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_gives_every_rank_the_same_sum() {
        let results: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = group(3)
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut v = vec![r.rank() as f64, 1.0, 0.1 * (r.rank() + 1) as f64];
                        r.all_reduce_sum(&mut v);
                        // A second collective right after reuses the slots safely.
                        let mut w = vec![1.0];
                        r.all_reduce_sum(&mut w);
                        assert_eq!(w, vec![3.0]);
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0], vec![3.0, 3.0, 0.1 + 0.2 + 0.30000000000000004]);
        assert!(
            results.iter().all(|r| r == &results[0]),
            "bit-identical on every rank"
        );
    }
}
