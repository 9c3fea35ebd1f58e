//! The direct CPU convolutions (src/cpu/conv_same.rs: stride-1 "same" convolutions on AVX-512,
//! forward, backward-data and weight gradient) through `ops`, against the im2col path of the same
//! f32 convolution and against the f64 convolution, in one process with both paths switched by
//! `conv_same::set_enabled`. One test function: the switch is process-wide.
//!
//! On a CPU without AVX-512 (or with `PODGPU_CPU_KERNELS=portable`) the direct path cannot run and
//! the test says it was skipped.

use podgpu::cpu::conv_same;
use podgpu::ops::{conv2d_bwd_data, conv2d_bwd_weight, conv2d_fwd, Conv2dSpec};
use podgpu::rng::Rng;
use podgpu::tensor::Tensor;

fn randn(shape: &[usize], rng: &mut Rng) -> Vec<f32> {
    (0..shape.iter().product::<usize>())
        .map(|_| rng.normal() as f32)
        .collect()
}

/// Largest |a − b| over the largest |b|.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |s, v| s.max(v.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |e, (&x, &y)| e.max((x as f64 - y).abs()));
    err / scale
}

fn f64_tensor(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape, v.iter().map(|&x| x as f64).collect::<Vec<f64>>())
}

/// (forward, backward-data, weight gradient) of one convolution, as f32 values.
fn three_passes(x: &Tensor, w: &Tensor, dy: &Tensor, spec: Conv2dSpec) -> [Vec<f32>; 3] {
    [
        conv2d_fwd(x, w, None, spec).to_vec_f32(),
        conv2d_bwd_data(dy, w, x.shape(), spec).to_vec_f32(),
        conv2d_bwd_weight(x, dy, w.shape(), spec).to_vec_f32(),
    ]
}

#[test]
fn direct_convolutions_match_the_im2col_path_and_f64_in_all_three_passes() {
    conv_same::set_enabled(true);
    if !conv_same::available() {
        eprintln!(
            "skipped: the direct convolutions cannot run here (no AVX-512, or \
             PODGPU_CPU_KERNELS=portable); the im2col path is what runs"
        );
        return;
    }
    let mut rng = Rng::new(5);
    // (n, cin, cout, k, h, w): ResNet-like layers on both sides of the thresholds in ops::conv
    // (weight gradient direct up to 64 × 64 channels), a 5×5 kernel, a plane whose size is not a
    // multiple of 16, more images than threads and fewer.
    let cases = [
        (4, 16, 16, 3, 16, 16),
        (3, 8, 24, 3, 8, 8),
        (5, 32, 64, 3, 4, 4),
        (4, 72, 72, 3, 4, 4),
        (2, 3, 16, 3, 7, 9),
        (4, 4, 6, 5, 6, 6),
        (1, 16, 8, 3, 8, 8),
    ];
    // The two paths add the same terms in different orders, so somewhere their f32 results must
    // differ in the last bits; if they never do, the switch did not switch.
    let mut paths_differ = false;
    for &(n, cin, cout, k, h, wd) in &cases {
        let spec = Conv2dSpec::new(1, k / 2);
        let (xs, ws, ys) = ([n, cin, h, wd], [cout, cin, k, k], [n, cout, h, wd]);
        let (xv, wv, dyv) = (
            randn(&xs, &mut rng),
            randn(&ws, &mut rng),
            randn(&ys, &mut rng),
        );
        let (x, w, dy) = (
            Tensor::from_vec(&xs, xv.clone()),
            Tensor::from_vec(&ws, wv.clone()),
            Tensor::from_vec(&ys, dyv.clone()),
        );
        conv_same::set_enabled(true);
        let direct = three_passes(&x, &w, &dy, spec);
        conv_same::set_enabled(false);
        let im2col = three_passes(&x, &w, &dy, spec);
        conv_same::set_enabled(true);
        let (xd, wd64, dyd) = (
            f64_tensor(&xs, &xv),
            f64_tensor(&ws, &wv),
            f64_tensor(&ys, &dyv),
        );
        let exact64 = [
            conv2d_fwd(&xd, &wd64, None, spec).to_vec_f64(),
            conv2d_bwd_data(&dyd, &wd64, &xs, spec).to_vec_f64(),
            conv2d_bwd_weight(&xd, &dyd, &ws, spec).to_vec_f64(),
        ];
        paths_differ |= direct != im2col;
        for (pass, name) in ["forward", "backward-data", "weight gradient"]
            .iter()
            .enumerate()
        {
            let case = (n, cin, cout, k, h, wd);
            let (e_direct, e_im2col) = (
                rel_err(&direct[pass], &exact64[pass]),
                rel_err(&im2col[pass], &exact64[pass]),
            );
            // f32 sums of up to a few thousand terms: both paths within 1e-5 of the largest value.
            assert!(
                e_direct < 1e-5,
                "{name} {case:?}: direct path off by {e_direct:e} (im2col path {e_im2col:e})"
            );
            assert!(
                e_im2col < 1e-5,
                "{name} {case:?}: im2col path off by {e_im2col:e}"
            );
        }
    }
    assert!(
        paths_differ,
        "the direct and im2col results were bit-identical in every case: set_enabled did not switch paths"
    );
}
