//! Which CPU matrix kernels the convolutions use, chosen once at run time from what this CPU has.
//!
//! - `Fast`: the `gemm` crate (the one candle uses). It detects the CPU at run time itself and runs
//!   its AVX-512 micro-kernels (built with its `x86-v4` feature), else AVX2+FMA, else NEON on ARM,
//!   else a scalar kernel. It is 1.2–1.6× matrixmultiply on the thin products of small convolutions
//!   (16–64 output channels), where matrixmultiply spends its time packing.
//! - `Portable`: matrixmultiply, the kernel podgpu has always used (`Elem::gemm`): the fallback, and
//!   the reference the fast path is tested against (tests/cpu_kernels.rs; CI runs the convolution
//!   and network tests a second time with the fallback forced).
//!
//! `PODGPU_CPU_KERNELS=portable` forces the fallback for the whole process (read once, at the first
//! convolution); `fast` or unset picks the fast kernels. Anything else is a clear error.

use crate::tensor::Elem;
use std::sync::OnceLock;

/// The environment variable that forces the portable kernels.
pub const KERNELS_ENV: &str = "PODGPU_CPU_KERNELS";

/// A matrix-product implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// The `gemm` crate, SIMD level picked at run time.
    Fast,
    /// matrixmultiply (`Elem::gemm`).
    Portable,
}

/// The SIMD level this CPU offers, as detected at run time (what the fast kernels run on).
pub fn simd_level() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
        "x86 scalar/sse"
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return "neon";
        }
        "aarch64 scalar"
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// Parses the value of `PODGPU_CPU_KERNELS` (unset = fast).
pub fn parse_kernels(value: Option<&str>) -> Result<GemmKernel, String> {
    match value.map(str::trim) {
        None | Some("") | Some("fast") | Some("auto") => Ok(GemmKernel::Fast),
        Some("portable") => Ok(GemmKernel::Portable),
        Some(other) => Err(format!(
            "{KERNELS_ENV}={other:?} is not a kernel choice: use 'portable' (matrixmultiply, the \
             fallback) or 'fast' (the default: run-time detected AVX-512 / AVX2+FMA / NEON)"
        )),
    }
}

/// The kernels of this process: `PODGPU_CPU_KERNELS`, read once.
pub fn active() -> GemmKernel {
    static ACTIVE: OnceLock<GemmKernel> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let v = std::env::var(KERNELS_ENV).ok();
        match parse_kernels(v.as_deref()) {
            Ok(k) => k,
            Err(e) => {
                // A typo must not silently change the kernels; the setting is read deep inside a
                // kernel where no error can be returned, so say what is wrong and stop.
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    })
}

/// The kernels for the next product: `active()`, except in deterministic mode
/// (`cpu::set_deterministic`), which promises bit-identical results on any thread count. The gemm
/// crate picks its cache blocking (how a dot product is split into partial sums) from the matrix
/// sizes, and the number of images per GEMM depends on the thread count; matrixmultiply blocks by
/// fixed sizes, so each output is the same sum in the same order however the columns are split.
pub fn current() -> GemmKernel {
    if super::deterministic() {
        GemmKernel::Portable
    } else {
        active()
    }
}

/// One line for logs and benchmark headers, e.g. "fast (gemm crate, avx512f)".
pub fn describe() -> String {
    match active() {
        GemmKernel::Fast => format!("fast (gemm crate, {})", simd_level()),
        GemmKernel::Portable => format!("portable (matrixmultiply; {KERNELS_ENV}=portable)"),
    }
}

/// Furthest element index a strided m×n matrix touches.
fn last_index(rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    (rows.saturating_sub(1) as isize * rs + cols.saturating_sub(1) as isize * cs) as usize
}

/// Row-major C[m×n] = op(A)·op(B) + beta·C on the calling thread, with the given kernel. A is stored
/// m×k (k×m when `ta`), B k×n (n×k when `tb`). With `beta == 0` C is not read.
#[allow(clippy::too_many_arguments)]
pub fn gemm_on_thread<T: Elem>(
    kernel: GemmKernel,
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    beta: T,
    c: &mut [T],
) {
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    gemm_strided(
        kernel,
        m,
        k,
        n,
        (a, rsa, csa),
        (b, rsb, csb),
        beta,
        (c, n as isize, 1),
    );
}

/// C = A·B + beta·C on the calling thread with explicit (row, column) strides, each operand given as
/// (slice, row stride, column stride): A is m×k, B k×n, C m×n. Strides are non-negative; the slices
/// must hold the furthest element each operand touches (checked). With `beta == 0` C is not read.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided<T: Elem>(
    kernel: GemmKernel,
    m: usize,
    k: usize,
    n: usize,
    (a, rsa, csa): (&[T], isize, isize),
    (b, rsb, csb): (&[T], isize, isize),
    beta: T,
    (c, rsc, csc): (&mut [T], isize, isize),
) {
    if kernel == GemmKernel::Portable {
        T::gemm(
            m,
            k,
            n,
            T::one(),
            a,
            rsa,
            csa,
            b,
            rsb,
            csb,
            beta,
            c,
            rsc,
            csc,
        );
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        last_index(m, n, rsc, csc) < c.len(),
        "gemm: C out of bounds"
    );
    if k == 0 {
        // No products: C = beta·C, and with beta = 0 C is not read (it may be uninitialised).
        for i in 0..m {
            for j in 0..n {
                let v = &mut c[(i as isize * rsc + j as isize * csc) as usize];
                *v = if beta == T::zero() {
                    T::zero()
                } else {
                    *v * beta
                };
            }
        }
        return;
    }
    // Bounds of every operand, which makes the unsafe call below sound.
    assert!(
        last_index(m, k, rsa, csa) < a.len(),
        "gemm: A out of bounds"
    );
    assert!(
        last_index(k, n, rsb, csb) < b.len(),
        "gemm: B out of bounds"
    );
    // The gemm crate computes dst = alpha·dst + beta·lhs·rhs and takes (column, row) strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            csc,
            rsc,
            beta != T::zero(),
            a.as_ptr(),
            csa,
            rsa,
            b.as_ptr(),
            csb,
            rsb,
            beta,
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// AVX-512F for `gemm_nt_add` (16 lanes, 4×4 rows at a time); `PODGPU_NT=avx2` forces the AVX2 one.
#[cfg(target_arch = "x86_64")]
fn nt_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::env::var("PODGPU_NT").map_or(true, |v| v != "avx2")
    })
}

/// Whether `gemm_nt_add` runs here: f32 with AVX2 and FMA, detected at run time.
pub fn has_nt_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// C[m×n] += A[m×k] · B[n×k]ᵀ for f32 (rows of A, B and C `lda`, `ldb`, `ldc` apart), where the
/// reduction runs along the rows of both operands: the convolutions' weight gradient dW += dy · colsᵀ,
/// whose two operands are long contiguous rows. A general GEMM has to transpose one of them while
/// packing (a gather with a stride of the row length); this kernel instead takes dot products of
/// rows, 4 rows of A by 3 rows of B at a time (12 AVX2 accumulators), with no packing. Each C[i, j]
/// is the same sum for given sizes: eight lanes over k in steps of 8, added in a fixed order, then
/// the last k mod 8 products. Returns false (and does nothing) where `has_nt_f32` is false.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_add(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    if !has_nt_f32() {
        return false;
    }
    if m == 0 || n == 0 || k == 0 {
        return true;
    }
    assert!(
        lda >= k && ldb >= k && ldc >= n,
        "gemm_nt_add: leading dimensions"
    );
    assert!((m - 1) * lda + k <= a.len(), "gemm_nt_add: A out of bounds");
    assert!((n - 1) * ldb + k <= b.len(), "gemm_nt_add: B out of bounds");
    assert!((m - 1) * ldc + n <= c.len(), "gemm_nt_add: C out of bounds");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F, or AVX2 and FMA, are present (has_nt_f32, nt_avx512); every row read or
    // written lies inside its slice (the asserts above).
    unsafe {
        if nt_avx512() {
            nt_avx512::gemm(m, n, k, a, lda, b, ldb, c, ldc);
        } else {
            nt_avx2::gemm(m, n, k, a, lda, b, ldb, c, ldc);
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod nt_avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        // B's rows (the long operand: the column matrix) once each, A's (dy, few rows) again for
        // each block of B's rows, from the cache.
        let mut j = 0;
        while j < n {
            let nr = (n - j).min(3);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                let (ap, bp) = (a.as_ptr().add(i * lda), b.as_ptr().add(j * ldb));
                let cp = c.as_mut_ptr().add(i * ldc + j);
                match (mr, nr) {
                    (4, 3) => block::<4, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (4, 2) => block::<4, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    (4, 1) => block::<4, 1>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 3) => block::<3, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 2) => block::<3, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 1) => block::<3, 1>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 3) => block::<2, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 2) => block::<2, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 1) => block::<2, 1>(k, ap, lda, bp, ldb, cp, ldc),
                    (1, 3) => block::<1, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (1, 2) => block::<1, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    _ => block::<1, 1>(k, ap, lda, bp, ldb, cp, ldc),
                }
                i += mr;
            }
            j += nr;
        }
    }

    /// C[MR×NR] += A[MR rows] · B[NR rows]ᵀ over k.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const MR: usize, const NR: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let k8 = k / 8 * 8;
        let mut p = 0;
        while p < k8 {
            let mut vb = [_mm256_setzero_ps(); NR];
            for (jj, v) in vb.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(b.add(jj * ldb + p));
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let va = _mm256_loadu_ps(a.add(ii * lda + p));
                for (acc, &vb) in row.iter_mut().zip(&vb) {
                    *acc = _mm256_fmadd_ps(va, vb, *acc);
                }
            }
            p += 8;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, &v) in row.iter().enumerate() {
                let mut s = hsum(v);
                for q in k8..k {
                    s += *a.add(ii * lda + q) * *b.add(jj * ldb + q);
                }
                *c.add(ii * ldc + jj) += s;
            }
        }
    }

    /// The eight lanes added in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(target_arch = "x86_64")]
mod nt_avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        // B's rows (the long operand: the column matrix) once each, A's (dy, few rows) again for
        // each block of B's rows, from the cache.
        let mut j = 0;
        while j < n {
            let nr = (n - j).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                let (ap, bp) = (a.as_ptr().add(i * lda), b.as_ptr().add(j * ldb));
                let cp = c.as_mut_ptr().add(i * ldc + j);
                match (mr, nr) {
                    (4, 4) => block::<4, 4>(k, ap, lda, bp, ldb, cp, ldc),
                    (4, 3) => block::<4, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (4, 2) => block::<4, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    (4, 1) => block::<4, 1>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 4) => block::<3, 4>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 3) => block::<3, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 2) => block::<3, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    (3, 1) => block::<3, 1>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 4) => block::<2, 4>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 3) => block::<2, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 2) => block::<2, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    (2, 1) => block::<2, 1>(k, ap, lda, bp, ldb, cp, ldc),
                    (1, 4) => block::<1, 4>(k, ap, lda, bp, ldb, cp, ldc),
                    (1, 3) => block::<1, 3>(k, ap, lda, bp, ldb, cp, ldc),
                    (1, 2) => block::<1, 2>(k, ap, lda, bp, ldb, cp, ldc),
                    _ => block::<1, 1>(k, ap, lda, bp, ldb, cp, ldc),
                }
                i += mr;
            }
            j += nr;
        }
    }

    /// C[MR×NR] += A[MR rows] · B[NR rows]ᵀ over k.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const MR: usize, const NR: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let k8 = k / 16 * 16;
        let mut p = 0;
        while p < k8 {
            let mut vb = [_mm512_setzero_ps(); NR];
            for (jj, v) in vb.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(b.add(jj * ldb + p));
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let va = _mm512_loadu_ps(a.add(ii * lda + p));
                for (acc, &vb) in row.iter_mut().zip(&vb) {
                    *acc = _mm512_fmadd_ps(va, vb, *acc);
                }
            }
            p += 16;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, &v) in row.iter().enumerate() {
                let mut s = hsum(v);
                for q in k8..k {
                    s += *a.add(ii * lda + q) * *b.add(jj * ldb + q);
                }
                *c.add(ii * ldc + jj) += s;
            }
        }
    }

    /// The sixteen lanes added in a fixed order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn hsum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}
