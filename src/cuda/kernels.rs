//! Launchers for podgpu's own CUDA kernels (sources in `cuda/*.cu`).
#![allow(unused_variables)]

use super::not_yet;
use crate::tensor::Tensor;

pub fn add(a: &Tensor, b: &Tensor) -> Tensor { not_yet("add") }
pub fn scale(x: &Tensor, s: f64) -> Tensor { not_yet("scale") }
pub fn relu(x: &Tensor) -> Tensor { not_yet("relu") }
pub fn relu_bwd(y: &Tensor, dy: &Tensor) -> Tensor { not_yet("relu_bwd") }
pub fn relu6(x: &Tensor) -> Tensor { not_yet("relu6") }
pub fn relu6_bwd(y: &Tensor, dy: &Tensor) -> Tensor { not_yet("relu6_bwd") }
pub fn matmul(a: &Tensor, ta: bool, b: &Tensor, tb: bool, m: usize, k: usize, n: usize) -> Tensor { not_yet("matmul") }
pub fn bias_add(y: &Tensor, b: &Tensor) -> Tensor { not_yet("bias_add") }
pub fn sum_rows(x: &Tensor) -> Tensor { not_yet("sum_rows") }

// ---- optimizer (train helper) ----
/// SGD update in place (see `crate::optim::sgd_update` for the math and the host reference):
/// creates `buf` from the gradient when it is `None` and `momentum > 0`.
#[allow(clippy::too_many_arguments)]
pub fn sgd_update(w: &mut Tensor, grad: &Tensor, buf: &mut Option<Tensor>, lr: f64, momentum: f64, weight_decay: f64, nesterov: bool) { not_yet("sgd_update") }
