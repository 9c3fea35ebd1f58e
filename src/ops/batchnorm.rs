//! Batch normalisation over the channels of NCHW tensors, as PyTorch's `BatchNorm2d`.
//!
//! Training mode normalises with the batch statistics (biased variance), back-propagates through them,
//! and updates the running statistics in the parameter store: `running = (1 − m)·running + m·batch`
//! with momentum m = 0.1 and the *unbiased* batch variance, and `num_batches_tracked += 1`.
//! Evaluation mode normalises with the running statistics: a per-channel affine map.
//!
//! The tensor-level entry points mirror cuDNN's (`BatchNormalizationForwardTraining` returns the saved
//! mean and inverse standard deviation and the new running statistics; the backward takes them back).

use super::{assert_same_place, expect_host_nchw, store_bf16};
use crate::autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{DType, Device, Elem, Layout, Tensor};
use rayon::prelude::*;

/// PyTorch's defaults for `BatchNorm2d`.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// The five tensors of one batch-norm layer in a `ParamStore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchNormIds {
    /// γ, trainable, initialised to 1.
    pub weight: ParamId,
    /// β, trainable, initialised to 0.
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    /// A 1-element tensor of the parameters' dtype counting training steps (PyTorch keeps an int64).
    pub num_batches_tracked: ParamId,
}

impl BatchNormIds {
    /// Registers `{prefix}.weight`, `.bias`, `.running_mean`, `.running_var`, `.num_batches_tracked`
    /// as f32 host tensors with PyTorch's initial values. `ParamStore::to_dtype` converts them for f64
    /// gradient checks.
    pub fn register(store: &mut ParamStore, prefix: &str, channels: usize) -> BatchNormIds {
        BatchNormIds::register_as(store, prefix, channels, DType::F32)
    }

    /// `register` with an explicit dtype.
    pub fn register_as(
        store: &mut ParamStore,
        prefix: &str,
        channels: usize,
        dtype: DType,
    ) -> BatchNormIds {
        let c = [channels];
        let full = |v: f64, shape: &[usize]| Tensor::full(shape, v, dtype, Device::Cpu);
        BatchNormIds {
            weight: store.add(
                format!("{prefix}.weight"),
                full(1.0, &c),
                ParamKind::Trainable,
            ),
            bias: store.add(
                format!("{prefix}.bias"),
                full(0.0, &c),
                ParamKind::Trainable,
            ),
            running_mean: store.add(
                format!("{prefix}.running_mean"),
                full(0.0, &c),
                ParamKind::Buffer,
            ),
            running_var: store.add(
                format!("{prefix}.running_var"),
                full(1.0, &c),
                ParamKind::Buffer,
            ),
            num_batches_tracked: store.add(
                format!("{prefix}.num_batches_tracked"),
                full(0.0, &[]), // a scalar, like PyTorch's state_dict
                ParamKind::Buffer,
            ),
        }
    }
}

/// Everything a training-mode forward produces.
pub struct BatchNormTrainOut {
    pub y: Tensor,
    /// Batch mean per channel [C] (saved for backward).
    pub mean: Tensor,
    /// 1/√(biased batch variance + eps) per channel [C] (saved for backward).
    pub invstd: Tensor,
    /// Updated running statistics [C].
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// Gradients of a batch-norm layer.
pub struct BatchNormGrads {
    pub dx: Tensor,
    pub dweight: Tensor,
    pub dbias: Tensor,
}

fn check_shapes(op: &str, x: &Tensor, per_channel: &[&Tensor]) {
    assert_eq!(x.rank(), 4, "{op}: input must be NCHW, got {:?}", x.shape());
    expect_host_nchw(op, &[x]);
    for p in per_channel {
        assert_eq!(
            p.shape(),
            &[x.dim(1)],
            "{op}: per-channel tensor {:?} for input {:?}",
            p.shape(),
            x.shape()
        );
    }
    if per_channel.is_empty() {
        return;
    }
    // Per-channel tensors are 1-d (no image layout) and share a device and dtype with x, except
    // that a bf16 x (the GPU's bf16 step) has f32 parameters and statistics.
    assert_same_place(op, per_channel);
    let p = per_channel[0];
    assert_eq!(
        p.device(),
        x.device(),
        "{op}: {p:?} and input {x:?} on different devices"
    );
    let want = match x.dtype() {
        DType::Bf16 => {
            assert!(
                x.is_cuda(),
                "{op}: a bf16 host tensor {x:?} is storage only"
            );
            DType::F32
        }
        d => d,
    };
    assert_eq!(p.dtype(), want, "{op}: per-channel {p:?} for input {x:?}");
}

// ---- tensor-level entry points ----

/// Training-mode forward: normalise with batch statistics and compute new running statistics.
pub fn batch_norm2d_train_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> BatchNormTrainOut {
    check_shapes(
        "batch_norm2d",
        x,
        &[weight, bias, running_mean, running_var],
    );
    let per_channel = x.dim(0) * x.dim(2) * x.dim(3);
    assert!(
        per_channel > 1,
        "batch_norm2d: training needs more than one value per channel, got input {:?} \
         (use a batch of at least 2, or evaluation mode)",
        x.shape()
    );
    dispatch!(
        x,
        bn_train_fwd_host,
        bn_train_fwd_cuda,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps
    )
}

/// Training-mode backward, through the batch statistics.
pub fn batch_norm2d_train_bwd(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> BatchNormGrads {
    check_shapes("batch_norm2d_train_bwd", x, &[weight, mean, invstd]);
    assert_eq!(x.shape(), dy.shape(), "batch_norm2d_train_bwd: dy shape");
    dispatch!(
        x,
        bn_train_bwd_host,
        bn_train_bwd_cuda,
        x,
        dy,
        weight,
        mean,
        invstd
    )
}

/// Evaluation-mode forward: normalise with the running statistics.
pub fn batch_norm2d_eval_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Tensor {
    check_shapes(
        "batch_norm2d",
        x,
        &[weight, bias, running_mean, running_var],
    );
    dispatch!(
        x,
        bn_eval_fwd_host,
        bn_eval_fwd_cuda,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        eps
    )
}

/// Evaluation-mode backward: the gradient of a per-channel affine map.
pub fn batch_norm2d_eval_bwd(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> BatchNormGrads {
    check_shapes(
        "batch_norm2d_eval_bwd",
        x,
        &[weight, running_mean, running_var],
    );
    assert_eq!(x.shape(), dy.shape(), "batch_norm2d_eval_bwd: dy shape");
    dispatch!(
        x,
        bn_eval_bwd_host,
        bn_eval_bwd_cuda,
        x,
        dy,
        weight,
        running_mean,
        running_var,
        eps
    )
}

/// x + 1 for a 1-element counter (num_batches_tracked), on its own device.
pub fn increment_fwd(x: &Tensor) -> Tensor {
    assert_eq!(
        x.numel(),
        1,
        "increment of a tensor of shape {:?}",
        x.shape()
    );
    dispatch!(x, increment_host, increment_cuda, x)
}

/// A training step's new running statistics into the store, and one more batch counted in
/// `num_batches_tracked` (as PyTorch's BatchNorm2d does). Written into the store's own buffers
/// (`ParamStore::assign_value`), so they keep their addresses from step to step: a captured CUDA
/// graph (`cuda::graph`) reads and updates the same memory at every replay. Callers drop their
/// clones of the old values first, or the write goes to a copy.
pub fn store_running_stats(
    store: &mut ParamStore,
    bn: &BatchNormIds,
    running_mean: Tensor,
    running_var: Tensor,
) {
    store.assign_value(bn.running_mean, &running_mean);
    store.assign_value(bn.running_var, &running_var);
    let count = increment_fwd(store.value(bn.num_batches_tracked));
    store.assign_value(bn.num_batches_tracked, &count);
}

// ---- tape-level op ----

/// Batch norm in the tape's mode (`tape.is_training()`); training mode updates the running statistics
/// in `store`, like a PyTorch module in `train()` mode, whether or not the tape records.
pub fn batch_norm2d(t: &mut Tape, store: &mut ParamStore, x: &Var, bn: &BatchNormIds) -> Var {
    let training = t.is_training();
    batch_norm2d_in_mode(t, store, x, bn, training)
}

/// Batch norm in an explicit mode (gradient checks of evaluation mode on a recording tape).
pub fn batch_norm2d_in_mode(
    t: &mut Tape,
    store: &mut ParamStore,
    x: &Var,
    bn: &BatchNormIds,
    training: bool,
) -> Var {
    // `--sync-bn` on several ranks: statistics over the global batch (dist::sync_bn).
    if training && crate::dist::sync_bn::is_active() {
        return crate::dist::sync_bn::batch_norm2d(t, store, x, bn);
    }
    let gamma = t.param(store, bn.weight);
    let beta = t.param(store, bn.bias);
    let rm = store.value(bn.running_mean).clone();
    let rv = store.value(bn.running_var).clone();
    let sx = x.value().clone();
    let sg = gamma.value().clone();
    // On the bf16 path y, dy and dx are bf16 (`store_bf16`); statistics, dγ and dβ stay f32.
    let bf16 = cpu::bf16::emulating();
    if training {
        let out = batch_norm2d_train_fwd(
            x.value(),
            gamma.value(),
            beta.value(),
            &rm,
            &rv,
            BN_MOMENTUM,
            BN_EPS,
        );
        // The clones share the store's buffers: dropped so that the new statistics are written
        // in place rather than into copies.
        drop((rm, rv));
        store_running_stats(store, bn, out.running_mean, out.running_var);
        let (mean, invstd) = (out.mean, out.invstd);
        let y = store_bf16(bf16, &out.y);
        t.op(y, &[x, &gamma, &beta], move || {
            Box::new(move |g, needs| {
                let g = &store_bf16(bf16, g);
                let d = batch_norm2d_train_bwd(&sx, g, &sg, &mean, &invstd);
                vec![
                    needs[0].then(|| store_bf16(bf16, &d.dx)),
                    needs[1].then_some(d.dweight),
                    needs[2].then_some(d.dbias),
                ]
            })
        })
    } else {
        let y = batch_norm2d_eval_fwd(x.value(), gamma.value(), beta.value(), &rm, &rv, BN_EPS);
        let y = store_bf16(bf16, &y);
        t.op(y, &[x, &gamma, &beta], move || {
            Box::new(move |g, needs| {
                let g = &store_bf16(bf16, g);
                let d = batch_norm2d_eval_bwd(&sx, g, &sg, &rm, &rv, BN_EPS);
                vec![
                    needs[0].then(|| store_bf16(bf16, &d.dx)),
                    needs[1].then_some(d.dweight),
                    needs[2].then_some(d.dbias),
                ]
            })
        })
    }
}

/// `batch_norm2d_relu` on a GPU through cuDNN's fused call (`cuda::dnn::bn_relu_fwd_train`):
/// training mode, channels-last activations, f32 or bf16 storage, no `--sync-bn`, not turned off
/// with `PODGPU_CPU_UNFUSED_BN`. `None` (nothing recorded, nothing updated) where cuDNN does not
/// fuse the shape; the caller then runs the other paths.
fn cudnn_fused(
    t: &mut Tape,
    store: &mut ParamStore,
    x: &Var,
    bn: &BatchNormIds,
    residual: Option<&Var>,
    bf16: bool,
) -> Option<Var> {
    let xv = x.value();
    let applies = t.is_training()
        && xv.is_cuda()
        && xv.layout() == Layout::Nhwc
        && xv.rank() == 4
        && !crate::dist::sync_bn::is_active()
        && !unfused_requested()
        && residual.is_none_or(|r| {
            let r = r.value();
            r.shape() == xv.shape() && r.dtype() == xv.dtype() && r.layout() == xv.layout()
        });
    if !applies {
        return None;
    }
    let out = cuda::dnn::bn_relu_fwd_train(
        xv,
        residual.map(|r| r.value()),
        store.value(bn.weight),
        store.value(bn.bias),
        store.value(bn.running_mean),
        store.value(bn.running_var),
        BN_MOMENTUM,
        BN_EPS,
    )?;
    store_running_stats(store, bn, out.running_mean, out.running_var);
    let gamma = t.param(store, bn.weight);
    let beta = t.param(store, bn.bias);
    let (sx, sy) = (xv.clone(), out.y.clone());
    let (sg, sb) = (gamma.value().clone(), beta.value().clone());
    let (mean, invstd, reserve) = (out.save_mean, out.save_invstd, out.reserve);
    let mut inputs = vec![x, &gamma, &beta];
    inputs.extend(residual);
    let with_z = residual.is_some();
    Some(t.op(out.y, &inputs, move || {
        Box::new(move |g, needs| {
            let g = store_bf16(bf16, g);
            let saved = (&mean, &invstd, &reserve);
            let (dx, dz, dg, db) =
                cuda::dnn::bn_relu_bwd(&sx, &sy, &g, &sg, &sb, saved, with_z, BN_EPS);
            let mut grads = vec![
                needs[0].then_some(dx),
                needs[1].then_some(dg),
                needs[2].then_some(db),
            ];
            if with_z {
                grads.push(needs[3].then(|| dz.expect("the residual's gradient")));
            }
            grads
        })
    }))
}

/// Training-mode batch norm, then an optional residual add, then ReLU: `relu(bn(x) [+ residual])`,
/// the tail of every ResNet conv. On the CPU in f32/f64 this is one pass over the activations
/// forward (instead of three: affine, add, ReLU) and the backward is the ReLU mask then the
/// plain batch-norm backward. The arithmetic is the unfused ops' own, in the same order, so the
/// results are bit-identical to them (tests/fd_cnn_ops.rs). On a GPU with `PODGPU_GPU_BN=own`
/// the same single pass runs in `cuda::bn_train`; otherwise on a GPU, in evaluation mode, under
/// `--sync-bn` or on the bf16 path (GPU or emulation) it is the unfused ops.
pub fn batch_norm2d_relu(
    t: &mut Tape,
    store: &mut ParamStore,
    x: &Var,
    bn: &BatchNormIds,
    residual: Option<&Var>,
) -> Var {
    let host = x.value().device() == crate::tensor::Device::Cpu
        && matches!(x.value().dtype(), DType::F32 | DType::F64);
    let own_gpu = x.value().is_cuda()
        && x.value().dtype() == DType::F32
        && x.value().layout() == Layout::RowMajor
        && own_gpu_bn();
    let fused = (host || own_gpu) && t.is_training() && !unfused_requested();
    let bf16 = cpu::bf16::emulating();
    if let Some(y) = cudnn_fused(t, store, x, bn, residual, bf16) {
        return y;
    }
    if !fused || crate::dist::sync_bn::is_active() || bf16 {
        let y = batch_norm2d(t, store, x, bn);
        let y = match residual {
            // The bf16 path stores the residual sum (and its gradient) in bf16.
            Some(r) => {
                let sum = super::add(t, &y, r);
                super::bf16_storage(t, &sum, bf16)
            }
            None => y,
        };
        return super::relu(t, &y);
    }
    let gamma = t.param(store, bn.weight);
    let beta = t.param(store, bn.bias);
    let rm = store.value(bn.running_mean).clone();
    let rv = store.value(bn.running_var).clone();
    if let Some(r) = residual {
        assert_eq!(
            r.value().shape(),
            x.value().shape(),
            "batch_norm2d_relu: residual shape"
        );
        assert_same_place("batch_norm2d_relu", &[x.value(), r.value()]);
    }
    let out = batch_norm2d_relu_train_fwd(
        x.value(),
        gamma.value(),
        beta.value(),
        &rm,
        &rv,
        residual.map(|r| r.value()),
        BN_MOMENTUM,
        BN_EPS,
    );
    drop((rm, rv)); // shared the store's buffers (see batch_norm2d_in_mode)
    store_running_stats(store, bn, out.running_mean, out.running_var);
    let (mean, invstd) = (out.mean, out.invstd);
    let (sx, sg, sy) = (x.value().clone(), gamma.value().clone(), out.y.clone());
    let mut inputs = vec![x, &gamma, &beta];
    inputs.extend(residual);
    let with_residual = residual.is_some();
    t.op(out.y, &inputs, move || {
        Box::new(move |g, needs| {
            // The masked gradient is materialised (one vectorised pass) and fed to the plain
            // backward: folding the mask into the channel sums measured ≈ 5% slower per step
            // (BENCHMARKS.md), and the masked gradient is the residual's gradient too.
            let dz = super::relu_bwd(&sy, g);
            let d = batch_norm2d_train_bwd(&sx, &dz, &sg, &mean, &invstd);
            let mut grads = vec![
                needs[0].then_some(d.dx),
                needs[1].then_some(d.dweight),
                needs[2].then_some(d.dbias),
            ];
            if with_residual {
                grads.push(needs[3].then_some(dz));
            }
            grads
        })
    })
}

/// Whether training-mode batch norm on a GPU uses our own kernels (`cuda::bn_train`: the fused
/// affine + residual add + ReLU pass, statistics in double as the host computes them) instead of
/// cuDNN's batch norm followed by separate add and ReLU kernels. `PODGPU_GPU_BN=own` selects them;
/// cuDNN stays the default until the own kernels' GPU parity and timing are recorded (docs/GPU.md).
pub fn own_gpu_bn() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| std::env::var("PODGPU_GPU_BN").is_ok_and(|v| v == "own"))
}

/// `PODGPU_CPU_UNFUSED_BN=1` runs the unfused ops instead (to measure what the fusion gains with
/// one binary).
fn unfused_requested() -> bool {
    static UNFUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNFUSED.get_or_init(|| std::env::var("PODGPU_CPU_UNFUSED_BN").is_ok_and(|v| v == "1"))
}

/// Host training-mode forward of `relu(bn(x) [+ residual])` (see `batch_norm2d_relu`).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_relu_train_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    residual: Option<&Tensor>,
    momentum: f64,
    eps: f64,
) -> BatchNormTrainOut {
    check_shapes(
        "batch_norm2d_relu",
        x,
        &[weight, bias, running_mean, running_var],
    );
    if x.is_cuda() {
        assert_eq!(
            x.dtype(),
            DType::F32,
            "batch_norm2d_relu_train_fwd: the GPU kernels are f32"
        );
        return cuda::bn_train::train_fwd(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            residual,
            true,
            momentum,
            eps,
        );
    }
    let ep = Epilogue {
        residual,
        relu: true,
    };
    match x.dtype() {
        DType::F32 => bn_train_fwd_host_with::<f32>(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            ep,
        ),
        DType::F64 => bn_train_fwd_host_with::<f64>(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            ep,
        ),
        d => panic!("batch_norm2d_relu_train_fwd: {d:?} host tensors are storage only"),
    }
}

// ---- CUDA arms (cuDNN) ----

/// cuDNN's training-mode batch norm has the same contract as the host kernel: new running
/// statistics are returned (the inputs are not modified), the tape-level op stores them. cuDNN
/// needs eps ≥ 1e-5 (PyTorch's default, `BN_EPS`); a smaller eps is raised to that on the GPU.
#[allow(clippy::too_many_arguments)]
fn bn_train_fwd_cuda(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> BatchNormTrainOut {
    if x.dtype() == DType::Bf16 {
        let o = cuda::dnn::batch_norm_fwd_train_bf16(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
        );
        return BatchNormTrainOut {
            y: o.y,
            mean: o.save_mean,
            invstd: o.save_invstd,
            running_mean: o.running_mean,
            running_var: o.running_var,
        };
    }
    if own_gpu_bn() && x.layout() == Layout::RowMajor {
        return cuda::bn_train::train_fwd(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            None,
            false,
            momentum,
            eps,
        );
    }
    let o =
        cuda::dnn::batch_norm_fwd_train(x, weight, bias, running_mean, running_var, momentum, eps);
    BatchNormTrainOut {
        y: o.y,
        mean: o.save_mean,
        invstd: o.save_invstd,
        running_mean: o.running_mean,
        running_var: o.running_var,
    }
}

/// cuDNN's backward takes the saved mean and 1/σ of the forward (it recomputes nothing from them),
/// so the eps passed here only has to be the forward's: `BN_EPS`, as the tape-level op uses.
fn bn_train_bwd_cuda(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> BatchNormGrads {
    let (dx, dweight, dbias) = if x.dtype() == DType::Bf16 {
        cuda::dnn::batch_norm_bwd_bf16(x, dy, weight, mean, invstd, BN_EPS)
    } else if own_gpu_bn() && x.layout() == Layout::RowMajor {
        cuda::bn_train::train_bwd(x, dy, weight, mean, invstd)
    } else {
        cuda::dnn::batch_norm_bwd(x, dy, weight, mean, invstd, BN_EPS)
    };
    BatchNormGrads { dx, dweight, dbias }
}

fn bn_eval_fwd_cuda(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Tensor {
    let (rm, rv) = (running_mean, running_var);
    if x.dtype() == DType::Bf16 {
        return cuda::dnn::batch_norm_fwd_infer_bf16(x, weight, bias, rm, rv, eps);
    }
    cuda::dnn::batch_norm_fwd_infer(x, weight, bias, rm, rv, eps)
}

fn bn_eval_bwd_cuda(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> BatchNormGrads {
    assert!(
        x.dtype() == DType::F32 && x.layout() == Layout::RowMajor,
        "batch_norm2d_eval_bwd: the GPU's evaluation-mode backward is f32 NCHW only (gradient \
         checks), got {x:?}"
    );
    let (dx, dweight, dbias) =
        cuda::dnn::batch_norm_eval_bwd(x, dy, weight, running_mean, running_var, eps);
    BatchNormGrads { dx, dweight, dbias }
}

/// x + 1 on the device (the counter never visits the host).
fn increment_cuda(x: &Tensor) -> Tensor {
    let one = Tensor::full(x.shape(), 1.0, x.dtype(), x.device());
    cuda::kernels::add(x, &one)
}

// ---- host kernels ----

/// (N, C, H·W) of an NCHW tensor.
fn dims(x: &Tensor) -> (usize, usize, usize) {
    (x.dim(0), x.dim(1), x.dim(2) * x.dim(3))
}

/// Per-channel f64 sums of `f(x, dy)` over batch and space (f64 so that large batches stay exact).
fn channel_sums<T: Elem>(
    xs: &[T],
    dys: Option<&[T]>,
    (n, c, hw): (usize, usize, usize),
    f: impl Fn(usize, T, T) -> f64 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .with_min_len((cpu::PAR_MIN_WORK / (n * hw).max(1)).max(1))
        .map(|ch| {
            // LANES independent partial sums: one running sum is a chain of dependent f64 adds (one
            // per ~4 cycles); independent lanes vectorise. The order is fixed per channel, so the
            // result still does not depend on the thread count.
            const LANES: usize = 8;
            let mut acc = [0.0f64; LANES];
            let mut tail = 0.0;
            for i in 0..n {
                let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                match dys {
                    Some(d) => {
                        let (xp, dp) = (&xs[r.clone()], &d[r]);
                        let (xc, dc) = (xp.chunks_exact(LANES), dp.chunks_exact(LANES));
                        for (&xv, &dv) in xc.remainder().iter().zip(dc.remainder()) {
                            tail += f(ch, xv, dv);
                        }
                        for (xb, db) in xc.zip(dc) {
                            for l in 0..LANES {
                                acc[l] += f(ch, xb[l], db[l]);
                            }
                        }
                    }
                    None => {
                        let xc = xs[r].chunks_exact(LANES);
                        for &xv in xc.remainder() {
                            tail += f(ch, xv, T::zero());
                        }
                        for xb in xc {
                            for l in 0..LANES {
                                acc[l] += f(ch, xb[l], T::zero());
                            }
                        }
                    }
                }
            }
            acc.iter().sum::<f64>() + tail
        })
        .collect()
}

/// out[n, c] = x[n, c]·scale[c] + shift[c] for every plane.
fn affine<T: Elem>(
    xs: &[T],
    scale: &[f64],
    shift: &[f64],
    (_, c, hw): (usize, usize, usize),
) -> Vec<T> {
    // SAFETY: the planes cover `out` and each writes all of its elements.
    let mut out = unsafe { cpu::arena::vec_for_overwrite(xs.len()) };
    cpu::par_chunks(&mut out, hw, hw, |p, o| {
        let (a, b) = (T::of(scale[p % c]), T::of(shift[p % c]));
        for (o, &v) in o.iter_mut().zip(&xs[p * hw..(p + 1) * hw]) {
            *o = v * a + b;
        }
    });
    out
}

/// out = max(0, x·scale[c] + shift[c] [+ r]): the affine map, the residual add and the ReLU of the
/// unfused ops in one pass, each step rounded to T as they round it.
fn affine_add_relu<T: Elem>(
    xs: &[T],
    scale: &[f64],
    shift: &[f64],
    residual: Option<&[T]>,
    (_, c, hw): (usize, usize, usize),
) -> Vec<T> {
    // SAFETY: the planes cover `out` and each writes all of its elements.
    let mut out = unsafe { cpu::arena::vec_for_overwrite(xs.len()) };
    let relu = |v: T| if v > T::zero() { v } else { T::zero() };
    cpu::par_chunks(&mut out, hw, hw, |p, o| {
        let (a, b) = (T::of(scale[p % c]), T::of(shift[p % c]));
        let r = p * hw..(p + 1) * hw;
        match residual {
            Some(res) => {
                for ((o, &v), &rv) in o.iter_mut().zip(&xs[r.clone()]).zip(&res[r]) {
                    *o = relu(v * a + b + rv);
                }
            }
            None => {
                for (o, &v) in o.iter_mut().zip(&xs[r]) {
                    *o = relu(v * a + b);
                }
            }
        }
    });
    out
}

fn f64s<T: Elem>(t: &Tensor) -> Vec<f64> {
    t.host::<T>().iter().map(|v| v.f64()).collect()
}

fn tensor_of<T: Elem>(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_vec(shape, v.iter().map(|&x| T::of(x)).collect::<Vec<T>>())
}

fn bn_train_fwd_host<T: Elem>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> BatchNormTrainOut {
    let plain = Epilogue {
        residual: None,
        relu: false,
    };
    bn_train_fwd_host_with::<T>(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps,
        plain,
    )
}

/// What follows the affine map in the same pass: an optional residual add, then an optional ReLU.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    residual: Option<&'a Tensor>,
    relu: bool,
}

#[allow(clippy::too_many_arguments)]
fn bn_train_fwd_host_with<T: Elem>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
    ep: Epilogue,
) -> BatchNormTrainOut {
    let d @ (n, c, hw) = dims(x);
    let m = (n * hw) as f64;
    let xs = x.host::<T>();
    // Two passes (mean, then centred squares) for accuracy.
    let mean: Vec<f64> = channel_sums(xs, None, d, |_, v, _| v.f64())
        .iter()
        .map(|s| s / m)
        .collect();
    let var: Vec<f64> = channel_sums(xs, None, d, |ch, v, _| (v.f64() - mean[ch]).powi(2))
        .iter()
        .map(|s| s / m)
        .collect();
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let (g, b) = (f64s::<T>(weight), f64s::<T>(bias));
    let scale: Vec<f64> = (0..c).map(|ch| g[ch] * invstd[ch]).collect();
    let shift: Vec<f64> = (0..c).map(|ch| b[ch] - mean[ch] * scale[ch]).collect();
    let y = if ep.residual.is_none() && !ep.relu {
        affine(xs, &scale, &shift, d)
    } else {
        affine_add_relu(xs, &scale, &shift, ep.residual.map(|r| r.host::<T>()), d)
    };

    let (rm, rv) = (f64s::<T>(running_mean), f64s::<T>(running_var));
    let unbias = m / (m - 1.0);
    let new_rm: Vec<f64> = (0..c)
        .map(|ch| (1.0 - momentum) * rm[ch] + momentum * mean[ch])
        .collect();
    let new_rv: Vec<f64> = (0..c)
        .map(|ch| (1.0 - momentum) * rv[ch] + momentum * var[ch] * unbias)
        .collect();
    BatchNormTrainOut {
        y: Tensor::from_vec(x.shape(), y),
        mean: tensor_of::<T>(&[c], &mean),
        invstd: tensor_of::<T>(&[c], &invstd),
        running_mean: tensor_of::<T>(&[c], &new_rm),
        running_var: tensor_of::<T>(&[c], &new_rv),
    }
}

/// With x̂ = (x − μ)·σ⁻¹ and M values per channel:
/// dβ = Σ dy,  dγ = Σ dy·x̂,  dx = γσ⁻¹ (dy − dβ/M − x̂·dγ/M).
fn bn_train_bwd_host<T: Elem>(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> BatchNormGrads {
    let d @ (n, c, hw) = dims(x);
    let m = (n * hw) as f64;
    let (xs, dys) = (x.host::<T>(), dy.host::<T>());
    let (g, mu, is) = (f64s::<T>(weight), f64s::<T>(mean), f64s::<T>(invstd));
    let dbeta = channel_sums(xs, Some(dys), d, |_, _, dv| dv.f64());
    let dgamma = channel_sums(xs, Some(dys), d, |ch, v, dv| {
        dv.f64() * (v.f64() - mu[ch]) * is[ch]
    });
    // SAFETY: the planes cover `dx` and each writes all of its elements.
    let mut dx = unsafe { cpu::arena::vec_for_overwrite(xs.len()) };
    cpu::par_chunks(&mut dx, hw, hw, |p, o| {
        let ch = p % c;
        let k = g[ch] * is[ch];
        let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
        let r = p * hw..(p + 1) * hw;
        for ((o, &v), &dv) in o.iter_mut().zip(&xs[r.clone()]).zip(&dys[r]) {
            let xhat = (v.f64() - mu[ch]) * is[ch];
            *o = T::of(k * (dv.f64() - mb - xhat * mg));
        }
    });
    BatchNormGrads {
        dx: Tensor::from_vec(x.shape(), dx),
        dweight: tensor_of::<T>(&[c], &dgamma),
        dbias: tensor_of::<T>(&[c], &dbeta),
    }
}

fn bn_eval_fwd_host<T: Elem>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Tensor {
    let d @ (_, c, _) = dims(x);
    let (g, b) = (f64s::<T>(weight), f64s::<T>(bias));
    let (rm, rv) = (f64s::<T>(running_mean), f64s::<T>(running_var));
    let scale: Vec<f64> = (0..c).map(|ch| g[ch] / (rv[ch] + eps).sqrt()).collect();
    let shift: Vec<f64> = (0..c).map(|ch| b[ch] - rm[ch] * scale[ch]).collect();
    Tensor::from_vec(x.shape(), affine(x.host::<T>(), &scale, &shift, d))
}

/// y = γ(x − μ_r)/√(σ²_r + eps) + β:  dx = dy·γ/√(σ²_r + eps),  dγ = Σ dy·x̂,  dβ = Σ dy.
fn bn_eval_bwd_host<T: Elem>(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> BatchNormGrads {
    let d @ (_, c, _) = dims(x);
    let (xs, dys) = (x.host::<T>(), dy.host::<T>());
    let g = f64s::<T>(weight);
    let (rm, rv) = (f64s::<T>(running_mean), f64s::<T>(running_var));
    let is: Vec<f64> = rv.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let dbeta = channel_sums(xs, Some(dys), d, |_, _, dv| dv.f64());
    let dgamma = channel_sums(xs, Some(dys), d, |ch, v, dv| {
        dv.f64() * (v.f64() - rm[ch]) * is[ch]
    });
    let scale: Vec<f64> = (0..c).map(|ch| g[ch] * is[ch]).collect();
    let dx = affine(dys, &scale, &vec![0.0; c], d);
    BatchNormGrads {
        dx: Tensor::from_vec(x.shape(), dx),
        dweight: tensor_of::<T>(&[c], &dgamma),
        dbias: tensor_of::<T>(&[c], &dbeta),
    }
}

fn increment_host<T: Elem>(x: &Tensor) -> Tensor {
    Tensor::from_vec(x.shape(), vec![x.host::<T>()[0] + T::one()])
}
