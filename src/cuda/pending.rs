//! CUDA arms of ops that are not yet wired to a launcher. Each panics with a message naming the op
//! and telling the user to run with `--device cpu`; the trainer refuses `--device cuda` until the
//! whole training step is wired, so users meet these only through the library API.
#![allow(unused_variables)]

use super::not_yet;
use crate::tensor::Tensor;

// ---- optimizer (train helper) ----
/// SGD update in place (see `crate::optim::sgd_update` for the math and the host reference):
/// creates `buf` from the gradient when it is `None` and `momentum > 0`.
#[allow(clippy::too_many_arguments)]
pub fn sgd_update(w: &mut Tensor, grad: &Tensor, buf: &mut Option<Tensor>, lr: f64, momentum: f64, weight_decay: f64, nesterov: bool) { not_yet("sgd_update") }
// ---- loss ops (loss helper) ----
pub fn row_normalize(x: &Tensor) -> Tensor { not_yet("row_normalize") }
pub fn row_normalize_bwd(x: &Tensor, dy: &Tensor) -> Tensor { not_yet("row_normalize_bwd") }
pub fn row_norms(x: &Tensor) -> Tensor { not_yet("row_norms") }
pub fn scale_by_scalar(x: &Tensor, s: &Tensor) -> Tensor { not_yet("scale_by_scalar") }
pub fn argmax_rows(logits: &Tensor) -> Tensor { not_yet("argmax_rows") }
pub fn nac(x: &Tensor, p: &Tensor, labels: &Tensor, delta: f64, variant: crate::loss::Variant, with_grad: bool) -> (Tensor, Option<Tensor>) { not_yet("nac") }
pub fn sub_class_centroids(xn: &Tensor, p: &Tensor, labels: &Tensor) -> Tensor { not_yet("sub_class_centroids") }
pub fn col_sumsq(d: &Tensor) -> Tensor { not_yet("col_sumsq") }
pub fn sc_value(m: &Tensor, s: &Tensor, coef: f64) -> Tensor { not_yet("sc_value") }
pub fn sc_grad(md: &Tensor, d: &Tensor, s: &Tensor, g: &Tensor, coef4: f64) -> Tensor { not_yet("sc_grad") }
pub fn softmax_ce(logits: &Tensor, labels: &Tensor, with_grad: bool) -> (Tensor, Option<Tensor>) { not_yet("softmax_ce") }

// ---- CNN ops (ops helper) ----
use crate::ops::{BatchNormGrads, BatchNormTrainOut, Conv2dSpec, Pool2dSpec};
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, spec: Conv2dSpec) -> Tensor { not_yet("conv2d") }
pub fn conv2d_bwd_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], spec: Conv2dSpec) -> Tensor { not_yet("conv2d_bwd_data") }
pub fn conv2d_bwd_weight(x: &Tensor, dy: &Tensor, w_shape: &[usize], spec: Conv2dSpec) -> Tensor { not_yet("conv2d_bwd_weight") }
pub fn conv2d_bwd_bias(dy: &Tensor) -> Tensor { not_yet("conv2d_bwd_bias") }
pub fn batch_norm2d_train(x: &Tensor, weight: &Tensor, bias: &Tensor, running_mean: &Tensor, running_var: &Tensor, momentum: f64, eps: f64) -> BatchNormTrainOut { not_yet("batch_norm2d_train") }
pub fn batch_norm2d_train_bwd(x: &Tensor, dy: &Tensor, weight: &Tensor, mean: &Tensor, invstd: &Tensor) -> BatchNormGrads { not_yet("batch_norm2d_train_bwd") }
pub fn batch_norm2d_eval(x: &Tensor, weight: &Tensor, bias: &Tensor, running_mean: &Tensor, running_var: &Tensor, eps: f64) -> Tensor { not_yet("batch_norm2d_eval") }
pub fn batch_norm2d_eval_bwd(x: &Tensor, dy: &Tensor, weight: &Tensor, running_mean: &Tensor, running_var: &Tensor, eps: f64) -> BatchNormGrads { not_yet("batch_norm2d_eval_bwd") }
pub fn increment(x: &Tensor) -> Tensor { not_yet("increment") }
pub fn max_pool2d(x: &Tensor, spec: Pool2dSpec) -> Tensor { not_yet("max_pool2d") }
pub fn max_pool2d_bwd(x: &Tensor, y: &Tensor, dy: &Tensor, spec: Pool2dSpec) -> Tensor { not_yet("max_pool2d_bwd") }
pub fn avg_pool2d(x: &Tensor, spec: Pool2dSpec) -> Tensor { not_yet("avg_pool2d") }
pub fn avg_pool2d_bwd(dy: &Tensor, x_shape: &[usize], spec: Pool2dSpec) -> Tensor { not_yet("avg_pool2d_bwd") }
pub fn global_avg_pool(x: &Tensor) -> Tensor { not_yet("global_avg_pool") }
pub fn global_avg_pool_bwd(dy: &Tensor, x_shape: &[usize]) -> Tensor { not_yet("global_avg_pool_bwd") }
pub fn concat_channels(xs: &[&Tensor]) -> Tensor { not_yet("concat_channels") }
pub fn split_channels(x: &Tensor, sizes: &[usize]) -> Vec<Tensor> { not_yet("split_channels") }
