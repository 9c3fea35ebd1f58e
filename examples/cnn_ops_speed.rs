//! Rough CPU throughput of the convolution kernels on ResNet/MobileNet-shaped layers (f32).
//! Run with `cargo run --release --example cnn_ops_speed [batch]`; it is a measuring aid, not a test.

use podgpu::gradcheck::randn;
use podgpu::ops::{self, Conv2dSpec, Pool2dSpec};
use podgpu::rng::Rng;
use podgpu::DType;
use std::time::Instant;

fn main() {
    let batch: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let mut rng = Rng::new(0);
    // (name, [C, H, W] of the input, Cout, kernel, spec)
    let time = |f: &dyn Fn()| {
        f();
        (0..3)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let layers = [
        ("stem 3→64 3×3", [3, 32, 32], 64, 3, Conv2dSpec::new(1, 1)),
        ("64→64 3×3", [64, 32, 32], 64, 3, Conv2dSpec::new(1, 1)),
        (
            "128→128 3×3 @16",
            [128, 16, 16],
            128,
            3,
            Conv2dSpec::new(1, 1),
        ),
        ("64→128 3×3 s2", [64, 32, 32], 128, 3, Conv2dSpec::new(2, 1)),
        (
            "256→64 1×1 @16",
            [256, 16, 16],
            64,
            1,
            Conv2dSpec::new(1, 0),
        ),
        ("64→128 1×1 s2", [64, 32, 32], 128, 1, Conv2dSpec::new(2, 0)),
        ("256→256 3×3 @8", [256, 8, 8], 256, 3, Conv2dSpec::new(1, 1)),
        ("512→512 3×3 @4", [512, 4, 4], 512, 3, Conv2dSpec::new(1, 1)),
        (
            "dw 96 3×3 @16",
            [96, 16, 16],
            96,
            3,
            Conv2dSpec::new(1, 1).with_groups(96),
        ),
    ];
    println!(
        "batch {batch}, {} rayon threads",
        rayon::current_num_threads()
    );
    for (name, [c, h, w], cout, k, spec) in layers {
        let x = randn(&[batch, c, h, w], &mut rng).to_dtype(DType::F32);
        let wt = randn(&[cout, c / spec.groups, k, k], &mut rng).to_dtype(DType::F32);
        let y = ops::conv2d_fwd(&x, &wt, None, spec);
        let dy = randn(y.shape(), &mut rng).to_dtype(DType::F32);
        let flop = 2.0 * y.numel() as f64 * (c / spec.groups * k * k) as f64;
        let tf = time(&|| drop(ops::conv2d_fwd(&x, &wt, None, spec)));
        let td = time(&|| drop(ops::conv2d_bwd_data(&dy, &wt, x.shape(), spec)));
        let tw = time(&|| drop(ops::conv2d_bwd_weight(&x, &dy, wt.shape(), spec)));
        let g = |t: f64| flop / t / 1e9;
        println!(
            "{name:<20} fwd {:7.1} ms ({:5.1} GFLOP/s)  dx {:7.1} ms ({:5.1})  dw {:7.1} ms ({:5.1})",
            tf * 1e3,
            g(tf),
            td * 1e3,
            g(td),
            tw * 1e3,
            g(tw)
        );
    }

    // Memory-bound ops on a [batch, 64, 32, 32] activation.
    let x = randn(&[batch, 64, 32, 32], &mut rng).to_dtype(DType::F32);
    let c = |v: f64| podgpu::Tensor::full(&[64], v, DType::F32, podgpu::Device::Cpu);
    let (g, b, rm, rv) = (c(1.0), c(0.0), c(0.0), c(1.0));
    let mb = x.numel() as f64 * 4.0 / 1e6;
    let out = ops::batch_norm2d_train_fwd(&x, &g, &b, &rm, &rv, 0.1, 1e-5);
    let tf = time(&|| drop(ops::batch_norm2d_train_fwd(&x, &g, &b, &rm, &rv, 0.1, 1e-5)));
    let tb = time(&|| {
        drop(ops::batch_norm2d_train_bwd(
            &x,
            &x,
            &g,
            &out.mean,
            &out.invstd,
        ))
    });
    println!(
        "batch norm (train) {mb:.0} MB   fwd {:6.1} ms  bwd {:6.1} ms",
        tf * 1e3,
        tb * 1e3
    );
    let sp = Pool2dSpec::new(3, 2, 1);
    let y = ops::max_pool2d_fwd(&x, sp);
    let tf = time(&|| drop(ops::max_pool2d_fwd(&x, sp)));
    let tb = time(&|| drop(ops::max_pool2d_bwd(&x, &y, &y, sp)));
    println!(
        "max pool 3/2/1                fwd {:6.1} ms  bwd {:6.1} ms",
        tf * 1e3,
        tb * 1e3
    );
}
