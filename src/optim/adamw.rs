//! AdamW (Loshchilov & Hutter), with PyTorch's `optim.AdamW` semantics:
//!
//! ```text
//! w  ← w·(1 − lr·wd)                       (decoupled weight decay)
//! m  ← β1·m + (1 − β1)·g
//! v  ← β2·v + (1 − β2)·g²
//! w  ← w − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
//! ```
//!
//! t is the step number (1-based). Parameters named in `no_decay` are not decayed (timm's groups:
//! norms, biases, position embeddings, tokens, relative-position tables). Only trainable parameters
//! with a gradient are updated. The state (m, v by parameter name, and t) is saved in checkpoints:
//! `exp_avg.<name>` and `exp_avg_sq.<name>` in the optimizer-buffer map.

use super::sgd::{SgdState, SkipIf};
use crate::autograd::{ParamKind, ParamStore};
use crate::tensor::{DType, Device, Elem, Tensor};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};

/// Key prefixes of AdamW's two moments in the saved buffer map.
pub const EXP_AVG: &str = "exp_avg.";
pub const EXP_AVG_SQ: &str = "exp_avg_sq.";

#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub no_decay: BTreeSet<String>,
    exp_avg: BTreeMap<String, Tensor>,
    exp_avg_sq: BTreeMap<String, Tensor>,
    steps: u64,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<AdamW> {
        for (name, v) in [("beta1", beta1), ("beta2", beta2)] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                bail!("AdamW {name} must be in [0, 1), got {v}");
            }
        }
        if !(eps.is_finite() && eps > 0.0) {
            bail!("AdamW eps must be a finite number > 0, got {eps}");
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            bail!("AdamW weight decay must be a finite number >= 0, got {weight_decay}");
        }
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            no_decay: BTreeSet::new(),
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
            steps: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update at learning rate `lr`; nothing changes (the step count neither) while `skip` is
    /// set. On a GPU the flag is tested by the kernels, so the host never waits for it.
    pub fn step_unless(&mut self, store: &mut ParamStore, lr: f64, skip: Option<SkipIf>) {
        let on_gpu = store
            .iter()
            .any(|p| p.kind == ParamKind::Trainable && p.grad.is_some() && p.value.is_cuda());
        if !on_gpu && skip.is_some_and(|s| s.is_set()) {
            return;
        }
        // On the GPU a skipped step still counts t (the flag is not read here); a skipped step
        // stops the run anyway (the numerics guard), so t never matters after one.
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for p in store.iter_mut() {
            if p.kind != ParamKind::Trainable {
                continue;
            }
            let Some(grad) = &p.grad else { continue };
            let wd = if self.no_decay.contains(&p.name) {
                0.0
            } else {
                self.weight_decay
            };
            let zeros = || Tensor::zeros(p.value.shape(), p.value.dtype(), p.value.device());
            let mut m = self.exp_avg.remove(&p.name).unwrap_or_else(zeros);
            let mut v = self.exp_avg_sq.remove(&p.name).unwrap_or_else(zeros);
            let h = AdamHyper {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: wd,
                bc1,
                bc2,
            };
            match (p.value.device(), p.value.dtype()) {
                (Device::Cuda(_), _) => {
                    let flag = skip.filter(|s| s.words.device() == p.value.device());
                    crate::cuda::adamw::adamw_update(&mut p.value, grad, &mut m, &mut v, &h, flag)
                }
                (Device::Cpu, DType::F32) => {
                    adamw_host::<f32>(&mut p.value, grad, &mut m, &mut v, &h)
                }
                (Device::Cpu, DType::F64) => {
                    adamw_host::<f64>(&mut p.value, grad, &mut m, &mut v, &h)
                }
                (Device::Cpu, DType::Bf16) => panic!(
                    "adamw: parameter {} is bf16, but master weights are f32 (bf16 is a storage \
                     precision of activations only)",
                    p.name
                ),
            }
            self.exp_avg.insert(p.name.clone(), m);
            self.exp_avg_sq.insert(p.name.clone(), v);
        }
    }

    /// The state as the checkpoint's optimizer-buffer map.
    pub fn state(&self) -> SgdState {
        let mut momentum = BTreeMap::new();
        for (k, t) in &self.exp_avg {
            momentum.insert(format!("{EXP_AVG}{k}"), t.clone());
        }
        for (k, t) in &self.exp_avg_sq {
            momentum.insert(format!("{EXP_AVG_SQ}{k}"), t.clone());
        }
        SgdState {
            momentum,
            steps: self.steps,
        }
    }

    /// Restores a saved state; every buffer must belong to a trainable parameter of the same shape.
    pub fn load_state(&mut self, state: SgdState, store: &ParamStore) -> Result<()> {
        let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
        for (key, buf) in state.momentum {
            let (map, name) = if let Some(n) = key.strip_prefix(EXP_AVG_SQ) {
                (&mut v, n)
            } else if let Some(n) = key.strip_prefix(EXP_AVG) {
                (&mut m, n)
            } else {
                bail!("optimizer state has a buffer `{key}` that is not AdamW's (the checkpoint was written with another optimizer)");
            };
            let Some(id) = store.find(name) else {
                bail!("optimizer state has a buffer for `{name}`, which the model does not have; the checkpoint is from another model");
            };
            let p = store.get(id);
            if p.kind != ParamKind::Trainable || p.value.shape() != buf.shape() {
                bail!(
                    "optimizer buffer `{key}` does not fit parameter `{name}` {:?}",
                    p.value.shape()
                );
            }
            let placed = match p.value.device() {
                Device::Cpu => buf.to_dtype(p.value.dtype()),
                d => buf.to_device(d),
            };
            map.insert(name.to_string(), placed);
        }
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.steps = state.steps;
        Ok(())
    }
}

/// The numbers of one AdamW update of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 − β1ᵗ and 1 − β2ᵗ.
    pub bc1: f64,
    pub bc2: f64,
}

/// The host kernel, in the parameter's element type (PyTorch's order of operations).
pub fn adamw_host<T: Elem>(
    w: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    h: &AdamHyper,
) {
    let g = grad.host::<T>();
    let (b1, b2, eps) = (T::of(h.beta1), T::of(h.beta2), T::of(h.eps));
    let decay = T::of(1.0 - h.lr * h.weight_decay);
    let step = T::of(h.lr / h.bc1);
    let sqrt_bc2 = T::of(h.bc2.sqrt());
    let ms = m.host_mut::<T>();
    let vs = v.host_mut::<T>();
    let ws = w.host_mut::<T>();
    for i in 0..ws.len() {
        if h.weight_decay != 0.0 {
            ws[i] = ws[i] * decay;
        }
        ms[i] = ms[i] * b1 + (T::one() - b1) * g[i];
        vs[i] = vs[i] * b2 + (T::one() - b2) * g[i] * g[i];
        let denom = vs[i].sqrt() / sqrt_bc2 + eps;
        ws[i] -= step * ms[i] / denom;
    }
}
