//! PEDCC: predefined evenly-distributed class centroids (DESIGN.md §1.1).
//!
//! K unit vectors in R^n that are as far apart as possible. For K ≤ n+1 they are the vertices of a
//! regular simplex (pairwise inner product exactly −1/(K−1)), built in f64 and randomly rotated
//! (`simplex`). For K > n+1 no exact solution exists; `repulsion` spreads points by letting them repel
//! each other on the sphere (the paper's older "physical model"). The centroids are a frozen head:
//! training never changes them, so they are generated once and stored as safetensors (`io`).

mod io;
mod repulsion;
mod simplex;

pub use io::{load, save, TENSOR_NAME};
pub use repulsion::repulsion;
pub use simplex::{random_orthonormal_rows, simplex};

use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// How the centroids were (or are to be) made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Exact regular simplex, randomly rotated (K ≤ n+1).
    Simplex,
    /// Mutual repulsion on the sphere (any K; approximate).
    Repulsion,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Simplex => "simplex",
            Method::Repulsion => "repulsion",
        }
    }
}

/// A set of K centroids in R^n, in f64 (row-major K×n).
#[derive(Clone, Debug)]
pub struct Pedcc {
    pub classes: usize,
    pub dim: usize,
    pub method: Method,
    pub seed: u64,
    pub values: Vec<f64>,
}

impl Pedcc {
    /// The centroids as the f32 host tensor [K, n] that training uses.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_vec(
            &[self.classes, self.dim],
            self.values.iter().map(|&v| v as f32).collect(),
        )
    }

    /// The centroids as an f64 host tensor [K, n] (gradient checks).
    pub fn to_tensor_f64(&self) -> Tensor {
        Tensor::from_vec(&[self.classes, self.dim], self.values.clone())
    }
}

/// Checks the arguments of `generate`; the message says what to change.
pub fn check_args(classes: usize, dim: usize, method: Method) -> Result<()> {
    if classes < 2 {
        bail!("PEDCC needs at least 2 classes (got --classes {classes})");
    }
    if dim < 1 {
        bail!("PEDCC needs a latent dimension of at least 1 (got --dim {dim})");
    }
    if method == Method::Simplex && classes - 1 > dim {
        bail!(
            "{classes} classes do not fit as an exact simplex in {dim} dimensions (that needs \
             classes ≤ dim + 1 = {}); use a larger --dim (recommended for {classes} classes: {}), \
             or add --repulsion for approximately even points",
            dim as u128 + 1,
            recommended_dim(classes)
        );
    }
    check_size(classes, dim)
}

/// Refuses a PEDCC too large for the machine before anything is allocated: its K×n values (and the
/// construction's working copies) and the K×K inner products that generating and checking it need.
pub fn check_size(classes: usize, dim: usize) -> Result<()> {
    let (k, n) = (classes as u128, dim as u128);
    let bytes = crate::budget::product(&[8, k, n])
        .saturating_mul(3)
        .saturating_add(crate::budget::product(&[8, k, k]));
    crate::budget::ensure_fits(
        bytes,
        || format!("a PEDCC of {classes} classes in {dim} dimensions"),
        "lower the number of classes or the dimension (--dim for `podgpu pedcc`, --feature-dim \
         for training)",
    )
}

/// Rows closer than this (cosine above 1 − ε) coincide: their classes cannot be told apart.
const COINCIDENT: f64 = 1e-6;

/// The two rows of a K×n set (row-major) with the largest cosine, and that cosine; computed in
/// blocks of rows, so that the K×K inner products are never held at once.
pub fn closest_pair(values: &[f64], classes: usize, dim: usize) -> (usize, usize, f64) {
    let norms: Vec<f64> = values
        .chunks_exact(dim)
        .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let block = ((1usize << 20) / classes.max(1)).clamp(1, 256);
    let mut g = vec![0.0; block * classes];
    let mut best = (0, 1, f64::NEG_INFINITY);
    for b0 in (0..classes).step_by(block) {
        let bs = block.min(classes - b0);
        let rows = &values[b0 * dim..(b0 + bs) * dim];
        crate::cpu::gemm(
            bs,
            dim,
            classes,
            1.0,
            rows,
            false,
            values,
            true,
            0.0,
            &mut g[..bs * classes],
        );
        for i in 0..bs {
            for j in (b0 + i + 1)..classes {
                let cos = g[i * classes + j] / (norms[b0 + i] * norms[j]);
                if cos > best.2 || cos.is_nan() {
                    best = (b0 + i, j, cos);
                }
            }
        }
    }
    best
}

/// Refuses a degenerate PEDCC: two coincident (or identical) centroids make their classes
/// impossible to tell apart, e.g. 3 classes in 1 dimension.
pub fn check_distinct(values: &[f64], classes: usize, dim: usize, source: &str) -> Result<()> {
    let (i, j, cos) = closest_pair(values, classes, dim);
    if cos.is_nan() || cos >= 1.0 - COINCIDENT {
        bail!(
            "{source} is degenerate: centroids {i} and {j} coincide (cosine {cos:.6}), so classes \
             {i} and {j} could not be told apart; {classes} classes need more than {dim} \
             dimension{} (recommended: {})",
            if dim == 1 { "" } else { "s" },
            recommended_dim(classes)
        );
    }
    Ok(())
}

/// Generates K centroids in R^n with the given method, reproducibly from `seed`.
pub fn generate(classes: usize, dim: usize, seed: u64, method: Method) -> Result<Pedcc> {
    check_args(classes, dim, method)?;
    let values = match method {
        Method::Simplex => simplex(classes, dim, seed),
        Method::Repulsion => repulsion(classes, dim, seed),
    };
    check_distinct(
        &values,
        classes,
        dim,
        &format!("the PEDCC of {classes} classes in {dim} dimensions"),
    )?;
    Ok(Pedcc {
        classes,
        dim,
        method,
        seed,
        values,
    })
}

/// The latent dimension n the paper recommends for K classes (Table III: K = 10, 30 → 256; K = 100,
/// 200 → 512; K = 500 → 1024; K = 1000 → 2048). Between the table's points: 256 up to 30 classes, 512
/// up to 200, beyond that the smallest power of two ≥ 2K (the paper's best range is 2K ≤ n ≤ 40K).
pub fn recommended_dim(classes: usize) -> usize {
    if classes <= 30 {
        256
    } else if classes <= 200 {
        512
    } else {
        classes
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .unwrap_or(usize::MAX)
    }
}

/// How close a set of centroids is to the ideal (DESIGN.md §1.1).
#[derive(Clone, Copy, Debug)]
pub struct Verification {
    /// max_i |‖p_i‖ − 1|
    pub max_norm_error: f64,
    /// max_{i≠j} |⟨p_i, p_j⟩ + 1/(K−1)|: zero for an exact simplex; unreachable when K > n+1.
    pub max_simplex_error: f64,
    /// max_{i≠j} cos(p_i, p_j): the closest pair (−1/(K−1) for a simplex).
    pub max_cosine: f64,
    /// min_{i≠j} cos(p_i, p_j).
    pub min_cosine: f64,
}

/// Verification numbers of K row vectors (row-major K×n, any values).
pub fn verify(values: &[f64], classes: usize, dim: usize) -> Verification {
    assert_eq!(values.len(), classes * dim, "verify: values are not K×n");
    let mut gram = vec![0.0; classes * classes];
    crate::cpu::gemm(
        classes, dim, classes, 1.0, values, false, values, true, 0.0, &mut gram,
    );
    let target = -1.0 / (classes as f64 - 1.0);
    let norms: Vec<f64> = (0..classes).map(|i| gram[i * classes + i].sqrt()).collect();
    let mut v = Verification {
        max_norm_error: norms.iter().fold(0.0, |m, &r| m.max((r - 1.0).abs())),
        max_simplex_error: 0.0,
        max_cosine: f64::NEG_INFINITY,
        min_cosine: f64::INFINITY,
    };
    for i in 0..classes {
        for j in (i + 1)..classes {
            let g = gram[i * classes + j];
            let cos = g / (norms[i] * norms[j]);
            v.max_simplex_error = v.max_simplex_error.max((g - target).abs());
            v.max_cosine = v.max_cosine.max(cos);
            v.min_cosine = v.min_cosine.min(cos);
        }
    }
    v
}

/// Verification of a [K, n] tensor (as stored, e.g. after rounding to f32).
pub fn verify_tensor(p: &Tensor) -> Verification {
    assert_eq!(p.rank(), 2, "a PEDCC tensor is [K, n], got {:?}", p.shape());
    verify(&p.to_vec_f64(), p.dim(0), p.dim(1))
}
