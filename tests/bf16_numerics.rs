//! bf16 numerics proven on the CPU (issue 12 item 6): the rounding function itself, and each op
//! under the CPU's bf16 emulation (`podgpu::cpu::bf16`) against f64 within a bound derived from its
//! arithmetic, plus an exact check that the emulation rounds where the GPU path stores bf16.
//!
//! The bound used for a product-sum y = Σ_k a_k·b_k of K terms with bf16 inputs and f32
//! accumulation (what cuDNN/cuBLAS compute with bf16 inputs and f32 compute):
//! - each input is rounded once: â = a(1+α), b̂ = b(1+β), |α|, |β| ≤ u = 2⁻⁸ (bf16 unit roundoff);
//! - the product of two bf16 values (8-bit significands) is exact in f32 (24 bits), so
//!   |â·b̂ − a·b| ≤ (2u + u²)·|a·b|;
//! - summing K exact products in f32 (any order, FMA or not) adds at most γ_K·Σ|â_k b̂_k| with
//!   γ_K = K·ε/(1 − K·ε) and ε = 2⁻²⁴, and Σ|â b̂| ≤ (1 + 2u + u²)·Σ|a b|;
//! - an output stored in bf16 is rounded once more: + u·|ŷ| ≤ u·(|y| + e).
//!
//! So |ŷ − y| ≤ e = (2u + u² + γ_K(1 + 2u + u²))·Σ_k|a_k b_k|, plus u·(|y| + e) when stored in
//! bf16. Σ|a b| is the same op on |a| and |b| in f64. A bias added in f32 adds ε·|y|.

use podgpu::autograd::{ParamStore, Tape};
use podgpu::cpu::bf16 as emu;
use podgpu::ops::{self, BatchNormIds, Conv2dSpec};
use podgpu::rng::Rng;
use podgpu::tensor::bf16::{bf16_bits_to_f32, f32_to_bf16_bits, round_bf16, BF16_MAX};
use podgpu::tensor::{DType, Tensor};

const U: f64 = 1.0 / 256.0; // bf16 unit roundoff 2⁻⁸
const EPS32: f64 = 1.0 / 16_777_216.0; // f32 unit roundoff 2⁻²⁴

fn gamma(k: usize) -> f64 {
    let ke = k as f64 * EPS32;
    ke / (1.0 - ke)
}

/// e of the module comment for a K-term product-sum.
fn product_sum_bound(k: usize) -> f64 {
    2.0 * U + U * U + gamma(k) * (1.0 + 2.0 * U + U * U)
}

// ---- the rounding function ----

fn b(x: u32) -> f32 {
    f32::from_bits(x)
}

#[test]
fn rounding_ties_go_to_even() {
    let p = |e: i32| 2f32.powi(e);
    // bf16's ulp at 1 is 2⁻⁷, so 1 + 2⁻⁸ is half-way between 1 (even) and 1 + 2⁻⁷ (odd).
    assert_eq!(round_bf16(1.0 + p(-8)), 1.0);
    // 1 + 3·2⁻⁸ is half-way between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶ (even).
    assert_eq!(round_bf16(1.0 + 3.0 * p(-8)), 1.0 + p(-6));
    // Just above and below a tie go to the nearer neighbour.
    assert_eq!(round_bf16(1.0 + p(-8) + p(-20)), 1.0 + p(-7));
    assert_eq!(round_bf16(1.0 + p(-8) - p(-20)), 1.0);
    // Symmetric in the sign.
    assert_eq!(round_bf16(-(1.0 + p(-8))), -1.0);
    assert_eq!(round_bf16(-(1.0 + 3.0 * p(-8))), -(1.0 + p(-6)));
    // A carry out of the mantissa moves to the next binade: 2 − 2⁻⁹ rounds to 2.
    assert_eq!(round_bf16(2.0 - p(-9)), 2.0);
    // Exactly representable values are unchanged.
    for v in [
        0.0f32,
        -0.0,
        1.0,
        -3.5,
        0.15625,
        1e30_f32.max(round_bf16(1e30)),
    ] {
        let r = round_bf16(v);
        assert_eq!(round_bf16(r), r);
    }
    assert_eq!(round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
}

#[test]
fn rounding_subnormals_inf_and_nan() {
    // Subnormals: the exponent field is 0 in both formats and the mantissa rounds the same way.
    assert_eq!(f32_to_bf16_bits(b(0x0000_0001)), 0x0000); // far below half of the smallest bf16
    assert_eq!(f32_to_bf16_bits(b(0x0000_8000)), 0x0000); // tie → even (0)
    assert_eq!(f32_to_bf16_bits(b(0x0000_8001)), 0x0001); // just above the tie
    assert_eq!(f32_to_bf16_bits(b(0x0001_8000)), 0x0002); // tie between 1 (odd) and 2 (even)
    assert_eq!(f32_to_bf16_bits(b(0x8000_8000)), 0x8000); // negative tie → −0
    assert_eq!(f32_to_bf16_bits(b(0x007f_ffff)), 0x0080); // largest subnormal → smallest normal
    assert_eq!(bf16_bits_to_f32(0x0080), f32::MIN_POSITIVE);
    // Overflow: values from BF16_MAX + half an ulp up round to infinity (ties to even: 0x7f80).
    assert_eq!(round_bf16(BF16_MAX), BF16_MAX);
    assert_eq!(f32_to_bf16_bits(b(0x7f7f_7fff)), 0x7f7f);
    assert_eq!(round_bf16(b(0x7f7f_8000)), f32::INFINITY);
    assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
    assert_eq!(round_bf16(f32::MIN), f32::NEG_INFINITY);
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
    // NaN stays NaN, with its sign, also when its payload is only in the dropped low bits (a
    // plain truncation would turn 0x7f800001 into infinity).
    for (nan, negative) in [
        (f32::NAN, false),
        (b(0x7f80_0001), false),
        (b(0xff80_0001), true),
        (b(0x7fc0_0000), false),
        (b(0xffff_ffff), true),
    ] {
        let r = round_bf16(nan);
        assert!(r.is_nan(), "{:#x} → {:#x}", nan.to_bits(), r.to_bits());
        assert_eq!(r.is_sign_negative(), negative);
    }
}

/// An independent reference: the two bf16 neighbours of x by truncation, compared in f64.
fn nearest_bf16_reference(x: f32) -> u16 {
    let bits = x.to_bits();
    let down = (bits >> 16) as u16; // toward zero
    let up = down + 1; // away from zero (may be the infinity bit pattern: still ordered)
    let (dx, ux) = (bf16_bits_to_f32(down) as f64, bf16_bits_to_f32(up) as f64);
    let (dd, du) = ((x as f64 - dx).abs(), (x as f64 - ux).abs());
    // Above the largest finite bf16, `up` is infinity: IEEE rounds to it from the half-way point
    // (BF16_MAX + half an ulp) on, which the f64 distance to inf cannot show.
    if up & 0x7fff == 0x7f80 {
        let half = (x as f64).abs() - (BF16_MAX as f64);
        let half_ulp = 2f64.powi(127 - 8);
        return if half >= half_ulp { up } else { down };
    }
    if dd < du || (dd == du && down.is_multiple_of(2)) {
        down
    } else {
        up
    }
}

#[test]
fn rounding_is_nearest_even_for_random_values() {
    let mut rng = Rng::new(12);
    let mut checked = 0;
    for _ in 0..200_000 {
        let x = f32::from_bits(rng.next_u64() as u32);
        if x.is_nan() || x.is_infinite() {
            continue;
        }
        assert_eq!(
            f32_to_bf16_bits(x),
            nearest_bf16_reference(x),
            "x = {x:e} ({:#010x})",
            x.to_bits()
        );
        checked += 1;
    }
    assert!(checked > 190_000);
}

// ---- ops under the emulation ----

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal() as f32).collect())
}

fn f64s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64)
}

fn abs64(t: &Tensor) -> Tensor {
    let v: Vec<f64> = t.to_vec_f64().iter().map(|x| x.abs()).collect();
    Tensor::from_vec(t.shape(), v)
}

fn round_t(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t.to_vec_f32().into_iter().map(round_bf16).collect();
    Tensor::from_vec(t.shape(), v)
}

fn all_bf16(t: &Tensor) -> bool {
    t.to_vec_f32().iter().all(|x| x.to_bits() & 0xffff == 0)
}

/// Checks |got − want| ≤ bound·abs + (stored ? u·(|want| + bound·abs) : 0) elementwise.
fn within(name: &str, got: &Tensor, want: &Tensor, abs: &Tensor, bound: f64, stored: bool) {
    let (g, w, a) = (got.to_vec_f64(), want.to_vec_f64(), abs.to_vec_f64());
    assert_eq!(g.len(), w.len(), "{name}: sizes");
    let mut worst = 0.0f64;
    for i in 0..g.len() {
        let e = bound * a[i];
        let allowed = e + if stored { U * (w[i].abs() + e) } else { 0.0 };
        let err = (g[i] - w[i]).abs();
        assert!(
            err <= allowed * (1.0 + 1e-9) + 1e-300,
            "{name}[{i}]: bf16 result {} vs f64 {} differs by {err:e} > bound {allowed:e}",
            g[i],
            w[i]
        );
        if allowed > 0.0 {
            worst = worst.max(err / allowed);
        }
    }
    // The bound is a worst case; the emulation must use a real part of it (else the rounding is
    // not happening and the test would prove nothing).
    assert!(worst > 0.01, "{name}: error only {worst:.3} of the bound");
}

#[test]
fn conv2d_in_bf16_emulation_rounds_where_the_gpu_stores_bf16() {
    let mut rng = Rng::new(1);
    let (n, cin, hw, cout, k) = (2, 3, 9, 4, 3);
    let spec = Conv2dSpec::new(1, 1);
    let x = randn(&[n, cin, hw, hw], &mut rng);
    let w = randn(&[cout, cin, k, k], &mut rng);
    let g = randn(&[n, cout, hw, hw], &mut rng);

    let _on = emu::scope(true);
    let mut tape = Tape::train();
    let (xv, wv) = (tape.leaf(x.clone()), tape.leaf(w.clone()));
    let y = ops::conv2d(&mut tape, &xv, &wv, None, spec);
    tape.backward_with(&y, g.clone(), &mut ParamStore::new());
    let (y, dx, dw) = (
        y.value().clone(),
        tape.grad_of(&xv).unwrap().clone(),
        tape.grad_of(&wv).unwrap().clone(),
    );

    // Exactly the GPU's storage points: y and dx are bf16, dw is f32, and each equals the f32 op
    // on the bf16-rounded inputs.
    let (xr, wr, gr) = (round_t(&x), round_t(&w), round_t(&g));
    assert!(all_bf16(&y) && all_bf16(&dx));
    assert!(!all_bf16(&dw), "dw (a weight gradient) stays f32");
    let y_exact = round_t(&ops::conv2d_fwd(&xr, &wr, None, spec));
    assert_eq!(y.to_vec_f32(), y_exact.to_vec_f32());
    let dx_exact = round_t(&ops::conv2d_bwd_data(&gr, &wr, x.shape(), spec));
    assert_eq!(dx.to_vec_f32(), dx_exact.to_vec_f32());
    let dw_exact = ops::conv2d_bwd_weight(&xr, &gr, w.shape(), spec);
    assert_eq!(dw.to_vec_f32(), dw_exact.to_vec_f32());

    // Against f64 on the unrounded inputs, within the derived bound.
    let (x64, w64, g64) = (f64s(&x), f64s(&w), f64s(&g));
    let (xa, wa, ga) = (abs64(&x), abs64(&w), abs64(&g));
    within(
        "conv y",
        &y,
        &ops::conv2d_fwd(&x64, &w64, None, spec),
        &ops::conv2d_fwd(&xa, &wa, None, spec),
        product_sum_bound(cin * k * k),
        true,
    );
    within(
        "conv dx",
        &dx,
        &ops::conv2d_bwd_data(&g64, &w64, x.shape(), spec),
        &ops::conv2d_bwd_data(&ga, &wa, x.shape(), spec),
        product_sum_bound(cout * k * k),
        true,
    );
    within(
        "conv dw",
        &dw,
        &ops::conv2d_bwd_weight(&x64, &g64, w.shape(), spec),
        &ops::conv2d_bwd_weight(&xa, &ga, w.shape(), spec),
        product_sum_bound(n * hw * hw),
        false,
    );
}

#[test]
fn linear_in_bf16_emulation_has_bf16_inputs_and_an_f32_output() {
    let mut rng = Rng::new(2);
    let (rows, inp, out) = (8, 40, 6);
    let x = randn(&[rows, inp], &mut rng);
    let w = randn(&[out, inp], &mut rng);
    let g = randn(&[rows, out], &mut rng);

    let _on = emu::scope(true);
    let mut tape = Tape::train();
    let (xv, wv) = (tape.leaf(x.clone()), tape.leaf(w.clone()));
    let y = ops::linear(&mut tape, &xv, &wv, None);
    tape.backward_with(&y, g.clone(), &mut ParamStore::new());
    let (y, dx, dw) = (
        y.value().clone(),
        tape.grad_of(&xv).unwrap().clone(),
        tape.grad_of(&wv).unwrap().clone(),
    );
    // FC1's output stays f32 (not rounded); dx is an activation gradient (bf16); dw stays f32.
    assert!(!all_bf16(&y));
    assert!(all_bf16(&dx));
    assert!(!all_bf16(&dw));
    let (xr, wr, gr) = (round_t(&x), round_t(&w), round_t(&g));
    assert_eq!(
        y.to_vec_f32(),
        ops::matmul_fwd(&xr, false, &wr, true).to_vec_f32()
    );
    assert_eq!(
        dx.to_vec_f32(),
        round_t(&ops::matmul_fwd(&gr, false, &wr, false)).to_vec_f32()
    );
    assert_eq!(
        dw.to_vec_f32(),
        ops::matmul_fwd(&gr, true, &xr, false).to_vec_f32()
    );

    let (x64, w64, g64) = (f64s(&x), f64s(&w), f64s(&g));
    let (xa, wa, ga) = (abs64(&x), abs64(&w), abs64(&g));
    within(
        "linear y",
        &y,
        &ops::matmul_fwd(&x64, false, &w64, true),
        &ops::matmul_fwd(&xa, false, &wa, true),
        product_sum_bound(inp),
        false,
    );
    within(
        "linear dx",
        &dx,
        &ops::matmul_fwd(&g64, false, &w64, false),
        &ops::matmul_fwd(&ga, false, &wa, false),
        product_sum_bound(out),
        true,
    );
    within(
        "linear dw",
        &dw,
        &ops::matmul_fwd(&g64, true, &x64, false),
        &ops::matmul_fwd(&ga, true, &xa, false),
        product_sum_bound(rows),
        false,
    );
    // The loss's own products (ops::matmul) stay f32 under the emulation.
    let mut tape = Tape::train();
    let (xv, wv) = (tape.leaf(x.clone()), tape.leaf(w.clone()));
    let p = ops::matmul(&mut tape, &xv, false, &wv, true);
    assert_eq!(
        p.value().to_vec_f32(),
        ops::matmul_fwd(&x, false, &w, true).to_vec_f32()
    );
}

/// Batch norm under the emulation: statistics in f32, the output and dx stored in bf16. Its bound
/// is one bf16 rounding of the f32 result (|ŷ − y₃₂| ≤ u·|y₃₂|, checked exactly below) on top of
/// the f32 op's own error, which the fp32 tests bound; so |ŷ − y₆₄| ≤ u·|y₃₂| + |y₃₂ − y₆₄|.
#[test]
fn batch_norm_in_bf16_emulation_keeps_statistics_in_f32() {
    let mut rng = Rng::new(3);
    let (n, c, hw) = (4, 3, 5);
    let x = randn(&[n, c, hw, hw], &mut rng);
    let g = randn(&[n, c, hw, hw], &mut rng);
    let run = |emulate: bool, x: &Tensor, g: &Tensor| {
        let _mode = emu::scope(emulate);
        let mut store = ParamStore::new();
        let ids = BatchNormIds::register_as(&mut store, "bn", c, x.dtype());
        let mut tape = Tape::train();
        let xv = tape.leaf(x.clone());
        let y = ops::batch_norm2d(&mut tape, &mut store, &xv, &ids);
        tape.backward_with(&y, g.to_dtype(x.dtype()), &mut store);
        let dx = tape.grad_of(&xv).unwrap().clone();
        let rm = store.value(ids.running_mean).clone();
        (y.value().clone(), dx, rm)
    };
    // The GPU stores the incoming gradient in bf16 (the tape's bf16 sums), so the emulation's
    // backward starts from bf16(g): an f32 run fed bf16(g), rounded at the end, is the same.
    let (y, dx, rm) = run(true, &x, &g);
    let (y32, dx32, rm32) = run(false, &x, &round_t(&g));
    assert_eq!(y.to_vec_f32(), round_t(&y32).to_vec_f32());
    assert_eq!(dx.to_vec_f32(), round_t(&dx32).to_vec_f32());
    let (_, dx32_unrounded_g, _) = run(false, &x, &g);
    assert_ne!(
        round_t(&dx32_unrounded_g).to_vec_f32(),
        dx.to_vec_f32(),
        "the incoming gradient must be rounded (an f32 g gives other values)"
    );
    assert_eq!(rm.to_vec_f32(), rm32.to_vec_f32(), "statistics stay f32");
    assert!(!all_bf16(&rm));
    let (y64, _, _) = run(false, &f64s(&x), &g);
    let (y, y32, y64) = (y.to_vec_f64(), y32.to_vec_f64(), y64.to_vec_f64());
    for i in 0..y.len() {
        let allowed = U * y32[i].abs() + (y32[i] - y64[i]).abs();
        assert!(
            (y[i] - y64[i]).abs() <= allowed * (1.0 + 1e-9),
            "bn y[{i}]: {} vs f64 {}",
            y[i],
            y64[i]
        );
    }
}

/// The rounding points the GPU's bf16 step adds around the residual connection, on the CPU: the
/// block's output relu(bn(x) + r) is a bf16 value (the GPU adds in bf16), and so are the
/// gradients that reach x and the shortcut r, although the gradient arriving at the output is the
/// f32 sum of two uses (the GPU's tape adds two bf16 gradients in bf16). The ImageNet stem's max
/// pool rounds its incoming gradient and its overlapping sums too.
#[test]
fn residual_blocks_in_bf16_emulation_round_where_the_gpu_stores_bf16() {
    use podgpu::ops::Pool2dSpec;
    let mut rng = Rng::new(5);
    let (n, c, hw) = (2, 3, 6);
    let x = round_t(&randn(&[n, c, hw, hw], &mut rng));
    let r = round_t(&randn(&[n, c, hw, hw], &mut rng));
    let _mode = emu::scope(true);
    let mut store = ParamStore::new();
    let ids = BatchNormIds::register_as(&mut store, "bn", c, DType::F32);
    let mut tape = Tape::train();
    let (xv, rv) = (tape.leaf(x.clone()), tape.leaf(r.clone()));
    let y = ops::batch_norm2d_relu(&mut tape, &mut store, &xv, &ids, Some(&rv));
    assert!(all_bf16(y.value()), "the block's output is stored in bf16");
    // Two uses of the output (the next block's conv and shortcut): the tape sums their f32
    // gradients (seeded with values that are not bf16 values).
    let s1 = ops::scale(&mut tape, &y, 1.0);
    let s2 = ops::scale(&mut tape, &y, 1.0);
    let s = ops::add(&mut tape, &s1, &s2);
    let seed = randn(s.shape(), &mut rng);
    assert!(!all_bf16(&seed));
    tape.backward_with(&s, seed, &mut store);
    let (dx, dr) = (tape.grad_of(&xv).unwrap(), tape.grad_of(&rv).unwrap());
    assert!(all_bf16(dr), "the shortcut's gradient is stored in bf16");
    assert!(all_bf16(dx), "the block input's gradient is stored in bf16");

    // Max pooling with overlapping windows: its gradient is bf16 too.
    let mut tape = Tape::train();
    let xv = tape.leaf(x.clone());
    let p = ops::max_pool2d(&mut tape, &xv, Pool2dSpec::new(3, 2, 1));
    let gp = randn(p.shape(), &mut rng);
    tape.backward_with(&p, gp, &mut store);
    assert!(
        all_bf16(tape.grad_of(&xv).unwrap()),
        "max pool's dx is bf16"
    );
}

#[test]
fn the_emulation_is_per_thread_and_leaves_f64_alone() {
    let mut rng = Rng::new(4);
    let x = randn(&[2, 8], &mut rng);
    let w = randn(&[3, 8], &mut rng);
    let _on = emu::scope(true);
    // Another thread does not see this thread's mode.
    let other = std::thread::spawn(emu::emulating).join().unwrap();
    assert!(!other);
    // f64 (gradient checks) is never rounded.
    let (x64, w64) = (f64s(&x), f64s(&w));
    let mut tape = Tape::train();
    let (xv, wv) = (tape.leaf(x64.clone()), tape.leaf(w64.clone()));
    let y = ops::linear(&mut tape, &xv, &wv, None);
    assert_eq!(
        y.value().to_vec_f64(),
        ops::matmul_fwd(&x64, false, &w64, true).to_vec_f64()
    );
    drop(_on);
    assert!(!emu::emulating());
}
