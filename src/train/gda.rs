//! Gaussian Discriminant Analysis on latent features (the paper's Table IX classifier): one Gaussian per
//! class with its own mean and a covariance shared by all classes (linear discriminant analysis),
//! fitted on the training features, then
//!
//! ```text
//! predict(x) = argmax_k  xᵀ Σ⁻¹ μ_k − ½ μ_kᵀ Σ⁻¹ μ_k + ln π_k
//! Σ = (1/(N − K)) Σ_b (x_b − μ_{y_b})(x_b − μ_{y_b})ᵀ + ε·(tr Σ / n)·I,   π_k = N_k / N
//! ```
//! The small ridge ε = 1e-6 (relative to the mean variance) keeps Σ invertible when the features span
//! fewer than n dimensions, which POD's features nearly do. Everything is computed in f64.

use crate::cpu;
use anyhow::{bail, Result};

/// Relative ridge added to the shared covariance.
pub const RIDGE: f64 = 1e-6;

/// A fitted GDA classifier: linear scores xᵀ w_k + b_k.
#[derive(Clone, Debug)]
pub struct Gda {
    pub classes: usize,
    pub dim: usize,
    /// Class means μ_k, [K × n] row-major.
    pub means: Vec<f64>,
    /// Class priors π_k (0 for a class without training samples, which is then never predicted).
    pub priors: Vec<f64>,
    /// w_k = Σ⁻¹ μ_k, [K × n].
    weights: Vec<f64>,
    /// b_k = −½ μ_kᵀ Σ⁻¹ μ_k + ln π_k.
    biases: Vec<f64>,
}

/// Fits GDA to features [N × n] (row-major; n = len / N) with labels in 0..classes.
pub fn fit(features: &[f32], labels: &[usize], classes: usize) -> Result<Gda> {
    let count = labels.len();
    if count == 0 || features.is_empty() {
        bail!("GDA needs training features; got none");
    }
    if !features.len().is_multiple_of(count) {
        bail!(
            "GDA: {} feature values do not split into {count} samples",
            features.len()
        );
    }
    let dim = features.len() / count;
    if let Some(&l) = labels.iter().find(|&&l| l >= classes) {
        bail!("GDA: label {l} is not a class index below {classes}");
    }
    let mut per_class = vec![0usize; classes];
    let mut means = vec![0.0f64; classes * dim];
    for (row, &y) in features.chunks_exact(dim).zip(labels) {
        per_class[y] += 1;
        for (m, &v) in means[y * dim..(y + 1) * dim].iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    for (k, &c) in per_class.iter().enumerate() {
        if c > 0 {
            means[k * dim..(k + 1) * dim]
                .iter_mut()
                .for_each(|m| *m /= c as f64);
        }
    }
    let present = per_class.iter().filter(|&&c| c > 0).count();
    if count <= present {
        bail!("GDA needs more training samples ({count}) than classes present ({present}) to estimate a covariance");
    }
    // Centred features D [N × n]; Σ = DᵀD / (N − K).
    let mut centred = vec![0.0f64; count * dim];
    for ((d, row), &y) in centred
        .chunks_exact_mut(dim)
        .zip(features.chunks_exact(dim))
        .zip(labels)
    {
        for ((o, &v), &m) in d.iter_mut().zip(row).zip(&means[y * dim..(y + 1) * dim]) {
            *o = v as f64 - m;
        }
    }
    let mut cov = vec![0.0f64; dim * dim];
    let denom = (count - present) as f64;
    cpu::gemm(
        dim,
        count,
        dim,
        1.0 / denom,
        &centred,
        true,
        &centred,
        false,
        0.0,
        &mut cov,
    );
    let trace: f64 = (0..dim).map(|i| cov[i * dim + i]).sum();
    let ridge = RIDGE * (trace / dim as f64).max(f64::MIN_POSITIVE);
    for i in 0..dim {
        cov[i * dim + i] += ridge;
    }
    let chol = cholesky(&mut cov, dim)?;
    let mut weights = vec![0.0f64; classes * dim];
    let mut biases = vec![f64::NEG_INFINITY; classes];
    let priors: Vec<f64> = per_class.iter().map(|&c| c as f64 / count as f64).collect();
    for k in 0..classes {
        if per_class[k] == 0 {
            continue;
        }
        let mu = &means[k * dim..(k + 1) * dim];
        let w = chol.solve(mu);
        let quad: f64 = w.iter().zip(mu).map(|(a, b)| a * b).sum();
        biases[k] = -0.5 * quad + priors[k].ln();
        weights[k * dim..(k + 1) * dim].copy_from_slice(&w);
    }
    Ok(Gda {
        classes,
        dim,
        means,
        priors,
        weights,
        biases,
    })
}

impl Gda {
    /// Discriminant scores [N × K] of features [N × n].
    pub fn scores(&self, features: &[f32]) -> Vec<f64> {
        assert_eq!(
            features.len() % self.dim,
            0,
            "GDA: features are not rows of {} values",
            self.dim
        );
        let rows = features.len() / self.dim;
        let x: Vec<f64> = features.iter().map(|&v| v as f64).collect();
        let mut out = vec![0.0f64; rows * self.classes];
        cpu::gemm(
            rows,
            self.dim,
            self.classes,
            1.0,
            &x,
            false,
            &self.weights,
            true,
            0.0,
            &mut out,
        );
        for row in out.chunks_exact_mut(self.classes) {
            for (s, &b) in row.iter_mut().zip(&self.biases) {
                *s += b;
            }
        }
        out
    }

    /// The predicted class of every feature row.
    pub fn predict(&self, features: &[f32]) -> Vec<usize> {
        self.scores(features)
            .chunks_exact(self.classes)
            .map(|row| {
                let mut best = 0;
                for (k, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = k;
                    }
                }
                best
            })
            .collect()
    }

    /// Fraction of rows predicted as their label.
    pub fn accuracy(&self, features: &[f32], labels: &[usize]) -> f64 {
        let pred = self.predict(features);
        let ok = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        ok as f64 / labels.len().max(1) as f64
    }
}

/// The lower Cholesky factor of a symmetric positive-definite matrix.
struct Cholesky {
    l: Vec<f64>,
    n: usize,
}

/// Factorises `a` (n × n, overwritten by L in its lower triangle).
fn cholesky(a: &mut [f64], n: usize) -> Result<Cholesky> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if !(d > 0.0 && d.is_finite()) {
            bail!("GDA: the shared covariance is not positive definite (are the features finite and varied?)");
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    Ok(Cholesky { l: a.to_vec(), n })
}

impl Cholesky {
    /// x with L Lᵀ x = b.
    fn solve(&self, b: &[f64]) -> Vec<f64> {
        let (l, n) = (&self.l, self.n);
        let mut y = b.to_vec();
        for i in 0..n {
            let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
            y[i] = (y[i] - s) / l[i * n + i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| l[k * n + i] * y[k]).sum();
            y[i] = (y[i] - s) / l[i * n + i];
        }
        y
    }
}
