//! Where the bf16 path (`--precision bf16`) keeps a tensor in bf16, on either device.
//!
//! One switch (`cpu::bf16::emulating()`, set from `--precision bf16`, per thread with
//! `cpu::bf16::scope`) selects the bf16 path. On the GPU the path *stores* bf16: activations
//! between layers are `DType::Bf16` tensors, cuDNN's bf16 convolutions and batch norms and our bf16
//! kernels (`cuda::bf16_ops`) work on them. On the CPU it *emulates* that storage: the same f32
//! values are rounded to bf16 at the same points and kept in f32 (`cpu::bf16`). The tape-level ops
//! call the two functions below at their rounding points, so both devices round in one place:
//!
//! - `store_bf16`: a tensor the GPU keeps in bf16 (convolution x, w, y, dy, dx; batch norm's y and
//!   dx; activations after ReLU, pooling and residual adds).
//! - `round_bf16`: bf16 values kept in f32 words on both devices (the linear layer's x, w, dy and
//!   dx: FC1 is small, so its GEMM runs in f32 on bf16 values, which is exact arithmetic up to the
//!   summation order, and its output stays f32).
//!
//! f64 tensors (gradient checks) are never rounded.

use crate::autograd::{Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{DType, Device, Layout, Tensor};

/// `t` in the bf16 path's storage when `on`: a host f32 tensor rounded to bf16 values (still f32),
/// a GPU f32 tensor converted to a bf16 tensor; bf16 tensors, f64 tensors and everything when
/// `!on` are returned as they are.
pub fn store_bf16(on: bool, t: &Tensor) -> Tensor {
    if !on || t.dtype() != DType::F32 {
        return t.clone();
    }
    match t.device() {
        Device::Cpu => cpu::bf16::round_if(true, t),
        Device::Cuda(_) => cuda::bf16::to_bf16(t),
    }
}

/// `store_bf16(on, t)` in `layout`: on a GPU an f32 NCHW tensor going to bf16 NHWC (a
/// convolution's weight on the channels-last bf16 path) is cast and reordered by one kernel
/// (`cuda::nhwc::to_nhwc_bf16`); otherwise the cast, then the layout change.
pub fn store_bf16_in_layout(on: bool, t: &Tensor, layout: Layout) -> Tensor {
    let fused = on
        && t.is_cuda()
        && t.dtype() == DType::F32
        && t.rank() == 4
        && t.layout() == Layout::RowMajor
        && layout == Layout::Nhwc;
    if fused {
        return cuda::nhwc::to_nhwc_bf16(t);
    }
    super::to_layout_fwd(&store_bf16(on, t), layout)
}

/// `t`'s values rounded to bf16 and kept in f32 when `on` (a bf16 GPU tensor widened to f32,
/// exactly); f64 tensors and everything when `!on` are returned as they are.
pub fn round_bf16(on: bool, t: &Tensor) -> Tensor {
    if !on {
        return t.clone();
    }
    match (t.device(), t.dtype()) {
        (Device::Cpu, DType::F32) => cpu::bf16::round_if(true, t),
        (Device::Cuda(_), DType::F32) => cuda::bf16::round_to_bf16(t),
        (Device::Cuda(_), DType::Bf16) => cuda::bf16::to_f32(t),
        _ => t.clone(),
    }
}

/// x in the bf16 path's storage on the tape, when `on`: forward `store_bf16(x)`, backward the
/// gradient rounded to bf16 too (in x's own dtype: `round_bf16`). It marks a value that the GPU keeps in bf16 although the op that
/// made it has no rounding point of its own: the residual sum `bn(x) + shortcut`, which the GPU
/// adds in bf16 (and whose gradient, the sum of the two uses of a block's output, the tape adds in
/// bf16). A GPU tensor that is bf16 already passes through without a node.
pub fn bf16_storage(t: &mut Tape, x: &Var, on: bool) -> Var {
    if !on || x.value().dtype() != DType::F32 {
        return x.clone();
    }
    let y = store_bf16(true, x.value());
    t.op(y, &[x], || Box::new(|g, _| vec![Some(round_bf16(true, g))]))
}
