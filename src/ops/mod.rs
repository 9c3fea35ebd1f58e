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
mod linear;
mod normalize;
mod pool;
mod tokens;
mod transformer;

pub use batchnorm::*;
pub use concat::*;
pub use conv::*;
pub use elementwise::*;
pub use linear::*;
pub use normalize::*;
pub use pool::*;
pub use tokens::*;
pub use transformer::*;

use crate::tensor::Tensor;

/// Panics unless all tensors share device and dtype (mixing them is a bug in the caller).
pub fn assert_same_place(op: &str, ts: &[&Tensor]) {
    let (d, t) = (ts[0].device(), ts[0].dtype());
    for x in ts {
        assert!(
            x.device() == d && x.dtype() == t,
            "{op}: tensors on different devices or dtypes ({:?} vs {:?})",
            ts[0],
            x
        );
    }
}
