//! The baseline losses of the paper's Table IV, beside POD: Center Loss, the margin softmaxes
//! (AM-Softmax, ArcFace, combined margin), COT's complement entropy, PEDCC-Loss and the Cosine Loss.
//! Softmax CE, NaC and POD live one level up. Each is a fused op with a generic host kernel (f32 for
//! training, f64 for the finite-difference tests). Their CUDA arms are `on_host` fallbacks for now: the
//! host kernel on f32 copies of the (small, B×K or B×n) inputs, results copied back to the device. Exact,
//! but each costs a device synchronisation and two small copies per step; own kernels can replace them
//! one by one.

mod center;
mod cosine;
mod cot;
mod margin;
mod pedcc_loss;

pub use center::{center_loss, center_loss_fwd, center_update_fwd};
pub use cosine::{cosine_loss, cosine_loss_fwd};
pub use cot::{complement_entropy, complement_entropy_fwd};
pub use margin::{margin_softmax_ce, margin_softmax_ce_fwd, Margin};
pub use pedcc_loss::{pedcc_loss, scalar_pow, scalar_pow_fwd, PedccLoss, PedccLossConfig};

use crate::tensor::{Device, Tensor};

/// A GPU tensor's host copy (f32), for the `on_host` CUDA arms.
pub(crate) fn host_copy(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu)
}

/// The result of an `on_host` arm back on the device of `like`.
pub(crate) fn back_to(t: Tensor, like: &Tensor) -> Tensor {
    t.to_device(like.device())
}
