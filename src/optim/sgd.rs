//! Stochastic gradient descent with momentum and weight decay, with PyTorch's `optim.SGD` semantics
//! (dampening 0):
//!
//! ```text
//! g   = grad + wd · w
//! buf = g                      on a parameter's first step
//! buf = momentum · buf + g     afterwards
//! d   = g + momentum · buf     if nesterov, else d = buf
//! w  -= lr · d
//! ```
//!
//! Only `ParamKind::Trainable` parameters are updated or decayed; the frozen PEDCC head and the
//! batch-norm buffers are never touched. A trainable parameter without a gradient is skipped, as
//! PyTorch skips parameters whose `.grad` is `None`.

use crate::autograd::{ParamKind, ParamStore};
use crate::tensor::{DType, Device, Elem, Tensor};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};

/// What SGD remembers between steps: one momentum buffer per trainable parameter (by parameter
/// name) and the number of steps taken. Saved in checkpoints.
#[derive(Clone, Debug, Default)]
pub struct SgdState {
    pub momentum: BTreeMap<String, Tensor>,
    pub steps: u64,
}

/// A flag word that turns an SGD step into a no-op while it is non-zero: word `index` of `words`, a
/// tensor of 32-bit words on the parameters' device (the trainer's step ledger,
/// `train::ledger::StepLedger::skip_flag`, whose guard sets it when a step is not finite).
#[derive(Clone, Copy)]
pub struct SkipIf<'a> {
    pub words: &'a Tensor,
    pub index: usize,
}

impl SkipIf<'_> {
    /// Whether the flag is set, read on the host: in place for a host tensor, a read (a wait) for a
    /// GPU one.
    pub fn is_set(&self) -> bool {
        match self.words.device() {
            Device::Cpu => self.words.host::<f32>()[self.index].to_bits() != 0,
            Device::Cuda(_) => self.words.to_vec_f32()[self.index].to_bits() != 0,
        }
    }

    /// The flag's device address (GPU tensors only).
    fn device_ptr(&self) -> u64 {
        crate::cuda::buf(self.words).device_ptr() + 4 * self.index as u64
    }
}

#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// Trainable parameters that are not decayed (timm's groups for the transformers: norms,
    /// biases, position embeddings, tokens); empty for the paper's CNN recipe, which decays all.
    pub no_decay: BTreeSet<String>,
    state: SgdState,
    /// The device address of an f32 learning rate that the one-launch GPU update reads instead
    /// of its `lr` argument (a CUDA graph's step scalars: arguments are frozen at capture).
    device_lr: Option<u64>,
}

impl Sgd {
    /// Errors on negative or non-finite hyper-parameters and on nesterov without momentum (the
    /// checks PyTorch makes).
    pub fn new(momentum: f64, weight_decay: f64, nesterov: bool) -> Result<Sgd> {
        if !(momentum.is_finite() && momentum >= 0.0) {
            bail!("SGD momentum must be a finite number >= 0, got {momentum}");
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            bail!("SGD weight decay must be a finite number >= 0, got {weight_decay}");
        }
        if nesterov && momentum == 0.0 {
            bail!("nesterov momentum needs momentum > 0");
        }
        Ok(Sgd {
            momentum,
            weight_decay,
            nesterov,
            no_decay: BTreeSet::new(),
            state: SgdState::default(),
            device_lr: None,
        })
    }

    /// Makes the one-launch GPU update read its learning rate from this device address (an f32,
    /// `cuda::graph::StepScalars::lr_ptr`) instead of the `lr` argument; `None` goes back to the
    /// argument. The per-tensor paths always use the argument.
    pub fn set_device_lr(&mut self, ptr: Option<u64>) {
        self.device_lr = ptr;
    }

    /// Counts a step taken outside `step` (a replay of a captured step, which runs the update on
    /// the device without this code), so that the saved state counts every step.
    pub fn count_replayed_step(&mut self) {
        self.state.steps += 1;
    }

    /// Sets the step count back to `steps` (what it was before a capture that failed: its host
    /// code counted a step that never ran).
    pub fn restore_step_count(&mut self, steps: u64) {
        self.state.steps = steps;
    }

    /// One update of every trainable parameter that has a gradient, at learning rate `lr`.
    ///
    /// When all of them are on one GPU, the whole update is one kernel launch
    /// (`cuda::optim::sgd_step_guarded`); otherwise each tensor is updated on its own device by
    /// `sgd_update`.
    pub fn step(&mut self, store: &mut ParamStore, lr: f64) {
        self.step_unless(store, lr, None);
    }

    /// `step`, except that nothing changes (no parameter, no momentum buffer) while `skip` is set: the
    /// trainer's numerics guard sets it on the device once a step's loss or gradient is not finite,
    /// and the one-launch GPU update tests it there, so the weights stay the last good ones without
    /// the host waiting for the check. On the CPU the flag is read in place (free). A GPU update that
    /// cannot take the one-launch path (parameters on several devices, more than 65 535 tensors)
    /// reads the flag to the host first: one wait per step.
    pub fn step_unless(&mut self, store: &mut ParamStore, lr: f64, skip: Option<SkipIf>) {
        if !self.step_fused_cuda(store, lr, skip) && !skip.is_some_and(|s| s.is_set()) {
            self.step_per_tensor(store, lr);
        }
        self.state.steps += 1;
    }

    /// Whether the one-launch GPU update applies: every trainable parameter with a gradient (at
    /// least one) on the same GPU.
    fn fused_cuda_device(&self, store: &ParamStore) -> Option<Device> {
        let mut device = None;
        for p in store.iter() {
            let Some(g) = &p.grad else { continue };
            if p.kind != ParamKind::Trainable {
                continue;
            }
            let d = p.value.device();
            if !matches!(d, Device::Cuda(_)) || g.device() != d || device.is_some_and(|x| x != d) {
                return None;
            }
            device = Some(d);
        }
        device
    }

    /// The whole update in one launch; false (nothing done) when it does not apply.
    fn step_fused_cuda(&mut self, store: &mut ParamStore, lr: f64, skip: Option<SkipIf>) -> bool {
        let Some(device) = self.fused_cuda_device(store) else {
            return false;
        };
        // The flag must be on the parameters' GPU for the kernel to read it.
        let skip_ptr = match skip {
            None => None,
            Some(s) if s.words.device() == device => Some(s.device_ptr()),
            Some(_) => return false,
        };
        let updated =
            |p: &crate::autograd::Param| p.kind == ParamKind::Trainable && p.grad.is_some();
        if store.iter().filter(|p| updated(p)).count() > 65_535 {
            return false; // more tensors than one launch's grid holds
        }
        // The kernel writes the parameters and momentum buffers in place: make sure no other tensor
        // (a tape still holding a value, a clone) shares their buffers, as `host_mut` does on the CPU.
        // A missing buffer starts at zero, which makes the first step's buffer the gradient.
        // Without momentum there are no buffers (as on the CPU); the kernel then never touches the
        // table's momentum pointer, which is given the gradient's.
        let with_momentum = self.momentum != 0.0;
        let mut bufs = Vec::new();
        for p in store.iter_mut().filter(|p| updated(p)) {
            p.value.device_buf_mut();
            if !with_momentum {
                continue;
            }
            let mut b = match self.state.momentum.remove(&p.name) {
                Some(b) if b.device() == device => b,
                Some(b) => b.to_device(device),
                None => Tensor::zeros(p.value.shape(), DType::F32, device),
            };
            b.device_buf_mut();
            bufs.push((p.name.clone(), b));
        }
        let table: Vec<crate::cuda::optim::SgdParam> = store
            .iter()
            .filter(|p| updated(p))
            .enumerate()
            .map(|(i, p)| {
                let grad = p.grad.as_ref().expect("filtered on grad");
                crate::cuda::optim::SgdParam {
                    param: &p.value,
                    grad,
                    momentum: bufs.get(i).map_or(grad, |(_, b)| b),
                    weight_decay: self.decay_of(&p.name) as f32,
                    frozen: false,
                }
            })
            .collect();
        crate::cuda::optim::sgd_step_guarded(
            &table,
            lr as f32,
            crate::cuda::optim::Momentum {
                momentum: self.momentum as f32,
                nesterov: self.nesterov,
                buffers: with_momentum,
            },
            skip_ptr,
            self.device_lr,
        );
        drop(table);
        self.state.momentum.extend(bufs);
        true
    }

    fn step_per_tensor(&mut self, store: &mut ParamStore, lr: f64) {
        for p in store.iter_mut() {
            if p.kind != ParamKind::Trainable {
                continue;
            }
            let Some(grad) = &p.grad else { continue };
            // Taking the buffer out of the map leaves it uniquely owned, so it updates in place.
            let mut buf = if self.momentum == 0.0 {
                None
            } else {
                self.state.momentum.remove(&p.name)
            };
            let wd = if self.no_decay.contains(&p.name) {
                0.0
            } else {
                self.weight_decay
            };
            sgd_update(
                &mut p.value,
                grad,
                &mut buf,
                lr,
                self.momentum,
                wd,
                self.nesterov,
            );
            if let Some(buf) = buf {
                self.state.momentum.insert(p.name.clone(), buf);
            }
        }
    }

    /// The weight decay of a parameter (0 for those in `no_decay`).
    fn decay_of(&self, name: &str) -> f64 {
        if self.no_decay.contains(name) {
            0.0
        } else {
            self.weight_decay
        }
    }

    /// Forgets all momentum, as re-creating the optimizer does (the reference code does this at every
    /// lr step, DESIGN.md §1.6.4). The next step starts every buffer afresh from the gradient.
    pub fn reset_momentum(&mut self) {
        self.state.momentum.clear();
    }

    pub fn state(&self) -> &SgdState {
        &self.state
    }

    /// Restores a saved state. Every buffer must belong to a trainable parameter of `store` with the
    /// same shape; buffers are moved to that parameter's device and dtype.
    pub fn load_state(&mut self, state: SgdState, store: &ParamStore) -> Result<()> {
        let mut momentum = BTreeMap::new();
        for (name, buf) in state.momentum {
            let Some(id) = store.find(&name) else {
                bail!("optimizer state has a momentum buffer for `{name}`, which the model does not have; the checkpoint is from another model");
            };
            let p = store.get(id);
            if p.kind != ParamKind::Trainable {
                bail!("optimizer state has a momentum buffer for `{name}`, which is not a trainable parameter of this model");
            }
            if p.value.shape() != buf.shape() {
                bail!(
                    "momentum buffer for `{name}` has shape {:?} but the parameter has shape {:?}",
                    buf.shape(),
                    p.value.shape()
                );
            }
            momentum.insert(name, to_place_of(&buf, &p.value));
        }
        self.state = SgdState {
            momentum,
            steps: state.steps,
        };
        Ok(())
    }
}

fn to_place_of(t: &Tensor, like: &Tensor) -> Tensor {
    match like.device() {
        Device::Cpu => t.to_dtype(like.dtype()),
        d => t.to_device(d),
    }
}

/// One SGD update of a parameter `w` in place, on its device. `buf` is the momentum buffer: `None`
/// before the first step (it is then created from the gradient) and always `None` when
/// `momentum == 0`.
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
    crate::ops::assert_same_place("sgd_update", &[w, grad]);
    assert_eq!(w.shape(), grad.shape(), "sgd_update: gradient shape");
    match (w.device(), w.dtype()) {
        (Device::Cuda(_), _) => {
            crate::cuda::optim::sgd_update(w, grad, buf, lr, momentum, weight_decay, nesterov)
        }
        (Device::Cpu, DType::F32) => {
            sgd_update_host::<f32>(w, grad, buf, lr, momentum, weight_decay, nesterov)
        }
        (Device::Cpu, DType::F64) => {
            sgd_update_host::<f64>(w, grad, buf, lr, momentum, weight_decay, nesterov)
        }
        (Device::Cpu, DType::Bf16) => panic!(
            "sgd_update of a bf16 parameter {w:?}: master weights are f32 (bf16 is a storage \
             precision of activations only)"
        ),
    }
}

/// The host kernel, in the element type of the parameter (hyper-parameters are rounded to it first,
/// as PyTorch does with its Python-float scalars).
fn sgd_update_host<T: Elem>(
    w: &mut Tensor,
    grad: &Tensor,
    buf: &mut Option<Tensor>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) {
    let (lr, m, wd) = (T::of(lr), T::of(momentum), T::of(weight_decay));
    // PyTorch adds the decay term only when weight_decay != 0 (0·w would turn an inf weight into NaN).
    let decay = weight_decay != 0.0;
    let decayed = |g: T, w: T| if decay { g + wd * w } else { g };
    let g_host = grad.host::<T>();
    let shape = w.shape().to_vec();
    let w_host = w.host_mut::<T>();
    if momentum == 0.0 {
        for (wi, &gi) in w_host.iter_mut().zip(g_host) {
            let g = decayed(gi, *wi);
            *wi -= lr * g;
        }
        return;
    }
    match buf {
        None => {
            // First step: buf = g.
            let mut b = Vec::with_capacity(w_host.len());
            for (wi, &gi) in w_host.iter_mut().zip(g_host) {
                let g = decayed(gi, *wi);
                let d = if nesterov { g + m * g } else { g };
                *wi -= lr * d;
                b.push(g);
            }
            *buf = Some(Tensor::from_vec(&shape, b));
        }
        Some(b) => {
            assert_eq!(b.shape(), &shape[..], "sgd_update: momentum buffer shape");
            let b_host = b.host_mut::<T>();
            for ((wi, &gi), bi) in w_host.iter_mut().zip(g_host).zip(b_host.iter_mut()) {
                let g = decayed(gi, *wi);
                *bi = m * *bi + g;
                let d = if nesterov { g + m * *bi } else { *bi };
                *wi -= lr * d;
            }
        }
    }
}
