//! cuDNN batch normalisation (training forward, inference forward, backward; PyTorch semantics)
//! and the per-channel helpers built on the same descriptors: a convolution's bias and its
//! gradient, elementwise products, evaluation-mode batch-norm backward.
//!
//! The batch norm also runs on bf16 data (issue 12's bf16 path): x, y, dy and dx stored in bf16,
//! while gamma, beta, the running and saved statistics and dgamma, dbeta stay f32 (cuDNN derives an
//! f32 per-channel descriptor from a bf16 x and computes in f32). That is the CPU emulation's
//! arithmetic (`ops::batch_norm2d` under `cpu::bf16`: f32 statistics, y and dx rounded to bf16).

use super::{alloc, input, ok, one, ptr, with_dnn, zero, Dnn, OutBuf, Storage, TensorDesc};
use crate::cuda::launch::gpu_of;
use crate::cuda::{buf, tensor};
use crate::tensor::{Layout, Tensor};
use cudarc::cudnn::sys;
use std::collections::hash_map::Entry;
use std::ffi::c_void;

/// Outputs of a training-mode batch-norm forward.
pub struct BnTrain {
    pub y: Tensor,
    /// Batch mean per channel [C].
    pub save_mean: Tensor,
    /// 1 / sqrt(batch variance + eps) per channel [C] (the biased variance).
    pub save_invstd: Tensor,
    /// Updated running statistics [C]: (1 − momentum)·old + momentum·batch (unbiased variance).
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// x as NCHW dims: [N, C, H, W] as is, [N, C] as [N, C, 1, 1] (BatchNorm1d).
fn bn_dims(x: &Tensor) -> [usize; 4] {
    match x.shape() {
        [n, c] => [*n, *c, 1, 1],
        [n, c, h, w] => [*n, *c, *h, *w],
        s => panic!("batch norm of a tensor of shape {s:?}: expected [N, C] or [N, C, H, W]"),
    }
}

const BN_MODE: sys::cudnnBatchNormMode_t = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

impl Dnn {
    /// (x descriptor, derived per-channel descriptor) for this shape and f32 NCHW data.
    fn bn_descs(
        &mut self,
        d: [usize; 4],
    ) -> Result<(sys::cudnnTensorDescriptor_t, sys::cudnnTensorDescriptor_t), String> {
        self.bn_descs_of(d, Storage::F32, Layout::RowMajor)
    }

    /// (x descriptor, derived per-channel descriptor) for this shape and data type; the derived
    /// descriptor is f32 for bf16 data too.
    pub(super) fn bn_descs_of(
        &mut self,
        d: [usize; 4],
        storage: Storage,
        layout: Layout,
    ) -> Result<(sys::cudnnTensorDescriptor_t, sys::cudnnTensorDescriptor_t), String> {
        if let Entry::Vacant(slot) = self.bn.entry((d, storage, layout)) {
            let xd = TensorDesc::of(d, storage.cudnn(), layout)?;
            let bd = TensorDesc(
                cudarc::cudnn::result::create_tensor_descriptor().map_err(|e| format!("{e:?}"))?,
            );
            // SAFETY: fresh descriptor derived from a configured one.
            ok(
                unsafe { sys::cudnnDeriveBNTensorDescriptor(bd.0, xd.0, BN_MODE) },
                "cudnnDeriveBNTensorDescriptor",
            )?;
            slot.insert((xd, bd));
        }
        let (xd, bd) = &self.bn[&(d, storage, layout)];
        Ok((xd.0, bd.0))
    }
}

/// Copies a GPU tensor into a fresh buffer (running statistics are updated on copies).
fn copy_of(t: &Tensor) -> crate::cuda::CudaBuf {
    buf(t).duplicate()
}

/// Training-mode batch norm over N·H·W per channel (cuDNN, spatial mode). `eps` must be ≥ 1e-5
/// (cuDNN's minimum).
pub fn batch_norm_fwd_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> BnTrain {
    let (rm, rv) = (running_mean, running_var);
    bn_fwd_train(x, gamma, beta, rm, rv, momentum, eps, Storage::F32)
}

/// `batch_norm_fwd_train` of a bf16 x: y is bf16; gamma, beta and every statistic are f32.
pub fn batch_norm_fwd_train_bf16(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> BnTrain {
    let (rm, rv) = (running_mean, running_var);
    bn_fwd_train(x, gamma, beta, rm, rv, momentum, eps, Storage::Bf16)
}

#[allow(clippy::too_many_arguments)]
fn bn_fwd_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
    storage: Storage,
) -> BnTrain {
    let layout = x.layout();
    let (gpu, xp) = input(x, storage, layout, "batch norm x");
    let d = bn_dims(x);
    let c = d[1];
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs_of(d, storage, layout)?;
        let y = OutBuf::alloc(&gpu, storage, x.numel())?;
        let rm = copy_of(running_mean);
        let rv = copy_of(running_var);
        let sm = alloc(&gpu, c)?;
        let si = alloc(&gpu, c)?;
        // SAFETY: x/y match xd; gamma, beta, running stats and saved stats hold C floats (bd).
        ok(
            unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    handle,
                    BN_MODE,
                    one(),
                    zero(),
                    xd,
                    xp,
                    xd,
                    y.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    ptr(beta),
                    momentum,
                    rm.device_ptr() as *mut c_void,
                    rv.device_ptr() as *mut c_void,
                    eps.max(1e-5),
                    sm.device_ptr() as *mut c_void,
                    si.device_ptr() as *mut c_void,
                )
            },
            "cudnnBatchNormalizationForwardTraining",
        )?;
        Ok(BnTrain {
            y: y.into_tensor(x.shape()).with_layout(layout),
            save_mean: tensor(&[c], sm),
            save_invstd: tensor(&[c], si),
            running_mean: tensor(&[c], rm),
            running_var: tensor(&[c], rv),
        })
    })
}

/// Inference-mode batch norm with the running statistics.
pub fn batch_norm_fwd_infer(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Tensor {
    bn_fwd_infer(x, gamma, beta, mean, var, eps, Storage::F32)
}

/// `batch_norm_fwd_infer` of a bf16 x: y is bf16; gamma, beta and the statistics are f32.
pub fn batch_norm_fwd_infer_bf16(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Tensor {
    bn_fwd_infer(x, gamma, beta, mean, var, eps, Storage::Bf16)
}

fn bn_fwd_infer(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    storage: Storage,
) -> Tensor {
    let layout = x.layout();
    let (gpu, xp) = input(x, storage, layout, "batch norm x");
    let d = bn_dims(x);
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs_of(d, storage, layout)?;
        let y = OutBuf::alloc(&gpu, storage, x.numel())?;
        // SAFETY: as in batch_norm_fwd_train.
        ok(
            unsafe {
                sys::cudnnBatchNormalizationForwardInference(
                    handle,
                    BN_MODE,
                    one(),
                    zero(),
                    xd,
                    xp,
                    xd,
                    y.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    ptr(beta),
                    ptr(mean),
                    ptr(var),
                    eps.max(1e-5),
                )
            },
            "cudnnBatchNormalizationForwardInference",
        )?;
        Ok(y.into_tensor(x.shape()).with_layout(layout))
    })
}

/// Backward of training-mode batch norm: (dx, dgamma, dbeta), using the statistics saved by
/// `batch_norm_fwd_train`.
pub fn batch_norm_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    bn_bwd(x, dy, gamma, save_mean, save_invstd, eps, Storage::F32)
}

/// `batch_norm_bwd` of bf16 x and dy: dx is bf16; dgamma and dbeta are f32 (the gradients of f32
/// parameters), as are gamma and the saved statistics.
pub fn batch_norm_bwd_bf16(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    bn_bwd(x, dy, gamma, save_mean, save_invstd, eps, Storage::Bf16)
}

fn bn_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    save_mean: &Tensor,
    save_invstd: &Tensor,
    eps: f64,
    storage: Storage,
) -> (Tensor, Tensor, Tensor) {
    let layout = x.layout();
    let (gpu, xp) = input(x, storage, layout, "batch norm backward x");
    let (_, dyp) = input(dy, storage, layout, "batch norm backward dy");
    assert_eq!(
        dy.shape(),
        x.shape(),
        "batch norm backward: dy and x shapes"
    );
    let d = bn_dims(x);
    let c = d[1];
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs_of(d, storage, layout)?;
        let dx = OutBuf::alloc(&gpu, storage, x.numel())?;
        let dg = alloc(&gpu, c)?;
        let db = alloc(&gpu, c)?;
        // SAFETY: as in batch_norm_fwd_train.
        ok(
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    handle,
                    BN_MODE,
                    one(),
                    zero(),
                    one(),
                    zero(),
                    xd,
                    xp,
                    xd,
                    dyp,
                    xd,
                    dx.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    dg.device_ptr() as *mut c_void,
                    db.device_ptr() as *mut c_void,
                    eps.max(1e-5),
                    ptr(save_mean),
                    ptr(save_invstd),
                )
            },
            "cudnnBatchNormalizationBackward",
        )?;
        Ok((
            dx.into_tensor(x.shape()).with_layout(layout),
            tensor(&[c], dg),
            tensor(&[c], db),
        ))
    })
}

// ---- per-channel helpers: the convolution bias and evaluation-mode batch-norm backward ----

/// x as per-channel dims for the helpers below: [N, C, H, W] as is, [N, C] as [N, C, 1, 1].
fn channel_dims(x: &Tensor, what: &str) -> [usize; 4] {
    match x.shape() {
        [n, c] => [*n, *c, 1, 1],
        [n, c, h, w] => [*n, *c, *h, *w],
        s => panic!("{what}: expected [N, C] or [N, C, H, W], got {s:?}"),
    }
}

/// y[n, c, :, :] += b[c] (a convolution's bias) with cudnnAddTensor. `y` is updated in place when
/// it owns its buffer (the fresh output of a convolution); a shared buffer is copied first.
pub fn add_channel_bias(y: Tensor, b: &Tensor) -> Tensor {
    let gpu = gpu_of(&y);
    let d = channel_dims(&y, "add_channel_bias");
    assert_eq!(
        b.shape(),
        &[d[1]],
        "add_channel_bias: bias {:?} for output {:?}",
        b.shape(),
        y.shape()
    );
    let mut y = y;
    let yp = crate::cuda::buf_mut(&mut y).device_ptr();
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        // The BN per-channel descriptor is exactly the [1, C, 1, 1] bias descriptor.
        let (yd, bd) = dnn.bn_descs(d)?;
        // SAFETY: y matches yd and is owned by `y` alone (cuda::buf_mut); b holds C floats.
        ok(
            unsafe { sys::cudnnAddTensor(handle, one(), bd, ptr(b), one(), yd, yp as *mut c_void) },
            "cudnnAddTensor",
        )?;
        Ok(())
    });
    y
}

/// Per-channel sums over batch and space, [N, C, H, W] (or [N, C]) → [C]: the gradient of a
/// convolution's bias (cudnnConvolutionBackwardBias).
pub fn channel_sums(x: &Tensor) -> Tensor {
    let gpu = gpu_of(x);
    let d = channel_dims(x, "channel_sums");
    let c = d[1];
    let out = gpu.alloc(c);
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs(d)?;
        // SAFETY: x matches xd; out holds C floats (bd); beta = 0 so out is only written.
        ok(
            unsafe {
                sys::cudnnConvolutionBackwardBias(
                    handle,
                    one(),
                    xd,
                    ptr(x),
                    zero(),
                    bd,
                    out.device_ptr() as *mut c_void,
                )
            },
            "cudnnConvolutionBackwardBias",
        )?;
        Ok(())
    });
    tensor(&[c], out)
}

struct OpDesc(sys::cudnnOpTensorDescriptor_t);

impl Drop for OpDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateOpTensorDescriptor, destroyed once.
        unsafe { sys::cudnnDestroyOpTensorDescriptor(self.0) };
    }
}

/// a ∘ b elementwise for two tensors of the same NCHW (or [N, C]) shape, with cudnnOpTensor.
pub fn mul(a: &Tensor, b: &Tensor) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "mul: shapes differ");
    let gpu = gpu_of(a);
    let d = channel_dims(a, "mul");
    // Zero-filled, so that the result does not depend on how cuDNN treats beta = 0.
    let out = gpu.alloc_zeros(a.numel());
    with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, _) = dnn.bn_descs(d)?;
        let mut raw: sys::cudnnOpTensorDescriptor_t = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle.
        ok(
            unsafe { sys::cudnnCreateOpTensorDescriptor(&mut raw) },
            "cudnnCreateOpTensorDescriptor",
        )?;
        let op = OpDesc(raw);
        // SAFETY: fresh descriptor.
        ok(
            unsafe {
                sys::cudnnSetOpTensorDescriptor(
                    op.0,
                    sys::cudnnOpTensorOp_t::CUDNN_OP_TENSOR_MUL,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                )
            },
            "cudnnSetOpTensorDescriptor",
        )?;
        // SAFETY: a, b and out all match xd.
        ok(
            unsafe {
                sys::cudnnOpTensor(
                    handle,
                    op.0,
                    one(),
                    xd,
                    ptr(a),
                    one(),
                    xd,
                    ptr(b),
                    zero(),
                    xd,
                    out.device_ptr() as *mut c_void,
                )
            },
            "cudnnOpTensor",
        )?;
        Ok(())
    });
    tensor(a.shape(), out)
}

/// Backward of inference-mode batch norm y = γ(x − μ)/√(σ² + eps) + β with fixed μ, σ²
/// (a per-channel affine map): dx = γ·dy/√(σ² + eps), dγ = Σ dy·x̂, dβ = Σ dy. Built from cuDNN
/// calls: x̂ and dx are inference-mode batch norms themselves (x̂ with γ = 1, β = 0; dx of dy
/// with μ = 0, β = 0), the sums are `channel_sums`.
pub fn batch_norm_eval_bwd(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> (Tensor, Tensor, Tensor) {
    assert_eq!(x.shape(), dy.shape(), "batch_norm_eval_bwd: dy shape");
    let gpu = gpu_of(x);
    let c = channel_dims(x, "batch_norm_eval_bwd")[1];
    let ones = crate::cuda::nn_kernels::fill(&[c], 1.0, &gpu);
    let zeros = tensor(&[c], gpu.alloc_zeros(c));
    let xhat = batch_norm_fwd_infer(x, &ones, &zeros, mean, var, eps);
    let dx = batch_norm_fwd_infer(dy, gamma, &zeros, &zeros, var, eps);
    let dgamma = channel_sums(&mul(dy, &xhat));
    let dbeta = channel_sums(dy);
    (dx, dgamma, dbeta)
}
