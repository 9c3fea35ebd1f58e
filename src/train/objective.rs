//! What the trainer minimises for each `--loss`: the loss of one batch from the network's outputs, and
//! what some losses do after the optimizer step (the Center Loss centre update, COT's complement step).
//! The trainer calls `loss` and `after_step` and never matches on the loss kind itself.

use super::config::{LossKind, TrainConfig};
use crate::autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
use crate::loss::baselines::{self, Margin, PedccLossConfig};
use crate::loss::{self, PodConfig, ScForm};
use crate::nn::{Network, Output};
use crate::optim::{Sgd, SkipIf};
use crate::tensor::{DType, Device, Tensor};
use anyhow::{anyhow, Result};

/// The name of the Center Loss centres [K, n] in the parameter store (a buffer, so they are saved in
/// checkpoints and restored on resume, but never touched by SGD).
pub const CENTERS_NAME: &str = "center_loss.centers";

/// Registers the Center Loss centres (zeros, as running class means start) when `loss` needs them.
pub fn register_loss_buffers(
    loss: LossKind,
    ps: &mut ParamStore,
    classes: usize,
    dim: usize,
    dtype: DType,
) {
    if loss == LossKind::Center && ps.find(CENTERS_NAME).is_none() {
        ps.add(
            CENTERS_NAME,
            Tensor::zeros(&[classes, dim], dtype, Device::Cpu),
            ParamKind::Buffer,
        );
    }
}

pub struct Objective {
    kind: LossKind,
    cfg: TrainConfig,
    /// The frozen PEDCC [K, n] on the training device (PEDCC-head losses).
    centroids: Option<Tensor>,
    centers: Option<ParamId>,
    /// COT's second optimizer: the complement step has its own momentum, as in the official code
    /// (its buffers are not checkpointed; a resumed COT run restarts them from zero).
    complement_sgd: Option<Sgd>,
}

impl Objective {
    /// `centroids` must be on the training device; `ps` must already hold the loss buffers
    /// (`register_loss_buffers`).
    pub fn new(cfg: &TrainConfig, centroids: Option<Tensor>, ps: &ParamStore) -> Result<Objective> {
        let kind = cfg.loss;
        if kind.uses_pedcc() && centroids.is_none() {
            return Err(anyhow!(
                "the {} loss needs the PEDCC centroids",
                kind.name()
            ));
        }
        let centers = match kind {
            LossKind::Center => Some(
                ps.find(CENTERS_NAME)
                    .ok_or_else(|| anyhow!("the Center Loss centres are not registered"))?,
            ),
            _ => None,
        };
        let complement_sgd = match kind {
            LossKind::Cot => Some(Sgd::new(cfg.momentum, cfg.weight_decay, cfg.nesterov)?),
            _ => None,
        };
        Ok(Objective {
            kind,
            cfg: cfg.clone(),
            centroids,
            centers,
            complement_sgd,
        })
    }

    /// The PEDCC of PEDCC-head losses.
    pub fn centroids(&self) -> Option<&Tensor> {
        self.centroids.as_ref()
    }

    fn pedcc(&self) -> &Tensor {
        self.centroids.as_ref().expect("checked in Objective::new")
    }

    /// The loss of one batch (the value to call `backward` on). `delta` is this epoch's δ (POD, NaC).
    pub fn loss(
        &self,
        t: &mut Tape,
        ps: &ParamStore,
        out: &Output,
        labels: &Tensor,
        delta: f64,
    ) -> Var {
        let c = &self.cfg;
        let scale = c.margin_scale;
        match self.kind {
            LossKind::Softmax | LossKind::Cot => {
                loss::softmax_cross_entropy(t, &out.logits, labels)
            }
            LossKind::Center => {
                let ce = loss::softmax_cross_entropy(t, &out.logits, labels);
                let centers = ps
                    .value(self.centers.expect("checked in Objective::new"))
                    .clone();
                let lc = baselines::center_loss(t, &out.features, &centers, labels);
                let weighted = crate::ops::scale(t, &lc, c.center_lambda);
                crate::ops::add(t, &ce, &weighted)
            }
            LossKind::AmSoftmax => baselines::margin_softmax_ce(
                t,
                &out.logits,
                labels,
                Margin::additive_cosine(c.am_margin),
                scale,
            ),
            LossKind::Arcface => baselines::margin_softmax_ce(
                t,
                &out.logits,
                labels,
                Margin::additive_angular(c.arc_margin),
                scale,
            ),
            LossKind::CombinedMargin => {
                let m = Margin::combined(c.cm_m1, c.cm_m2, c.cm_m3);
                baselines::margin_softmax_ce(t, &out.logits, labels, m, scale)
            }
            LossKind::PedccLoss => {
                let pc = PedccLossConfig {
                    margin: c.pedcc_margin,
                    scale: c.pedcc_scale,
                    lambda: c.pedcc_lambda,
                    root: c.pedcc_root,
                };
                baselines::pedcc_loss(t, &out.features, self.pedcc(), labels, &pc).loss
            }
            LossKind::Cosine => baselines::cosine_loss(t, &out.features, self.pedcc(), labels),
            LossKind::Nac => loss::nac(t, &out.features, self.pedcc(), labels, delta, c.variant),
            LossKind::Pod => {
                let pod = PodConfig {
                    variant: c.variant,
                    lambda: c.lambda,
                    sc_form: ScForm::Auto,
                };
                loss::pod(t, &out.features, self.pedcc(), labels, delta, &pod).loss
            }
        }
    }

    /// Runs after the optimizer step of a batch: moves the Center Loss centres towards the batch's
    /// features (computed before the step, as Wen et al.'s layer does), or takes COT's complement step:
    /// a second forward of the same images, the complement entropy, backward and its own SGD step (the
    /// second forward runs in training mode, so batch-norm statistics see the batch twice, as in the
    /// official COT code).
    ///
    /// `skip` is the trainer's numerics-guard flag: COT's complement update skips while it is set, as
    /// the main update does. (The Center Loss centres are a buffer, not weights, and are updated
    /// regardless: a run whose guard tripped stops without saving them.)
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        net: &Network,
        ps: &mut ParamStore,
        images: &Tensor,
        out: &Output,
        labels: &Tensor,
        lr: f64,
        skip: Option<SkipIf>,
    ) {
        match self.kind {
            LossKind::Center => {
                let id = self.centers.expect("checked in Objective::new");
                let updated = baselines::center_update_fwd(
                    ps.value(id),
                    out.features.value(),
                    labels,
                    self.cfg.center_alpha,
                );
                ps.set_value(id, updated);
            }
            LossKind::Cot => {
                let sgd = self
                    .complement_sgd
                    .as_mut()
                    .expect("created in Objective::new");
                let mut tape = Tape::train();
                let x = tape.constant(images.clone());
                let o = net.forward(&mut tape, ps, &x);
                let l = baselines::complement_entropy(&mut tape, &o.logits, labels);
                tape.backward(&l, ps);
                drop(tape);
                sgd.step_unless(ps, lr, skip);
                ps.zero_grad();
            }
            _ => {}
        }
    }
}
