//! Matrix products: the linear layer (FC1, softmax heads) and the PEDCC projection `x Pᵀ`.

use super::{assert_same_place, round_bf16};
use crate::autograd::{Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{DType, Elem, Tensor};

/// op(A)·op(B) for 2-D tensors; `ta`/`tb` transpose the stored matrix.
pub fn matmul_fwd(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Tensor {
    assert!(a.rank() == 2 && b.rank() == 2, "matmul of {a:?} and {b:?}");
    assert_same_place("matmul", &[a, b]);
    let (m, k) = if ta {
        (a.dim(1), a.dim(0))
    } else {
        (a.dim(0), a.dim(1))
    };
    let (k2, n) = if tb {
        (b.dim(1), b.dim(0))
    } else {
        (b.dim(0), b.dim(1))
    };
    assert_eq!(
        k, k2,
        "matmul: inner dimensions differ ({a:?}, ta={ta}; {b:?}, tb={tb})"
    );
    dispatch!(a, matmul_host, cuda::kernels::matmul, a, ta, b, tb, m, k, n)
}

#[allow(clippy::too_many_arguments)]
fn matmul_host<T: Elem>(
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Tensor {
    let mut c = vec![T::zero(); m * n];
    cpu::gemm(
        m,
        k,
        n,
        T::one(),
        a.host(),
        ta,
        b.host(),
        tb,
        T::zero(),
        &mut c,
    );
    Tensor::from_vec(&[m, n], c)
}

/// y[b, j] += bias[j] for a [rows, cols] tensor.
pub fn bias_add_fwd(y: &Tensor, bias: &Tensor) -> Tensor {
    assert_eq!(y.rank(), 2);
    assert_eq!(
        bias.shape(),
        &[y.dim(1)],
        "bias shape {:?} for output {:?}",
        bias.shape(),
        y.shape()
    );
    assert_same_place("bias_add", &[y, bias]);
    dispatch!(y, bias_add_host, cuda::kernels::bias_add, y, bias)
}

fn bias_add_host<T: Elem>(y: &Tensor, bias: &Tensor) -> Tensor {
    let b = bias.host::<T>();
    let mut out = y.host::<T>().to_vec();
    for row in out.chunks_mut(b.len()) {
        for (o, &bv) in row.iter_mut().zip(b) {
            *o += bv;
        }
    }
    Tensor::from_vec(y.shape(), out)
}

/// Column sums of a [rows, cols] tensor → [cols] (the bias gradient).
pub fn sum_rows_fwd(x: &Tensor) -> Tensor {
    assert_eq!(x.rank(), 2);
    dispatch!(x, sum_rows_host, cuda::kernels::sum_rows, x)
}

fn sum_rows_host<T: Elem>(x: &Tensor) -> Tensor {
    let cols = x.dim(1);
    let mut out = vec![T::zero(); cols];
    for row in x.host::<T>().chunks(cols) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    Tensor::from_vec(&[cols], out)
}

/// The body of the tape-level product, stamped into `matmul` and `bf16_matmul` so that each
/// records under its own name (the anomaly detection names an op by the function recording it).
/// With `$bf16` (the bf16 path, `ops::round_bf16`) A, B and, in the backward, G are rounded to
/// bf16 values (kept in f32 words on both devices); dA (an activation gradient) is rounded too,
/// dB (a weight gradient) and the product stay f32.
macro_rules! matmul_on_tape {
    ($t:expr, $a:expr, $ta:expr, $b:expr, $tb:expr, $bf16:expr) => {{
        let (ta, tb, bf16) = ($ta, $tb, $bf16);
        let (sa, sb) = (
            round_bf16(bf16, $a.value()),
            round_bf16(bf16, $b.value()),
        );
        let y = matmul_fwd(&sa, ta, &sb, tb);
        $t.op(y, &[$a, $b], move || {
            Box::new(move |g, needs| {
                let g = &round_bf16(bf16, g);
                // C = op(A) op(B):  d op(A) = G op(B)ᵀ,  d op(B) = op(A)ᵀ G; transposing back where stored so.
                let da = needs[0].then(|| {
                    let da = if ta {
                        matmul_fwd(&sb, tb, g, true)
                    } else {
                        matmul_fwd(g, false, &sb, !tb)
                    };
                    round_bf16(bf16, &da)
                });
                let db = needs[1].then(|| {
                    if tb {
                        matmul_fwd(g, true, &sa, ta)
                    } else {
                        matmul_fwd(&sa, !ta, g, false)
                    }
                });
                vec![da, db]
            })
        })
    }};
}

/// op(A)·op(B) on the tape, in f32 whatever the bf16 emulation (the loss's products use it).
pub fn matmul(t: &mut Tape, a: &Var, ta: bool, b: &Var, tb: bool) -> Var {
    matmul_on_tape!(t, a, ta, b, tb, false)
}

/// op(A)·op(B) with bf16 GEMM inputs (a linear layer on the bf16 path).
fn bf16_matmul(t: &mut Tape, a: &Var, ta: bool, b: &Var, tb: bool) -> Var {
    matmul_on_tape!(t, a, ta, b, tb, true)
}

/// y = x Wᵀ + b with x [B, in], W [out, in] (PyTorch's layout), b [out]. On the bf16 path (GPU
/// or emulation) x and W are bf16 GEMM inputs; y stays f32.
pub fn linear(t: &mut Tape, x: &Var, w: &Var, b: Option<&Var>) -> Var {
    if let Some(b) = b {
        if x.value().is_cuda() && x.value().dtype() == DType::F32 {
            return linear_bias_gpu(t, x, w, b, cpu::bf16::emulating());
        }
    }
    let xw = if cpu::bf16::emulating() {
        bf16_matmul(t, x, false, w, true)
    } else {
        matmul(t, x, false, w, true)
    };
    match b {
        Some(b) => bias_add(t, &xw, b),
        None => xw,
    }
}

/// `linear` with a bias on a GPU: the forward is one cuBLASLt call with the bias in its epilogue
/// (`cuda::blaslt::linear_bias`) instead of a GEMM and a bias kernel; the backward is the same
/// products as `matmul`'s (in f32 the weight's with the bias gradient in its epilogue,
/// `linear_weight_and_bias_grad`) and the bias gradient from the unrounded gradient, as `bias_add`'s, so
/// the numbers are those of the unfused ops up to the GEMM's summation order. On the bf16 path x, w,
/// the gradient and dx are rounded to bf16 values (`round_bf16`) exactly where `bf16_matmul`
/// rounds them.
fn linear_bias_gpu(t: &mut Tape, x: &Var, w: &Var, b: &Var, bf16: bool) -> Var {
    assert_same_place("linear", &[x.value(), w.value(), b.value()]);
    let (sx, sw) = (round_bf16(bf16, x.value()), round_bf16(bf16, w.value()));
    let y = cuda::blaslt::linear_bias(&sx, &sw, b.value());
    t.op(y, &[x, w, b], move || {
        Box::new(move |g, needs| {
            // In f32 both gradients of the parameters come from one cuBLASLt call (the bias's in
            // the epilogue), when it has an algorithm for the shape; the bf16 path takes the bias
            // gradient from the unrounded g, so it stays two calls.
            let (mut dw, mut db) = (None, None);
            if needs[1] && needs[2] && !bf16 {
                if let Some((w_grad, b_grad)) = cuda::blaslt::linear_weight_and_bias_grad(g, &sx) {
                    (dw, db) = (Some(w_grad), Some(b_grad));
                }
            }
            if db.is_none() {
                db = needs[2].then(|| sum_rows_fwd(g));
            }
            let g = &round_bf16(bf16, g);
            // y = x wᵀ:  dx = g w,  dw = gᵀ x.
            let dx = needs[0].then(|| round_bf16(bf16, &matmul_fwd(g, false, &sw, false)));
            if dw.is_none() {
                dw = needs[1].then(|| matmul_fwd(g, true, &sx, false));
            }
            vec![dx, dw, db]
        })
    })
}

/// Adds a bias row to every row of y.
pub fn bias_add(t: &mut Tape, y: &Var, b: &Var) -> Var {
    let out = bias_add_fwd(y.value(), b.value());
    t.op(out, &[y, b], || {
        Box::new(|g, needs| vec![Some(g.clone()), needs[1].then(|| sum_rows_fwd(g))])
    })
}
