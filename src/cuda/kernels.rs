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
