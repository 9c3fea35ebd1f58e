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
            n as isize,
            1,
        );
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // No products: C = beta·C, and with beta = 0 C is not read (it may be uninitialised).
        c[..m * n].iter_mut().for_each(|v| {
            *v = if beta == T::zero() {
                T::zero()
            } else {
                *v * beta
            }
        });
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
    assert!(
        last_index(m, n, n as isize, 1) < c.len(),
        "gemm: C out of bounds"
    );
    // The gemm crate computes dst = alpha·dst + beta·lhs·rhs and takes (column, row) strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
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
