//! Deterministic mode (issue 7): the same seed gives bit-identical weights on the CPU whatever the
//! thread count. The thread-dependent reduction was the convolution's weight gradient (per-thread
//! partial sums); GEMM splits rows over threads, which must not change any element.

mod common;

use common::*;
use podgpu::ops::{conv2d_bwd_weight, conv2d_fwd, Conv2dSpec};
use podgpu::rng::Rng;
use podgpu::Tensor;

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        shape,
        (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>(),
    )
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32().iter().map(|x| x.to_bits()).collect()
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn conv_and_gemm_results_do_not_depend_on_the_thread_count_in_deterministic_mode() {
    podgpu::cpu::set_deterministic(true);
    let mut rng = Rng::new(5);
    // Shapes from a small ResNet: a 3×3 conv on many positions, a strided one, a pointwise one with
    // few positions (several images per GEMM), and a batch smaller than some thread counts.
    let cases = [
        ([16, 8, 12, 12], [8, 8, 3, 3], Conv2dSpec::new(1, 1)),
        ([13, 8, 9, 9], [16, 8, 3, 3], Conv2dSpec::new(2, 1)),
        ([32, 16, 4, 4], [24, 16, 1, 1], Conv2dSpec::new(1, 0)),
        ([3, 4, 10, 10], [6, 4, 3, 3], Conv2dSpec::new(1, 1)),
    ];
    for (xs, ws, spec) in cases {
        let x = randn(&xs, &mut rng);
        let w = randn(&ws, &mut rng);
        let y = conv2d_fwd(&x, &w, None, spec);
        let dy = randn(y.shape(), &mut rng);
        let reference = in_pool(1, || {
            (
                bits(&conv2d_fwd(&x, &w, None, spec)),
                bits(&conv2d_bwd_weight(&x, &dy, &ws, spec)),
            )
        });
        for threads in [2, 3, 4] {
            let got = in_pool(threads, || {
                (
                    bits(&conv2d_fwd(&x, &w, None, spec)),
                    bits(&conv2d_bwd_weight(&x, &dy, &ws, spec)),
                )
            });
            assert!(
                got.0 == reference.0,
                "forward differs: {xs:?} {threads} threads"
            );
            assert!(got.1 == reference.1, "dW differs: {xs:?} {threads} threads");
        }
    }
    // GEMM: rows split over threads give the same bits as one thread.
    let (m, k, n) = (203, 97, 61);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
    let gemm = |threads| {
        in_pool(threads, || {
            let mut c = vec![0.0f32; m * n];
            podgpu::cpu::gemm(m, k, n, 1.0, &a, false, &b, true, 0.0, &mut c);
            c.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        })
    };
    let one = gemm(1);
    for threads in [2, 3, 5] {
        assert!(gemm(threads) == one, "gemm differs with {threads} threads");
    }
}

fn train_with_threads(out: &std::path::Path, threads: &str) {
    assert_ok(&run(&[
        "train",
        "resnet18",
        "--data",
        "datasets/mnist-small.bin",
        "--width",
        "4",
        "--limit-train",
        "192",
        "--limit-test",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--seed",
        "4",
        "--deterministic",
        "--threads",
        threads,
        "--out",
        out.to_str().unwrap(),
    ]));
}

#[test]
fn deterministic_training_gives_the_same_weights_on_one_and_two_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("t1"), tmp.path().join("t2"));
    train_with_threads(&one, "1");
    train_with_threads(&two, "2");
    assert_same_checkpoint(&one.join("last.safetensors"), &two.join("last.safetensors"));
    assert_eq!(exact_metrics(&one), exact_metrics(&two));
}
