//! Gradient clipping by global norm (PyTorch's `clip_grad_norm_`): every trainable gradient is
//! multiplied by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the L2 norm of all of them together. On a GPU
//! the norm and the factor stay on the device (no wait).

use crate::autograd::{ParamKind, ParamStore};
use crate::tensor::{DType, Elem, Tensor};

/// Clips the gradients in place. Returns the norm when it was computed on the host (CPU), None on a
/// GPU (it stays there).
pub fn clip_grad_norm(store: &mut ParamStore, max_norm: f64) -> Option<f64> {
    let on_gpu = store
        .iter()
        .any(|p| p.grad.as_ref().is_some_and(|g| g.is_cuda()));
    if on_gpu {
        let grads: Vec<&Tensor> = store
            .iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .filter_map(|p| p.grad.as_ref())
            .collect();
        if grads.is_empty() {
            return None;
        }
        let coef = crate::cuda::adamw::clip_coef(&grads, max_norm);
        for p in store.iter_mut().filter(|p| p.kind == ParamKind::Trainable) {
            if let Some(g) = &p.grad {
                p.grad = Some(crate::cuda::nn_kernels::scale_by(g, &coef));
            }
        }
        return None;
    }
    let mut sumsq = 0.0f64;
    for p in store.iter().filter(|p| p.kind == ParamKind::Trainable) {
        if let Some(g) = &p.grad {
            sumsq += match g.dtype() {
                DType::F32 => sq::<f32>(g),
                DType::F64 => sq::<f64>(g),
                DType::Bf16 => panic!(
                    "clip: gradient of {} is bf16, but gradients are reduced into f32",
                    p.name
                ),
            };
        }
    }
    let norm = sumsq.sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    for p in store.iter_mut().filter(|p| p.kind == ParamKind::Trainable) {
        if let Some(g) = &p.grad {
            p.grad = Some(crate::ops::scale_fwd(g, coef));
        }
    }
    Some(norm)
}

fn sq<T: Elem>(g: &Tensor) -> f64 {
    g.host::<T>().iter().map(|&v| v.f64() * v.f64()).sum()
}
