//! Every op of the engine, one family per file. Each file holds, side by side:
//! - the tape-level function (`relu(tape, &x) -> Var`) that records the backward closure,
//! - the tensor-level entry points (`relu_fwd`, `relu_bwd`) that dispatch on the device,
//! - the generic host kernels (f32 for training, f64 for gradient checks),
//! - the call into the CUDA launcher for GPU tensors.
//!
//! The host kernel of an op is the reference its CUDA kernel is tested against.

/// Runs an op on the device of its leading tensor: the host kernel `$host::<T>` for f32/f64 host
/// tensors, the CUDA launcher `$cuda` for GPU tensors.
macro_rules! dispatch {
    ($lead:expr, $host:ident, $cuda:expr $(, $arg:expr)* $(,)?) => {
        match ($lead.device(), $lead.dtype()) {
            ($crate::tensor::Device::Cpu, $crate::tensor::DType::F32) => $host::<f32>($($arg),*),
            ($crate::tensor::Device::Cpu, $crate::tensor::DType::F64) => $host::<f64>($($arg),*),
            ($crate::tensor::Device::Cpu, $crate::tensor::DType::Bf16) => panic!(
                "{}: a bf16 host tensor {:?} is storage only; the CPU computes in f32 (convert with \
                 to_dtype(DType::F32); the bf16 emulation rounds f32 values, see cpu::bf16)",
                stringify!($host),
                $lead
            ),
            ($crate::tensor::Device::Cuda(_), _) => $cuda($($arg),*),
        }
    };
}
// Lets op families outside `ops` (the losses) use the same dispatch: `use crate::ops::dispatch;`.
pub(crate) use dispatch;

mod batchnorm;
mod concat;
mod conv;
mod elementwise;
mod layout;
mod linear;
mod normalize;
mod pool;
mod precision;
mod tokens;
mod transformer;

pub use batchnorm::*;
pub use concat::*;
pub use conv::*;
pub use elementwise::*;
pub use layout::*;
pub use linear::*;
pub use normalize::*;
pub use pool::*;
pub use precision::*;
pub use tokens::*;
pub use transformer::*;

use crate::tensor::{Layout, Tensor};

/// Panics unless all tensors share device, dtype and layout (mixing them is a bug in the caller).
pub fn assert_same_place(op: &str, ts: &[&Tensor]) {
    let (d, t, l) = (ts[0].device(), ts[0].dtype(), ts[0].layout());
    for x in ts {
        assert!(
            x.device() == d && x.dtype() == t,
            "{op}: tensors on different devices or dtypes ({:?} vs {:?})",
            ts[0],
            x
        );
        assert!(
            x.layout() == l,
            "{op}: tensors in different layouts ({:?} in {} vs {:?} in {})",
            ts[0],
            l.name(),
            x,
            x.layout().name()
        );
    }
}

/// Panics unless every host tensor is NCHW: the host kernels index images by (n, c, h, w) in
/// that order, while their CUDA arms take NCHW or NHWC (`ops::gpu_nhwc`) and check it themselves.
pub fn expect_host_nchw(op: &str, ts: &[&Tensor]) {
    let host: Vec<&Tensor> = ts.iter().copied().filter(|t| !t.is_cuda()).collect();
    expect_layout(op, Layout::RowMajor, &host);
}

/// Panics unless every tensor is in `layout`: the ops that index images by (n, c, h, w) say
/// which memory order they were written for instead of assuming it.
pub fn expect_layout(op: &str, layout: Layout, ts: &[&Tensor]) {
    for x in ts {
        assert!(
            x.layout() == layout,
            "{op}: expects {} tensors, got {:?} in {}; convert with to_layout(Layout::{:?})",
            layout.name(),
            x,
            x.layout().name(),
            layout
        );
    }
}
