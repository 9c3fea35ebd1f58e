//! What the ranks agree on at every step, in one small sum: the global batch, which ranks saw a
//! non-finite loss or gradient, and whether any rank was asked to stop (Ctrl-C, SIGTERM). Every rank
//! gets the same answer, so all of them skip the same update and stop after the same step, with one
//! message that names the rank where it went wrong.

use super::{Collective, RankFailed};

/// One rank's part of a step's vote.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ballot {
    /// Images this rank trained on in the step (0: none, it still votes).
    pub batch: usize,
    /// Its loss or a gradient was not finite.
    pub non_finite: bool,
    /// A stop was requested on this rank.
    pub stop: bool,
}

/// What every rank agreed on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Images in the global batch.
    pub total: usize,
    /// The fewest images a rank has.
    pub smallest: usize,
    /// The ranks whose loss or gradients were not finite, in rank order.
    pub non_finite: Vec<usize>,
    /// The ranks where a stop was requested.
    pub stop: Vec<usize>,
}

/// Each rank's ballot into its own three slots, summed: every rank reads every ballot.
pub fn vote(c: &dyn Collective, b: Ballot) -> Result<Verdict, RankFailed> {
    let n = c.size();
    let mut slots = vec![0f64; 3 * n];
    let at = 3 * c.rank();
    slots[at] = b.batch as f64;
    slots[at + 1] = f64::from(u8::from(b.non_finite));
    slots[at + 2] = f64::from(u8::from(b.stop));
    c.all_reduce_sum(&mut slots)?;
    let ranks = |k: usize| {
        (0..n)
            .filter(|r| slots[3 * r + k] != 0.0)
            .collect::<Vec<_>>()
    };
    Ok(Verdict {
        total: (0..n).map(|r| slots[3 * r] as usize).sum(),
        smallest: (0..n).map(|r| slots[3 * r] as usize).min().unwrap_or(0),
        non_finite: ranks(1),
        stop: ranks(2),
    })
}

/// Whether `flag` is set on any rank.
pub fn any(c: &dyn Collective, flag: bool) -> Result<bool, RankFailed> {
    let mut v = [f64::from(u8::from(flag))];
    c.all_reduce_sum(&mut v)?;
    Ok(v[0] != 0.0)
}

/// "rank 1", "ranks 0 and 2", "ranks 0, 1 and 3".
pub fn name_ranks(ranks: &[usize]) -> String {
    match ranks {
        [] => "no rank".into(),
        [r] => format!("rank {r}"),
        [init @ .., last] => format!(
            "ranks {} and {last}",
            init.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::local;

    #[test]
    fn every_rank_reads_every_ballot() {
        let got: Vec<Verdict> = std::thread::scope(|s| {
            let hs: Vec<_> = local::group(3)
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let b = Ballot {
                            batch: 10 + r.rank(),
                            non_finite: r.rank() == 2,
                            stop: r.rank() != 1,
                        };
                        vote(&r, b).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = Verdict {
            total: 33,
            smallest: 10,
            non_finite: vec![2],
            stop: vec![0, 2],
        };
        assert!(got.iter().all(|v| *v == want), "{got:?}");
        assert_eq!(name_ranks(&[2]), "rank 2");
        assert_eq!(name_ranks(&[0, 1, 3]), "ranks 0, 1 and 3");
    }
}
