//! Finite-difference checks (f64) of the CNN layer ops — convolution, batch norm, pooling, channel
//! concat, reshape — plus direct checks of their forward semantics against naive loops and PyTorch's
//! formulas.

use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::ops::{self, BatchNormIds, Conv2dSpec, Pool2dSpec};
use podgpu::rng::Rng;
use podgpu::tensor::rel_error;
use podgpu::{DType, Tensor};

fn opts() -> GradCheckOptions {
    GradCheckOptions {
        max_elems: 40,
        ..GradCheckOptions::default()
    }
}

// ---- convolution ----

struct ConvCase {
    x: [usize; 4],
    cout: usize,
    k: (usize, usize),
    spec: Conv2dSpec,
    bias: bool,
}

fn spec(stride: usize, padding: usize, groups: usize) -> Conv2dSpec {
    Conv2dSpec::new(stride, padding).with_groups(groups)
}

fn conv_cases() -> Vec<ConvCase> {
    let case = |x, cout, k, spec, bias| ConvCase {
        x,
        cout,
        k: (k, k),
        spec,
        bias,
    };
    vec![
        // 1×1 stride 1: the path without im2col; batch 1 runs the images serially.
        case([1, 4, 5, 5], 3, 1, spec(1, 0, 1), true),
        case([3, 4, 5, 5], 6, 1, spec(1, 0, 1), false),
        // 1×1 stride 2 (ResNet projection shortcut).
        case([2, 4, 6, 6], 5, 1, spec(2, 0, 1), false),
        // 3×3, padding 0 and 1, stride 1 and 2.
        case([2, 3, 6, 6], 4, 3, spec(1, 1, 1), false),
        case([2, 3, 7, 7], 4, 3, spec(2, 1, 1), true),
        case([3, 3, 6, 5], 2, 3, spec(1, 0, 1), true),
        case([1, 3, 7, 6], 4, 3, spec(2, 0, 1), false),
        // Grouped.
        case([2, 4, 5, 5], 6, 3, spec(1, 1, 2), true),
        case([2, 4, 6, 6], 2, 3, spec(2, 0, 2), false),
        // Depthwise (groups = Cin = Cout), the MobileNetV2 case.
        case([2, 5, 6, 6], 5, 3, spec(1, 1, 5), false),
        case([3, 4, 7, 7], 4, 3, spec(2, 1, 4), true),
        // 16×16 outputs: one image per GEMM (smaller outputs share a GEMM across images).
        case([2, 3, 16, 16], 4, 3, spec(1, 1, 1), true),
        case([2, 6, 16, 16], 4, 1, spec(1, 0, 2), false),
        // Channel multiplier 2 (one input channel per group, two outputs): the im2col path.
        case([2, 3, 5, 5], 6, 3, spec(1, 1, 3), true),
        // A non-square "same" kernel: the data gradient as a forward convolution with the taps
        // flipped in both axes (3×1 here).
        ConvCase {
            x: [2, 3, 5, 6],
            cout: 4,
            k: (3, 1),
            spec: Conv2dSpec {
                stride: (1, 1),
                padding: (1, 0),
                groups: 1,
            },
            bias: false,
        },
    ]
}

fn register_conv(
    store: &mut ParamStore,
    c: &ConvCase,
    rng: &mut Rng,
) -> (podgpu::ParamId, Option<podgpu::ParamId>) {
    let w_shape = [c.cout, c.x[1] / c.spec.groups, c.k.0, c.k.1];
    let w = store.add("conv.weight", randn(&w_shape, rng), ParamKind::Trainable);
    let b = c
        .bias
        .then(|| store.add("conv.bias", randn(&[c.cout], rng), ParamKind::Trainable));
    (w, b)
}

#[test]
fn conv2d_gradients_all_configurations() {
    for (i, c) in conv_cases().iter().enumerate() {
        let mut rng = Rng::new(100 + i as u64);
        let mut store = ParamStore::new();
        let (w, b) = register_conv(&mut store, c, &mut rng);
        let x = randn(&c.x, &mut rng);
        let spec = c.spec;
        let r = check(
            &[("x", x)],
            &mut store,
            |t, s, v| {
                let wv = t.param(s, w);
                let bv = b.map(|b| t.param(s, b));
                ops::conv2d(t, &v[0], &wv, bv.as_ref(), spec)
            },
            &opts(),
        );
        eprintln!("case {i}: x {:?} spec {:?}", c.x, c.spec);
        assert_close(&r, 1e-6);
    }
}

#[test]
fn conv2d_rectangular_kernel_and_per_axis_stride_padding() {
    let mut rng = Rng::new(7);
    let mut store = ParamStore::new();
    let w = store.add("w", randn(&[3, 2, 3, 2], &mut rng), ParamKind::Trainable);
    let x = randn(&[2, 2, 7, 5], &mut rng);
    let spec = Conv2dSpec {
        stride: (2, 1),
        padding: (1, 0),
        groups: 1,
    };
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| {
            let wv = t.param(s, w);
            ops::conv2d(t, &v[0], &wv, None, spec)
        },
        &opts(),
    );
    assert_close(&r, 1e-6);
}

/// y[n, co, oh, ow] = b[co] + Σ_{ci in group, kh, kw} w[co, ci', kh, kw] · x[n, ci, oh·s+kh−p, ow·s+kw−p].
fn naive_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, spec: Conv2dSpec) -> Vec<f64> {
    let (xs, ws) = (x.to_vec_f64(), w.to_vec_f64());
    let [n, cin, h, wd] = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
    let [cout, cin_g, kh, kw] = [w.dim(0), w.dim(1), w.dim(2), w.dim(3)];
    let cout_g = cout / spec.groups;
    let (sh, sw) = spec.stride;
    let (ph, pw) = spec.padding;
    let oh = (h + 2 * ph - kh) / sh + 1;
    let ow = (wd + 2 * pw - kw) / sw + 1;
    let mut y = Vec::new();
    for i in 0..n {
        for co in 0..cout {
            let grp = co / cout_g;
            for a in 0..oh {
                for bb in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b.to_vec_f64()[co]);
                    for cj in 0..cin_g {
                        let ci = grp * cin_g + cj;
                        for u in 0..kh {
                            for v in 0..kw {
                                let ih = (a * sh + u) as isize - ph as isize;
                                let iw = (bb * sw + v) as isize - pw as isize;
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                    continue;
                                }
                                let xv = xs[((i * cin + ci) * h + ih as usize) * wd + iw as usize];
                                acc += ws[((co * cin_g + cj) * kh + u) * kw + v] * xv;
                            }
                        }
                    }
                    y.push(acc);
                }
            }
        }
    }
    y
}

#[test]
fn conv2d_forward_matches_naive_loop() {
    for (i, c) in conv_cases().iter().enumerate() {
        let mut rng = Rng::new(200 + i as u64);
        let x = randn(&c.x, &mut rng);
        let w = randn(&[c.cout, c.x[1] / c.spec.groups, c.k.0, c.k.1], &mut rng);
        let b = c.bias.then(|| randn(&[c.cout], &mut rng));
        let y = ops::conv2d_fwd(&x, &w, b.as_ref(), c.spec);
        let expect = naive_conv(&x, &w, b.as_ref(), c.spec);
        assert_eq!(y.numel(), expect.len(), "case {i}: output size");
        let e = rel_error(&y.to_vec_f64(), &expect);
        assert!(
            e < 1e-12,
            "case {i} ({:?}): rel error {e:e} against the naive loop",
            c.spec
        );
    }
}

#[test]
fn conv2d_f32_matches_f64() {
    // Big enough batch for the batch-parallel path, several layouts.
    for (i, (xs, cout, k, sp)) in [
        ([4, 8, 12, 12], 16, 3, spec(1, 1, 1)),
        ([4, 8, 12, 12], 8, 1, spec(1, 0, 1)),
        ([4, 8, 11, 11], 8, 3, spec(2, 1, 8)),
        ([4, 8, 11, 11], 6, 3, spec(2, 0, 2)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(300 + i as u64);
        let x = randn(&xs, &mut rng);
        let w = randn(&[cout, xs[1] / sp.groups, k, k], &mut rng);
        let b = randn(&[cout], &mut rng);
        let y64 = ops::conv2d_fwd(&x, &w, Some(&b), sp);
        let dy = randn(y64.shape(), &mut rng);
        let (x32, w32, b32, dy32) = (
            x.to_dtype(DType::F32),
            w.to_dtype(DType::F32),
            b.to_dtype(DType::F32),
            dy.to_dtype(DType::F32),
        );
        let pairs = [
            (ops::conv2d_fwd(&x32, &w32, Some(&b32), sp), y64),
            (
                ops::conv2d_bwd_data(&dy32, &w32, x.shape(), sp),
                ops::conv2d_bwd_data(&dy, &w, x.shape(), sp),
            ),
            (
                ops::conv2d_bwd_weight(&x32, &dy32, w.shape(), sp),
                ops::conv2d_bwd_weight(&x, &dy, w.shape(), sp),
            ),
            (ops::conv2d_bwd_bias(&dy32), ops::conv2d_bwd_bias(&dy)),
        ];
        for (j, (a, b)) in pairs.iter().enumerate() {
            assert_eq!(a.dtype(), DType::F32);
            let e = rel_error(&a.to_vec_f64(), &b.to_vec_f64());
            assert!(e < 1e-5, "case {i}, tensor {j}: f32 vs f64 rel error {e:e}");
        }
    }
}

/// Every way of spreading images over threads and GEMMs (serial images with parallel GEMMs, images
/// over threads, one or several images per GEMM) gives the same result as one thread.
#[test]
fn conv2d_same_result_for_any_thread_count() {
    for (i, (xs, cout, k, sp)) in [
        ([5, 4, 16, 16], 6, 3, spec(1, 1, 1)),
        ([5, 4, 16, 16], 6, 1, spec(1, 0, 2)),
        ([5, 4, 9, 9], 6, 3, spec(2, 1, 2)),
        ([5, 4, 6, 6], 8, 1, spec(1, 0, 1)),
        ([5, 4, 6, 6], 4, 3, spec(1, 1, 4)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(400 + i as u64);
        let x = randn(&xs, &mut rng);
        let w = randn(&[cout, xs[1] / sp.groups, k, k], &mut rng);
        let y_shape = ops::conv2d_fwd(&x, &w, None, sp).shape().to_vec();
        let dy = randn(&y_shape, &mut rng);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                [
                    ops::conv2d_fwd(&x, &w, None, sp).to_vec_f64(),
                    ops::conv2d_bwd_data(&dy, &w, x.shape(), sp).to_vec_f64(),
                    ops::conv2d_bwd_weight(&x, &dy, w.shape(), sp).to_vec_f64(),
                ]
            })
        };
        let one = run(1);
        let e = rel_error(&one[0], &naive_conv(&x, &w, None, sp));
        assert!(e < 1e-12, "case {i}: forward vs naive {e:e}");
        for threads in [2, 3, 4, 8] {
            for (j, (a, b)) in run(threads).iter().zip(&one).enumerate() {
                let e = rel_error(a, b);
                assert!(e < 1e-12, "case {i}, {threads} threads, tensor {j}: {e:e}");
            }
        }
    }
}

#[test]
fn conv2d_skips_input_gradient_of_constant_input() {
    let mut rng = Rng::new(8);
    let mut store = ParamStore::new();
    let w = store.add("w", randn(&[2, 3, 3, 3], &mut rng), ParamKind::Trainable);
    let mut t = Tape::train();
    let x = t.leaf(randn(&[2, 3, 5, 5], &mut rng));
    let xc = t.constant(x.value().clone());
    let wv = t.param(&store, w);
    let y = ops::conv2d(&mut t, &xc, &wv, None, Conv2dSpec::new(1, 1));
    let y = ops::global_avg_pool(&mut t, &y);
    let y = ops::flatten(&mut t, &y);
    let ones = t.constant(Tensor::from_vec(&[2, 1], vec![1.0f64; 2]));
    let l = ops::matmul(&mut t, &y, true, &ones, false);
    let ones2 = t.constant(Tensor::from_vec(&[1, 2], vec![1.0f64; 2]));
    let l = ops::matmul(&mut t, &ones2, false, &l, false);
    t.backward(&l, &mut store);
    assert!(store
        .get(w)
        .grad
        .as_ref()
        .is_some_and(|g| g.max_abs() > 0.0));
    assert!(
        t.grad_of(&x).is_none(),
        "a constant input must not receive a gradient"
    );
}

// ---- batch norm ----

/// Batch norm with non-trivial γ, β (and running statistics) so that every term of the gradient shows.
fn bn_store(c: usize, rng: &mut Rng) -> (ParamStore, BatchNormIds) {
    let mut store = ParamStore::new();
    let bn = BatchNormIds::register_as(&mut store, "bn", c, DType::F64);
    store.set_value(bn.weight, randn(&[c], rng));
    store.set_value(bn.bias, randn(&[c], rng));
    let rm = randn(&[c], rng);
    let rv: Vec<f64> = (0..c).map(|_| 0.5 + rng.uniform()).collect();
    store.set_value(bn.running_mean, rm);
    store.set_value(bn.running_var, Tensor::from_vec(&[c], rv));
    (store, bn)
}

/// Shifted, scaled input so the batch statistics are far from 0 and 1.
fn bn_input(shape: &[usize], rng: &mut Rng) -> Tensor {
    let v: Vec<f64> = randn(shape, rng)
        .to_vec_f64()
        .iter()
        .map(|x| 1.5 * x + 0.7)
        .collect();
    Tensor::from_vec(shape, v)
}

#[test]
fn batch_norm_training_gradients_through_batch_statistics() {
    let mut rng = Rng::new(20);
    let (mut store, bn) = bn_store(3, &mut rng);
    let x = bn_input(&[4, 3, 3, 2], &mut rng);
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| {
            assert!(t.is_training());
            ops::batch_norm2d(t, s, &v[0], &bn)
        },
        &opts(),
    );
    assert_eq!(r.len(), 3, "x, weight and bias are checked");
    assert_close(&r, 1e-6);
}

#[test]
fn batch_norm_eval_gradients() {
    let mut rng = Rng::new(21);
    let (mut store, bn) = bn_store(3, &mut rng);
    let x = bn_input(&[2, 3, 3, 3], &mut rng);
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| ops::batch_norm2d_in_mode(t, s, &v[0], &bn, false),
        &opts(),
    );
    assert_eq!(r.len(), 3);
    assert_close(&r, 1e-7);
}

#[test]
fn batch_norm_eval_mode_uses_running_statistics_and_changes_nothing() {
    let mut rng = Rng::new(22);
    let (mut store, bn) = bn_store(2, &mut rng);
    let x = bn_input(&[2, 2, 2, 3], &mut rng);
    let before: Vec<Vec<f64>> = store.iter().map(|p| p.value.to_vec_f64()).collect();
    let mut t = Tape::inference();
    let xv = t.constant(x.clone());
    let y = ops::batch_norm2d(&mut t, &mut store, &xv, &bn);
    let after: Vec<Vec<f64>> = store.iter().map(|p| p.value.to_vec_f64()).collect();
    assert_eq!(
        before, after,
        "evaluation mode must not touch the running statistics"
    );
    let (g, b) = (
        store.value(bn.weight).to_vec_f64(),
        store.value(bn.bias).to_vec_f64(),
    );
    let (rm, rv) = (
        store.value(bn.running_mean).to_vec_f64(),
        store.value(bn.running_var).to_vec_f64(),
    );
    let xs = x.to_vec_f64();
    let expect: Vec<f64> = (0..xs.len())
        .map(|i| {
            let c = (i / 6) % 2;
            g[c] * (xs[i] - rm[c]) / (rv[c] + 1e-5).sqrt() + b[c]
        })
        .collect();
    assert!(rel_error(&y.value().to_vec_f64(), &expect) < 1e-14);
}

#[test]
fn batch_norm_running_statistics_follow_pytorch_after_two_steps() {
    let mut rng = Rng::new(23);
    let (n, c, hw) = (3, 2, 4);
    let mut store = ParamStore::new();
    let bn = BatchNormIds::register(&mut store, "layer1.0.bn1", c);
    store.to_dtype(DType::F64);
    assert!(store.find("layer1.0.bn1.num_batches_tracked").is_some());
    assert_eq!(store.get(bn.running_var).kind, ParamKind::Buffer);
    assert_eq!(store.get(bn.weight).kind, ParamKind::Trainable);

    let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
    for step in 0..2 {
        let x = bn_input(&[n, c, 2, 2], &mut rng);
        let mut t = Tape::train();
        let xv = t.leaf(x.clone());
        let y = ops::batch_norm2d(&mut t, &mut store, &xv, &bn);
        // PyTorch: normalise with the biased variance, update the running variance with the unbiased.
        let xs = x.to_vec_f64();
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| xs[(i * c + ch) * hw..(i * c + ch + 1) * hw].to_vec())
                .collect();
            let m = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / m;
            let ss: f64 = vals.iter().map(|v| (v - mean).powi(2)).sum();
            rm[ch] = 0.9 * rm[ch] + 0.1 * mean;
            rv[ch] = 0.9 * rv[ch] + 0.1 * ss / (m - 1.0);
            // γ = 1, β = 0: y is the standardised input.
            let ys = y.value().to_vec_f64();
            for i in 0..n {
                for j in 0..hw {
                    let k = (i * c + ch) * hw + j;
                    let expect = (xs[k] - mean) / (ss / m + 1e-5).sqrt();
                    assert!((ys[k] - expect).abs() < 1e-12, "step {step}: y[{k}]");
                }
            }
        }
        let got_rm = store.value(bn.running_mean).to_vec_f64();
        let got_rv = store.value(bn.running_var).to_vec_f64();
        assert!(
            rel_error(&got_rm, &rm) < 1e-14,
            "step {step}: running_mean {got_rm:?} vs {rm:?}"
        );
        assert!(
            rel_error(&got_rv, &rv) < 1e-14,
            "step {step}: running_var {got_rv:?} vs {rv:?}"
        );
        assert_eq!(
            store.value(bn.num_batches_tracked).item(),
            (step + 1) as f64
        );
    }
}

/// Running statistics and the batch count are written into the store's own buffers (a CUDA graph
/// replays reads and writes of fixed addresses), by the plain and the fused batch norm alike.
#[test]
fn batch_norm_updates_running_statistics_in_place() {
    let mut rng = Rng::new(5);
    let c = 3;
    let mut store = ParamStore::new();
    let bn = BatchNormIds::register_as(&mut store, "bn", c, DType::F32);
    let addr = |s: &ParamStore| -> Vec<usize> {
        [bn.running_mean, bn.running_var, bn.num_batches_tracked]
            .iter()
            .map(|&id| s.value(id).host::<f32>().as_ptr() as usize)
            .collect()
    };
    let before = addr(&store);
    for (step, fused) in [false, true, false, true].into_iter().enumerate() {
        let old_rm = store.value(bn.running_mean).to_vec_f64();
        let x = bn_input(&[2, c, 3, 3], &mut rng).to_dtype(DType::F32);
        let mut t = Tape::train();
        let xv = t.leaf(x);
        let y = if fused {
            ops::batch_norm2d_relu(&mut t, &mut store, &xv, &bn, None)
        } else {
            ops::batch_norm2d(&mut t, &mut store, &xv, &bn)
        };
        // The tape still holds its values: the store's buffers are not shared with it.
        assert_eq!(
            addr(&store),
            before,
            "step {step} (fused: {fused}) moved a buffer"
        );
        assert_ne!(
            store.value(bn.running_mean).to_vec_f64(),
            old_rm,
            "step {step}: no update"
        );
        assert_eq!(
            store.value(bn.num_batches_tracked).item(),
            (step + 1) as f64
        );
        drop((t, y));
    }
}

// ---- pooling ----

/// Distinct values (gaps of 0.05, far above the finite-difference step) in random order: no ties.
fn distinct(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = rng
        .permutation(n)
        .into_iter()
        .map(|i| (i as f64 - n as f64 / 2.0) * 0.05)
        .collect();
    Tensor::from_vec(shape, v)
}

#[test]
fn max_pool_gradients() {
    for (i, sp) in [
        Pool2dSpec::new(2, 2, 0),
        Pool2dSpec::new(3, 2, 1), // the ImageNet stem: overlapping windows and padding
        Pool2dSpec::new(3, 1, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(30 + i as u64);
        let x = distinct(&[2, 2, 6, 5], &mut rng);
        let r = check(
            &[("x", x)],
            &mut ParamStore::new(),
            |t, _, v| ops::max_pool2d(t, &v[0], sp),
            &opts(),
        );
        assert_close(&r, 1e-7);
    }
}

#[test]
fn avg_and_global_avg_pool_gradients() {
    for (i, sp) in [
        Pool2dSpec::new(2, 2, 0),
        Pool2dSpec::new(3, 2, 1),
        Pool2dSpec::new(3, 1, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(40 + i as u64);
        let x = randn(&[2, 3, 5, 6], &mut rng);
        let r = check(
            &[("x", x)],
            &mut ParamStore::new(),
            |t, _, v| ops::avg_pool2d(t, &v[0], sp),
            &opts(),
        );
        assert_close(&r, 1e-7);
    }
    let mut rng = Rng::new(45);
    let x = randn(&[3, 4, 3, 5], &mut rng);
    let r = check(
        &[("x", x)],
        &mut ParamStore::new(),
        |t, _, v| ops::global_avg_pool(t, &v[0]),
        &opts(),
    );
    assert_close(&r, 1e-7);
}

/// Naive pooling over one plane with padding: max ignores the padding, average divides by k² always.
fn naive_pool(x: &[f64], h: usize, w: usize, k: usize, s: usize, p: usize, max: bool) -> Vec<f64> {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let mut y = Vec::new();
    for a in 0..oh {
        for b in 0..ow {
            let mut vals = Vec::new();
            for u in 0..k {
                for v in 0..k {
                    let (ih, iw) = (
                        (a * s + u) as isize - p as isize,
                        (b * s + v) as isize - p as isize,
                    );
                    if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < w {
                        vals.push(x[ih as usize * w + iw as usize]);
                    }
                }
            }
            y.push(if max {
                vals.iter().cloned().fold(f64::MIN, f64::max)
            } else {
                vals.iter().sum::<f64>() / (k * k) as f64
            });
        }
    }
    y
}

#[test]
fn pool_forwards_match_naive_loops() {
    let mut rng = Rng::new(50);
    let (h, w) = (7, 6);
    let x = randn(&[2, 3, h, w], &mut rng);
    let xs = x.to_vec_f64();
    for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1)] {
        let sp = Pool2dSpec::new(k, s, p);
        for max in [true, false] {
            let y = if max {
                ops::max_pool2d_fwd(&x, sp)
            } else {
                ops::avg_pool2d_fwd(&x, sp)
            };
            let expect: Vec<f64> = xs
                .chunks(h * w)
                .flat_map(|plane| naive_pool(plane, h, w, k, s, p, max))
                .collect();
            let e = rel_error(&y.to_vec_f64(), &expect);
            assert!(e < 1e-14, "pool k{k} s{s} p{p} max={max}: rel error {e:e}");
        }
    }
    let g = ops::global_avg_pool_fwd(&x);
    assert_eq!(g.shape(), &[2, 3]);
    let expect: Vec<f64> = xs
        .chunks(h * w)
        .map(|p| p.iter().sum::<f64>() / (h * w) as f64)
        .collect();
    assert!(rel_error(&g.to_vec_f64(), &expect) < 1e-14);
}

// ---- concat and reshape ----

#[test]
fn concat_channels_gradients_and_layout() {
    let mut rng = Rng::new(60);
    let a = randn(&[2, 2, 3, 3], &mut rng);
    let b = randn(&[2, 3, 3, 3], &mut rng);
    let c = randn(&[2, 1, 3, 3], &mut rng);
    let r = check(
        &[("a", a.clone()), ("b", b.clone()), ("c", c.clone())],
        &mut ParamStore::new(),
        |t, _, v| {
            let ab = ops::concat_channels(t, &[&v[0], &v[1]]);
            ops::concat_channels(t, &[&v[2], &ab, &v[0]])
        },
        &opts(),
    );
    assert_close(&r, 1e-7);

    // Layout: channel blocks of each image in order.
    let y = ops::concat_channels_fwd(&[&a, &b]);
    assert_eq!(y.shape(), &[2, 5, 3, 3]);
    let (ys, av, bv) = (y.to_vec_f64(), a.to_vec_f64(), b.to_vec_f64());
    assert_eq!(ys[5 * 9..5 * 9 + 18], av[18..36]);
    assert_eq!(ys[5 * 9 + 18..10 * 9], bv[27..54]);
}

#[test]
fn concat_with_a_constant_input_gives_it_no_gradient() {
    let mut rng = Rng::new(61);
    let mut t = Tape::train();
    let a = t.leaf(randn(&[2, 2, 2, 2], &mut rng));
    let k = t.constant(randn(&[2, 3, 2, 2], &mut rng));
    let y = ops::concat_channels(&mut t, &[&k, &a]);
    let y = ops::global_avg_pool(&mut t, &y); // [2, 5]
    let ones = t.constant(Tensor::from_vec(&[5, 1], vec![1.0f64; 5]));
    let y = ops::matmul(&mut t, &y, false, &ones, false);
    let ones2 = t.constant(Tensor::from_vec(&[1, 2], vec![1.0f64; 2]));
    let l = ops::matmul(&mut t, &ones2, false, &y, false);
    t.backward(&l, &mut ParamStore::new());
    let g = t.grad_of(&a).expect("a gets a gradient");
    assert_eq!(g.shape(), &[2, 2, 2, 2]);
    assert!(g.to_vec_f64().iter().all(|&v| (v - 0.25).abs() < 1e-15));
}

#[test]
fn reshape_and_flatten_gradients() {
    let mut rng = Rng::new(70);
    let mut store = ParamStore::new();
    let w = store.add("fc.weight", randn(&[3, 12], &mut rng), ParamKind::Trainable);
    let x = randn(&[2, 3, 2, 2], &mut rng);
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| {
            let f = ops::flatten(t, &v[0]);
            assert_eq!(f.shape(), &[2, 12]);
            let wv = t.param(s, w);
            let y = ops::linear(t, &f, &wv, None); // makes the reshaped gradient position-dependent
            let y = ops::reshape(t, &y, &[3, 2]);
            ops::matmul(t, &y, false, &y, true)
        },
        &opts(),
    );
    assert_close(&r, 1e-7);
}

// ---- all of it together ----

#[test]
fn small_cnn_with_every_op() {
    let mut rng = Rng::new(80);
    let mut store = ParamStore::new();
    let c1 = store.add(
        "c1.weight",
        randn(&[4, 3, 3, 3], &mut rng),
        ParamKind::Trainable,
    );
    let bn = BatchNormIds::register_as(&mut store, "bn1", 4, DType::F64);
    let dw = store.add(
        "dw.weight",
        randn(&[4, 1, 3, 3], &mut rng),
        ParamKind::Trainable,
    );
    let pw = store.add(
        "pw.weight",
        randn(&[2, 8, 1, 1], &mut rng),
        ParamKind::Trainable,
    );
    let pb = store.add("pw.bias", randn(&[2], &mut rng), ParamKind::Trainable);
    let x = randn(&[2, 3, 8, 8], &mut rng);
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| {
            let w1 = t.param(s, c1);
            let h = ops::conv2d(t, &v[0], &w1, None, Conv2dSpec::new(1, 1));
            let h = ops::batch_norm2d(t, s, &h, &bn);
            let h = ops::avg_pool2d(t, &h, Pool2dSpec::new(2, 2, 0)); // [2, 4, 4, 4]
            let wd = t.param(s, dw);
            let d = ops::conv2d(t, &h, &wd, None, Conv2dSpec::new(1, 1).with_groups(4));
            let h = ops::concat_channels(t, &[&h, &d]); // [2, 8, 4, 4]
            let (wp, bp) = (t.param(s, pw), t.param(s, pb));
            let h = ops::conv2d(t, &h, &wp, Some(&bp), Conv2dSpec::new(2, 0)); // [2, 2, 2, 2]
            let h = ops::global_avg_pool(t, &h);
            ops::flatten(t, &h)
        },
        &opts(),
    );
    assert_close(&r, 1e-6);
}

// ---- fused batch norm + residual add + ReLU (the ResNet blocks' tail) ----

#[test]
fn fused_batch_norm_relu_gradients() {
    let mut rng = Rng::new(24);
    let (mut store, bn) = bn_store(3, &mut rng);
    let x = bn_input(&[4, 3, 3, 2], &mut rng);
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| ops::batch_norm2d_relu(t, s, &v[0], &bn, None),
        &opts(),
    );
    assert_eq!(r.len(), 3, "x, weight and bias are checked");
    assert_close(&r, 1e-6);
}

#[test]
fn fused_batch_norm_add_relu_gradients() {
    let mut rng = Rng::new(25);
    let (mut store, bn) = bn_store(3, &mut rng);
    let x = bn_input(&[4, 3, 3, 2], &mut rng);
    let res = randn(&[4, 3, 3, 2], &mut rng);
    let r = check(
        &[("x", x), ("residual", res)],
        &mut store,
        |t, s, v| ops::batch_norm2d_relu(t, s, &v[0], &bn, Some(&v[1])),
        &opts(),
    );
    assert_eq!(r.len(), 4, "x, residual, weight and bias are checked");
    assert_close(&r, 1e-6);
}

/// The fused op does the unfused ops' arithmetic in their order: in f32 every output, gradient and
/// running statistic must be bit-identical to batch_norm2d → add → relu.
#[test]
fn fused_batch_norm_relu_equals_unfused_ops_exactly_in_f32() {
    for with_residual in [false, true] {
        let mut rng = Rng::new(26);
        let (c, shape) = (5, [3, 5, 7, 9]); // 63 values per plane: the 8-lane sums and their tails
        let (store64, bn) = bn_store(c, &mut rng);
        let x = bn_input(&shape, &mut rng).to_dtype(DType::F32);
        let res = randn(&shape, &mut rng).to_dtype(DType::F32);
        let dy = randn(&shape, &mut rng).to_dtype(DType::F32);
        let run = |fused: bool| {
            let mut store = ParamStore::new();
            let ids = BatchNormIds::register_as(&mut store, "bn", c, DType::F32);
            for (to, from) in [
                (ids.weight, bn.weight),
                (ids.bias, bn.bias),
                (ids.running_mean, bn.running_mean),
                (ids.running_var, bn.running_var),
            ] {
                store.set_value(to, store64.value(from).to_dtype(DType::F32));
            }
            let mut t = Tape::train();
            let xv = t.leaf(x.clone());
            let rv = t.leaf(res.clone());
            let r = with_residual.then_some(&rv);
            let y = if fused {
                ops::batch_norm2d_relu(&mut t, &mut store, &xv, &ids, r)
            } else {
                let y = ops::batch_norm2d(&mut t, &mut store, &xv, &ids);
                let y = match r {
                    Some(r) => ops::add(&mut t, &y, r),
                    None => y,
                };
                ops::relu(&mut t, &y)
            };
            t.backward_with(&y, dy.clone(), &mut store);
            let mut out = vec![y.value().to_vec_f64(), t.grad_of(&xv).unwrap().to_vec_f64()];
            if with_residual {
                out.push(t.grad_of(&rv).unwrap().to_vec_f64());
            }
            for id in [ids.weight, ids.bias] {
                out.push(store.get(id).grad.as_ref().unwrap().to_vec_f64());
            }
            for id in [ids.running_mean, ids.running_var] {
                out.push(store.value(id).to_vec_f64());
            }
            out
        };
        let (fused, unfused) = (run(true), run(false));
        assert!(
            fused[0].contains(&0.0) && fused[0].iter().any(|&v| v > 0.0),
            "the ReLU must clip some values and pass others"
        );
        assert_eq!(fused, unfused, "residual: {with_residual}");
    }
}
