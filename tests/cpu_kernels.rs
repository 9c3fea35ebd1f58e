//! The CPU convolutions' matrix kernels (src/cpu/kernels.rs): the fast one (the gemm crate, SIMD level
//! detected at run time) against the portable fallback (matrixmultiply) and against a plain f64 loop,
//! on the shapes and transposes the convolutions use, plus the setting that forces the fallback.
//! CI also runs the convolution and network tests with `PODGPU_CPU_KERNELS=portable` (.ci/run), so
//! both paths run under every CPU test of the convolutions.

use podgpu::cpu::kernels::{self, GemmKernel};
use podgpu::rng::Rng;

/// Row-major C = op(A)·op(B) + beta·C in f64, the obvious triple loop.
#[allow(clippy::too_many_arguments)]
fn naive(
    m: usize,
    k: usize,
    n: usize,
    a: &[f64],
    ta: bool,
    b: &[f64],
    tb: bool,
    beta: f64,
    c: &mut [f64],
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = s + beta * c[i * n + j];
        }
    }
}

fn randv(len: usize, rng: &mut Rng) -> Vec<f64> {
    (0..len).map(|_| rng.normal()).collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |s, v| s.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0.0f64, |e, (x, y)| e.max((x - y).abs()))
        / scale
}

/// Shapes of the convolutions' products: thin (16 output channels), odd sizes that leave partial
/// micro-tiles, a long reduction, and every transpose combination.
const SHAPES: [(usize, usize, usize); 7] = [
    (16, 144, 1024),
    (3, 5, 7),
    (17, 33, 65),
    (64, 576, 100),
    (130, 9, 31),
    (8, 1100, 24),
    (1, 1, 1),
];

#[test]
fn fast_and_portable_kernels_match_a_plain_loop_in_f64_and_f32() {
    let mut rng = Rng::new(11);
    for &(m, k, n) in &SHAPES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for beta in [0.0, 1.0, 0.5] {
                let a = randv(m * k, &mut rng);
                let b = randv(k * n, &mut rng);
                let c0 = randv(m * n, &mut rng);
                let mut want = c0.clone();
                naive(m, k, n, &a, ta, &b, tb, beta, &mut want);
                for kernel in [GemmKernel::Fast, GemmKernel::Portable] {
                    let mut c = if beta == 0.0 {
                        // beta = 0 must not read C: garbage (NaN) in it must not leak out.
                        vec![f64::NAN; m * n]
                    } else {
                        c0.clone()
                    };
                    kernels::gemm_on_thread(kernel, m, k, n, &a, ta, &b, tb, beta, &mut c);
                    let e = max_rel(&c, &want);
                    assert!(
                        e < 1e-12,
                        "{kernel:?} f64 m{m} k{k} n{n} ta{ta} tb{tb} beta{beta}: error {e:e}"
                    );

                    let (a32, b32): (Vec<f32>, Vec<f32>) = (
                        a.iter().map(|&v| v as f32).collect(),
                        b.iter().map(|&v| v as f32).collect(),
                    );
                    let mut c32: Vec<f32> = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        c0.iter().map(|&v| v as f32).collect()
                    };
                    kernels::gemm_on_thread(
                        kernel,
                        m,
                        k,
                        n,
                        &a32,
                        ta,
                        &b32,
                        tb,
                        beta as f32,
                        &mut c32,
                    );
                    let c32: Vec<f64> = c32.iter().map(|&v| v as f64).collect();
                    let e = max_rel(&c32, &want);
                    assert!(
                        e < 1e-5,
                        "{kernel:?} f32 m{m} k{k} n{n} ta{ta} tb{tb} beta{beta}: error {e:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn kernel_setting_parses_and_rejects_typos_with_a_clear_message() {
    assert_eq!(kernels::parse_kernels(None), Ok(GemmKernel::Fast));
    assert_eq!(kernels::parse_kernels(Some("fast")), Ok(GemmKernel::Fast));
    assert_eq!(
        kernels::parse_kernels(Some(" portable ")),
        Ok(GemmKernel::Portable)
    );
    let e = kernels::parse_kernels(Some("avx9000")).unwrap_err();
    assert!(
        e.contains("PODGPU_CPU_KERNELS") && e.contains("avx9000") && e.contains("portable"),
        "{e}"
    );
}

/// The process follows the variable CI sets: `PODGPU_CPU_KERNELS=portable` must reach the kernels
/// (otherwise CI's second run would test the fast path twice).
#[test]
fn active_kernels_follow_the_environment() {
    let want = kernels::parse_kernels(std::env::var(kernels::KERNELS_ENV).ok().as_deref()).unwrap();
    assert_eq!(kernels::active(), want);
    let line = kernels::describe();
    match want {
        GemmKernel::Fast => assert!(line.contains(kernels::simd_level()), "{line}"),
        GemmKernel::Portable => assert!(line.contains("portable"), "{line}"),
    }
}
