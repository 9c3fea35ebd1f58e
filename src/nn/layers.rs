//! Layers: parameter ids plus a forward that records on the tape. Parameters live in the `ParamStore`.

use super::init;
use crate::autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// 2-D convolution `{prefix}.weight` [Cout, Cin/groups, k, k] (+ `{prefix}.bias`).
pub struct Conv {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub spec: ops::Conv2dSpec,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
        dtype: DType,
        rng: &mut Rng,
    ) -> Conv {
        let shape = [cout, cin / groups, k, k];
        let weight = ps.add(
            format!("{prefix}.weight"),
            init::default_weight(&shape, dtype, rng),
            ParamKind::Trainable,
        );
        let fan_in = (cin / groups * k * k) as f64;
        let bias = bias.then(|| {
            ps.add(
                format!("{prefix}.bias"),
                init::uniform(&[cout], 1.0 / fan_in.sqrt(), dtype, rng),
                ParamKind::Trainable,
            )
        });
        Conv {
            weight,
            bias,
            spec: ops::Conv2dSpec::new(stride, padding).with_groups(groups),
        }
    }

    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let w = t.param(ps, self.weight);
        let b = self.bias.map(|b| t.param(ps, b));
        let y = ops::conv2d(t, x, &w, b.as_ref(), self.spec);
        super::flops::add(super::flops::conv2d_macs(y.shape(), w.shape()));
        y
    }
}

/// Batch norm 2-d with PyTorch's parameter and buffer names.
pub struct BatchNorm {
    pub ids: ops::BatchNormIds,
}

impl BatchNorm {
    pub fn new(ps: &mut ParamStore, prefix: &str, channels: usize, dtype: DType) -> BatchNorm {
        BatchNorm {
            ids: ops::BatchNormIds::register_as(ps, prefix, channels, dtype),
        }
    }

    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        ops::batch_norm2d(t, ps, x, &self.ids)
    }

    /// relu(bn(x) [+ residual]) as one fused op (`ops::batch_norm2d_relu`).
    pub fn forward_relu(
        &self,
        t: &mut Tape,
        ps: &mut ParamStore,
        x: &Var,
        residual: Option<&Var>,
    ) -> Var {
        ops::batch_norm2d_relu(t, ps, x, &self.ids, residual)
    }
}

/// Fully connected layer `{prefix}.weight` [out, in] and `{prefix}.bias` [out].
pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
}

impl Linear {
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        cin: usize,
        cout: usize,
        bias: bool,
        dtype: DType,
        rng: &mut Rng,
    ) -> Linear {
        let weight = ps.add(
            format!("{prefix}.weight"),
            init::default_weight(&[cout, cin], dtype, rng),
            ParamKind::Trainable,
        );
        let bias = bias.then(|| {
            ps.add(
                format!("{prefix}.bias"),
                init::uniform(&[cout], 1.0 / (cin as f64).sqrt(), dtype, rng),
                ParamKind::Trainable,
            )
        });
        Linear { weight, bias }
    }

    pub fn forward(&self, t: &mut Tape, ps: &ParamStore, x: &Var) -> Var {
        let w = t.param(ps, self.weight);
        let b = self.bias.map(|b| t.param(ps, b));
        let (rows, cols) = (x.shape()[0], w.shape()[0]);
        super::flops::add(super::flops::matmul_macs(rows, w.shape()[1], cols));
        ops::linear(t, x, &w, b.as_ref())
    }
}

/// Transposes a host or device 2-D tensor (used once, for the frozen head's two layouts).
pub fn transpose2d(x: &Tensor) -> Tensor {
    let (r, c) = (x.dim(0), x.dim(1));
    let v = x.to_vec_f64();
    let mut out = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    Tensor::from_f64_as(&[c, r], &out, x.dtype()).to_device(x.device())
}
