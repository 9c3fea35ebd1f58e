//! Training steps replayed from a CUDA graph (opt-in: `PODGPU_CUDA_GRAPH=1`, on a GPU).
//!
//! Each epoch's steps are eager until one eager step has run in it (cuDNN's algorithms chosen, the
//! pool's cache filled, SGD's momentum buffers made); then the next full batch's step is captured
//! once (`cuda::graph::StepGraph`) and every later full batch of the epoch replays it. What
//! changes per step reaches the graph through memory made before the capture: the images and
//! labels are copied into its input buffers, and the learning rate and the step number into
//! `StepScalars`, which the SGD kernel and the numerics guard read on the device. Everything else
//! a step touches stays where it is (parameters, momentum, batch-norm statistics, the epoch's
//! ledger), so the graph is made again each epoch (a new ledger, a new δ). A last, smaller batch
//! runs eagerly.
//!
//! Not for: `--detect-anomaly` (it inspects values on the host), `--clip-grad`, AdamW, the Center
//! Loss and COT (host-side per-step updates), drop path (a random stream per step), the test
//! hook that poisons a gradient. A step that cannot be captured (an op that uploads or reads back)
//! is reported once and the run goes on eagerly.

use super::config::{LossKind, OptimizerKind, TrainConfig};
use super::ledger::StepLedger;
use crate::autograd::{ParamStore, Tape};
use crate::cuda::graph::{addresses, StepGraph, StepScalars};
use crate::cuda::Gpu;
use crate::loss;
use crate::nn::Network;
use crate::optim::Optimizer;
use crate::tensor::{Device, Tensor};
use anyhow::{bail, Result};
use std::sync::Arc;

/// Whether this run asked for graphs (`PODGPU_CUDA_GRAPH=1`) and can have them: `Ok(None)` when
/// not asked, `Ok(Some(gpu))` when asked and possible, an error naming what stands in the way.
pub fn wanted(cfg: &TrainConfig, device: Device) -> Result<Option<Arc<Gpu>>> {
    match std::env::var("PODGPU_CUDA_GRAPH").ok().as_deref() {
        None | Some("") | Some("0") => return Ok(None),
        Some("1") => {}
        Some(other) => bail!("PODGPU_CUDA_GRAPH={other:?}: expected 1 (replay steps) or 0"),
    }
    let Device::Cuda(ordinal) = device else {
        bail!("PODGPU_CUDA_GRAPH=1 needs a GPU (--device cuda); unset it to train on the CPU");
    };
    let refuse = |what: &str| -> Result<Option<Arc<Gpu>>> {
        bail!("PODGPU_CUDA_GRAPH=1 cannot replay steps with {what}; unset it, or drop {what}")
    };
    if cfg.detect_anomaly {
        return refuse("--detect-anomaly");
    }
    if cfg.clip_grad.is_some() {
        return refuse("--clip-grad");
    }
    if cfg.optimizer != OptimizerKind::Sgd {
        return refuse("AdamW");
    }
    if matches!(cfg.loss, LossKind::Center | LossKind::Cot) {
        return refuse("the Center Loss or COT (they update on the host after each step)");
    }
    if cfg.drop_path.is_some_and(|p| p > 0.0) {
        return refuse("drop path");
    }
    Ok(Some(Gpu::get(ordinal).map_err(anyhow::Error::msg)?))
}

/// The parts of a run a step reads and updates.
pub struct StepParts<'a> {
    pub net: &'a Network,
    pub ps: &'a mut ParamStore,
    pub objective: &'a super::objective::Objective,
    pub opt: &'a mut Optimizer,
    pub ledger: &'a mut StepLedger,
    pub cfg: &'a TrainConfig,
    pub delta: f64,
}

/// A step's device work as the eager loop does it for the losses and settings `wanted` accepts:
/// forward, loss, backward, the guard, SGD, and the step's sums into the ledger.
fn device_step(p: &mut StepParts, x: &Tensor, y: &Tensor, labels: &[usize], lr: f64, step: u64) {
    let mut tape = Tape::train();
    let xv = tape.constant(x.clone());
    let out = p.net.forward(&mut tape, p.ps, &xv);
    let l = p.objective.loss(&mut tape, p.ps, &out, y, p.delta);
    let loss_t = l.value().clone();
    tape.backward(&l, p.ps);
    drop(tape);
    p.ledger.guard(step, p.ps, &loss_t);
    p.opt.step_unless(p.ps, lr, Some(p.ledger.skip_flag()));
    p.ps.zero_grad();
    let norms = loss::delta_norms(p.cfg.variant, out.features.value(), out.logits.value());
    p.ledger
        .add_step(&loss_t, out.logits.value(), y, labels, &norms, labels.len());
}

/// How a capture went.
pub enum Captured {
    /// Captured and run once; later full batches replay it.
    Replaying(Graphed),
    /// Run once (the batch is trained) but not replayable: go on eagerly.
    RanOnce(String),
    /// Nothing ran and nothing changed (counts put back): train this batch eagerly.
    Failed(String),
    /// The model's state cannot be trusted (a failed capture after state moved, or a failed
    /// launch): stop the run; the last checkpoint is intact.
    Broken(String),
}

/// One epoch's captured step and its input buffers.
pub struct Graphed {
    graph: StepGraph,
    x: Tensor,
    y: Tensor,
    scalars: StepScalars,
    batch: usize,
}

impl Graphed {
    /// Captures the step of this batch and runs it (a capture only records); see `Captured`.
    pub fn capture(
        gpu: &Arc<Gpu>,
        p: &mut StepParts,
        images: &Tensor,
        labels: &[usize],
        lr: f64,
        step: u64,
    ) -> Captured {
        let device = Device::Cuda(gpu.ordinal);
        let x = images.to_device(device);
        let y = loss::labels_tensor(labels, &x);
        let mut scalars = StepScalars::new(gpu);
        scalars.set(lr, step);
        let state = |ps: &ParamStore, opt: &Optimizer| -> Vec<u64> {
            let momentum = match opt {
                Optimizer::Sgd(s) => s.state().momentum.values().cloned().collect(),
                Optimizer::AdamW(_) => Vec::new(),
            };
            addresses(ps.iter().map(|q| &q.value).chain(momentum.iter()))
        };
        let before = state(p.ps, p.opt);
        // What the step's host code counts during the capture; put back if the capture fails.
        let counts = (p.opt.state().steps, p.ledger.unread());
        if let Optimizer::Sgd(s) = p.opt {
            s.set_device_lr(Some(scalars.lr_ptr()));
        }
        p.ledger.set_device_step(Some(scalars.step_ptr()));
        let captured = StepGraph::capture(gpu, || device_step(p, &x, &y, labels, lr, step));
        // Eager steps after this one pass their own lr and step again.
        if let Optimizer::Sgd(s) = p.opt {
            s.set_device_lr(None);
        }
        p.ledger.set_device_step(None);
        let moved = state(p.ps, p.opt) != before;
        let graph = match captured {
            Ok((graph, ())) => graph,
            // State the step's host code moved to new memory holds what the recorded (never run)
            // copies would have written: nothing. The run cannot go on from it.
            Err(why) if moved => return Captured::Broken(why),
            Err(why) => {
                if let Optimizer::Sgd(s) = p.opt {
                    s.restore_step_count(counts.0);
                }
                p.ledger.restore_unread(counts.1);
                return Captured::Failed(why);
            }
        };
        // Run the recorded step once: that also fills any state the step moved, so the model is
        // whole whether or not the graph can be replayed again.
        if let Err(why) = graph.replay() {
            return Captured::Broken(why);
        }
        if moved {
            return Captured::RanOnce(
                "the captured step moved model state to new memory, so its graph cannot be \
                 replayed"
                    .into(),
            );
        }
        Captured::Replaying(Graphed {
            graph,
            x,
            y,
            scalars,
            batch: labels.len(),
        })
    }

    /// Whether a batch of this size can replay the graph.
    pub fn fits(&self, batch: usize) -> bool {
        batch == self.batch
    }

    /// Copies the batch and the step's scalars in and replays the step; counts it where the host
    /// keeps counts (SGD's steps, the ledger's unread steps).
    pub fn replay(
        &mut self,
        p: &mut StepParts,
        images: &Tensor,
        labels: &[usize],
        lr: f64,
        step: u64,
    ) -> Result<()> {
        let device = self.x.device();
        let at = addresses([&self.x, &self.y].into_iter());
        let x = images.to_device(device);
        self.y.assign(&loss::labels_tensor(labels, &x));
        self.x.assign(&x);
        if addresses([&self.x, &self.y].into_iter()) != at {
            bail!("a CUDA graph's input buffer was shared and moved (a podgpu bug)");
        }
        self.scalars.set(lr, step);
        self.graph.replay().map_err(anyhow::Error::msg)?;
        if let Optimizer::Sgd(s) = p.opt {
            s.count_replayed_step();
        }
        p.ledger.count_replayed_step();
        Ok(())
    }
}
