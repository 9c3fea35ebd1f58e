//! The "physical model" for K > n+1: points on the unit sphere that repel each other, moved until they
//! settle (DESIGN.md §1.1). Approximate: no set of more than n+1 points reaches −1/(K−1).
//!
//! Each point feels a force from every other point that grows steeply with their cosine,
//! w_ij = exp(t·(cos_ij − cos_max)), so the closest pairs dominate and the largest pairwise cosine
//! (what classification cares about) is what goes down. A step moves every point along the tangential
//! part of its force by an angle that shrinks over the run; the sharpness t grows over the run, from a
//! smooth energy (all pairs count, fast global spreading) to nearly the max-cosine itself. One step is
//! two K×K×n GEMMs (the Gram matrix and the forces), so K=300, n=256 takes well under a second.

use crate::rng::Rng;

/// Iterations of the repulsion; enough for the schedule below to settle at K of a few thousand.
const STEPS: usize = 150;

/// K approximately evenly spread unit vectors in R^n (row-major K×n, f64), from `seed`.
pub fn repulsion(classes: usize, dim: usize, seed: u64) -> Vec<f64> {
    assert!(classes >= 2 && dim >= 1, "repulsion({classes}, {dim})");
    let (k, n) = (classes, dim);
    let mut rng = Rng::derive(seed, 0x4E9E1);
    let mut p: Vec<f64> = (0..k * n).map(|_| rng.normal()).collect();
    normalise_rows(&mut p, n);
    if n == 1 {
        // The 0-sphere has two points: alternate them, nothing to move.
        for (i, v) in p.iter_mut().enumerate() {
            *v = if i % 2 == 0 { 1.0 } else { -1.0 };
        }
        return p;
    }
    let mut gram = vec![0.0; k * k];
    let mut force = vec![0.0; k * n];
    let mut best = p.clone();
    let mut best_max = f64::INFINITY;
    for step in 0..STEPS {
        let progress = step as f64 / (STEPS - 1) as f64;
        // Sharpness from 10 to 200 and step angle from 0.1 to 0.002 rad, both geometric.
        let t = 10.0 * 20f64.powf(progress);
        let angle = 0.1 * 0.02f64.powf(progress);

        crate::cpu::gemm(k, n, k, 1.0, &p, false, &p, true, 0.0, &mut gram);
        let mut gmax = f64::NEG_INFINITY;
        for i in 0..k {
            for j in 0..k {
                if i != j {
                    gmax = gmax.max(gram[i * k + j]);
                }
            }
        }
        if gmax < best_max {
            best_max = gmax;
            best.copy_from_slice(&p);
        }
        for i in 0..k {
            for j in 0..k {
                let g = &mut gram[i * k + j];
                *g = if i == j { 0.0 } else { (t * (*g - gmax)).exp() };
            }
        }
        // Force on p_i: −Σ_j w_ij p_j (away from its neighbours), made tangential to the sphere.
        crate::cpu::gemm(k, k, n, 1.0, &gram, false, &p, false, 0.0, &mut force);
        let mut fnorms = vec![0.0; k];
        for ((pi, fi), fnorm) in p
            .chunks_exact(n)
            .zip(force.chunks_exact_mut(n))
            .zip(&mut fnorms)
        {
            let radial: f64 = pi.iter().zip(fi.iter()).map(|(a, b)| a * b).sum();
            for (f, &x) in fi.iter_mut().zip(pi.iter()) {
                *f = -(*f - radial * x);
            }
            *fnorm = fi.iter().map(|f| f * f).sum::<f64>().sqrt();
        }
        let fmax = fnorms.iter().fold(0.0f64, |m, &f| m.max(f));
        for ((pi, fi), &fnorm) in p
            .chunks_exact_mut(n)
            .zip(force.chunks_exact(n))
            .zip(&fnorms)
        {
            if fnorm > 0.0 {
                // Rotate along the force, by an angle proportional to its strength (stays on the sphere).
                let (s, c) = (angle * fnorm / fmax).sin_cos();
                for (x, &f) in pi.iter_mut().zip(fi.iter()) {
                    *x = c * *x + s * f / fnorm;
                }
            }
        }
        normalise_rows(&mut p, n);
    }
    crate::cpu::gemm(k, n, k, 1.0, &p, false, &p, true, 0.0, &mut gram);
    let gmax = (0..k * k)
        .filter(|ij| ij / k != ij % k)
        .fold(f64::NEG_INFINITY, |m, ij| m.max(gram[ij]));
    if gmax < best_max {
        best.copy_from_slice(&p);
    }
    best
}

fn normalise_rows(p: &mut [f64], n: usize) {
    for row in p.chunks_exact_mut(n) {
        let r = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for v in row {
            *v /= r;
        }
    }
}
