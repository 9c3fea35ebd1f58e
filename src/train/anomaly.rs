//! The numerics guard's report of a non-finite gradient (`BadGradient`), and a direct check of a
//! parameter store (`non_finite_gradient`).
//!
//! The trainer guards every step on the device without waiting for it (`train::ledger`: one kernel
//! counts NaN/±inf over every gradient and the loss, the update skips while a bad step is recorded,
//! the host reads the record every few steps) and reports it with `BadGradient`. `non_finite_gradient`
//! checks a store on the spot: one pass over the gradients on the CPU; on the GPU one row-norm
//! reduction per tensor read back, with a precise host check only when a norm is not finite (a norm
//! can overflow f32 while every value is finite).

use crate::autograd::anomaly::count_non_finite;
use crate::autograd::{ParamKind, ParamStore};
use crate::ops;
use crate::tensor::{Storage, Tensor};

/// A parameter whose gradient holds non-finite values.
#[derive(Clone, Debug, PartialEq)]
pub struct BadGradient {
    /// The first such parameter in the model's order (reference PyTorch name).
    pub name: String,
    pub nan: usize,
    pub inf: usize,
    pub numel: usize,
    /// How many parameters have a non-finite gradient in all.
    pub tensors: usize,
}

impl std::fmt::Display for BadGradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the gradient of `{}` has {} NaN and {} infinite values of {}",
            self.name, self.nan, self.inf, self.numel
        )?;
        if self.tensors > 1 {
            write!(
                f,
                " ({} parameters have non-finite gradients)",
                self.tensors
            )?;
        }
        Ok(())
    }
}

/// The first trainable parameter with a non-finite gradient, if any.
pub fn non_finite_gradient(store: &ParamStore) -> Option<BadGradient> {
    let mut found: Option<BadGradient> = None;
    for p in store.iter() {
        if p.kind != ParamKind::Trainable {
            continue;
        }
        let Some(g) = &p.grad else { continue };
        if !may_be_non_finite(g) {
            continue;
        }
        let (nan, inf) = count_non_finite(g);
        if nan + inf == 0 {
            continue;
        }
        match &mut found {
            Some(b) => b.tensors += 1,
            None => {
                found = Some(BadGradient {
                    name: p.name.clone(),
                    nan,
                    inf,
                    numel: g.numel(),
                    tensors: 1,
                })
            }
        }
    }
    found
}

/// A cheap test that is true whenever `t` holds a NaN or an infinity (and rarely otherwise).
fn may_be_non_finite(t: &Tensor) -> bool {
    match t.storage() {
        // x·0 is 0 for finite x and NaN for NaN/±inf, so the sum is NaN exactly when a value is not
        // finite; it vectorises and never overflows.
        Storage::F32(v) => v.iter().map(|&x| x * 0.0).sum::<f32>().is_nan(),
        Storage::F64(v) => v.iter().map(|&x| x * 0.0).sum::<f64>().is_nan(),
        // bf16 is NaN/inf exactly when its exponent bits are all ones.
        Storage::Bf16(v) => v.iter().any(|&b| b & 0x7f80 == 0x7f80),
        Storage::Cuda(_) => {
            let rows = t.shape().first().copied().unwrap_or(1).max(1);
            let cols = t.numel() / rows;
            if rows * cols != t.numel() || cols == 0 {
                return true;
            }
            let norms = ops::row_norms_fwd(&t.reshape(&[rows, cols]));
            norms.to_vec_f32().iter().any(|n| !n.is_finite())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::ParamKind;

    fn store_with(grads: &[(&str, ParamKind, Vec<f32>)]) -> ParamStore {
        let mut ps = ParamStore::new();
        for (name, kind, g) in grads {
            let id = ps.add(
                *name,
                Tensor::from_vec(&[g.len()], vec![0.5f32; g.len()]),
                *kind,
            );
            ps.get_mut(id).grad = Some(Tensor::from_vec(&[g.len()], g.clone()));
        }
        ps
    }

    #[test]
    fn finite_gradients_pass_even_when_huge() {
        let ps = store_with(&[
            ("a", ParamKind::Trainable, vec![1.0, -2.0, 3e38, -3e38]),
            ("b", ParamKind::Trainable, vec![0.0, 1e-30]),
        ]);
        assert_eq!(non_finite_gradient(&ps), None);
    }

    #[test]
    fn names_the_first_bad_tensor_and_counts_the_rest() {
        let ps = store_with(&[
            ("ok", ParamKind::Trainable, vec![1.0, 2.0]),
            ("frozen", ParamKind::Frozen, vec![f32::NAN]),
            (
                "layer1.0.conv1.weight",
                ParamKind::Trainable,
                vec![1.0, f32::NAN, f32::INFINITY, f32::NAN],
            ),
            ("fc.weight", ParamKind::Trainable, vec![f32::NEG_INFINITY]),
        ]);
        let bad = non_finite_gradient(&ps).unwrap();
        assert_eq!(bad.name, "layer1.0.conv1.weight");
        assert_eq!((bad.nan, bad.inf, bad.numel, bad.tensors), (2, 1, 4, 2));
        let text = bad.to_string();
        assert!(
            text.contains("layer1.0.conv1.weight") && text.contains("2 parameters"),
            "{text}"
        );
    }
}
