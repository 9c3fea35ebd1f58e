//! Parameter initialisation, matching PyTorch's defaults so that podgpu's runs start where the
//! reference code's do: `kaiming_uniform_(a=√5)` for conv and linear weights, i.e. U(−1/√fan_in, 1/√fan_in),
//! the same bound for linear biases.

use crate::rng::Rng;
use crate::tensor::{numel, DType, Tensor};

/// U(−bound, bound) values of the given shape.
pub fn uniform(shape: &[usize], bound: f64, dtype: DType, rng: &mut Rng) -> Tensor {
    let v: Vec<f64> = (0..numel(shape))
        .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
        .collect();
    Tensor::from_f64_as(shape, &v, dtype)
}

/// PyTorch's default for `nn.Conv2d` / `nn.Linear` weights: fan_in = product of all dims but the first.
pub fn default_weight(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
    let fan_in: usize = shape[1..].iter().product();
    uniform(shape, 1.0 / (fan_in as f64).sqrt(), dtype, rng)
}
