//! bf16 storage on the GPU (`podgpu::cuda::bf16`) against the CPU's rounding (`tensor::bf16`),
//! bit for bit: the GPU's bf16 path and the CPU's bf16 emulation must store the same values.

use super::{dev, gpu, GPU_LOCK};
use podgpu::cuda::bf16 as gb;
use podgpu::rng::Rng;
use podgpu::tensor::bf16::{f32_to_bf16_bits, round_bf16};
use podgpu::DType;

/// Random bit patterns plus the special cases: ties, subnormals, overflow, infinities, NaNs.
fn awkward_values(n: usize) -> Vec<f32> {
    let mut rng = Rng::new(5);
    let mut v: Vec<f32> = [
        0x3f80_8000u32, // 1 + 2⁻⁸: tie → 1
        0x3f81_8000,    // tie → up (even)
        0x0000_8000,    // subnormal tie → 0
        0x0001_8000,    // subnormal tie → 2
        0x007f_ffff,    // largest subnormal → smallest normal
        0x7f7f_8000,    // above the largest bf16 by half an ulp → inf
        0x7f80_0000,    // inf
        0xff80_0000,    // −inf
        0x7f80_0001,    // NaN with a low payload only
        0xffc0_0000,    // negative quiet NaN
        0x8000_0000,    // −0
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    while v.len() < n {
        v.push(f32::from_bits(rng.next_u64() as u32));
    }
    v
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_conversions_match_the_cpu_bit_for_bit() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    // An odd count: the last bf16 value sits alone in its 32-bit word.
    let v = awkward_values(100_001);
    let x = dev(&[v.len()], &v);
    let b = gb::to_bf16(&x);
    assert_eq!(b.dtype(), DType::Bf16);
    assert_eq!(b.shape(), x.shape());
    let want: Vec<u16> = v.iter().map(|&f| f32_to_bf16_bits(f)).collect();
    assert_eq!(gb::bf16_buf(&b).to_host_bits(), want, "pack_bf16_f32");
    // Back to f32: exact, NaN stays NaN.
    let back = gb::to_f32(&b).to_vec_f32();
    let rounded = gb::round_to_bf16(&x).to_vec_f32();
    for (i, &f) in v.iter().enumerate() {
        let r = round_bf16(f);
        if r.is_nan() {
            assert!(
                back[i].is_nan() && rounded[i].is_nan(),
                "value {i}: NaN lost"
            );
        } else {
            assert_eq!(back[i].to_bits(), r.to_bits(), "unpack_bf16_f32 at {i}");
            assert_eq!(rounded[i].to_bits(), r.to_bits(), "round_bf16_f32 at {i}");
        }
    }
    // The rounding made a copy: x itself is unchanged.
    assert_eq!(x.to_vec_f32()[0].to_bits(), v[0].to_bits());
    // A bf16 GPU tensor reads back through the tensor API as its f32 values.
    assert_eq!(b.to_vec_f32()[1], round_bf16(v[1]));
}

/// cuBLAS GemmEx with bf16 inputs and f32 compute against the CPU emulation's product (the f32
/// GEMM of the bf16-rounded inputs). Only the order of the f32 sums differs, so the results agree
/// to f32 accumulation error: γ_K·Σ|a·b| ≤ K·2⁻²⁴ relative, far below 1e-5 for K ≤ 300.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_gemm_matches_the_cpu_emulation() {
    use podgpu::ops;
    use podgpu::Tensor;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(6);
    for (m, k, n, ta, tb) in [
        (32, 64, 16, false, true),
        (7, 300, 5, false, false),
        (9, 33, 17, true, false),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let (sa, sb) = (
            if ta { [k, m] } else { [m, k] },
            if tb { [n, k] } else { [k, n] },
        );
        let got = gb::matmul_bf16_inputs(&dev(&sa, &a), ta, &dev(&sb, &b), tb);
        let round = |v: &[f32], s: &[usize]| {
            Tensor::from_vec(s, v.iter().map(|&x| round_bf16(x)).collect::<Vec<f32>>())
        };
        let want = ops::matmul_fwd(&round(&a, &sa), ta, &round(&b, &sb), tb);
        super::close(
            &format!("gemm_bf16 m={m} k={k} n={n} ta={ta} tb={tb}"),
            &got,
            &want.to_vec_f64(),
            1e-5,
        );
    }
}

/// cuDNN's bf16 convolution (bf16 x, w, y; f32 compute) against the CPU emulation's
/// y = bf16(conv_f32(bf16(x), bf16(w))). The f32 sums differ only in order, so a y value can land on
/// the other side of a bf16 rounding boundary: at most one bf16 ulp (relative 2⁻⁷) apart per
/// element, and rarely; the relative error over the tensor stays below 2⁻⁸.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_conv_matches_the_cpu_emulation() {
    use podgpu::cpu::bf16 as emu;
    use podgpu::ops::{self, Conv2dSpec};
    use podgpu::Tensor;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(7);
    for (x_shape, w_shape, stride, pad) in [
        ([2, 16, 8, 8], [32, 16, 3, 3], 1, 1),
        ([2, 32, 8, 8], [64, 32, 1, 1], 2, 0),
    ] {
        let xv: Vec<f32> = (0..x_shape.iter().product())
            .map(|_| rng.normal() as f32)
            .collect();
        let wv: Vec<f32> = (0..w_shape.iter().product())
            .map(|_| rng.normal() as f32)
            .collect();
        let geom = podgpu::cuda::dnn::ConvGeom {
            stride: [stride, stride],
            pad: [pad, pad],
            dilation: [1, 1],
            groups: 1,
        };
        let got = gb::conv2d_bf16_inputs(&dev(&x_shape, &xv), &dev(&w_shape, &wv), &geom);
        let want = {
            let _on = emu::scope(true);
            let mut tape = podgpu::Tape::train();
            let xh = tape.leaf(Tensor::from_vec(&x_shape, xv.clone()));
            let wh = tape.leaf(Tensor::from_vec(&w_shape, wv.clone()));
            ops::conv2d(&mut tape, &xh, &wh, None, Conv2dSpec::new(stride, pad))
                .value()
                .clone()
        };
        super::close(
            &format!("conv bf16 x {x_shape:?} w {w_shape:?}"),
            &got,
            &want.to_vec_f64(),
            1.0 / 256.0,
        );
    }
}

/// cuDNN's bf16 convolution backward passes against the CPU emulation's rounding points
/// (`ops::conv2d` under `cpu::bf16`): dx = bf16(conv_bwd_data(bf16(dy), bf16(w))), one bf16 rounding
/// as in the forward test (relative error ≤ 2⁻⁸); dw = conv_bwd_weight(bf16(x), bf16(dy)) kept f32,
/// where only the order of exact products' f32 sums differs, so dw agrees to f32 accumulation error
/// (γ_K·Σ|a·b| with K = N·OH·OW ≤ 128 here: far below 1e-5). A dw rounded to bf16 anywhere (the
/// rounding the f32 master weights' gradient must not have) would miss 1e-5 by two orders.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_conv_backward_matches_the_cpu_emulation() {
    use podgpu::ops::{self, Conv2dSpec};
    use podgpu::Tensor;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(8);
    let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let rounded = |v: &[f32], s: &[usize]| {
        Tensor::from_vec(s, v.iter().map(|&x| round_bf16(x)).collect::<Vec<f32>>())
    };
    for (x_shape, w_shape, stride, pad) in [
        ([2usize, 16, 8, 8], [32usize, 16, 3, 3], 1, 1),
        ([2, 32, 8, 8], [64, 32, 1, 1], 2, 0),
    ] {
        let spec = Conv2dSpec::new(stride, pad);
        let (oh, ow) = (
            (x_shape[2] + 2 * pad - w_shape[2]) / stride + 1,
            (x_shape[3] + 2 * pad - w_shape[3]) / stride + 1,
        );
        let y_shape = [x_shape[0], w_shape[0], oh, ow];
        let xv = normal(x_shape.iter().product());
        let wv = normal(w_shape.iter().product());
        let dyv = normal(y_shape.iter().product());
        let geom = podgpu::cuda::dnn::ConvGeom {
            stride: [stride, stride],
            pad: [pad, pad],
            dilation: [1, 1],
            groups: 1,
        };
        let (xr, wr, dyr) = (
            rounded(&xv, &x_shape),
            rounded(&wv, &w_shape),
            rounded(&dyv, &y_shape),
        );
        let dx_want: Vec<f64> = ops::conv2d_bwd_data(&dyr, &wr, &x_shape, spec)
            .to_vec_f32()
            .iter()
            .map(|&v| round_bf16(v) as f64)
            .collect();
        let dw_want = ops::conv2d_bwd_weight(&xr, &dyr, &w_shape, spec).to_vec_f64();
        let dx = gb::conv2d_bwd_data_bf16_inputs(
            &dev(&y_shape, &dyv),
            &dev(&w_shape, &wv),
            &x_shape,
            &geom,
        );
        assert_eq!(dx.dtype(), DType::F32);
        super::close(
            &format!("conv bf16 dx x {x_shape:?} w {w_shape:?}"),
            &dx,
            &dx_want,
            1.0 / 256.0,
        );
        // dx is stored in bf16: every value is a bf16 value.
        for v in dx.to_vec_f32() {
            assert_eq!(
                v.to_bits(),
                round_bf16(v).to_bits(),
                "dx holds {v}, not a bf16"
            );
        }
        let dw = gb::conv2d_bwd_filter_bf16_inputs(
            &dev(&x_shape, &xv),
            &dev(&y_shape, &dyv),
            &w_shape,
            &geom,
        );
        assert_eq!(dw.dtype(), DType::F32, "the weight gradient stays f32");
        super::close(
            &format!("conv bf16 dw x {x_shape:?} w {w_shape:?}"),
            &dw,
            &dw_want,
            1e-5,
        );
    }
}

/// cuDNN's batch norm with bf16 x, y, dy, dx and f32 gamma, beta and statistics against the CPU
/// emulation (`ops::batch_norm2d` under `cpu::bf16`: the f32 batch norm of the bf16 values, y and
/// dx rounded to bf16, statistics and dgamma/dbeta kept f32). The f32 quantities differ only in
/// summation order (the f32 parity test's tolerances: 1e-5); y and dx may land one bf16 ulp apart
/// (relative error ≤ 2⁻⁸ over the tensor).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_batch_norm_matches_the_cpu_emulation() {
    use podgpu::cuda::dnn;
    use podgpu::ops;
    use podgpu::Tensor;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(9);
    let shape = [4usize, 8, 6, 5];
    let c = shape[1];
    let n: usize = shape.iter().product();
    let mut normal = |n: usize, scale: f32, shift: f32| -> Vec<f32> {
        (0..n)
            .map(|_| rng.normal() as f32 * scale + shift)
            .collect()
    };
    // Inputs as the bf16 path holds them: x and dy bf16 values, parameters f32.
    let xv: Vec<f32> = normal(n, 2.0, 0.7).into_iter().map(round_bf16).collect();
    let dyv: Vec<f32> = normal(n, 1.0, 0.0).into_iter().map(round_bf16).collect();
    let (gv, bv, rmv) = (
        normal(c, 1.0, 0.0),
        normal(c, 1.0, 0.0),
        normal(c, 0.5, 0.0),
    );
    let rvv: Vec<f32> = normal(c, 1.0, 0.0).iter().map(|v| v.abs() + 0.5).collect();
    let (momentum, eps) = (0.1, 1e-5);
    let h = |s: &[usize], v: &[f32]| Tensor::from_vec(s, v.to_vec());
    let round_all = |t: &Tensor| -> Vec<f64> {
        t.to_vec_f32()
            .iter()
            .map(|&v| round_bf16(v) as f64)
            .collect()
    };
    let want = ops::batch_norm2d_train_fwd(
        &h(&shape, &xv),
        &h(&[c], &gv),
        &h(&[c], &bv),
        &h(&[c], &rmv),
        &h(&[c], &rvv),
        momentum,
        eps,
    );
    let want_d = ops::batch_norm2d_train_bwd(
        &h(&shape, &xv),
        &h(&shape, &dyv),
        &h(&[c], &gv),
        &want.mean,
        &want.invstd,
    );
    let (xb, dyb) = (
        gb::to_bf16(&dev(&shape, &xv)),
        gb::to_bf16(&dev(&shape, &dyv)),
    );
    let (gd, bd) = (dev(&[c], &gv), dev(&[c], &bv));
    let got = dnn::batch_norm_fwd_train_bf16(
        &xb,
        &gd,
        &bd,
        &dev(&[c], &rmv),
        &dev(&[c], &rvv),
        momentum,
        eps,
    );
    assert_eq!(got.y.dtype(), DType::Bf16, "y is stored in bf16");
    assert_eq!(got.save_mean.dtype(), DType::F32, "statistics stay f32");
    super::close("bn bf16 y", &got.y, &round_all(&want.y), 1.0 / 256.0);
    super::close(
        "bn bf16 mean",
        &got.save_mean,
        &want.mean.to_vec_f64(),
        1e-5,
    );
    super::close(
        "bn bf16 invstd",
        &got.save_invstd,
        &want.invstd.to_vec_f64(),
        1e-5,
    );
    super::close(
        "bn bf16 running_mean",
        &got.running_mean,
        &want.running_mean.to_vec_f64(),
        1e-5,
    );
    super::close(
        "bn bf16 running_var",
        &got.running_var,
        &want.running_var.to_vec_f64(),
        1e-5,
    );
    let (dx, dg, db) =
        dnn::batch_norm_bwd_bf16(&xb, &dyb, &gd, &got.save_mean, &got.save_invstd, eps);
    assert_eq!(dx.dtype(), DType::Bf16, "dx is stored in bf16");
    assert_eq!(dg.dtype(), DType::F32, "dgamma stays f32");
    super::close("bn bf16 dx", &dx, &round_all(&want_d.dx), 1.0 / 256.0);
    super::close("bn bf16 dgamma", &dg, &want_d.dweight.to_vec_f64(), 1e-5);
    super::close("bn bf16 dbeta", &db, &want_d.dbias.to_vec_f64(), 1e-5);
    let y_eval =
        dnn::batch_norm_fwd_infer_bf16(&xb, &gd, &bd, &dev(&[c], &rmv), &dev(&[c], &rvv), eps);
    let want_eval = ops::batch_norm2d_eval_fwd(
        &h(&shape, &xv),
        &h(&[c], &gv),
        &h(&[c], &bv),
        &h(&[c], &rmv),
        &h(&[c], &rvv),
        eps,
    );
    assert_eq!(y_eval.dtype(), DType::Bf16);
    super::close(
        "bn bf16 eval y",
        &y_eval,
        &round_all(&want_eval),
        1.0 / 256.0,
    );
}

/// cuBLASLt's product with the bias in its epilogue (FC1 and the head) against the CPU: f32 inputs
/// in fp32 mode against the f32 product plus bias, and bf16 inputs against the CPU emulation's
/// linear layer (the f32 product of the bf16-rounded x and w, plus the f32 bias, f32 output). Only
/// the order of f32 sums differs: within 1e-5. A bias added twice or not at all, or a transposed
/// weight, would miss by far more (the bias is as large as the products here).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_linear_with_the_bias_epilogue_matches_the_cpu() {
    use podgpu::cuda::{self, blaslt, MathMode};
    use podgpu::ops;
    use podgpu::Tensor;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let _mode = cuda::math_mode_scope(MathMode::Fp32);
    let mut rng = Rng::new(10);
    // FC1-like and head-like shapes: m = batch, k = features in, n = features out.
    for (m, k, n) in [(16usize, 64usize, 32usize), (7, 33, 10), (128, 512, 100)] {
        let xv: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let wv: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        let bv: Vec<f32> = (0..n).map(|_| 4.0 * rng.normal() as f32).collect();
        let add_bias = |y: &Tensor| -> Vec<f64> {
            let y = y.to_vec_f32();
            (0..m * n).map(|i| (y[i] + bv[i % n]) as f64).collect()
        };
        let (xd, wd, bd) = (dev(&[m, k], &xv), dev(&[n, k], &wv), dev(&[n], &bv));
        let want = add_bias(&ops::matmul_fwd(
            &Tensor::from_vec(&[m, k], xv.clone()),
            false,
            &Tensor::from_vec(&[n, k], wv.clone()),
            true,
        ));
        let got = blaslt::linear_bias(&xd, &wd, &bd);
        assert_eq!(got.shape(), &[m, n]);
        super::close(&format!("lt f32 m={m} k={k} n={n}"), &got, &want, 1e-5);

        let round = |v: &[f32], s: &[usize]| {
            Tensor::from_vec(s, v.iter().map(|&x| round_bf16(x)).collect::<Vec<f32>>())
        };
        let want = add_bias(&ops::matmul_fwd(
            &round(&xv, &[m, k]),
            false,
            &round(&wv, &[n, k]),
            true,
        ));
        let got = blaslt::linear_bias(&gb::to_bf16(&xd), &gb::to_bf16(&wd), &bd);
        assert_eq!(got.dtype(), DType::F32, "FC1's output stays f32");
        super::close(&format!("lt bf16 m={m} k={k} n={n}"), &got, &want, 1e-5);
    }
}

/// The bf16 step's own kernels (`cuda::bf16_ops`, through the ops' public entry points with bf16
/// GPU tensors) against the CPU emulation, which computes the same f32 values from the same bf16
/// inputs and rounds them once. ReLU, its backward and max pooling move bf16 values and must match
/// bit for bit; the residual add of two bf16 values is exact in f32 (same exponents here) before
/// its one rounding, so it matches bit for bit too; max pooling's backward sums up to four bf16
/// gradients in f32 in another order (one bf16 ulp at most: relative ≤ 2⁻⁸ per value); the
/// global pool's f32 mean differs by summation order only (1e-5), and its backward is one f32
/// product and one rounding (bit for bit).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_activation_ops_match_the_cpu_emulation() {
    use podgpu::ops::{self, Pool2dSpec};
    use podgpu::Tensor;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(12);
    let shape = [3usize, 5, 9, 7];
    let n: usize = shape.iter().product();
    let mut bf16_normals =
        |n: usize| -> Vec<f32> { (0..n).map(|_| round_bf16(rng.normal() as f32)).collect() };
    let (av, bv, gv) = (bf16_normals(n), bf16_normals(n), bf16_normals(n));
    let h = |s: &[usize], v: &[f32]| Tensor::from_vec(s, v.to_vec());
    let b = |s: &[usize], v: &[f32]| gb::to_bf16(&dev(s, v));
    let bits = |t: &Tensor| -> Vec<u32> {
        assert_eq!(t.dtype(), DType::Bf16, "{t:?}");
        t.to_vec_f32().iter().map(|v| v.to_bits()).collect()
    };
    let rounded_bits = |t: &Tensor| -> Vec<u32> {
        t.to_vec_f32()
            .iter()
            .map(|&v| round_bf16(v).to_bits())
            .collect()
    };

    let sum = ops::add_fwd(&b(&shape, &av), &b(&shape, &bv));
    assert_eq!(
        bits(&sum),
        rounded_bits(&ops::add_fwd(&h(&shape, &av), &h(&shape, &bv))),
        "add"
    );
    let y = ops::relu_fwd(&b(&shape, &av));
    let yh = ops::relu_fwd(&h(&shape, &av));
    assert_eq!(bits(&y), rounded_bits(&yh), "relu");
    let dx = ops::relu_bwd(&y, &b(&shape, &gv));
    assert_eq!(
        bits(&dx),
        rounded_bits(&ops::relu_bwd(&yh, &h(&shape, &gv))),
        "relu_bwd"
    );

    // Overlapping windows (3×3, stride 2, padding 1: the ImageNet stem's pool).
    let spec = Pool2dSpec::new(3, 2, 1);
    let yp = ops::max_pool2d_fwd(&b(&shape, &av), spec);
    let yph = ops::max_pool2d_fwd(&h(&shape, &av), spec);
    assert_eq!(bits(&yp), rounded_bits(&yph), "max_pool2d");
    let pn = yp.numel();
    let gp = bf16_normals(pn);
    let dxp = ops::max_pool2d_bwd(&b(&shape, &av), &yp, &b(yp.shape(), &gp), spec);
    assert_eq!(dxp.dtype(), DType::Bf16);
    let want: Vec<f64> = ops::max_pool2d_bwd(&h(&shape, &av), &yph, &h(yp.shape(), &gp), spec)
        .to_vec_f32()
        .iter()
        .map(|&v| round_bf16(v) as f64)
        .collect();
    let got = dxp.to_vec_f64();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= w.abs() * 2f64.powi(-8) + 1e-30,
            "max_pool2d_bwd at {i}: gpu {g} emulation {w}"
        );
    }

    let m = ops::global_avg_pool_fwd(&b(&shape, &av));
    assert_eq!(m.dtype(), DType::F32, "the pooled features are f32");
    let mh = ops::global_avg_pool_fwd(&h(&shape, &av));
    super::close("global_avg_pool bf16", &m, &mh.to_vec_f64(), 1e-5);
    let dm: Vec<f32> = (0..shape[0] * shape[1])
        .map(|i| i as f32 * 0.37 - 2.0)
        .collect();
    let dxm = podgpu::cuda::bf16_ops::global_avg_pool_bwd(&dev(&shape[..2], &dm), shape);
    let want = ops::global_avg_pool_bwd(&h(&shape[..2], &dm), &shape);
    assert_eq!(bits(&dxm), rounded_bits(&want), "global_avg_pool_bwd");
}
