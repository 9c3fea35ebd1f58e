//! The autodiff tape.
//!
//! Forward ops return `Var`s (a value plus the index of the tape node that made it) and, when the tape is
//! recording and some input needs a gradient, push a node holding a backward closure. The closure owns
//! exactly what backward needs (saved activations); `backward()` walks the nodes in reverse and drops
//! each closure right after running it, so saved activations are freed as soon as they are used.
//! An inference tape records nothing and keeps nothing.

pub mod anomaly;
mod params;

pub use anomaly::Anomaly;
pub use params::{Param, ParamId, ParamKind, ParamStore};

use crate::ops;
use crate::tensor::Tensor;

/// The gradient of a node's output, in; gradients of its inputs, out (`None` where not needed).
/// `needs[i]` says whether input i wants a gradient, so backward can skip work (e.g. dX of the
/// first convolution).
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Vec<Option<Tensor>> + Send>;

/// Told that parameter `id`'s gradient in the store is final (`Tape::backward_then`).
pub type GradReady<'a> = dyn FnMut(&mut ParamStore, ParamId) + 'a;

const NO_NODE: usize = usize::MAX;

/// A value produced on a tape.
#[derive(Clone, Debug)]
pub struct Var {
    value: Tensor,
    node: usize,
}

impl Var {
    pub fn value(&self) -> &Tensor {
        &self.value
    }
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    /// Whether a gradient flows back through this value.
    pub fn requires_grad(&self) -> bool {
        self.node != NO_NODE
    }
}

enum NodeKind {
    /// A parameter leaf: its gradient is accumulated into the parameter store.
    Param(ParamId),
    /// A leaf created by `Tape::leaf` whose gradient the caller wants back (`Tape::grad_of`).
    Input,
    /// The output of an op.
    Op {
        inputs: Vec<usize>,
        backward: Option<BackwardFn>,
        /// The op's name (see `anomaly::op_name`), for anomaly reports.
        name: &'static str,
    },
}

pub struct Tape {
    nodes: Vec<NodeKind>,
    recording: bool,
    training: bool,
    /// Gradients of `Input` leaves after `backward`.
    leaf_grads: Vec<(usize, Tensor)>,
    /// Check every op output and input gradient for non-finite values (`with_anomaly_detection`).
    detect_anomaly: bool,
    /// The first non-finite value found while `detect_anomaly` is on.
    anomaly: Option<Anomaly>,
    /// Random draws of the forward pass (drop path, dropout): seeded by the trainer per step.
    rng: Option<crate::rng::Rng>,
}

impl Tape {
    /// A recording tape in training mode (batch norm uses batch statistics).
    pub fn train() -> Tape {
        Tape {
            nodes: Vec::new(),
            recording: true,
            training: true,
            leaf_grads: Vec::new(),
            detect_anomaly: false,
            anomaly: None,
            rng: None,
        }
    }

    /// A tape that records nothing, in evaluation mode (batch norm uses running statistics).
    pub fn inference() -> Tape {
        Tape {
            nodes: Vec::new(),
            recording: false,
            training: false,
            leaf_grads: Vec::new(),
            detect_anomaly: false,
            anomaly: None,
            rng: None,
        }
    }

    /// Set training mode independently of recording (e.g. gradient checks of eval-mode BN).
    pub fn with_training(mut self, training: bool) -> Tape {
        self.training = training;
        self
    }

    /// Turns anomaly detection on: every op output (and, in `backward`, every gradient an op computes
    /// for its inputs) is checked for NaN/inf, and the first found is kept for `anomaly()`. Slow.
    pub fn with_anomaly_detection(mut self, on: bool) -> Tape {
        self.detect_anomaly = on;
        self
    }

    /// Seeds the random draws of this tape's forward pass (drop path, dropout). The trainer derives
    /// one stream per step from the run's seed, so a resumed run draws the same masks.
    pub fn with_rng(mut self, rng: crate::rng::Rng) -> Tape {
        self.rng = Some(rng);
        self
    }

    /// The tape's random stream (a fixed seed when none was given).
    pub fn rng(&mut self) -> &mut crate::rng::Rng {
        self.rng.get_or_insert_with(|| crate::rng::Rng::new(0))
    }

    /// The first non-finite value found by anomaly detection, if any.
    pub fn anomaly(&self) -> Option<&Anomaly> {
        self.anomaly.as_ref()
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Number of nodes currently recorded (tests use it to check that inference records nothing).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A constant: no gradient flows into it.
    pub fn constant(&self, value: Tensor) -> Var {
        Var {
            value,
            node: NO_NODE,
        }
    }

    /// A leaf whose gradient `grad_of` returns after `backward` (inputs of gradient checks).
    pub fn leaf(&mut self, value: Tensor) -> Var {
        if !self.recording {
            return self.constant(value);
        }
        self.nodes.push(NodeKind::Input);
        Var {
            value,
            node: self.nodes.len() - 1,
        }
    }

    /// A parameter as a value on this tape. Frozen parameters and buffers are constants.
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Var {
        let p = store.get(id);
        if !self.recording || p.kind != ParamKind::Trainable {
            return self.constant(p.value.clone());
        }
        self.nodes.push(NodeKind::Param(id));
        Var {
            value: p.value.clone(),
            node: self.nodes.len() - 1,
        }
    }

    /// Records an op. `make_backward` runs only when the tape records and an input needs a gradient,
    /// so inference never builds (or saves for) a backward closure.
    pub fn op<F: FnOnce() -> BackwardFn>(
        &mut self,
        value: Tensor,
        inputs: &[&Var],
        make_backward: F,
    ) -> Var {
        let name = anomaly::op_name::<F>();
        if self.detect_anomaly && self.anomaly.is_none() {
            let node = self.nodes.len();
            self.anomaly = anomaly::check(&value, name, anomaly::Phase::Forward, node);
        }
        if !self.recording || inputs.iter().all(|v| !v.requires_grad()) {
            return self.constant(value);
        }
        self.nodes.push(NodeKind::Op {
            inputs: inputs.iter().map(|v| v.node).collect(),
            backward: Some(make_backward()),
            name,
        });
        Var {
            value,
            node: self.nodes.len() - 1,
        }
    }

    /// Back-propagates from a scalar `loss` (seed gradient 1), accumulating into `store`'s gradients.
    pub fn backward(&mut self, loss: &Var, store: &mut ParamStore) {
        assert_eq!(loss.value.numel(), 1, "backward() needs a scalar loss");
        let seed = Tensor::full(&[1], 1.0, loss.value.dtype(), loss.value.device())
            .reshape(loss.value.shape());
        self.backward_with(loss, seed, store);
    }

    /// Back-propagates a given output gradient.
    pub fn backward_with(&mut self, out: &Var, grad_out: Tensor, store: &mut ParamStore) {
        self.backward_reporting(out, grad_out, store, None);
    }

    /// `backward` that calls `ready(store, id)` as soon as parameter `id`'s gradient in `store` is
    /// final: when the last (earliest recorded) of its uses on this tape has been back-propagated,
    /// whether or not a gradient reached it. Data-parallel training starts summing a bucket of
    /// gradients across ranks while the backward pass goes on (`dist::buckets`). Each parameter
    /// recorded on the tape is reported once; parameters the tape never saw are not reported.
    pub fn backward_then(&mut self, loss: &Var, store: &mut ParamStore, ready: &mut GradReady) {
        assert_eq!(loss.value.numel(), 1, "backward() needs a scalar loss");
        let seed = Tensor::full(&[1], 1.0, loss.value.dtype(), loss.value.device())
            .reshape(loss.value.shape());
        self.backward_reporting(loss, seed, store, Some(ready));
    }

    fn backward_reporting(
        &mut self,
        out: &Var,
        grad_out: Tensor,
        store: &mut ParamStore,
        mut ready: Option<&mut GradReady<'_>>,
    ) {
        assert!(
            out.requires_grad(),
            "backward() of a value that does not depend on any parameter or leaf"
        );
        // Uses of each parameter still to be back-propagated (one tape node per use), counted
        // only when someone wants to hear of final gradients.
        let mut uses: std::collections::HashMap<ParamId, usize> = Default::default();
        if ready.is_some() {
            for node in &self.nodes[..=out.node] {
                if let NodeKind::Param(pid) = node {
                    *uses.entry(*pid).or_default() += 1;
                }
            }
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; out.node + 1];
        grads[out.node] = Some(grad_out);
        self.leaf_grads.clear();
        for id in (0..=out.node).rev() {
            if let NodeKind::Param(pid) = &self.nodes[id] {
                let pid = *pid;
                if let Some(g) = grads[id].take() {
                    store.accumulate_grad(pid, g);
                }
                if let Some(ready) = ready.as_mut() {
                    let left = uses.get_mut(&pid).expect("counted above");
                    *left -= 1;
                    if *left == 0 {
                        ready(store, pid);
                    }
                }
                continue;
            }
            let Some(g) = grads[id].take() else { continue };
            match &mut self.nodes[id] {
                NodeKind::Param(_) => unreachable!("handled above"),
                NodeKind::Input => self.leaf_grads.push((id, g)),
                NodeKind::Op {
                    inputs,
                    backward,
                    name,
                } => {
                    let Some(f) = backward.take() else {
                        panic!("backward() ran twice over the same tape");
                    };
                    let needs: Vec<bool> = inputs.iter().map(|&i| i != NO_NODE).collect();
                    let input_grads = f(&g, &needs);
                    assert_eq!(input_grads.len(), inputs.len(), "backward arity");
                    for (k, (&i, ig)) in inputs.iter().zip(input_grads).enumerate() {
                        if i == NO_NODE {
                            continue;
                        }
                        if let Some(ig) = ig {
                            if self.detect_anomaly && self.anomaly.is_none() {
                                let phase = anomaly::Phase::Backward { input: k };
                                self.anomaly = anomaly::check(&ig, name, phase, id);
                            }
                            grads[i] = Some(match grads[i].take() {
                                Some(acc) => ops::add_fwd(&acc, &ig),
                                None => ig,
                            });
                        }
                    }
                }
            }
        }
    }

    /// The gradient of a `leaf` after `backward` (None if no gradient reached it).
    pub fn grad_of(&self, leaf: &Var) -> Option<&Tensor> {
        self.leaf_grads
            .iter()
            .find(|(id, _)| *id == leaf.node)
            .map(|(_, g)| g)
    }
}
