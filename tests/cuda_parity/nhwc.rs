//! Channels-last on the GPU (`cuda::nhwc`, `ops::gpu_nhwc`): the layout kernels against the host's
//! `Tensor::to_layout`, and the NHWC pools against the NCHW ones on the same values, in f32 and in
//! bf16 storage. Results are compared in NCHW order (an NHWC tensor's raw values are in NHWC order).

use super::{close, dev, gpu, randn, GPU_LOCK};
use podgpu::cuda::bf16 as gb;
use podgpu::ops::{self, Pool2dSpec};
use podgpu::rng::Rng;
use podgpu::tensor::Layout;
use podgpu::{DType, Tensor};

/// A GPU tensor's values in NCHW order, whatever its layout.
fn nchw_values(t: &Tensor) -> Vec<f64> {
    ops::to_layout_fwd(t, Layout::RowMajor).to_vec_f64()
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn layout_kernels_match_the_host_bit_for_bit() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(40);
    // Odd sizes everywhere; the bf16 tensor has an odd count (a half-filled last word).
    let shape = [3usize, 5, 7, 3];
    let v = randn(shape.iter().product(), &mut rng);
    let host = Tensor::from_vec(&shape, v.clone());
    let want = host.to_layout(Layout::Nhwc).to_vec_f64();
    for bf16 in [false, true] {
        let x = if bf16 {
            gb::to_bf16(&dev(&shape, &v))
        } else {
            dev(&shape, &v)
        };
        let y = ops::to_layout_fwd(&x, Layout::Nhwc);
        assert_eq!(y.layout(), Layout::Nhwc);
        assert_eq!(y.dtype(), x.dtype());
        let got = y.to_vec_f64();
        let want: Vec<f64> = if bf16 {
            let h = Tensor::from_vec(&shape, x.to_vec_f32());
            h.to_layout(Layout::Nhwc).to_vec_f64()
        } else {
            want.clone()
        };
        assert_eq!(got, want, "NCHW → NHWC (bf16 {bf16})");
        let back = ops::to_layout_fwd(&y, Layout::RowMajor);
        assert_eq!(back.layout(), Layout::RowMajor);
        assert_eq!(
            back.to_vec_f64(),
            x.to_vec_f64(),
            "round trip (bf16 {bf16})"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn nhwc_pools_match_the_nchw_pools() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(41);
    let shape = [2usize, 6, 9, 7];
    let n: usize = shape.iter().product();
    let spec = Pool2dSpec::new(3, 2, 1);
    for bf16 in [false, true] {
        let store = |v: &[f32], s: &[usize]| {
            let t = dev(s, v);
            if bf16 {
                gb::to_bf16(&t)
            } else {
                t
            }
        };
        let x = store(&randn(n, &mut rng), &shape);
        let xn = ops::to_layout_fwd(&x, Layout::Nhwc);
        let tag = if bf16 { "bf16" } else { "f32" };

        let y = ops::max_pool2d_fwd(&x, spec);
        let yn = ops::max_pool2d_fwd(&xn, spec);
        assert_eq!((yn.layout(), yn.dtype()), (Layout::Nhwc, x.dtype()));
        assert_eq!(nchw_values(&yn), y.to_vec_f64(), "max pool {tag}");
        let dy = store(&randn(y.numel(), &mut rng), y.shape());
        let dyn_ = ops::to_layout_fwd(&dy, Layout::Nhwc);
        let dx = ops::max_pool2d_bwd(&x, &y, &dy, spec);
        let dxn = ops::max_pool2d_bwd(&xn, &yn, &dyn_, spec);
        assert_eq!(dxn.layout(), Layout::Nhwc);
        // The same windows summed in the same order: bit for bit.
        assert_eq!(
            nchw_values(&dxn),
            dx.to_vec_f64(),
            "max pool backward {tag}"
        );

        let m = ops::global_avg_pool_fwd(&x);
        let mn = ops::global_avg_pool_fwd(&xn);
        assert_eq!((mn.dtype(), mn.layout()), (DType::F32, Layout::RowMajor));
        close(
            &format!("global pool nhwc {tag}"),
            &mn,
            &m.to_vec_f64(),
            1e-6,
        );
        let dm = dev(m.shape(), &randn(m.numel(), &mut rng));
        let dxm = podgpu::cuda::nhwc::global_avg_pool_bwd(&dm, &shape, x.dtype());
        let want = match x.dtype() {
            DType::Bf16 => podgpu::cuda::bf16_ops::global_avg_pool_bwd(&dm, shape),
            _ => ops::global_avg_pool_bwd(&dm, &shape),
        };
        assert_eq!(dxm.dtype(), x.dtype());
        assert_eq!(
            nchw_values(&dxm),
            want.to_vec_f64(),
            "global pool backward {tag}"
        );
    }
}

/// cuDNN's fused batch norm + residual add + ReLU on NHWC activations (`ops::batch_norm2d_relu`'s
/// GPU path, `cuda::dnn::bn_relu_fwd_train`) against the CPU's fused op on the same values, in f32
/// and bf16 storage, with and without a residual: y, dx, dz, dγ, dβ and the running statistics.
/// Where cuDNN does not fuse a case the op falls back to the unfused ops, which the same
/// comparison then checks (the test says which ran).
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn fused_batch_norm_add_relu_on_nhwc_matches_the_cpu() {
    use podgpu::autograd::{ParamStore, Tape};
    use podgpu::ops::BatchNormIds;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(42);
    let shape = [4usize, 8, 5, 5];
    let n: usize = shape.iter().product();
    let (xv, zv, gv) = (randn(n, &mut rng), randn(n, &mut rng), randn(n, &mut rng));
    for bf16 in [false, true] {
        for with_z in [false, true] {
            let _b = podgpu::cpu::bf16::scope(bf16);
            // The CPU side runs on bf16-rounded inputs in f32 (its emulation rounds the same way).
            let round = |v: &[f32]| -> Vec<f32> {
                let t = dev(&shape, v);
                if bf16 {
                    gb::to_bf16(&t).to_vec_f32()
                } else {
                    v.to_vec()
                }
            };
            let (xr, zr, gr) = (round(&xv), round(&zv), round(&gv));
            let run = |gpu_side: bool| {
                let mut store = ParamStore::new();
                let bn = BatchNormIds::register_as(&mut store, "bn", shape[1], DType::F32);
                let put = |v: &[f32]| -> Tensor {
                    if !gpu_side {
                        return Tensor::from_vec(&shape, v.to_vec());
                    }
                    let t = ops::to_layout_fwd(&dev(&shape, v), Layout::Nhwc);
                    if bf16 {
                        gb::to_bf16(&t)
                    } else {
                        t
                    }
                };
                if gpu_side {
                    store.to_device(podgpu::Device::Cuda(0));
                }
                let mut t = Tape::train();
                let x = t.leaf(put(&xr));
                let z = t.leaf(put(&zr));
                let y = ops::batch_norm2d_relu(&mut t, &mut store, &x, &bn, with_z.then_some(&z));
                t.backward_with(&y, put(&gr), &mut store);
                let vals = |t: &Tensor| -> Vec<f64> {
                    if t.is_cuda() && t.rank() == 4 {
                        nchw_values(t)
                    } else {
                        t.to_vec_f64()
                    }
                };
                let mut out = vec![
                    ("y", vals(y.value())),
                    ("dx", vals(t.grad_of(&x).expect("dx"))),
                ];
                if with_z {
                    out.push(("dz", vals(t.grad_of(&z).expect("dz"))));
                }
                for (name, id) in [("dgamma", bn.weight), ("dbeta", bn.bias)] {
                    out.push((name, store.get(id).grad.as_ref().expect(name).to_vec_f64()));
                }
                out.push(("running_mean", store.value(bn.running_mean).to_vec_f64()));
                out.push(("running_var", store.value(bn.running_var).to_vec_f64()));
                out
            };
            let fused = {
                let x = ops::to_layout_fwd(&dev(&shape, &xr), Layout::Nhwc);
                let x = if bf16 { gb::to_bf16(&x) } else { x };
                let ones = dev(&[shape[1]], &vec![1.0; shape[1]]);
                let zeros = dev(&[shape[1]], &vec![0.0; shape[1]]);
                podgpu::cuda::dnn::bn_relu_fwd_train(
                    &x, None, &ones, &zeros, &zeros, &ones, 0.1, 1e-5,
                )
                .is_some()
            };
            println!("bf16 {bf16}, residual {with_z}: cuDNN fused: {fused}");
            let tol = if bf16 { 3e-2 } else { 1e-4 };
            for ((name, g), (_, h)) in run(true).iter().zip(run(false).iter()) {
                let e = podgpu::tensor::rel_error(g, h);
                println!("  {name:<13} rel error {e:.2e}");
                assert!(
                    e <= tol,
                    "{name} (bf16 {bf16}, residual {with_z}): {e:.3e} > {tol:.0e}"
                );
            }
        }
    }
}

/// The bf16 step's weight cast and reorder in one kernel (`cuda::nhwc::to_nhwc_bf16`) gives the
/// bits of the cast then the reorder.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn the_fused_weight_cast_and_reorder_matches_the_two_steps() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    let mut rng = Rng::new(43);
    let shape = [7usize, 5, 3, 3]; // K, C, R, S
    let x = dev(&shape, &randn(shape.iter().product(), &mut rng));
    let fused = podgpu::cuda::nhwc::to_nhwc_bf16(&x);
    let two = ops::to_layout_fwd(&gb::to_bf16(&x), Layout::Nhwc);
    assert_eq!((fused.dtype(), fused.layout()), (DType::Bf16, Layout::Nhwc));
    assert_eq!(
        gb::bf16_buf(&fused).to_host_bits(),
        gb::bf16_buf(&two).to_host_bits()
    );
}
