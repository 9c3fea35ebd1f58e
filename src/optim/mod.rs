//! Optimisers and learning-rate schedules: SGD with momentum and weight decay stepped ×γ at fixed
//! epochs (the paper's CNN recipe, DESIGN.md §1.7); AdamW, linear warm-up and cosine decay stepped
//! per iteration, and gradient clipping by global norm (the transformers' recipes, §1.8).

pub mod adamw;
pub mod clip;
pub mod lr;
mod schedule;
mod sgd;

pub use adamw::AdamW;
pub use clip::clip_grad_norm;
pub use lr::{Decay, LrSchedule};
pub use schedule::StepSchedule;
pub use sgd::{sgd_update, Sgd, SgdState, SkipIf};

use crate::autograd::ParamStore;
use std::collections::BTreeSet;

/// The optimiser of a run, behind one interface for the trainer.
#[derive(Clone, Debug)]
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    pub fn step_unless(&mut self, store: &mut ParamStore, lr: f64, skip: Option<SkipIf>) {
        match self {
            Optimizer::Sgd(o) => o.step_unless(store, lr, skip),
            Optimizer::AdamW(o) => o.step_unless(store, lr, skip),
        }
    }

    /// The state saved in checkpoints (SGD: momentum by parameter name; AdamW: `exp_avg.<name>`,
    /// `exp_avg_sq.<name>`), with the step count.
    pub fn state(&self) -> SgdState {
        match self {
            Optimizer::Sgd(o) => o.state().clone(),
            Optimizer::AdamW(o) => o.state(),
        }
    }

    pub fn load_state(&mut self, state: SgdState, store: &ParamStore) -> anyhow::Result<()> {
        match self {
            Optimizer::Sgd(o) => o.load_state(state, store),
            Optimizer::AdamW(o) => o.load_state(state, store),
        }
    }

    /// Forgets SGD's momentum (the reference variant at lr milestones); nothing for AdamW.
    pub fn reset_momentum(&mut self) {
        if let Optimizer::Sgd(o) = self {
            o.reset_momentum();
        }
    }

    /// Parameters that are not weight-decayed.
    pub fn set_no_decay(&mut self, names: BTreeSet<String>) {
        match self {
            Optimizer::Sgd(o) => o.no_decay = names,
            Optimizer::AdamW(o) => o.no_decay = names,
        }
    }
}

/// timm's rule for which parameters are not decayed: 1-D tensors (norms, biases) and any bias, the
/// position embeddings, the class token and the relative-position-bias tables.
pub fn timm_no_decay(store: &ParamStore) -> BTreeSet<String> {
    store
        .iter()
        .filter(|p| {
            p.value.rank() <= 1
                || p.name.ends_with(".bias")
                || ["pos_embed", "cls_token", "absolute_pos_embed"].contains(&p.name.as_str())
                || p.name.ends_with("relative_position_bias_table")
        })
        .map(|p| p.name.clone())
        .collect()
}
