//! Every op through its public tensor-level (and tape-level) API, CPU vs GPU on the same random
//! inputs: this is what the models and the trainer call, so it checks the wiring of each op's CUDA
//! arm (argument conventions, labels, saved tensors), not only the launchers.

use super::{close, dev, gpu, host, randn, GPU_LOCK};
use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::cli::fidelity::{compare, fixture_tolerance, run_fixture, Place};
use podgpu::cuda::{self, MathMode};
use podgpu::fixture::Fixture;
use podgpu::loss::{self, PodConfig, ScForm, Variant};
use podgpu::ops::{self, BatchNormIds, Conv2dSpec, Pool2dSpec, BN_EPS, BN_MOMENTUM};
use podgpu::optim::Sgd;
use podgpu::rng::Rng;
use podgpu::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

const GPU: Device = Device::Cuda(0);

/// The same random values on the host and on the GPU.
fn pair(shape: &[usize], rng: &mut Rng, scale: f32, shift: f32) -> (Tensor, Tensor) {
    let n = shape.iter().product();
    let v: Vec<f32> = randn(n, rng).iter().map(|x| x * scale + shift).collect();
    (host(shape, &v), dev(shape, &v))
}

/// GPU result vs CPU result of the same op.
#[track_caller]
fn same(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    assert!(
        gpu.is_cuda(),
        "{what}: the GPU result is on {}",
        gpu.device()
    );
    assert!(
        !cpu.is_cuda(),
        "{what}: the CPU result is on {}",
        cpu.device()
    );
    assert_eq!(gpu.shape(), cpu.shape(), "{what}: shapes");
    close(what, gpu, &cpu.to_vec_f64(), tol);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn conv2d_ops_match_cpu_in_every_pass() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(21);
    let spec = |s: (usize, usize), p: (usize, usize), g: usize| Conv2dSpec {
        stride: s,
        padding: p,
        groups: g,
    };
    // (x, w, spec, bias): ResNet 3×3, strided 1×1 shortcut, depthwise stride 2, and a grouped one
    // with different strides and paddings per axis (catches a swapped (h, w)).
    let cases: [([usize; 4], [usize; 4], Conv2dSpec, bool); 4] = [
        ([2, 4, 8, 8], [6, 4, 3, 3], spec((1, 1), (1, 1), 1), true),
        ([2, 4, 9, 9], [8, 4, 1, 1], spec((2, 2), (0, 0), 1), false),
        ([2, 6, 9, 7], [6, 1, 3, 3], spec((2, 2), (1, 1), 6), true),
        ([1, 4, 10, 11], [6, 2, 3, 3], spec((1, 2), (2, 1), 2), true),
    ];
    for (mode, tol) in [(MathMode::Fp32, 1e-4), (MathMode::Tf32, 5e-3)] {
        let _mode = cuda::math_mode_scope(mode);
        for (i, (xs, ws, sp, with_bias)) in cases.iter().enumerate() {
            let (hx, gx) = pair(xs, &mut rng, 1.0, 0.0);
            let (hw, gw) = pair(ws, &mut rng, 1.0, 0.0);
            let (hb, gb) = pair(&[ws[0]], &mut rng, 1.0, 0.0);
            let (hb, gb) = if *with_bias {
                (Some(&hb), Some(&gb))
            } else {
                (None, None)
            };
            let hy = ops::conv2d_fwd(&hx, &hw, hb, *sp);
            let gy = ops::conv2d_fwd(&gx, &gw, gb, *sp);
            let tag = format!("conv #{i} {mode:?}");
            same(&format!("{tag} fwd (bias={with_bias})"), &gy, &hy, tol);
            let (hdy, gdy) = pair(hy.shape(), &mut rng, 1.0, 0.0);
            same(
                &format!("{tag} bwd_data"),
                &ops::conv2d_bwd_data(&gdy, &gw, xs, *sp),
                &ops::conv2d_bwd_data(&hdy, &hw, xs, *sp),
                tol,
            );
            same(
                &format!("{tag} bwd_weight"),
                &ops::conv2d_bwd_weight(&gx, &gdy, ws, *sp),
                &ops::conv2d_bwd_weight(&hx, &hdy, ws, *sp),
                tol,
            );
            same(
                &format!("{tag} bwd_bias"),
                &ops::conv2d_bwd_bias(&gdy),
                &ops::conv2d_bwd_bias(&hdy),
                1e-5,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn batch_norm_ops_match_cpu_in_both_modes() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(22);
    let shape = [4, 3, 5, 6];
    let (hx, gx) = pair(&shape, &mut rng, 2.0, 0.7);
    let (hg, gg) = pair(&[3], &mut rng, 1.0, 0.0);
    let (hb, gb) = pair(&[3], &mut rng, 1.0, 0.0);
    let (hrm, grm) = pair(&[3], &mut rng, 0.5, 0.0);
    let rv: Vec<f32> = randn(3, &mut rng).iter().map(|v| v.abs() + 0.5).collect();
    let (hrv, grv) = (host(&[3], &rv), dev(&[3], &rv));
    let (hdy, gdy) = pair(&shape, &mut rng, 1.0, 0.0);

    let h = ops::batch_norm2d_train_fwd(&hx, &hg, &hb, &hrm, &hrv, BN_MOMENTUM, BN_EPS);
    let g = ops::batch_norm2d_train_fwd(&gx, &gg, &gb, &grm, &grv, BN_MOMENTUM, BN_EPS);
    same("bn train y", &g.y, &h.y, 1e-5);
    same("bn train mean", &g.mean, &h.mean, 1e-5);
    same("bn train invstd", &g.invstd, &h.invstd, 1e-5);
    same(
        "bn train running_mean",
        &g.running_mean,
        &h.running_mean,
        1e-5,
    );
    same("bn train running_var", &g.running_var, &h.running_var, 1e-5);
    // The inputs are not modified: new running statistics are returned.
    same("bn running_mean input untouched", &grm, &hrm, 0.0);
    let hd = ops::batch_norm2d_train_bwd(&hx, &hdy, &hg, &h.mean, &h.invstd);
    let gd = ops::batch_norm2d_train_bwd(&gx, &gdy, &gg, &g.mean, &g.invstd);
    same("bn train dx", &gd.dx, &hd.dx, 1e-4);
    same("bn train dweight", &gd.dweight, &hd.dweight, 1e-5);
    same("bn train dbias", &gd.dbias, &hd.dbias, 1e-5);

    same(
        "bn eval y",
        &ops::batch_norm2d_eval_fwd(&gx, &gg, &gb, &grm, &grv, BN_EPS),
        &ops::batch_norm2d_eval_fwd(&hx, &hg, &hb, &hrm, &hrv, BN_EPS),
        1e-5,
    );
    let hd = ops::batch_norm2d_eval_bwd(&hx, &hdy, &hg, &hrm, &hrv, BN_EPS);
    let gd = ops::batch_norm2d_eval_bwd(&gx, &gdy, &gg, &grm, &grv, BN_EPS);
    same("bn eval dx", &gd.dx, &hd.dx, 1e-5);
    same("bn eval dweight", &gd.dweight, &hd.dweight, 1e-5);
    same("bn eval dbias", &gd.dbias, &hd.dbias, 1e-5);

    // Tape level: training mode stores new running statistics and counts the batch in the store on
    // either device; gradients reach x, γ and β.
    let mut hs = ParamStore::new();
    let ids = BatchNormIds::register(&mut hs, "bn", 3);
    hs.set_value(ids.weight, hg.clone());
    hs.set_value(ids.bias, hb.clone());
    let mut gs = hs.clone();
    gs.to_device(GPU);
    let run = |store: &mut ParamStore, x: &Tensor, dy: &Tensor| {
        let mut t = Tape::train();
        let xv = t.leaf(x.clone());
        let y = ops::batch_norm2d(&mut t, store, &xv, &ids);
        let y2 = ops::batch_norm2d(&mut t, store, &y, &ids); // two steps of running statistics
        t.backward_with(&y2, dy.clone(), store);
        (y2.value().clone(), t.grad_of(&xv).unwrap().clone())
    };
    let (hy, hgx) = run(&mut hs, &hx, &hdy);
    let (gy, ggx) = run(&mut gs, &gx, &gdy);
    same("bn tape y", &gy, &hy, 1e-5);
    same("bn tape dx", &ggx, &hgx, 1e-4);
    for (name, id) in [
        ("running_mean", ids.running_mean),
        ("running_var", ids.running_var),
        ("num_batches_tracked", ids.num_batches_tracked),
    ] {
        same(
            &format!("bn store {name}"),
            gs.value(id),
            hs.value(id),
            1e-5,
        );
    }
    assert_eq!(gs.value(ids.num_batches_tracked).item(), 2.0);
    for (name, id) in [("weight", ids.weight), ("bias", ids.bias)] {
        same(
            &format!("bn store grad {name}"),
            gs.get(id).grad.as_ref().unwrap(),
            hs.get(id).grad.as_ref().unwrap(),
            1e-4,
        );
    }
    // Evaluation mode on the tape uses the stored statistics.
    let eval = |store: &mut ParamStore, x: &Tensor| {
        let mut t = Tape::inference();
        let xv = t.constant(x.clone());
        ops::batch_norm2d(&mut t, store, &xv, &ids).value().clone()
    };
    same(
        "bn tape eval y",
        &eval(&mut gs, &gx),
        &eval(&mut hs, &hx),
        1e-5,
    );
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn pooling_concat_and_normalize_ops_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(23);
    let xs = [2, 3, 9, 8];
    let (hx, gx) = pair(&xs, &mut rng, 1.0, 0.0);
    for spec in [
        Pool2dSpec::new(3, 2, 1),
        Pool2dSpec::new(2, 2, 0),
        Pool2dSpec {
            kernel: (3, 2),
            stride: (1, 2),
            padding: (1, 0),
        },
    ] {
        let tag = format!("{:?}/{:?}/{:?}", spec.kernel, spec.stride, spec.padding);
        let (hy, gy) = (
            ops::max_pool2d_fwd(&hx, spec),
            ops::max_pool2d_fwd(&gx, spec),
        );
        same(&format!("max_pool {tag} fwd"), &gy, &hy, 0.0);
        let (hdy, gdy) = pair(hy.shape(), &mut rng, 1.0, 0.0);
        same(
            &format!("max_pool {tag} bwd"),
            &ops::max_pool2d_bwd(&gx, &gy, &gdy, spec),
            &ops::max_pool2d_bwd(&hx, &hy, &hdy, spec),
            1e-6,
        );
        let (hy, gy) = (
            ops::avg_pool2d_fwd(&hx, spec),
            ops::avg_pool2d_fwd(&gx, spec),
        );
        same(&format!("avg_pool {tag} fwd"), &gy, &hy, 1e-6);
        same(
            &format!("avg_pool {tag} bwd"),
            &ops::avg_pool2d_bwd(&gdy, &xs, spec),
            &ops::avg_pool2d_bwd(&hdy, &xs, spec),
            1e-6,
        );
    }
    same(
        "global_avg_pool fwd",
        &ops::global_avg_pool_fwd(&gx),
        &ops::global_avg_pool_fwd(&hx),
        1e-6,
    );
    let (hdp, gdp) = pair(&[2, 3], &mut rng, 1.0, 0.0);
    same(
        "global_avg_pool bwd",
        &ops::global_avg_pool_bwd(&gdp, &xs),
        &ops::global_avg_pool_bwd(&hdp, &xs),
        1e-7,
    );

    // Concat/split of NCHW tensors and of [N, C] rows (rank 2 goes through the same kernels).
    for (a, b) in [
        (vec![2, 3, 9, 8], vec![2, 5, 9, 8]),
        (vec![4, 3], vec![4, 6]),
    ] {
        let (ha, ga) = pair(&a, &mut rng, 1.0, 0.0);
        let (hb, gb) = pair(&b, &mut rng, 1.0, 0.0);
        let hc = ops::concat_channels_fwd(&[&ha, &hb]);
        let gc = ops::concat_channels_fwd(&[&ga, &gb]);
        same(&format!("concat rank {}", a.len()), &gc, &hc, 0.0);
        let hp = ops::split_channels_fwd(&hc, &[a[1], b[1]]);
        let gp = ops::split_channels_fwd(&gc, &[a[1], b[1]]);
        for (i, (g, h)) in gp.iter().zip(&hp).enumerate() {
            same(&format!("split rank {} part {i}", a.len()), g, h, 0.0);
        }
    }

    // Row normalisation and norms; one all-zero row exercises the ε branch of the backward.
    let (r, c) = (6, 33);
    let mut m = randn(r * c, &mut rng);
    m[2 * c..3 * c].iter_mut().for_each(|v| *v = 0.0);
    let (hm, gm) = (host(&[r, c], &m), dev(&[r, c], &m));
    let (hdm, gdm) = pair(&[r, c], &mut rng, 1.0, 0.0);
    same(
        "row_normalize fwd",
        &ops::row_normalize_fwd(&gm),
        &ops::row_normalize_fwd(&hm),
        1e-6,
    );
    same(
        "row_normalize bwd",
        &ops::row_normalize_bwd(&gm, &gdm),
        &ops::row_normalize_bwd(&hm, &hdm),
        1e-5,
    );
    same(
        "row_norms",
        &ops::row_norms_fwd(&gm),
        &ops::row_norms_fwd(&hm),
        1e-6,
    );
}

/// (host features, GPU features, host PEDCC, GPU PEDCC, labels).
fn head_case(
    b: usize,
    n: usize,
    k: usize,
    rng: &mut Rng,
) -> (Tensor, Tensor, Tensor, Tensor, Vec<usize>) {
    let (hx, gx) = pair(&[b, n], rng, 1.0, 0.0);
    let pedcc = podgpu::pedcc::generate(k, n, 3, podgpu::pedcc::Method::Repulsion)
        .expect("pedcc")
        .to_tensor();
    let gp = pedcc.to_device(GPU);
    let labels = (0..b).map(|_| rng.below(k)).collect();
    (hx, gx, pedcc, gp, labels)
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn labels_have_one_convention_per_device() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let labels = vec![3usize, 0, 9, 9, 1];
    let like = Tensor::zeros(&[5, 2], DType::F32, GPU);
    let t = loss::labels_tensor(&labels, &like);
    assert_eq!(t.device(), GPU);
    assert_eq!(t.shape(), &[5]);
    let back: Vec<usize> = loss::label_values(&t).iter().map(|&v| v as usize).collect();
    assert_eq!(back, labels);
    // The GPU tensor holds i32 words, what the kernels index with.
    assert_eq!(cuda::loss_kernels::ints_to_host(&t), vec![3, 0, 9, 9, 1]);
    let h = loss::labels_tensor(&labels, &Tensor::zeros(&[5, 2], DType::F64, Device::Cpu));
    assert_eq!(h.dtype(), DType::F64);
    assert_eq!(h.to_vec_f64(), vec![3.0, 0.0, 9.0, 9.0, 1.0]);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn loss_ops_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(24);
    // n > B (the Gram form is the cheap one) and n < B (the n×n form is).
    for (b, n, k) in [(16, 40, 10), (24, 6, 5)] {
        let (hx, gx, hp, gp, labels) = head_case(b, n, k, &mut rng);
        let hl = loss::labels_tensor(&labels, &hx);
        let gl = loss::labels_tensor(&labels, &gx);
        let tag = format!("B={b} n={n}");
        for variant in [Variant::Paper, Variant::Reference] {
            let (hloss, hdx) = loss::nac_fwd(&hx, &hp, &hl, 0.37, variant, true);
            let (gloss, gdx) = loss::nac_fwd(&gx, &gp, &gl, 0.37, variant, true);
            same(&format!("nac {variant} {tag} loss"), &gloss, &hloss, 1e-5);
            same(
                &format!("nac {variant} {tag} dx"),
                gdx.as_ref().unwrap(),
                hdx.as_ref().unwrap(),
                1e-5,
            );
            // Host labels with GPU features are uploaded as the GPU convention wants.
            let (gloss2, none) = loss::nac_fwd(&gx, &gp, &hl, 0.37, variant, false);
            assert!(none.is_none());
            same(
                &format!("nac {variant} {tag} host labels"),
                &gloss2,
                &hloss,
                1e-5,
            );

            for form in [ScForm::Gram, ScForm::Covariance, ScForm::Auto] {
                let run = |x: &Tensor, p: &Tensor, l: &Tensor| {
                    let mut t = Tape::train();
                    let xv = t.leaf(x.clone());
                    let s = loss::sc(&mut t, &xv, p, l, variant, form);
                    t.backward(&s, &mut ParamStore::new());
                    (s.value().clone(), t.grad_of(&xv).unwrap().clone())
                };
                let (hs, hg) = run(&hx, &hp, &hl);
                let (gs, gg) = run(&gx, &gp, &gl);
                same(&format!("sc {variant} {form:?} {tag} loss"), &gs, &hs, 1e-4);
                same(&format!("sc {variant} {form:?} {tag} dx"), &gg, &hg, 1e-4);
            }

            let cfg = PodConfig {
                variant,
                lambda: 0.7,
                sc_form: ScForm::Auto,
            };
            let run = |x: &Tensor, p: &Tensor, l: &Tensor| {
                let mut t = Tape::train();
                let xv = t.leaf(x.clone());
                let out = loss::pod(&mut t, &xv, p, l, 0.21, &cfg);
                t.backward(&out.loss, &mut ParamStore::new());
                (
                    [
                        out.loss.value().clone(),
                        out.nac.value().clone(),
                        out.sc.value().clone(),
                    ],
                    t.grad_of(&xv).unwrap().clone(),
                )
            };
            let (hv, hg) = run(&hx, &hp, &hl);
            let (gv, gg) = run(&gx, &gp, &gl);
            for (i, name) in ["loss", "nac", "sc"].iter().enumerate() {
                same(&format!("pod {variant} {tag} {name}"), &gv[i], &hv[i], 1e-4);
            }
            same(&format!("pod {variant} {tag} dx"), &gg, &hg, 1e-4);
        }

        // The SC pieces one by one (both Gram forms), with a non-unit upstream gradient.
        let hxn = ops::row_normalize_fwd(&hx);
        let gxn = ops::row_normalize_fwd(&gx);
        let hd = loss::sub_class_centroids_fwd(&hxn, &hp, &hl);
        let gd = loss::sub_class_centroids_fwd(&gxn, &gp, &gl);
        same(&format!("sub_class_centroids {tag}"), &gd, &hd, 1e-6);
        let (hs, gs) = (loss::col_sumsq_fwd(&hd), loss::col_sumsq_fwd(&gd));
        same(&format!("col_sumsq {tag}"), &gs, &hs, 1e-5);
        let coef = loss::sc_coefficient(b, n, Variant::Reference);
        let (hup, gup) = pair(&[1], &mut rng, 1.0, 0.0);
        for (ta, tb) in [(false, true), (true, false)] {
            let hm = ops::matmul_fwd(&hd, ta, &hd, tb);
            let gm = ops::matmul_fwd(&gd, ta, &gd, tb);
            same(
                &format!("sc_value {tag} gram={tb}"),
                &loss::sc_value_fwd(&gm, &gs, coef),
                &loss::sc_value_fwd(&hm, &hs, coef),
                1e-4,
            );
            let (hmd, gmd) = if tb {
                (
                    ops::matmul_fwd(&hm, false, &hd, false),
                    ops::matmul_fwd(&gm, false, &gd, false),
                )
            } else {
                (
                    ops::matmul_fwd(&hd, false, &hm, false),
                    ops::matmul_fwd(&gd, false, &gm, false),
                )
            };
            same(
                &format!("sc_grad {tag} gram={tb}"),
                &loss::sc_grad_fwd(&gmd, &gd, &gs, &gup, 4.0 * coef),
                &loss::sc_grad_fwd(&hmd, &hd, &hs, &hup, 4.0 * coef),
                1e-4,
            );
        }

        // Softmax CE on the PEDCC logits, forward and backward on the tape.
        let run = |x: &Tensor, p: &Tensor, l: &Tensor| {
            let mut t = Tape::train();
            let xv = t.leaf(x.clone());
            let logits = loss::pedcc_logits(&mut t, &xv, p);
            let ce = loss::softmax_cross_entropy(&mut t, &logits, l);
            t.backward(&ce, &mut ParamStore::new());
            (
                ce.value().clone(),
                t.grad_of(&xv).unwrap().clone(),
                logits.value().clone(),
            )
        };
        let (hce, hg, hlogits) = run(&hx, &hp, &hl);
        let (gce, gg, glogits) = run(&gx, &gp, &gl);
        same(&format!("softmax_ce {tag} loss"), &gce, &hce, 1e-5);
        same(&format!("softmax_ce {tag} dx"), &gg, &hg, 1e-5);
        let (hz, gz) = pair(&[b, k], &mut rng, 3.0, 0.0);
        let (hl2, hdz) = loss::softmax_ce_fwd(&hz, &hl, true);
        let (gl2, gdz) = loss::softmax_ce_fwd(&gz, &gl, true);
        same(&format!("softmax_ce_fwd {tag}"), &gl2, &hl2, 1e-5);
        same(
            &format!("softmax_ce_fwd {tag} dz"),
            gdz.as_ref().unwrap(),
            hdz.as_ref().unwrap(),
            1e-5,
        );

        // Predictions, accuracy and the δ-schedule norms.
        let want = loss::predictions(&hlogits);
        assert_eq!(loss::predictions(&glogits), want, "predictions {tag}");
        let hits = want.iter().zip(&labels).filter(|(a, b)| a == b).count();
        assert_eq!(
            loss::count_correct(&glogits, &labels),
            hits,
            "count_correct {tag}"
        );
        assert_eq!(loss::count_correct(&hlogits, &labels), hits);
        let (hz_pred, gz_pred) = (loss::argmax_rows_fwd(&hz), loss::argmax_rows_fwd(&gz));
        assert_eq!(loss::label_values(&gz_pred), loss::label_values(&hz_pred));
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(rel(loss::sum_row_norms(&gx), loss::sum_row_norms(&hx)) < 1e-5);
        assert!(rel(loss::mean_row_norm(&gx), loss::mean_row_norm(&hx)) < 1e-5);
        for v in [Variant::Paper, Variant::Reference] {
            let (g, h) = (
                loss::delta_norm_sum(v, &gx, &glogits),
                loss::delta_norm_sum(v, &hx, &hlogits),
            );
            assert!(rel(g, h) < 1e-5, "delta_norm_sum {v} {tag}: {g} vs {h}");
        }
        same(
            &format!("scale_by_scalar {tag}"),
            &loss::scale_by_scalar_fwd(&gx, &gup),
            &loss::scale_by_scalar_fwd(&hx, &hup),
            1e-6,
        );
    }
}

/// A store with every kind of tensor SGD meets: trainable ones (one left without a gradient), a
/// frozen one and a buffer.
fn sgd_store(rng: &mut Rng) -> ParamStore {
    let mut s = ParamStore::new();
    for (name, shape, kind) in [
        ("conv.weight", vec![6, 3, 3, 3], ParamKind::Trainable),
        ("fc.bias", vec![7], ParamKind::Trainable),
        ("big", vec![70_000], ParamKind::Trainable),
        ("no_grad", vec![5], ParamKind::Trainable),
        ("out.weight", vec![4, 3], ParamKind::Frozen),
        ("bn.running_var", vec![3], ParamKind::Buffer),
    ] {
        let n = shape.iter().product();
        s.add(name, host(&shape, &randn(n, rng)), kind);
    }
    s
}

fn set_grads(s: &mut ParamStore, grads: &[Option<Vec<f32>>]) {
    for (p, g) in s.iter_mut().zip(grads) {
        p.grad = g
            .as_ref()
            .map(|g| host(p.value.shape(), g).to_device(p.value.device()));
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn sgd_steps_match_cpu_fused_and_per_tensor() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut rng = Rng::new(25);
    // (momentum, weight decay, nesterov): `Sgd::step` takes the one-launch path for all four (a
    // store on one GPU); the per-tensor path (several devices) is checked on its own below.
    for (m, wd, nesterov) in [
        (0.9, 5e-4, false),
        (0.9, 0.0, false),
        (0.9, 1e-2, true),
        (0.0, 5e-4, false),
    ] {
        let tag = format!("sgd m={m} wd={wd} nesterov={nesterov}");
        let mut hs = sgd_store(&mut rng);
        let mut gs = hs.clone();
        gs.to_device(GPU);
        let initial: Vec<Vec<f64>> = hs.iter().map(|p| p.value.to_vec_f64()).collect();
        // Clones held across the steps (as a tape holds parameter values) must keep their values.
        let held: Vec<Tensor> = gs.iter().map(|p| p.value.clone()).collect();
        let (mut ho, mut go) = (
            Sgd::new(m, wd, nesterov).unwrap(),
            Sgd::new(m, wd, nesterov).unwrap(),
        );
        let allocs = gpu.pool_stats().device_allocs;
        for step in 0..3 {
            let grads: Vec<Option<Vec<f32>>> = hs
                .iter()
                .map(|p| (p.name != "no_grad").then(|| randn(p.value.numel(), &mut rng)))
                .collect();
            set_grads(&mut hs, &grads);
            set_grads(&mut gs, &grads);
            let lr = 0.1 / (step + 1) as f64;
            ho.step(&mut hs, lr);
            go.step(&mut gs, lr);
        }
        for (h, g) in hs.iter().zip(gs.iter()) {
            assert!(g.value.is_cuda());
            same(&format!("{tag} {}", h.name), &g.value, &h.value, 1e-6);
        }
        for name in ["out.weight", "bn.running_var", "no_grad"] {
            let id = gs.find(name).unwrap();
            close(
                &format!("{tag} {name} unchanged"),
                gs.value(id),
                &initial[id.0],
                0.0,
            );
        }
        let trained = gs.find("conv.weight").unwrap();
        assert!(
            gs.value(trained).to_vec_f64() != initial[trained.0],
            "{tag}: the parameter did not change"
        );
        for (i, t) in held.iter().enumerate() {
            close(
                &format!("{tag} held clone {i} untouched"),
                t,
                &initial[i],
                0.0,
            );
        }
        let (hm, gm) = (&ho.state().momentum, &go.state().momentum);
        assert_eq!(
            hm.keys().collect::<Vec<_>>(),
            gm.keys().collect::<Vec<_>>(),
            "{tag}: momentum buffers"
        );
        for (name, hb) in hm {
            same(&format!("{tag} momentum {name}"), &gm[name], hb, 1e-6);
        }
        println!(
            "{tag}: {} device allocations over 3 steps",
            gpu.pool_stats().device_allocs - allocs
        );
    }
    // The per-tensor GPU update (`optim::sgd_update` on one tensor, what `Sgd` uses when the
    // parameters are not all on one GPU) against the host, for every setting, three steps each.
    for (m, wd, nesterov) in [(0.9, 5e-4, false), (0.9, 1e-2, true), (0.0, 5e-4, false)] {
        let n = 1000;
        let w0 = randn(n, &mut rng);
        let (mut hw, mut gw) = (host(&[n], &w0), dev(&[n], &w0));
        let (mut hb, mut gb) = (None, None);
        for step in 0..3 {
            let g = randn(n, &mut rng);
            let lr = 0.1 / (step + 1) as f64;
            podgpu::optim::sgd_update(&mut hw, &host(&[n], &g), &mut hb, lr, m, wd, nesterov);
            podgpu::optim::sgd_update(&mut gw, &dev(&[n], &g), &mut gb, lr, m, wd, nesterov);
        }
        same(
            &format!("per-tensor sgd m={m} wd={wd} nesterov={nesterov}"),
            &gw,
            &hw,
            1e-6,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn tensors_move_fill_and_copy_on_write_on_the_gpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(26);
    let v = randn(300, &mut rng);
    let h = host(&[3, 100], &v);
    let g = h.to_device(GPU);
    assert_eq!(g.device(), GPU);
    assert_eq!(g.to_device(Device::Cpu).host::<f32>(), &v[..]);
    assert_eq!(g.to_device(GPU).to_vec_f32(), v);
    let h64 = h.to_dtype(DType::F64).to_device(GPU);
    assert_eq!(h64.to_vec_f32(), v);
    for value in [0.0, 2.5] {
        let f = Tensor::full(&[4, 5], value, DType::F32, GPU);
        assert!(f.is_cuda());
        assert_eq!(f.to_vec_f64(), vec![value; 20]);
    }
    let scalar = Tensor::full(&[], 1.0, DType::F32, GPU);
    assert_eq!(scalar.item(), 1.0);

    // device_buf_mut copies a shared buffer first: the clone keeps its values.
    let mut a = dev(&[300], &v);
    let keep = a.clone();
    a.device_buf_mut();
    cuda::nn_kernels::axpy_(&a, 1.0, &keep);
    assert_eq!(keep.to_vec_f32(), v, "the clone changed");
    let doubled: Vec<f64> = v.iter().map(|&x| 2.0 * x as f64).collect();
    close("axpy after device_buf_mut", &a, &doubled, 0.0);

    let mut store = ParamStore::new();
    let id = store.add("w", h.clone(), ParamKind::Trainable);
    store.to_device(GPU);
    assert!(store.value(id).is_cuda());
    store.to_device(Device::Cpu);
    assert_eq!(store.value(id).host::<f32>(), &v[..]);
}

/// The fixture folder: `$PODGPU_FIXTURES`, else `tests/fixtures` under the working directory (the
/// repository root, where tools/gpu-check.sh runs the packed test executables), else under the
/// repository this test was built from. Panics naming every place tried.
fn fixtures_dir() -> PathBuf {
    let mut tried = Vec::new();
    if let Some(d) = std::env::var_os("PODGPU_FIXTURES") {
        let d = PathBuf::from(d);
        assert!(
            d.is_dir(),
            "PODGPU_FIXTURES={} is not a folder",
            d.display()
        );
        return d;
    }
    for d in [
        PathBuf::from("tests/fixtures"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    ] {
        if d.is_dir() {
            return d;
        }
        tried.push(d.display().to_string());
    }
    panic!(
        "no fixture folder: tried {}; run from the repository root or set PODGPU_FIXTURES",
        tried.join(", ")
    );
}

/// The committed PyTorch fixtures through `podgpu fidelity`'s runner on the GPU, judged by the same
/// rule as `podgpu fidelity` (1e-4, raised to 10× PyTorch's own float32 error when a fixture records
/// a larger one).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn fidelity_fixtures_pass_on_the_gpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let dir = fixtures_dir();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no *.safetensors in {}", dir.display());
    let place = Place {
        device: GPU,
        dtype: DType::F32,
    };
    for path in paths {
        let fx = Fixture::read(&path).unwrap();
        let tolerance = fixture_tolerance(&fx, None, DType::F32).unwrap();
        let out = run_fixture(&fx, place).unwrap();
        for row in compare(&fx, &out, tolerance).unwrap() {
            println!(
                "{:<44} {:<14} rel error {:.2e} (tolerance {tolerance:.1e})",
                path.file_name().unwrap().to_string_lossy(),
                row.name,
                row.rel_error
            );
            assert!(
                row.passed,
                "{}: {} off by {:.3e} (tolerance {tolerance:.1e})",
                path.display(),
                row.name,
                row.rel_error
            );
        }
    }
}

/// `ops::linear` with a bias on the GPU (one cuBLASLt call with the bias epilogue forward) against
/// the CPU's unfused products, forward and every gradient, in fp32 and on the bf16 path (where
/// both devices round x, w, the gradient and dx to bf16 values at the same points; only the f32
/// summation order differs: 1e-5, except bf16 dx, where that order can move a value across a
/// rounding boundary: one bf16 ulp, 2⁻⁸ relative).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn linear_with_bias_on_the_tape_matches_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let _mode = cuda::math_mode_scope(MathMode::Fp32);
    let mut rng = Rng::new(23);
    let (hx, gx) = pair(&[6, 40], &mut rng, 1.0, 0.3);
    let (hw, gw) = pair(&[12, 40], &mut rng, 0.2, 0.0);
    let (hb, gb) = pair(&[12], &mut rng, 3.0, 0.0);
    let (hg, gg) = pair(&[6, 12], &mut rng, 1.0, 0.0);
    for bf16 in [false, true] {
        let _b = podgpu::cpu::bf16::scope(bf16);
        let run = |x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor| {
            let mut t = Tape::train();
            let (xv, wv, bv) = (t.leaf(x.clone()), t.leaf(w.clone()), t.leaf(b.clone()));
            let y = ops::linear(&mut t, &xv, &wv, Some(&bv));
            t.backward_with(&y, g.clone(), &mut ParamStore::new());
            let grads: Vec<Tensor> = [&xv, &wv, &bv]
                .iter()
                .map(|v| t.grad_of(v).expect("gradient").clone())
                .collect();
            (y.value().clone(), grads)
        };
        let (hy, hgr) = run(&hx, &hw, &hb, &hg);
        let (gy, ggr) = run(&gx, &gw, &gb, &gg);
        let tag = if bf16 { "bf16" } else { "fp32" };
        same(&format!("linear {tag} y"), &gy, &hy, 1e-5);
        for (name, (g, h)) in ["dx", "dw", "db"].iter().zip(ggr.iter().zip(&hgr)) {
            let tol = if bf16 && *name == "dx" {
                2f64.powi(-8)
            } else {
                1e-5
            };
            same(&format!("linear {tag} {name}"), g, h, tol);
        }
    }
}

/// The weight gradient with the bias gradient in cuBLASLt's epilogue (BGRADB) against the two
/// products made apart on the CPU; says when cuBLASLt offers no algorithm for it (the tape op
/// then falls back, which the test above covers).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn linear_weight_and_bias_gradient_in_one_call_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let _mode = cuda::math_mode_scope(MathMode::Fp32);
    let mut rng = Rng::new(29);
    for (m, k, n) in [(6, 40, 12), (128, 2048, 256)] {
        let (hg, gg) = pair(&[m, n], &mut rng, 1.0, 0.0);
        let (hx, gx) = pair(&[m, k], &mut rng, 1.0, 0.2);
        match cuda::blaslt::linear_weight_and_bias_grad(&gg, &gx) {
            Some((dw, db)) => {
                let hdw = ops::matmul_fwd(&hg, true, &hx, false);
                let hdb = ops::sum_rows_fwd(&hg);
                same(&format!("BGRADB dw {m}x{k}x{n}"), &dw, &hdw, 1e-5);
                same(&format!("BGRADB db {m}x{k}x{n}"), &db, &hdb, 1e-5);
            }
            None => println!("cuBLASLt has no BGRADB algorithm for {m}x{k}x{n}: two calls"),
        }
    }
}
