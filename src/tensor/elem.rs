//! `Elem`: the element types a host tensor can hold (f32 for training, f64 for gradient checks).
//!
//! Every CPU kernel is generic over `Elem`, so the same code runs the model in f32 and checks its
//! gradients in f64.

use super::{DType, Storage};
use num_traits::Float;
use std::fmt::Debug;
use std::iter::Sum;

pub trait Elem:
    Float + Sum + Send + Sync + Debug + Default + std::ops::AddAssign + std::ops::SubAssign + 'static
{
    const DTYPE: DType;
    fn slice(s: &Storage) -> Option<&[Self]>;
    fn slice_mut(s: &mut Storage) -> Option<&mut [Self]>;
    fn wrap(v: Vec<Self>) -> Storage;
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;

    /// C = alpha·op(A)·op(B) + beta·C with explicit row/column strides (matrixmultiply).
    ///
    /// A is m×k with strides (rsa, csa), B is k×n with (rsb, csb), C is m×n with (rsc, csc).
    /// A transpose is just swapped strides.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        beta: Self,
        c: &mut [Self],
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_elem {
    ($t:ty, $variant:ident, $gemm:path) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(s: &Storage) -> Option<&[Self]> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut Storage) -> Option<&mut [Self]> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> Storage {
                Storage::$variant(v)
            }
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                rsa: isize,
                csa: isize,
                b: &[Self],
                rsb: isize,
                csb: isize,
                beta: Self,
                c: &mut [Self],
                rsc: isize,
                csc: isize,
            ) {
                if m == 0 || n == 0 {
                    return;
                }
                // Bounds: the furthest element each operand touches must be inside its slice, which
                // makes the unsafe call below sound.
                let last = |rows: usize, cols: usize, rs: isize, cs: isize| {
                    (rows.saturating_sub(1) as isize * rs + cols.saturating_sub(1) as isize * cs)
                        as usize
                };
                if k > 0 {
                    assert!(last(m, k, rsa, csa) < a.len(), "gemm: A out of bounds");
                    assert!(last(k, n, rsb, csb) < b.len(), "gemm: B out of bounds");
                }
                assert!(last(m, n, rsc, csc) < c.len(), "gemm: C out of bounds");
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        rsc,
                        csc,
                    );
                }
            }
        }
    };
}

impl_elem!(f32, F32, matrixmultiply::sgemm);
impl_elem!(f64, F64, matrixmultiply::dgemm);
