//! The baseline losses of the paper's Table IV, beside POD: Center Loss, the margin softmaxes
//! (AM-Softmax, ArcFace, combined margin), COT's complement entropy, PEDCC-Loss and the Cosine Loss.
//! Softmax CE, NaC and POD live one level up. Each is a fused op with a generic host kernel (f32 for
//! training, f64 for the finite-difference tests) and a CUDA kernel in `cuda/baselines.cu` (launchers in
//! `cuda::baseline_kernels`), so that a GPU step with any of them copies nothing to the host.

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
