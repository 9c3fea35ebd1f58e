//! Our own training-mode batch norm kernels (`cuda::bn_train`, the fused affine + residual add +
//! ReLU pass) against the host kernels, which the finite-difference and PyTorch-fixture tests check:
//! forward with and without the residual and the ReLU, backward, several shapes (one value per
//! plane, odd sizes, a batch split into many chunks), and two runs bit for bit.
//!
//! The statistics are the host's formulas in double in a fixed order, and the affine map rounds as
//! the host rounds it, so the bound is f32 rounding of a few operations: 1e-6.

use super::{close, dev, gpu, host, randn, GPU_LOCK};
use podgpu::cuda::bn_train;
use podgpu::ops;
use podgpu::rng::Rng;
use podgpu::Tensor;

const TOL: f64 = 1e-6;
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

struct Case {
    x: Vec<f32>,
    r: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn case(shape: [usize; 4], seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let (n, c) = (shape.iter().product::<usize>(), shape[1]);
    Case {
        // An offset and a scale, so that centring matters.
        x: randn(n, &mut rng).iter().map(|v| v * 2.0 + 0.5).collect(),
        r: randn(n, &mut rng),
        dy: randn(n, &mut rng),
        gamma: randn(c, &mut rng),
        beta: randn(c, &mut rng),
        rm: randn(c, &mut rng),
        rv: randn(c, &mut rng).iter().map(|v| v.abs() + 0.5).collect(),
    }
}

fn v64(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64()
}

fn check_shape(shape: [usize; 4], seed: u64) {
    let k = case(shape, seed);
    let c = shape[1];
    let (hx, hr, hdy) = (host(&shape, &k.x), host(&shape, &k.r), host(&shape, &k.dy));
    let (hg, hb, hrm, hrv) = (
        host(&[c], &k.gamma),
        host(&[c], &k.beta),
        host(&[c], &k.rm),
        host(&[c], &k.rv),
    );
    let (gx, gr, gdy) = (dev(&shape, &k.x), dev(&shape, &k.r), dev(&shape, &k.dy));
    let (gg, gb, grm, grv) = (
        dev(&[c], &k.gamma),
        dev(&[c], &k.beta),
        dev(&[c], &k.rm),
        dev(&[c], &k.rv),
    );
    let what = format!("{shape:?}");
    // Plain forward (the shortcut's batch norm).
    let want = ops::batch_norm2d_train_fwd(&hx, &hg, &hb, &hrm, &hrv, MOMENTUM, EPS);
    let got = bn_train::train_fwd(&gx, &gg, &gb, &grm, &grv, None, false, MOMENTUM, EPS);
    close(&format!("bn_train y {what}"), &got.y, &v64(&want.y), TOL);
    close(
        &format!("bn_train mean {what}"),
        &got.mean,
        &v64(&want.mean),
        TOL,
    );
    close(
        &format!("bn_train invstd {what}"),
        &got.invstd,
        &v64(&want.invstd),
        TOL,
    );
    close(
        &format!("bn_train running_mean {what}"),
        &got.running_mean,
        &v64(&want.running_mean),
        TOL,
    );
    close(
        &format!("bn_train running_var {what}"),
        &got.running_var,
        &v64(&want.running_var),
        TOL,
    );
    // The inputs are not modified.
    close(
        &format!("bn_train running_mean kept {what}"),
        &grm,
        &v64(&hrm),
        0.0,
    );
    // With the ReLU, and with the residual add before it.
    for residual in [None, Some((&hr, &gr))] {
        let want = ops::batch_norm2d_relu_train_fwd(
            &hx,
            &hg,
            &hb,
            &hrm,
            &hrv,
            residual.map(|r| r.0),
            MOMENTUM,
            EPS,
        );
        let got = bn_train::train_fwd(
            &gx,
            &gg,
            &gb,
            &grm,
            &grv,
            residual.map(|r| r.1),
            true,
            MOMENTUM,
            EPS,
        );
        let tag = if residual.is_some() {
            "+r relu"
        } else {
            "relu"
        };
        close(
            &format!("bn_train y {tag} {what}"),
            &got.y,
            &v64(&want.y),
            TOL,
        );
        assert!(
            got.y.to_vec_f64().iter().all(|&v| v >= 0.0),
            "{what}: ReLU output below 0"
        );
    }
    // Backward from the forward's statistics (the host's, so both start from the same values).
    let stats = ops::batch_norm2d_train_fwd(&hx, &hg, &hb, &hrm, &hrv, MOMENTUM, EPS);
    let want = ops::batch_norm2d_train_bwd(&hx, &hdy, &hg, &stats.mean, &stats.invstd);
    let d = podgpu::Device::Cuda(0);
    let (gmean, ginv) = (stats.mean.to_device(d), stats.invstd.to_device(d));
    let got = bn_train::train_bwd(&gx, &gdy, &gg, &gmean, &ginv);
    close(&format!("bn_train dx {what}"), &got.0, &v64(&want.dx), TOL);
    close(
        &format!("bn_train dgamma {what}"),
        &got.1,
        &v64(&want.dweight),
        TOL,
    );
    close(
        &format!("bn_train dbeta {what}"),
        &got.2,
        &v64(&want.dbias),
        TOL,
    );
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn own_batch_norm_matches_the_host_kernels() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    check_shape([8, 16, 8, 8], 1);
    check_shape([3, 5, 1, 1], 2); // one value per plane
    check_shape([2, 7, 7, 7], 3); // odd sizes
    check_shape([32, 64, 16, 16], 4); // many chunks per channel
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn own_batch_norm_repeats_bit_for_bit() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let shape = [16, 32, 8, 8];
    let k = case(shape, 9);
    let c = shape[1];
    let (x, r, dy) = (dev(&shape, &k.x), dev(&shape, &k.r), dev(&shape, &k.dy));
    let (g, b, rm, rv) = (
        dev(&[c], &k.gamma),
        dev(&[c], &k.beta),
        dev(&[c], &k.rm),
        dev(&[c], &k.rv),
    );
    let run = || {
        let f = bn_train::train_fwd(&x, &g, &b, &rm, &rv, Some(&r), true, MOMENTUM, EPS);
        let (dx, dg, db) = bn_train::train_bwd(&x, &dy, &g, &f.mean, &f.invstd);
        [f.y, f.mean, f.invstd, f.running_var, dx, dg, db].map(|t| {
            t.to_vec_f64()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<u64>>()
        })
    };
    assert!(run() == run(), "two runs of the own batch norm differ");
}
