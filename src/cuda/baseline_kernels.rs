//! Launchers of the baseline losses' kernels (cuda/baselines.cu): Cosine Loss, the margin softmaxes,
//! COT's complement entropy, Center Loss and its centre update, PEDCC-Loss's scalar power. Each loss
//! writes one value per row, summed on the device in a fixed order (`loss_kernels::sum`); nothing is
//! copied to the host. Labels are i32 GPU tensors (`loss::cuda_labels`).

use super::launch::{check, func, gpu_of, per_row, NULL};
use super::loss_kernels::sum;
use super::{buf, tensor};
use crate::tensor::Tensor;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// A [rows, cols] gradient buffer when `with_grad`, and the pointer the kernel gets (null without).
fn grad_out(like: &Tensor, with_grad: bool) -> (Option<super::CudaBuf>, u64) {
    if !with_grad {
        return (None, NULL);
    }
    let g = gpu_of(like).alloc(like.numel());
    let p = g.device_ptr();
    (Some(g), p)
}

/// A per-row loss kernel `name(row_loss, grad, a, b, labels, B, n, with_grad)` over `x` [B, n] and
/// the class rows `p` [K, n]: (mean loss [1], ∂loss/∂x).
fn rows_vs_classes(
    name: &'static str,
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let gpu = gpu_of(x);
    let (b, n) = (x.dim(0), x.dim(1));
    let mut rows = gpu.alloc(b);
    let (g, gp) = grad_out(x, with_grad);
    let f = func(&gpu, "baselines", name);
    let (b32, n32, w32) = (b as i32, n as i32, with_grad as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(rows.raw_mut())
        .arg(&gp)
        .arg(buf(x).raw())
        .arg(buf(p).raw())
        .arg(buf(labels).raw())
        .arg(&b32)
        .arg(&n32)
        .arg(&w32);
    // SAFETY: matches name(float*, float*, const float*, const float*, const int*, int, int, int):
    // rows holds B floats, the gradient (when asked for) B·n, x is [B, n], p [K, n], labels B ints.
    check(unsafe { l.launch(per_row(b)) }, name);
    let loss = sum(&tensor(&[b], rows));
    (loss, g.map(|g| tensor(x.shape(), g)))
}

/// Cosine Loss: (mean (1 − cos(x_b, p_{y_b})), ∂/∂x).
pub fn cosine_loss(
    x: &Tensor,
    p: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    rows_vs_classes("cosine_loss_f32", x, p, labels, with_grad)
}

/// Center Loss: (Σ_b ‖x_b − c_{y_b}‖² / 2B, ∂/∂x).
pub fn center_loss(
    x: &Tensor,
    c: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    rows_vs_classes("center_loss_f32", x, c, labels, with_grad)
}

/// A per-row kernel over logits/cosines z [B, K] with its labels: (mean loss [1], ∂loss/∂z).
fn rows_of_logits(
    name: &'static str,
    z: &Tensor,
    labels: &Tensor,
    with_grad: bool,
    margin: Option<(f64, f64, f64, f32)>,
) -> (Tensor, Option<Tensor>) {
    let gpu = gpu_of(z);
    let (b, k) = (z.dim(0), z.dim(1));
    let mut rows = gpu.alloc(b);
    let (g, gp) = grad_out(z, with_grad);
    let f = func(&gpu, "baselines", name);
    let (b32, k32, w32) = (b as i32, k as i32, with_grad as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(rows.raw_mut())
        .arg(&gp)
        .arg(buf(z).raw())
        .arg(buf(labels).raw())
        .arg(&b32)
        .arg(&k32);
    if let Some((m1, m2, m3, s)) = &margin {
        l.arg(m1).arg(m2).arg(m3).arg(s);
    }
    l.arg(&w32);
    // SAFETY: matches name(float*, float*, const float*, const int*, int, int, [double m1, double
    // m2, double m3, float s: margin_ce_f32 only], int): rows
    // holds B floats, the gradient (when asked for) B·K, z is [B, K], labels B ints.
    check(unsafe { l.launch(per_row(b)) }, name);
    let loss = sum(&tensor(&[b], rows));
    (loss, g.map(|g| tensor(z.shape(), g)))
}

/// Margin softmax cross-entropy over cosines [B, K] with f(c) = cos(m1·θ + m2) − m3 and scale s.
pub fn margin_ce(
    cos: &Tensor,
    labels: &Tensor,
    (m1, m2, m3): (f64, f64, f64),
    s: f64,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    let margin = Some((m1, m2, m3, s as f32));
    rows_of_logits("margin_ce_f32", cos, labels, with_grad, margin)
}

/// COT's complement entropy of logits [B, K].
pub fn complement_entropy(
    z: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> (Tensor, Option<Tensor>) {
    rows_of_logits("complement_entropy_f32", z, labels, with_grad, None)
}

/// The Center Loss centre update: new centres [K, n] from the old ones, the features and labels.
pub fn center_update(c: &Tensor, x: &Tensor, labels: &Tensor, alpha: f64) -> Tensor {
    let gpu = gpu_of(c);
    let (k, n, b) = (c.dim(0), c.dim(1), x.dim(0));
    let mut out = gpu.alloc(k * n);
    if k > 0 && n > 0 {
        let f = func(&gpu, "baselines", "center_update_f32");
        let (b32, n32) = (b as i32, n as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut())
            .arg(buf(c).raw())
            .arg(buf(x).raw())
            .arg(buf(labels).raw())
            .arg(&b32)
            .arg(&n32)
            .arg(&alpha);
        // SAFETY: matches center_update_f32(float*, const float*, const float*, const int*, int,
        // int, double): out and c hold K·n floats, x B·n, labels B ints; one block per class.
        check(unsafe { l.launch(per_row(k)) }, "center_update_f32");
    }
    tensor(c.shape(), out)
}

/// v^e of a one-element tensor.
pub fn scalar_pow(v: &Tensor, e: f64) -> Tensor {
    let gpu = gpu_of(v);
    let mut out = gpu.alloc(1);
    let f = func(&gpu, "baselines", "scalar_pow_f32");
    let e32 = e as f32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(out.raw_mut()).arg(buf(v).raw()).arg(&e32);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches scalar_pow_f32(float*, const float*, float); both hold one float.
    check(unsafe { l.launch(one) }, "scalar_pow_f32");
    tensor(v.shape(), out)
}
