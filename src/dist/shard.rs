//! Which images a rank trains on.
//!
//! All ranks draw the same seeded permutation of the epoch (the loader's), cut it into global batches
//! of `ranks × batch` images, and rank r takes the r-th slice of `batch` images of each. The last,
//! shorter global batch is cut into `ranks` contiguous slices as even as possible (the first ranks
//! get one image more), so every image of the epoch is trained on exactly once, by exactly one rank,
//! whatever the number of ranks — and one rank is the plain single-process loader.

/// The positions (into the epoch's permutation) of rank `rank`'s images in global batch `k`, for
/// `n` images in the epoch, `ranks` ranks and `batch` images per rank. Empty past the epoch's end.
pub fn rank_slice(
    n: usize,
    ranks: usize,
    batch: usize,
    k: usize,
    rank: usize,
) -> std::ops::Range<usize> {
    assert!(
        ranks >= 1 && rank < ranks && batch >= 1,
        "shard: {rank} of {ranks}, batch {batch}"
    );
    let global = ranks * batch;
    let start = k * global;
    if start >= n {
        return start..start;
    }
    let len = global.min(n - start);
    if len == global {
        return start + rank * batch..start + (rank + 1) * batch;
    }
    // The last, short global batch: `len` images in `ranks` slices, the first `len % ranks` one longer.
    let (base, extra) = (len / ranks, len % ranks);
    let lo = rank * base + rank.min(extra);
    let hi = lo + base + usize::from(rank < extra);
    start + lo..start + hi
}

/// The number of global batches in an epoch of `n` images.
pub fn global_batches(n: usize, ranks: usize, batch: usize) -> usize {
    n.div_ceil(ranks * batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_is_seen_once_per_epoch_whatever_the_number_of_ranks() {
        for (n, batch) in [(100, 8), (64, 32), (7, 4), (1000, 128), (3, 1)] {
            for ranks in 1..=5 {
                let mut seen = vec![0u32; n];
                for k in 0..global_batches(n, ranks, batch) {
                    let mut sizes = Vec::new();
                    for r in 0..ranks {
                        let s = rank_slice(n, ranks, batch, k, r);
                        sizes.push(s.len());
                        for i in s {
                            seen[i] += 1;
                        }
                    }
                    assert!(sizes.iter().all(|&s| s <= batch), "{sizes:?}");
                    let (mx, mn) = (sizes.iter().max().unwrap(), sizes.iter().min().unwrap());
                    assert!(mx - mn <= 1, "slices as even as possible: {sizes:?}");
                }
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "n {n}, batch {batch}, {ranks} ranks: {seen:?}"
                );
                assert!(rank_slice(n, ranks, batch, global_batches(n, ranks, batch), 0).is_empty());
            }
        }
    }

    #[test]
    fn one_rank_is_the_plain_loader_and_two_ranks_split_each_global_batch() {
        assert_eq!(rank_slice(100, 1, 32, 0, 0), 0..32);
        assert_eq!(rank_slice(100, 1, 32, 3, 0), 96..100);
        // Two ranks of 32: global batch k is 64 images, rank 1 takes the second half.
        assert_eq!(rank_slice(200, 2, 32, 1, 0), 64..96);
        assert_eq!(rank_slice(200, 2, 32, 1, 1), 96..128);
        // The tail of 8 images: 4 each.
        assert_eq!(rank_slice(200, 2, 32, 3, 0), 192..196);
        assert_eq!(rank_slice(200, 2, 32, 3, 1), 196..200);
    }
}
