//! The CPU backend's bf16 emulation: the numerics of the GPU's mixed-precision path, without a GPU.
//!
//! The GPU's bf16 path (`--precision bf16`) stores convolution and GEMM inputs and the activations
//! between layers in bf16 and accumulates in f32; master weights, gradients of the weights, the
//! optimizer state, batch-norm statistics, the FC1 output and the POD loss stay f32. The emulation
//! computes everything in f32 as usual and rounds a tensor to bf16 (`tensor::bf16::round_bf16`,
//! round to nearest even) exactly where the GPU path stores one:
//!
//! | op (tape level)              | rounded to bf16                          | kept f32           |
//! |------------------------------|------------------------------------------|--------------------|
//! | `ops::conv2d`                | x, w (cast copy), y; backward dy, dx     | dw, db             |
//! | `ops::batch_norm2d`          | y; backward dy, dx                       | stats, dγ, dβ      |
//! | `ops::batch_norm2d_relu` + residual | the sum bn(x) + r, its gradient    |                    |
//! | `ops::max_pool2d`            | backward dy, dx                          |                    |
//! | `ops::linear` (FC1 and head) | x, w (cast copy); backward dy, dx        | y (f32 output), dw, db |
//!
//! An f32 accumulator over bf16 inputs is what cuDNN and cuBLAS compute with `CUDNN_DATA_BFLOAT16`
//! / `CUDA_R_16BF` inputs and f32 compute, so the host kernels' f32 sums match the GPU's up to
//! summation order. ReLU and max pooling of bf16 values are bf16 values already. The gradient
//! arriving at a bf16 activation is rounded where the GPU stores it: the tape adds the gradients of
//! a value's two uses (a block's output feeds the next block's convolution and its shortcut) in
//! bf16 there, so batch norm, max pooling and the residual sum round their incoming gradient.
//! The rounding calls themselves are `ops::store_bf16` / `ops::round_bf16`, which on a GPU convert
//! to bf16 storage instead, so both devices round at the same points by the same code.
//!
//! The switch is process-wide for a run (`set_emulation`, from `--precision bf16`; on a GPU the
//! same switch selects its bf16 storage, see `ops::precision`) and can be overridden per thread
//! (`scope`), so parallel tests do not see each other's mode. An op
//! decides its precision when it is recorded (forward) and its backward keeps that decision. The
//! loss's own products (`ops::matmul`) never round. f64 tensors (gradient checks) and GPU tensors
//! are never rounded here.

use crate::tensor::bf16::round_slice_bf16;
use crate::tensor::{DType, Device, Tensor};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

static EMULATE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Turns the emulation on or off for the whole process (threads inside a `scope` keep theirs).
pub fn set_emulation(on: bool) {
    EMULATE.store(on, Ordering::Relaxed);
}

/// Whether this thread's CPU ops round to bf16 where the GPU stores bf16.
pub fn emulating() -> bool {
    OVERRIDE
        .with(Cell::get)
        .unwrap_or_else(|| EMULATE.load(Ordering::Relaxed))
}

/// Turns the emulation on or off for this thread until the guard drops (restored on unwind too).
#[must_use = "the mode is restored when the guard drops"]
pub fn scope(on: bool) -> Bf16Scope {
    let previous = OVERRIDE.with(|o| o.replace(Some(on)));
    Bf16Scope { previous }
}

/// Restores the previous mode of the thread on drop (see `scope`).
pub struct Bf16Scope {
    previous: Option<bool>,
}

impl Drop for Bf16Scope {
    fn drop(&mut self) {
        OVERRIDE.with(|o| o.set(self.previous));
    }
}

/// `t` with its values rounded to bf16 when `on` and `t` is a host f32 tensor; otherwise `t`
/// itself (a cheap clone).
pub fn round_if(on: bool, t: &Tensor) -> Tensor {
    if !on || t.device() != Device::Cpu || t.dtype() != DType::F32 {
        return t.clone();
    }
    let mut r = t.clone();
    round_slice_bf16(r.host_mut::<f32>());
    r
}
