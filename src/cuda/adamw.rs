//! Launchers of `cuda/adamw.cu`: AdamW's in-place update of one tensor (`adamw_update`, honouring the
//! numerics guard's skip flag on the device) and the clipping factor of `optim::clip_grad_norm`
//! (`clip_coef`, a one-element device tensor: nothing is read back).

use super::launch::{check, func, gpu_of, grid_1d, one_block, NULL};
use super::{buf, tensor};
use crate::optim::adamw::AdamHyper;
use crate::optim::SkipIf;
use crate::tensor::Tensor;
use cudarc::driver::PushKernelArg;

/// One AdamW step of `w` with gradient `g` and moments `m`, `v` (all updated in place; the buffers
/// are made unique first, as `cuda::buf_mut` does).
pub fn adamw_update(
    w: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    h: &AdamHyper,
    skip: Option<SkipIf>,
) {
    let n = w.numel();
    if n == 0 {
        return;
    }
    let gpu = gpu_of(w);
    let skip_ptr = skip.map_or(NULL, |s| buf(s.words).device_ptr() + 4 * s.index as u64);
    let f = func(&gpu, "adamw", "adamw_f32");
    let n64 = n as i64;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let (b1, b2, eps) = (h.beta1 as f32, h.beta2 as f32, h.eps as f32);
    let (step, sqrt_bc2) = ((h.lr / h.bc1) as f32, h.bc2.sqrt() as f32);
    let (wp, mp, vp) = (
        super::buf_mut(w).device_ptr(),
        super::buf_mut(m).device_ptr(),
        super::buf_mut(v).device_ptr(),
    );
    let gp = buf(g).device_ptr();
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&wp)
        .arg(&gp)
        .arg(&mp)
        .arg(&vp)
        .arg(&n64)
        .arg(&decay)
        .arg(&b1)
        .arg(&b2)
        .arg(&eps)
        .arg(&step)
        .arg(&sqrt_bc2)
        .arg(&skip_ptr);
    // SAFETY: matches adamw_f32(float*, const float*, float*, float*, i64, float x6, const int*); the
    // four buffers hold n floats and belong to this parameter alone (made unique above).
    check(unsafe { l.launch(grid_1d(&gpu, n)) }, "adamw_f32");
}

/// min(1, max_norm / (‖grads‖ + 1e-6)) as a one-element device tensor.
pub fn clip_coef(grads: &[&Tensor], max_norm: f64) -> Tensor {
    let gpu = gpu_of(grads[0]);
    // Doubles in a float buffer: two words each.
    let partial = gpu.alloc(2 * grads.len());
    let pp = partial.device_ptr();
    let f = func(&gpu, "adamw", "sumsq_slot_f32");
    for (i, g) in grads.iter().enumerate() {
        let (slot, n64) = (i as i32, g.numel() as i64);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&pp).arg(&slot).arg(buf(g).raw()).arg(&n64);
        // SAFETY: matches sumsq_slot_f32(double*, int, const float*, i64); slot < grads.len().
        check(unsafe { l.launch(one_block()) }, "sumsq_slot_f32");
    }
    let mut coef = gpu.alloc(1);
    let f = func(&gpu, "adamw", "clip_coef_f32");
    let (count, mn) = (grads.len() as i32, max_norm as f32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(coef.raw_mut()).arg(&pp).arg(&count).arg(&mn);
    // SAFETY: matches clip_coef_f32(float*, const double*, int, float).
    check(unsafe { l.launch(one_block()) }, "clip_coef_f32");
    drop(partial);
    tensor(&[1], coef)
}
