//! Anomaly detection on the tape (`podgpu train --detect-anomaly`): every op's output and, during
//! backward, every gradient an op hands to its inputs is checked for NaN and ±inf, and the first one
//! found is recorded with the op that produced it. Slow (each value is scanned, and GPU values are
//! copied to the host), so it is off unless asked for.
//!
//! Ops are named without changing `Tape::op`'s signature: the closure each op passes to `Tape::op`
//! is a distinct type whose name is the path of the function that defines it
//! (`podgpu::ops::conv::conv2d::{{closure}}`), which `op_name` trims to `ops::conv::conv2d`.

use crate::tensor::{Storage, Tensor};
use std::fmt;

/// Where a non-finite value first appeared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The op's output in the forward pass.
    Forward,
    /// The gradient the op's backward computed for its input `input` (0-based).
    Backward { input: usize },
}

/// The first non-finite value found on a tape.
#[derive(Clone, Debug, PartialEq)]
pub struct Anomaly {
    /// The op, e.g. `ops::conv::conv2d`.
    pub op: &'static str,
    pub phase: Phase,
    /// Position of the op on the tape (0 = first value recorded).
    pub node: usize,
    pub shape: Vec<usize>,
    pub nan: usize,
    pub inf: usize,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.phase {
            Phase::Forward => format!("the output of `{}` (forward)", self.op),
            Phase::Backward { input } => {
                format!(
                    "the gradient `{}` computed for its input {input} (backward)",
                    self.op
                )
            }
        };
        write!(
            f,
            "the first non-finite value appeared in {what}, tape node {}: {} NaN and {} infinite of \
             {} values, shape {:?}",
            self.node,
            self.nan,
            self.inf,
            self.shape.iter().product::<usize>(),
            self.shape
        )
    }
}

/// The name of the op whose `make_backward` closure has type `F`: the defining function's path
/// without the crate name and the closure suffixes.
pub fn op_name<F>() -> &'static str {
    let full = std::any::type_name::<F>();
    let mut name = full;
    while let Some(stripped) = name.strip_suffix("::{{closure}}") {
        name = stripped;
    }
    name.strip_prefix("podgpu::").unwrap_or(name)
}

/// (NaN count, infinity count) of a tensor's values; (0, 0) when all are finite.
pub fn count_non_finite(t: &Tensor) -> (usize, usize) {
    fn count<I: Iterator<Item = f64>>(values: I) -> (usize, usize) {
        values.fold((0, 0), |(nan, inf), v| {
            (nan + v.is_nan() as usize, inf + v.is_infinite() as usize)
        })
    }
    match t.storage() {
        Storage::F32(v) => count(v.iter().map(|&x| x as f64)),
        Storage::F64(v) => count(v.iter().copied()),
        Storage::Bf16(_) | Storage::Cuda(_) => count(t.to_vec_f32().into_iter().map(|x| x as f64)),
    }
}

/// An anomaly record for `t` when it holds a non-finite value.
pub(super) fn check(t: &Tensor, op: &'static str, phase: Phase, node: usize) -> Option<Anomaly> {
    let (nan, inf) = count_non_finite(t);
    (nan + inf > 0).then(|| Anomaly {
        op,
        phase,
        node,
        shape: t.shape().to_vec(),
        nan,
        inf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_types_name_their_function() {
        fn some_op() -> &'static str {
            fn name_of<F>(_: &F) -> &'static str {
                op_name::<F>()
            }
            let c = || 1;
            name_of(&c)
        }
        assert_eq!(
            some_op(),
            "autograd::anomaly::tests::closure_types_name_their_function::some_op"
        );
    }

    #[test]
    fn counts_nan_and_inf() {
        let t = Tensor::from_vec(&[4], vec![1.0f32, f32::NAN, f32::INFINITY, -f32::INFINITY]);
        assert_eq!(count_non_finite(&t), (1, 2));
        let t = Tensor::from_vec(&[2], vec![1.0f64, -2.0]);
        assert_eq!(count_non_finite(&t), (0, 0));
    }
}
