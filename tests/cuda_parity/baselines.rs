//! The baseline losses' CUDA kernels (cuda/baselines.cu) against their host kernels, through the
//! public ops: value and gradient of every loss, the centre update and the scalar power. Their inputs
//! are random, with cosines that reach past ArcFace's threshold angle.

use super::{close, dev, gpu, host, randn, GPU_LOCK};
use podgpu::loss::baselines::{
    center_loss_fwd, center_update_fwd, complement_entropy_fwd, cosine_loss_fwd,
    margin_softmax_ce_fwd, scalar_pow_fwd, Margin,
};
use podgpu::loss::labels_tensor;
use podgpu::rng::Rng;
use podgpu::Tensor;

/// (loss, gradient) of the GPU against the host; the loss to 1e-5 and the gradient to 1e-4.
#[track_caller]
fn same_pair(what: &str, got: (Tensor, Option<Tensor>), want: (Tensor, Option<Tensor>)) {
    assert!(got.0.is_cuda(), "{what}: the loss is not on the GPU");
    close(&format!("{what} loss"), &got.0, &want.0.to_vec_f64(), 1e-5);
    let (g, w) = (got.1.expect("GPU gradient"), want.1.expect("host gradient"));
    assert!(g.is_cuda());
    close(&format!("{what} gradient"), &g, &w.to_vec_f64(), 1e-4);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn baseline_losses_match_their_host_kernels() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(61);
    let (b, n, k) = (24, 40, 10);
    let labels: Vec<usize> = (0..b).map(|_| rng.below(k)).collect();
    let x = randn(b * n, &mut rng);
    let p = randn(k * n, &mut rng);
    let (hx, gx) = (host(&[b, n], &x), dev(&[b, n], &x));
    let (hp, gp) = (host(&[k, n], &p), dev(&[k, n], &p));
    let (hl, gl) = (labels_tensor(&labels, &hx), labels_tensor(&labels, &gx));

    same_pair(
        "cosine",
        cosine_loss_fwd(&gx, &gp, &gl, true),
        cosine_loss_fwd(&hx, &hp, &hl, true),
    );
    same_pair(
        "center",
        center_loss_fwd(&gx, &gp, &gl, true),
        center_loss_fwd(&hx, &hp, &hl, true),
    );
    close(
        "center update",
        &center_update_fwd(&gp, &gx, &gl, 0.5),
        &center_update_fwd(&hp, &hx, &hl, 0.5).to_vec_f64(),
        1e-6,
    );

    // Cosines in [-1, 1], some near -1 (past ArcFace's threshold angle) and near 1.
    let mut c: Vec<f32> = (0..b * k)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect();
    c[0] = -0.999;
    c[1] = 0.9999;
    let (hc, gc) = (host(&[b, k], &c), dev(&[b, k], &c));
    let (hy, gy) = (labels_tensor(&labels, &hc), labels_tensor(&labels, &gc));
    for (name, m) in [
        ("am-softmax", Margin::additive_cosine(0.35)),
        ("arcface", Margin::additive_angular(0.5)),
        ("combined", Margin::combined(0.9, 0.4, 0.15)),
    ] {
        same_pair(
            name,
            margin_softmax_ce_fwd(&gc, &gy, m, 30.0, true),
            margin_softmax_ce_fwd(&hc, &hy, m, 30.0, true),
        );
    }
    same_pair(
        "complement entropy",
        complement_entropy_fwd(&gc, &gy, true),
        complement_entropy_fwd(&hc, &hy, true),
    );
    let v = [2.5f32];
    close(
        "scalar pow",
        &scalar_pow_fwd(&dev(&[1], &v), 0.5),
        &scalar_pow_fwd(&host(&[1], &v), 0.5).to_vec_f64(),
        1e-6,
    );
}
