//! Memory layout on the tape: NCHW (`Layout::RowMajor`) everywhere by default, channels-last
//! (`Layout::Nhwc`) on a GPU when asked for.
//!
//! With `PODGPU_GPU_LAYOUT=nhwc` (or `nhwc_scope(true)` on a thread) a network's input on a GPU
//! is reordered to NHWC once (`gpu_input_layout`), and every op after it keeps NHWC: cuDNN's
//! convolutions and batch norms get NHWC descriptors (the weights are reordered KCRS → KRSC per
//! step, their gradients back to the master weights' KCRS), the pools read NHWC (`cuda::nhwc`),
//! elementwise ops do not care; the global pool's [N, C] features have no layout. Host ops stay
//! NCHW (the CPU is the reference and has no NHWC kernels), so the switch changes nothing on the
//! CPU. It is opt-in until a GPU run measures it faster than NCHW (docs/GPU.md, "fast path").

use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::tensor::{Layout, Tensor};
use std::cell::Cell;

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether GPU activations are kept channels-last on this thread (`PODGPU_GPU_LAYOUT=nhwc`, or
/// `nhwc_scope`).
pub fn gpu_nhwc() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    OVERRIDE.with(Cell::get).unwrap_or_else(|| {
        *ENV.get_or_init(|| std::env::var("PODGPU_GPU_LAYOUT").is_ok_and(|v| v == "nhwc"))
    })
}

/// Sets this thread's GPU layout switch until the guard drops (tests, benchmarks).
#[must_use = "the switch is restored when the guard drops"]
pub fn nhwc_scope(on: bool) -> NhwcScope {
    NhwcScope {
        previous: OVERRIDE.with(|o| o.replace(Some(on))),
    }
}

/// Restores the previous switch on drop (see `nhwc_scope`).
pub struct NhwcScope {
    previous: Option<bool>,
}

impl Drop for NhwcScope {
    fn drop(&mut self) {
        OVERRIDE.with(|o| o.set(self.previous));
    }
}

/// A 4-d tensor's values reordered into `layout` (a copy; the same tensor when already there): on
/// the host by `Tensor::to_layout`, on a GPU by `cuda::nhwc::to_layout` (f32 or bf16).
pub fn to_layout_fwd(x: &Tensor, layout: Layout) -> Tensor {
    if x.layout() == layout {
        return x.clone();
    }
    if x.is_cuda() {
        cuda::nhwc::to_layout(x, layout)
    } else {
        x.to_layout(layout)
    }
}

/// `to_layout_fwd` on the tape; the gradient goes back in x's layout.
pub fn to_layout(t: &mut Tape, x: &Var, layout: Layout) -> Var {
    let from = x.value().layout();
    if from == layout {
        return x.clone();
    }
    let y = to_layout_fwd(x.value(), layout);
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(to_layout_fwd(g, from))])
    })
}

/// A network's image input in the layout its GPU ops keep: NHWC when it is a 4-d GPU tensor and
/// `gpu_nhwc()` is on, else as it is.
pub fn gpu_input_layout(t: &mut Tape, x: &Var) -> Var {
    if x.value().is_cuda() && x.value().rank() == 4 && gpu_nhwc() {
        to_layout(t, x, Layout::Nhwc)
    } else {
        x.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tape op reorders forward and hands the gradient back in the input's layout, as the
    /// transpose it is: ⟨to_layout(x), g⟩ = ⟨x, to_layout⁻¹(g)⟩ for any g.
    #[test]
    fn to_layout_on_the_tape_is_its_own_adjoint() {
        let shape = [2, 3, 4, 5];
        let n: usize = shape.iter().product();
        let x = Tensor::from_vec(&shape, (0..n).map(|i| (i as f64 * 0.7).sin()).collect());
        let g = Tensor::from_vec(&shape, (0..n).map(|i| (i as f64 * 1.3).cos()).collect())
            .with_layout(Layout::Nhwc);
        let mut t = Tape::train();
        let xv = t.leaf(x.clone());
        let y = to_layout(&mut t, &xv, Layout::Nhwc);
        assert_eq!(y.value().layout(), Layout::Nhwc);
        assert_eq!(
            y.value().to_vec_f64(),
            x.to_layout(Layout::Nhwc).to_vec_f64()
        );
        t.backward_with(&y, g.clone(), &mut crate::autograd::ParamStore::new());
        let dx = t.grad_of(&xv).unwrap();
        assert_eq!(dx.layout(), Layout::RowMajor);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        let lhs = dot(&y.value().to_vec_f64(), &g.to_vec_f64());
        let rhs = dot(&x.to_vec_f64(), &dx.to_vec_f64());
        assert!((lhs - rhs).abs() < 1e-12, "{lhs} vs {rhs}");
        // An input already in the layout records nothing.
        assert_eq!(
            to_layout(&mut t, &xv, Layout::RowMajor).value().layout(),
            Layout::RowMajor
        );
    }

    #[test]
    fn the_gpu_layout_switch_leaves_host_tensors_alone() {
        let _on = nhwc_scope(true);
        assert!(gpu_nhwc());
        let mut t = Tape::train();
        let x = t.constant(Tensor::from_vec(&[1, 2, 2, 2], vec![0.0f32; 8]));
        assert_eq!(
            gpu_input_layout(&mut t, &x).value().layout(),
            Layout::RowMajor
        );
        drop(_on);
        let other = std::thread::spawn(|| {
            let _off = nhwc_scope(false);
            gpu_nhwc()
        });
        assert!(!other.join().unwrap());
    }
}
