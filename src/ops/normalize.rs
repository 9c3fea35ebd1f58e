//! Row L2-normalisation `y_b = x_b / max(‖x_b‖, ε)` (the x̃ of the SC loss) and row norms.
//!
//! ε = 1e-12 as in PyTorch's `F.normalize`. Backward recomputes the norm from the saved input (one
//! pass over a row) instead of saving it: the GPU kernel does the same, one block per row.

use super::assert_same_place;
use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::tensor::{Elem, Tensor};

pub const NORMALIZE_EPS: f64 = 1e-12;

fn rows_cols(x: &Tensor) -> (usize, usize) {
    assert_eq!(
        x.rank(),
        2,
        "row op of a {:?} tensor; expected [rows, cols]",
        x.shape()
    );
    (x.dim(0), x.dim(1))
}

fn row_norm<T: Elem>(row: &[T]) -> T {
    row.iter().map(|&v| v * v).sum::<T>().sqrt()
}

// ---- row_normalize ----

pub fn row_normalize_fwd(x: &Tensor) -> Tensor {
    rows_cols(x);
    dispatch!(x, row_normalize_host, row_normalize_cuda, x)
}

fn row_normalize_host<T: Elem>(x: &Tensor) -> Tensor {
    let (_, n) = rows_cols(x);
    let eps = T::of(NORMALIZE_EPS);
    let mut out = x.host::<T>().to_vec();
    for row in out.chunks_exact_mut(n.max(1)) {
        let m = row_norm(row).max(eps);
        for v in row {
            *v = *v / m;
        }
    }
    Tensor::from_vec(x.shape(), out)
}

/// dx from the input x and dy. With r = ‖x‖ > ε: dx = (dy − y⟨y, dy⟩)/r; below ε the divisor is the
/// constant ε and dx = dy/ε.
pub fn row_normalize_bwd(x: &Tensor, dy: &Tensor) -> Tensor {
    assert_eq!(x.shape(), dy.shape(), "row_normalize_bwd: shapes differ");
    assert_same_place("row_normalize_bwd", &[x, dy]);
    dispatch!(x, row_normalize_bwd_host, row_normalize_bwd_cuda, x, dy)
}

fn row_normalize_bwd_host<T: Elem>(x: &Tensor, dy: &Tensor) -> Tensor {
    let (_, n) = rows_cols(x);
    let eps = T::of(NORMALIZE_EPS);
    let mut dx = vec![T::zero(); x.numel()];
    let rows = x.host::<T>().chunks_exact(n.max(1));
    for ((xr, gr), dr) in rows
        .zip(dy.host::<T>().chunks_exact(n.max(1)))
        .zip(dx.chunks_exact_mut(n.max(1)))
    {
        let r = row_norm(xr);
        if r > eps {
            // ⟨y, dy⟩ with y = x/r.
            let ydy = xr.iter().zip(gr).map(|(&a, &g)| a * g).sum::<T>() / r;
            for ((d, &a), &g) in dr.iter_mut().zip(xr).zip(gr) {
                *d = (g - a / r * ydy) / r;
            }
        } else {
            for (d, &g) in dr.iter_mut().zip(gr) {
                *d = g / eps;
            }
        }
    }
    Tensor::from_vec(x.shape(), dx)
}

fn row_normalize_cuda(x: &Tensor) -> Tensor {
    cuda::nn_kernels::l2norm_rows_fwd(x, NORMALIZE_EPS).0
}

/// Recomputes y and the norms from x (one pass per row, like the host) and runs the kernel's backward.
fn row_normalize_bwd_cuda(x: &Tensor, dy: &Tensor) -> Tensor {
    let (y, norms) = cuda::nn_kernels::l2norm_rows_fwd(x, NORMALIZE_EPS);
    cuda::nn_kernels::l2norm_rows_bwd(dy, &y, &norms, NORMALIZE_EPS)
}

/// x / max(‖x‖, ε) row by row, on the tape.
pub fn row_normalize(t: &mut Tape, x: &Var) -> Var {
    let y = row_normalize_fwd(x.value());
    let saved = x.value().clone();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(row_normalize_bwd(&saved, g))])
    })
}

// ---- row_norms ----

/// ‖x_b‖ for every row → [rows] (the δ schedule's mean norms; no gradient).
pub fn row_norms_fwd(x: &Tensor) -> Tensor {
    rows_cols(x);
    dispatch!(x, row_norms_host, cuda::loss_kernels::row_norms, x)
}

fn row_norms_host<T: Elem>(x: &Tensor) -> Tensor {
    let (b, n) = rows_cols(x);
    let norms: Vec<T> = if n == 0 {
        vec![T::zero(); b]
    } else {
        x.host::<T>().chunks_exact(n).map(row_norm).collect()
    };
    Tensor::from_vec(&[b], norms)
}
