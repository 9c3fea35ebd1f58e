//! What a GPU user meets when things go wrong, and what must survive it: out-of-memory comes back
//! as an error with advice and leaves the GPU usable; a failing cuDNN call leaves the handle usable
//! for the calls after it; the SC value keeps the small remainder of two nearly equal sums.

use super::{dev, gpu, GPU_LOCK};
use podgpu::cuda::dnn::{self, ConvGeom};
use podgpu::cuda::loss_kernels as lk;
use podgpu::cuda::{self, catch_oom};

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn out_of_memory_is_an_error_with_advice_and_the_gpu_stays_usable() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let total = gpu.info.total_memory;
    // Twice the device's memory cannot be had, whatever else is running.
    let Err(oom) = catch_oom(|| gpu.alloc(total / 2).len()) else {
        panic!("an allocation of twice the device's memory succeeded");
    };
    let text = oom.advice(Some(128));
    println!("{text}");
    assert_eq!(oom.ordinal, 0);
    assert!(oom.requested >= total, "{oom:?}");
    assert!(oom.total > 0 && oom.free <= oom.total, "{oom:?}");
    assert!(
        text.contains("out of memory") && text.contains("--batch-size 64 (now 128)"),
        "{text}"
    );
    // The pool's lock was not held by a panic: small allocations and a kernel still work.
    let x = dev(&[4], &[1.0, 2.0, 3.0, 4.0]);
    let s = lk::sum(&x);
    assert_eq!(s.to_vec_f32(), vec![10.0]);
    assert!(gpu.pool_stats().bytes_in_use > 0);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn a_failed_cudnn_call_leaves_cudnn_usable() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let geom = ConvGeom {
        stride: [1, 1],
        pad: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    let x = dev(&[1, 2, 4, 4], &[0.5; 32]);
    let w = dev(&[3, 2, 3, 3], &[0.25; 54]);
    // dy of the wrong shape: the launcher refuses it (a panic, as launchers have no error path)…
    let bad_dy = dev(&[1, 3, 5, 5], &[1.0; 75]);
    let r = std::panic::catch_unwind(|| dnn::conv2d_bwd_data(&bad_dy, &w, &[1, 2, 4, 4], &geom));
    let msg = r.expect_err("a wrong dy shape is refused");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("dy is [1, 3, 5, 5]"), "{msg}");
    // …and raised after the cuDNN lock was released: the next calls work.
    let y = dnn::conv2d_fwd(&x, &w, &geom);
    assert_eq!(y.shape(), &[1, 3, 4, 4]);
    // The centre output sees all 3×3×2 inputs: 18 · 0.5 · 0.25.
    assert!((y.to_vec_f32()[5] - 2.25).abs() < 1e-6);
    let dx = dnn::conv2d_bwd_data(&y, &w, &[1, 2, 4, 4], &geom);
    assert!(dx.to_vec_f32().iter().all(|v| v.is_finite()));
}

/// ‖G‖² and ‖s‖² agree to within the small off-diagonal terms that are the SC value: a float
/// accumulator would lose them, a double one keeps them.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn the_sc_value_keeps_what_is_left_after_cancellation() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let b = 128;
    // G: ones on the diagonal, ±1e-4 off it (symmetric); s = the diagonal, so that Σ s² cancels
    // Σ diag(G)² exactly and the value is Σ_{i≠j} G_ij² = b(b−1)·1e-8.
    let mut g = vec![0f32; b * b];
    for i in 0..b {
        for j in 0..b {
            g[i * b + j] = if i == j {
                1.0
            } else if (i + j) % 2 == 0 {
                1e-4
            } else {
                -1e-4
            };
        }
    }
    let s = vec![1f32; b];
    let want: f64 = g.iter().map(|&v| v as f64 * v as f64).sum::<f64>()
        - s.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    assert!((want - (b * (b - 1)) as f64 * 1e-8).abs() < 1e-9 * want.abs().max(1.0) + 1e-9);
    let got = lk::sc_loss(&dev(&[b, b], &g), &dev(&[b], &s), 1.0).to_vec_f64()[0];
    let rel = (got - want).abs() / want.abs();
    println!("sc value {got:.6e}, exact {want:.6e}, relative error {rel:.1e}");
    assert!(
        rel < 1e-5,
        "SC value {got} vs {want} (relative error {rel:.2e})"
    );
    // The math mode is untouched by the SC pieces.
    assert_eq!(cuda::math_mode(), cuda::MathMode::Fp32);
}
