//! Ranks as threads of one process: the same `Collective` contract as MPI, for tests and for checking
//! the data-parallel arithmetic (and the trainer) without launching processes. A rank that fails
//! calls `abort`: every collective of the others, waiting or later, returns `RankFailed`.

use super::{Collective, RankFailed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

struct State {
    /// Each rank's contribution to the sum in progress.
    slots: Vec<Option<Vec<f64>>>,
    /// Rank 0's bytes of the broadcast in progress.
    bytes: Vec<u8>,
    /// Ranks arrived at the current meeting point.
    arrived: usize,
    /// Counts meeting points passed, so that a waiting rank knows when its own one is complete.
    generation: u64,
    failed: Option<RankFailed>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// One rank of a `group`; move it into its thread.
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// `n` ranks that run as threads (one `LocalRank` each).
pub fn group(n: usize) -> Vec<LocalRank> {
    assert!(n >= 1, "a group needs a rank");
    let shared = Arc::new(Shared {
        size: n,
        state: Mutex::new(State {
            slots: vec![None; n],
            bytes: Vec::new(),
            arrived: 0,
            generation: 0,
            failed: None,
        }),
        changed: Condvar::new(),
    });
    (0..n)
        .map(|rank| LocalRank {
            rank,
            shared: shared.clone(),
        })
        .collect()
}

impl LocalRank {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every rank has reached this meeting point (or one failed).
    fn meet<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, RankFailed> {
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.size {
            st.arrived = 0;
            st.generation += 1;
            self.shared.changed.notify_all();
        } else {
            while st.generation == generation && st.failed.is_none() {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        match &st.failed {
            Some(f) => Err(f.clone()),
            None => Ok(st),
        }
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<(), RankFailed> {
        let mut st = self.lock();
        st.slots[self.rank] = Some(v.to_vec());
        let st = self.meet(st)?;
        // Every rank adds in rank order: bit-identical results everywhere.
        v.fill(0.0);
        for (r, s) in st.slots.iter().enumerate() {
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
        // Nobody deposits the next sum's values before every rank has read these.
        self.meet(st).map(drop)
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), RankFailed> {
        let mut st = self.lock();
        if self.rank == 0 {
            st.bytes = bytes.clone();
        }
        let st = self.meet(st)?;
        if self.rank != 0 {
            *bytes = st.bytes.clone();
        }
        self.meet(st).map(drop)
    }

    fn barrier(&self) -> Result<(), RankFailed> {
        let st = self.lock();
        self.meet(st).map(drop)
    }

    fn abort(&self, message: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(RankFailed {
                rank: self.rank,
                size: self.shared.size,
                message: message.to_string(),
            });
        }
        self.shared.changed.notify_all();
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
                        r.all_reduce_sum(&mut v).unwrap();
                        // A second collective right after reuses the slots safely.
                        let mut w = vec![1.0];
                        r.all_reduce_sum(&mut w).unwrap();
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

    #[test]
    fn broadcast_gives_every_rank_rank_0_s_bytes() {
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = group(3)
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut b = vec![r.rank() as u8; r.rank() + 1];
                        r.broadcast_bytes(&mut b).unwrap();
                        b
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, vec![vec![0u8]; 3]);
    }

    #[test]
    fn a_failed_rank_wakes_the_others_with_its_message() {
        let got: Vec<Result<(), RankFailed>> = std::thread::scope(|s| {
            let hs: Vec<_> = group(3)
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut v = [1.0];
                        r.all_reduce_sum(&mut v)?;
                        if r.rank() == 2 {
                            r.abort("out of disk");
                            return Ok(());
                        }
                        // Ranks 0 and 1 wait here for rank 2, which never comes.
                        r.all_reduce_sum(&mut v)?;
                        r.barrier()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = RankFailed {
            rank: 2,
            size: 3,
            message: "out of disk".into(),
        };
        assert_eq!(got[0], Err(want.clone()));
        assert_eq!(got[1], Err(want));
        assert_eq!(got[2], Ok(()));
    }
}
