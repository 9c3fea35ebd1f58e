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
