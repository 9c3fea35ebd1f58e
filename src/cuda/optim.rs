//! The SGD update of every parameter tensor in one kernel launch (optim.cu).

use super::buf;
use super::launch::{check, func, gpu_of, NULL, THREADS};
use crate::tensor::Tensor;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// One row of the kernel's table; the layout matches `struct SgdEntry` in cuda/optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct SgdEntry {
    p: u64,
    g: u64,
    m: u64,
    n: i64,
    wd: f32,
    flags: i32,
}

/// One parameter's update inputs. `param` and `momentum` are updated in place: their buffers must
/// belong to the parameter store alone.
pub struct SgdParam<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub momentum: &'a Tensor,
    pub weight_decay: f32,
    /// Frozen tensors (the PEDCC head) are skipped.
    pub frozen: bool,
}

/// g = grad + wd·p; m = momentum·m + g; p −= lr·m for every entry, in one launch (PyTorch's SGD
/// with dampening 0; a zero momentum buffer makes the first step m = g as in PyTorch).
pub fn sgd_step(params: &[SgdParam], lr: f32, momentum: f32) {
    let m = Momentum {
        momentum,
        nesterov: false,
        buffers: true,
    };
    sgd_step_guarded(params, lr, m, None, None);
}

/// The momentum settings of `sgd_step_guarded`.
#[derive(Clone, Copy, Debug)]
pub struct Momentum {
    pub momentum: f32,
    /// d = g + momentum·m instead of m.
    pub nesterov: bool,
    /// false: plain SGD (p −= lr·g); the momentum tensors are neither read nor written.
    pub buffers: bool,
}

/// `sgd_step` with every setting of `optim::Sgd` (Nesterov, no momentum) and an optional skip
/// flag: `skip` is the device address of an i32 (the numerics guard's flag in the trainer's step
/// ledger, `cuda::guard`); while it is non-zero the kernel changes nothing. Nothing waits for the
/// device: the pointer table goes up with `Gpu::upload_constant` (a constant of a captured graph).
///
/// `lr_dev`: the device address of an f32 that overrides `lr` (a CUDA graph's step scalars,
/// `cuda::graph::StepScalars`).
pub fn sgd_step_guarded(
    params: &[SgdParam],
    lr: f32,
    m: Momentum,
    skip: Option<u64>,
    lr_dev: Option<u64>,
) {
    if params.is_empty() {
        return;
    }
    let gpu = gpu_of(params[0].param);
    let mut table = Vec::with_capacity(params.len());
    let mut max_n = 0usize;
    for p in params {
        let n = p.param.numel();
        assert!(
            p.grad.numel() == n && p.momentum.numel() == n,
            "sgd: sizes differ for a parameter"
        );
        max_n = max_n.max(n);
        table.push(SgdEntry {
            p: buf(p.param).device_ptr(),
            g: buf(p.grad).device_ptr(),
            m: buf(p.momentum).device_ptr(),
            n: n as i64,
            wd: p.weight_decay,
            flags: p.frozen as i32,
        });
    }
    let words: Vec<f32> = bytemuck::cast_slice(&table).to_vec();
    let dev_table = gpu.upload_constant(words);
    let count = table.len();
    assert!(
        count <= 65_535,
        "sgd: {count} tensors exceed one launch's grid"
    );
    let blocks_x = max_n
        .div_ceil(THREADS as usize)
        .clamp(1, gpu.info.multiprocessors.max(1) * 4);
    let cfg = LaunchConfig {
        grid_dim: (blocks_x as u32, count as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = func(&gpu, "optim", "sgd_multi_f32");
    let (c32, n32, b32) = (count as i32, m.nesterov as i32, m.buffers as i32);
    let skip = skip.unwrap_or(NULL);
    let lr_dev = lr_dev.unwrap_or(NULL);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dev_table.raw())
        .arg(&c32)
        .arg(&lr)
        .arg(&lr_dev)
        .arg(&m.momentum)
        .arg(&n32)
        .arg(&b32)
        .arg(&skip);
    // SAFETY: matches sgd_multi_f32(const SgdEntry*, int, float, const float*, float, int, int,
    // const int*); `lr_dev` is null or the address of a live f32 on this GPU; every
    // pointer in the table is a live buffer of n floats, kept alive by `params` until the kernel is
    // queued (and by the stream order after that, as the pool only reuses blocks for later work);
    // `skip` is null or the address of a live i32 on this GPU.
    check(unsafe { l.launch(cfg) }, "sgd_multi_f32");
}

/// y += a·x in place on y's own buffer (copied first if another tensor shares it).
fn axpy_owned(y: &mut Tensor, a: f64, x: &Tensor) {
    y.device_buf_mut();
    super::nn_kernels::axpy_(y, a, x);
}

/// One SGD update of one GPU parameter tensor, with every setting `optim::Sgd` has (the host
/// kernel's math, `optim::sgd_update`): g = grad + wd·w (only when wd ≠ 0); with momentum,
/// buf = g on the first step (`buf` is `None`) and momentum·buf + g afterwards; d = g + momentum·buf
/// (Nesterov) or buf; w −= lr·d. `w` is updated in place (its buffer is copied first if shared);
/// `buf` gets a new tensor. A few elementwise launches per tensor: `Sgd::step` uses `sgd_step`
/// (one launch for the whole model) instead whenever it can.
#[allow(clippy::too_many_arguments)]
pub fn sgd_update(
    w: &mut Tensor,
    grad: &Tensor,
    buf: &mut Option<Tensor>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) {
    use super::kernels::scale;
    // Rounded to f32 first, as the host kernel rounds them to the element type.
    let (lr, momentum, wd) = (
        lr as f32 as f64,
        momentum as f32 as f64,
        weight_decay as f32 as f64,
    );
    let g = if weight_decay != 0.0 {
        let mut g = scale(w, wd);
        axpy_owned(&mut g, 1.0, grad);
        g
    } else {
        grad.clone()
    };
    if momentum == 0.0 {
        axpy_owned(w, -lr, &g);
        return;
    }
    let b = match buf.take() {
        None => g.clone(),
        Some(old) => {
            assert_eq!(old.shape(), w.shape(), "sgd_update: momentum buffer shape");
            let mut b = scale(&old, momentum);
            axpy_owned(&mut b, 1.0, &g);
            b
        }
    };
    if nesterov {
        let mut d = scale(&b, momentum);
        axpy_owned(&mut d, 1.0, &g);
        axpy_owned(w, -lr, &d);
    } else {
        axpy_owned(w, -lr, &b);
    }
    *buf = Some(b);
}

#[cfg(test)]
mod tests {
    #[test]
    fn entry_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<super::SgdEntry>(), 40);
        assert_eq!(std::mem::align_of::<super::SgdEntry>(), 8);
    }
}
