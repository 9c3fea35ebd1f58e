//! The exact construction for K ≤ n+1: a regular simplex, randomly rotated, in f64.
//!
//! The K vectors e_i − (1/K)·1, scaled to unit norm, have pairwise inner products exactly −1/(K−1)
//! and span the (K−1)-dimensional subspace orthogonal to 1. Their coordinates in the Helmert basis of
//! that subspace are closed-form (C, K×(K−1)). Mapping C by K−1 random orthonormal rows F ((K−1)×n)
//! gives P = C·F: F Fᵀ = I keeps every inner product, and a Haar-random F makes the orientation random.
//! Only the first K−1 rows of a random n×n rotation matter, so F costs K²n, not n³.

use crate::rng::Rng;

/// K simplex vertices in R^n (row-major K×n, f64), randomly oriented from `seed`. Needs 2 ≤ K ≤ n+1.
pub fn simplex(classes: usize, dim: usize, seed: u64) -> Vec<f64> {
    assert!(
        classes >= 2 && classes <= dim.saturating_add(1),
        "simplex({classes}, {dim}) needs 2 ≤ K ≤ n+1"
    );
    let m = classes - 1;
    let coords = helmert_coordinates(classes);
    let frame = random_orthonormal_rows(m, dim, &mut Rng::derive(seed, 0x9EDCC));
    let mut p = vec![0.0; classes * dim];
    crate::cpu::gemm(
        classes, m, dim, 1.0, &coords, false, &frame, false, 0.0, &mut p,
    );
    p
}

/// Coordinates (K×(K−1)) of the unit simplex vertices (e_i − 1/K)/√(1−1/K) in the Helmert basis
/// h_j = (1, …, 1, −j, 0, …)/√(j(j+1)), j = 1..K−1 (j ones, then −j at position j).
fn helmert_coordinates(classes: usize) -> Vec<f64> {
    let m = classes - 1;
    let scale = (classes as f64 / m as f64).sqrt();
    let mut c = vec![0.0; classes * m];
    for j in 1..=m {
        let h = 1.0 / ((j * (j + 1)) as f64).sqrt();
        for i in 0..j {
            c[i * m + (j - 1)] = h * scale;
        }
        c[j * m + (j - 1)] = -(j as f64) * h * scale;
    }
    c
}

/// `rows` orthonormal vectors in R^dim (row-major rows×dim), uniformly (Haar) distributed: Gaussian
/// rows orthonormalised by classical Gram–Schmidt run twice ("twice is enough" keeps them orthogonal to
/// rounding error). Gram–Schmidt's R has a positive diagonal, which is exactly the sign correction that
/// makes QR of a Gaussian matrix Haar-distributed. Rows go in blocks: the projection of a block onto
/// all finished rows is two GEMMs, only the few rows inside a block are done one by one.
pub fn random_orthonormal_rows(rows: usize, dim: usize, rng: &mut Rng) -> Vec<f64> {
    assert!(
        rows <= dim,
        "cannot have {rows} orthonormal vectors in R^{dim}"
    );
    const BLOCK: usize = 64;
    let mut q: Vec<f64> = (0..rows * dim).map(|_| rng.normal()).collect();
    let mut done = 0;
    while done < rows {
        let bs = BLOCK.min(rows - done);
        let (finished, rest) = q.split_at_mut(done * dim);
        let block = &mut rest[..bs * dim];
        // Project the block off the finished rows, twice: block −= (block·Qᵀ)·Q.
        if done > 0 {
            let mut coef = vec![0.0; bs * done];
            for _pass in 0..2 {
                crate::cpu::gemm(
                    bs, dim, done, 1.0, block, false, finished, true, 0.0, &mut coef,
                );
                crate::cpu::gemm(
                    bs, done, dim, -1.0, &coef, false, finished, false, 1.0, block,
                );
            }
        }
        // Inside the block, one row at a time.
        let mut j = 0;
        while j < bs {
            let (prev, cur) = block.split_at_mut(j * dim);
            let v = &mut cur[..dim];
            for _pass in 0..2 {
                for qi in prev.chunks_exact(dim) {
                    let c = dot(qi, v);
                    for (vk, &qk) in v.iter_mut().zip(qi) {
                        *vk -= c * qk;
                    }
                }
            }
            let norm = dot(v, v).sqrt();
            // A Gaussian draw (almost) never lies in the span of the rows so far; should rounding say
            // it nearly does, draw the row again and redo the block rather than normalise noise.
            if norm < 1e-6 {
                for vk in block.iter_mut().skip(j * dim).take(dim) {
                    *vk = rng.normal();
                }
                break;
            }
            for vk in v.iter_mut() {
                *vk /= norm;
            }
            j += 1;
        }
        if j == bs {
            done += bs;
        }
    }
    q
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helmert_coordinates_are_a_unit_simplex() {
        for k in [2, 3, 7] {
            let c = helmert_coordinates(k);
            let m = k - 1;
            for i in 0..k {
                for j in 0..k {
                    let g = dot(&c[i * m..(i + 1) * m], &c[j * m..(j + 1) * m]);
                    let want = if i == j { 1.0 } else { -1.0 / m as f64 };
                    assert!((g - want).abs() < 1e-14, "K={k} ({i},{j}): {g}");
                }
            }
        }
    }

    #[test]
    fn orthonormal_rows() {
        let q = random_orthonormal_rows(9, 9, &mut Rng::new(3));
        for i in 0..9 {
            for j in 0..9 {
                let g = dot(&q[i * 9..(i + 1) * 9], &q[j * 9..(j + 1) * 9]);
                assert!((g - f64::from(u8::from(i == j))).abs() < 1e-13);
            }
        }
    }
}
