//! cuDNN's fused training batch norm: `relu(bn(x) [+ z])` forward and its backward in one call
//! each (`cudnnBatchNormalizationForwardTrainingEx` / `BackwardEx` with
//! `CUDNN_BATCHNORM_OPS_BN_ACTIVATION` or `…_BN_ADD_ACTIVATION`), the tail of every ResNet
//! convolution on channels-last activations (issue 12 item 2).
//!
//! cuDNN documents these fused ops for NHWC data in the persistent spatial mode, and for half
//! precision; whether a given cuDNN takes bf16 (or f32) is asked at run time: the first call for a
//! shape, type and layout queries the workspace and reserve sizes, and a refusal is remembered, so
//! that the caller (`ops::batch_norm2d_relu`) runs the unfused ops for that shape from then on.
//!
//! The forward saves a reserve buffer (the activation's mask) that its backward needs; the
//! backward returns the residual's gradient dz as well as dx, dγ, dβ. Numerics against the CPU's
//! bf16 emulation: the fused forward rounds once (relu(bn(x) + z) stored in bf16) where the
//! unfused ops store bn(x) and the sum in bf16 before the ReLU, so the two differ by up to one
//! bf16 rounding of bn(x).

use super::{alloc, input, ok, one, ptr, try_with_dnn, zero, Fail, OutBuf, Storage};
use crate::cuda::{buf, lock, tensor, CudaBuf};
use crate::tensor::{Layout, Tensor};
use cudarc::cudnn::sys;
use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

const MODE: sys::cudnnBatchNormMode_t =
    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL_PERSISTENT;

/// (device, dims, storage, layout, with z) that cuDNN refused to fuse.
type Key = (usize, [usize; 4], Storage, Layout, bool);
static REFUSED: OnceLock<Mutex<HashSet<Key>>> = OnceLock::new();

fn refused() -> &'static Mutex<HashSet<Key>> {
    REFUSED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The outputs of the fused forward.
pub struct BnReluTrain {
    pub y: Tensor,
    pub save_mean: Tensor,
    pub save_invstd: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// cuDNN's reserve space, for the backward (bytes, rounded up to words).
    pub reserve: Reserve,
}

/// Device bytes cuDNN asks for by size: a workspace, or the reserve space a fused forward leaves
/// for its backward. No memory (a null pointer) when the size is zero.
pub struct Reserve {
    buf: Option<CudaBuf>,
    bytes: usize,
}

impl Reserve {
    fn alloc(gpu: &std::sync::Arc<crate::cuda::Gpu>, bytes: usize) -> Result<Reserve, Fail> {
        let buf = (bytes > 0)
            .then(|| alloc(gpu, bytes.div_ceil(4)))
            .transpose()?;
        Ok(Reserve { buf, bytes })
    }

    fn ptr(&self) -> *mut c_void {
        self.buf
            .as_ref()
            .map_or(std::ptr::null_mut(), |b| b.device_ptr() as *mut c_void)
    }
}

struct ActDesc(sys::cudnnActivationDescriptor_t);

impl Drop for ActDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateActivationDescriptor, destroyed once.
        unsafe { sys::cudnnDestroyActivationDescriptor(self.0) };
    }
}

fn relu_desc() -> Result<ActDesc, String> {
    let mut raw: sys::cudnnActivationDescriptor_t = std::ptr::null_mut();
    // SAFETY: writes one descriptor handle.
    ok(
        unsafe { sys::cudnnCreateActivationDescriptor(&mut raw) },
        "cudnnCreateActivationDescriptor",
    )?;
    let d = ActDesc(raw);
    // SAFETY: fresh descriptor.
    ok(
        unsafe {
            sys::cudnnSetActivationDescriptor(
                d.0,
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                0.0,
            )
        },
        "cudnnSetActivationDescriptor",
    )?;
    Ok(d)
}

fn ops_of(with_z: bool) -> sys::cudnnBatchNormOps_t {
    if with_z {
        sys::cudnnBatchNormOps_t::CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION
    } else {
        sys::cudnnBatchNormOps_t::CUDNN_BATCHNORM_OPS_BN_ACTIVATION
    }
}

fn storage_of(x: &Tensor) -> Option<Storage> {
    match x.dtype() {
        crate::tensor::DType::F32 => Some(Storage::F32),
        crate::tensor::DType::Bf16 => Some(Storage::Bf16),
        _ => None,
    }
}

/// `relu(bn(x) + z)` (or `relu(bn(x))`) in training mode with new running statistics, for a
/// channels-last x [N, C, H, W] on a GPU; `None` when cuDNN does not fuse it for this shape, type
/// and layout (nothing was computed then; remembered).
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_fwd_train(
    x: &Tensor,
    z: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Option<BnReluTrain> {
    let storage = storage_of(x)?;
    let layout = x.layout();
    if layout != Layout::Nhwc || x.rank() != 4 {
        return None;
    }
    let d = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
    let (gpu, xp) = input(x, storage, layout, "fused batch norm x");
    let key = (gpu.ordinal, d, storage, layout, z.is_some());
    if lock(refused()).contains(&key) {
        return None;
    }
    let zp = z.map(|z| {
        assert_eq!(z.shape(), x.shape(), "fused batch norm: residual shape");
        input(z, storage, layout, "fused batch norm residual").1
    });
    let c = d[1];
    let out = try_with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs_of(d, storage, layout)?;
        let act = relu_desc()?;
        let ops = ops_of(z.is_some());
        let (mut ws_bytes, mut reserve_bytes) = (0usize, 0usize);
        // SAFETY: live descriptors; writes one size each.
        ok(
            unsafe {
                sys::cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(
                    handle,
                    MODE,
                    ops,
                    xd,
                    if z.is_some() {
                        xd
                    } else {
                        std::ptr::null_mut()
                    },
                    xd,
                    bd,
                    act.0,
                    &mut ws_bytes,
                )
            },
            "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize",
        )?;
        // SAFETY: as above.
        ok(
            unsafe {
                sys::cudnnGetBatchNormalizationTrainingExReserveSpaceSize(
                    handle,
                    MODE,
                    ops,
                    act.0,
                    xd,
                    &mut reserve_bytes,
                )
            },
            "cudnnGetBatchNormalizationTrainingExReserveSpaceSize",
        )?;
        let y = OutBuf::alloc(&gpu, storage, x.numel())?;
        let rm = buf(running_mean).duplicate();
        let rv = buf(running_var).duplicate();
        let sm = alloc(&gpu, c)?;
        let si = alloc(&gpu, c)?;
        let ws = Reserve::alloc(&gpu, ws_bytes)?;
        let reserve = Reserve::alloc(&gpu, reserve_bytes)?;
        // SAFETY: x, z and y match xd; γ, β, the running and saved statistics hold C floats (bd);
        // the workspace and reserve have the sizes cuDNN asked for.
        ok(
            unsafe {
                sys::cudnnBatchNormalizationForwardTrainingEx(
                    handle,
                    MODE,
                    ops,
                    one(),
                    zero(),
                    xd,
                    xp,
                    if z.is_some() {
                        xd
                    } else {
                        std::ptr::null_mut()
                    },
                    zp.unwrap_or(std::ptr::null()),
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
                    act.0,
                    ws.ptr(),
                    ws.bytes,
                    reserve.ptr(),
                    reserve_bytes,
                )
            },
            "cudnnBatchNormalizationForwardTrainingEx",
        )?;
        Ok(BnReluTrain {
            y: y.into_tensor(x.shape()).with_layout(layout),
            save_mean: tensor(&[c], sm),
            save_invstd: tensor(&[c], si),
            running_mean: tensor(&[c], rm),
            running_var: tensor(&[c], rv),
            reserve,
        })
    });
    match out {
        Ok(o) => Some(o),
        Err(Fail::Oom(o)) => std::panic::panic_any(o),
        Err(Fail::Msg(_)) => {
            lock(refused()).insert(key);
            None
        }
    }
}

/// The gradients of `bn_relu_fwd_train`: (dx, dz if there was a residual, dγ, dβ), from its x,
/// its output y, the incoming dy and what it saved. A cuDNN that fused the forward is expected to
/// fuse the backward; a refusal here is an error (panic naming the call).
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_bwd(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    fwd: (&Tensor, &Tensor, &Reserve),
    with_z: bool,
    eps: f64,
) -> (Tensor, Option<Tensor>, Tensor, Tensor) {
    let storage = storage_of(x).expect("fused batch norm backward: f32 or bf16 x");
    let layout = x.layout();
    let d = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
    let (gpu, xp) = input(x, storage, layout, "fused batch norm backward x");
    let (_, yp) = input(y, storage, layout, "fused batch norm backward y");
    let (_, dyp) = input(dy, storage, layout, "fused batch norm backward dy");
    let (save_mean, save_invstd, reserve) = fwd;
    let c = d[1];
    let out = try_with_dnn(&gpu, |dnn| {
        let handle = dnn.handle;
        let (xd, bd) = dnn.bn_descs_of(d, storage, layout)?;
        let act = relu_desc()?;
        let ops = ops_of(with_z);
        let mut ws_bytes = 0usize;
        let zd: sys::cudnnTensorDescriptor_t = if with_z { xd } else { std::ptr::null_mut() };
        // SAFETY: live descriptors; writes one size.
        ok(
            unsafe {
                sys::cudnnGetBatchNormalizationBackwardExWorkspaceSize(
                    handle,
                    MODE,
                    ops,
                    xd,
                    xd,
                    xd,
                    zd,
                    xd,
                    bd,
                    act.0,
                    &mut ws_bytes,
                )
            },
            "cudnnGetBatchNormalizationBackwardExWorkspaceSize",
        )?;
        let dx = OutBuf::alloc(&gpu, storage, x.numel())?;
        let dz = with_z
            .then(|| OutBuf::alloc(&gpu, storage, x.numel()))
            .transpose()?;
        let dg = alloc(&gpu, c)?;
        let db = alloc(&gpu, c)?;
        let ws = Reserve::alloc(&gpu, ws_bytes)?;
        // SAFETY: x, y, dy, dz and dx match xd; γ, β, dγ, dβ and the saved statistics hold C
        // floats (bd); the workspace has the size cuDNN asked for and the reserve is the forward's.
        ok(
            unsafe {
                sys::cudnnBatchNormalizationBackwardEx(
                    handle,
                    MODE,
                    ops,
                    one(),
                    zero(),
                    one(),
                    zero(),
                    xd,
                    xp,
                    xd,
                    yp,
                    xd,
                    dyp,
                    zd,
                    dz.as_ref()
                        .map_or(std::ptr::null_mut(), |b| b.device_ptr() as *mut c_void),
                    xd,
                    dx.device_ptr() as *mut c_void,
                    bd,
                    ptr(gamma),
                    ptr(beta),
                    dg.device_ptr() as *mut c_void,
                    db.device_ptr() as *mut c_void,
                    eps.max(1e-5),
                    ptr(save_mean),
                    ptr(save_invstd),
                    act.0,
                    ws.ptr(),
                    ws.bytes,
                    reserve.ptr(),
                    reserve.bytes,
                )
            },
            "cudnnBatchNormalizationBackwardEx",
        )?;
        Ok((
            dx.into_tensor(x.shape()).with_layout(layout),
            dz.map(|b| b.into_tensor(x.shape()).with_layout(layout)),
            tensor(&[c], dg),
            tensor(&[c], db),
        ))
    });
    match out {
        Ok(r) => r,
        Err(Fail::Oom(o)) => std::panic::panic_any(o),
        Err(Fail::Msg(m)) => panic!("cuda:{}: {m}", gpu.ordinal),
    }
}
