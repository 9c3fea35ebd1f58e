//! The POD head on a GPU in as few launches as its math allows (issue 12 item 4): forward = the NaC
//! row pass that also writes SC's D (`loss_kernels::nac_rows`), SC's Gram or covariance product
//! (cuBLAS), its column sums of squares, and one kernel that sums NaC, finishes SC and weighs
//! them (`pod_loss_f32`); backward = SC's second product (cuBLAS) and one row kernel that takes
//! SC's gradient back through the normalisation and adds NaC's (`pod_dx_f32`). Seven launches
//! where the unfused ops (`loss::nac`, `loss::sc`, scale, add and their backwards) take about
//! sixteen. The arithmetic is the unfused kernels', in the same order (cuda/loss.cu says where);
//! `loss::pod` uses it for f32 features on a GPU and is compared with the CPU by the parity tests.

use super::launch::{check, func, gpu_of, one_block, per_row};
use super::{buf, tensor};
use crate::tensor::Tensor;
use cudarc::driver::PushKernelArg;

/// [loss, nac, sc] (three [1] tensors) from NaC's row losses, SC's product M (either form) and
/// column sums of squares s, with SC's coefficient `norm` and λ.
pub fn loss(row_loss: &Tensor, m: &Tensor, s: &Tensor, norm: f64, lambda: f64) -> [Tensor; 3] {
    let gpu = gpu_of(row_loss);
    let (b, n) = (row_loss.numel(), s.numel());
    let (mut loss, mut nac, mut sc) = (gpu.alloc(1), gpu.alloc(1), gpu.alloc(1));
    let f = func(&gpu, "loss", "pod_loss_f32");
    let (mm, b32, n32, l32) = (m.numel() as i64, b as i32, n as i32, lambda as f32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(loss.raw_mut())
        .arg(nac.raw_mut())
        .arg(sc.raw_mut())
        .arg(buf(row_loss).raw())
        .arg(buf(m).raw())
        .arg(&mm)
        .arg(buf(s).raw())
        .arg(&b32)
        .arg(&n32)
        .arg(&norm)
        .arg(&l32);
    // SAFETY: matches pod_loss_f32(float*, float*, float*, const float*, const float*, i64, const
    // float*, int, int, double, float); the outputs hold one float each, row_loss B, M mm, s n.
    check(unsafe { l.launch(one_block()) }, "pod_loss_f32");
    [tensor(&[1], loss), tensor(&[1], nac), tensor(&[1], sc)]
}

/// ∂L/∂x for the upstream gradient g [1]: NaC's gradient dx_nac [B, n] and SC's from MD (M·D or
/// D·M, [B, n]), D, s, the features x and their norms, SC's coefficient and λ.
#[allow(clippy::too_many_arguments)]
pub fn dx(
    g: &Tensor,
    dx_nac: &Tensor,
    md: &Tensor,
    d: &Tensor,
    s: &Tensor,
    x: &Tensor,
    norms: &Tensor,
    norm: f64,
    lambda: f64,
    eps: f64,
) -> Tensor {
    let gpu = gpu_of(x);
    let (b, n) = (x.dim(0), x.dim(1));
    for (what, t) in [("dx_nac", dx_nac), ("MD", md), ("D", d)] {
        assert_eq!(t.shape(), x.shape(), "pod dx: {what} {t:?} for x {x:?}");
    }
    let mut out = gpu.alloc(b * n);
    if b > 0 {
        let f = func(&gpu, "loss", "pod_dx_f32");
        let (n32, k, l32, e32) = (n as i32, (4.0 * norm) as f32, lambda as f32, eps as f32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(g).raw())
            .arg(buf(dx_nac).raw())
            .arg(buf(md).raw())
            .arg(buf(d).raw())
            .arg(buf(s).raw())
            .arg(buf(x).raw())
            .arg(buf(norms).raw())
            .arg(&n32)
            .arg(&k)
            .arg(&l32)
            .arg(&e32);
        // SAFETY: matches pod_dx_f32(float*, const float*, const float*, const float*, const
        // float*, const float*, const float*, const float*, int, float, float, float); every
        // [B, n] buffer holds B·n floats, s n, norms B, g one.
        check(unsafe { l.launch(per_row(b)) }, "pod_dx_f32");
    }
    tensor(x.shape(), out)
}
