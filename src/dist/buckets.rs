//! Buckets of gradients: which trainable parameters are summed across ranks together, and when a
//! bucket may start while the backward pass is still running.
//!
//! `plan` cuts the trainable parameters, in reverse parameter order (the order the backward pass
//! finishes them: the head first, the stem last), into buckets of whole tensors of at most
//! `BUCKET_VALUES` values (a larger tensor is a bucket of its own), as PyTorch's DDP does. Every
//! rank makes the same plan from the same network.
//!
//! `Schedule` follows a backward pass (`Tape::backward_then` reports each parameter whose gradient
//! is final) and says which buckets may be launched now. Buckets are launched strictly in plan
//! order, on every rank: collective libraries (NCCL) require every rank to issue the same
//! collectives in the same order, and a rank whose backward finishes the parameters in another
//! order, or which has no images this step and runs no backward at all (`rest`), must still issue
//! them identically.

use crate::autograd::{ParamKind, ParamStore};
use std::collections::HashMap;

/// Gradient values per bucket (DDP's default is 25 MB of f32, about 6.5 M values).
pub const BUCKET_VALUES: usize = 6_500_000;

/// The buckets of `store`'s trainable parameters (indices into the store), in launch order.
pub fn plan(store: &ParamStore, bucket_values: usize) -> Vec<Vec<usize>> {
    let mut ids: Vec<(usize, usize)> = store
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind == ParamKind::Trainable)
        .map(|(i, p)| (i, p.value.numel()))
        .collect();
    ids.reverse();
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut values = 0;
    for (i, n) in ids {
        match buckets.last_mut() {
            Some(b) if values + n <= bucket_values => {
                b.push(i);
                values += n;
            }
            _ => {
                buckets.push(vec![i]);
                values = n;
            }
        }
    }
    buckets
}

/// Which buckets of a plan are ready, as the parameters' gradients become final.
#[derive(Debug)]
pub struct Schedule {
    bucket_of: HashMap<usize, usize>,
    /// Parameters of each bucket not yet final.
    left: Vec<usize>,
    /// Buckets launched so far (a prefix of the plan).
    launched: usize,
}

impl Schedule {
    pub fn new(plan: &[Vec<usize>]) -> Schedule {
        let mut bucket_of = HashMap::new();
        for (b, params) in plan.iter().enumerate() {
            for &p in params {
                bucket_of.insert(p, b);
            }
        }
        Schedule {
            bucket_of,
            left: plan.iter().map(Vec::len).collect(),
            launched: 0,
        }
    }

    /// Parameter `param`'s gradient is final: the buckets that may be launched now, in order (the
    /// next ones of the plan whose parameters are all final). A parameter outside the plan (not
    /// trainable) or reported twice changes nothing.
    pub fn ready(&mut self, param: usize) -> std::ops::Range<usize> {
        if let Some(&b) = self.bucket_of.get(&param) {
            self.bucket_of.remove(&param);
            self.left[b] -= 1;
        }
        let from = self.launched;
        while self.launched < self.left.len() && self.left[self.launched] == 0 {
            self.launched += 1;
        }
        from..self.launched
    }

    /// The buckets not launched yet, in order, now marked launched: after the backward pass
    /// (parameters that got no gradient), or for a rank without images this step.
    pub fn rest(&mut self) -> std::ops::Range<usize> {
        let from = self.launched;
        self.launched = self.left.len();
        from..self.launched
    }

    /// Whether every bucket has been launched.
    pub fn done(&self) -> bool {
        self.launched == self.left.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn store(sizes: &[usize]) -> ParamStore {
        let mut ps = ParamStore::new();
        for (i, &n) in sizes.iter().enumerate() {
            let kind = if i == 1 {
                ParamKind::Frozen
            } else {
                ParamKind::Trainable
            };
            ps.add(format!("p{i}"), Tensor::from_vec(&[n], vec![0f32; n]), kind);
        }
        ps
    }

    #[test]
    fn plans_take_trainable_parameters_in_reverse_order_in_whole_tensors() {
        // p1 is frozen; bucket limit 10 values.
        let ps = store(&[4, 100, 3, 5, 12, 2]);
        assert_eq!(plan(&ps, 10), vec![vec![5], vec![4], vec![3, 2], vec![0]]);
        assert_eq!(plan(&ps, 1000), vec![vec![5, 4, 3, 2, 0]]);
        // One value per bucket: one tensor each.
        assert_eq!(plan(&ps, 1).len(), 5);
    }

    #[test]
    fn buckets_launch_in_plan_order_once_each() {
        let plan = vec![vec![5], vec![4], vec![3, 2], vec![0]];
        let mut s = Schedule::new(&plan);
        assert_eq!(s.ready(4), 0..0, "bucket 1 waits for bucket 0");
        assert_eq!(s.ready(5), 0..2, "then both go, in order");
        assert_eq!(s.ready(2), 2..2, "bucket 2 still waits for parameter 3");
        assert_eq!(s.ready(2), 2..2, "a second report changes nothing");
        assert_eq!(s.ready(1), 2..2, "a frozen parameter changes nothing");
        assert_eq!(s.ready(3), 2..3);
        assert!(!s.done());
        // Parameter 0 got no gradient: the rest goes after the backward pass.
        assert_eq!(s.rest(), 3..4);
        assert!(s.done());
        assert_eq!(s.rest(), 4..4);
        // A rank without images launches everything, in the same order.
        let mut idle = Schedule::new(&plan);
        assert_eq!(idle.rest(), 0..4);
    }

    /// With a real backward pass: a small ResNet's parameters are reported once each, every
    /// gradient is final when reported, and the buckets all launch during the backward pass.
    #[test]
    fn a_resnet_backward_pass_reports_every_gradient_once_when_final() {
        use crate::autograd::{ParamId, Tape};
        use crate::nn::{HeadSpec, ModelSpec, Network, Stem};
        let spec = ModelSpec {
            arch: "resnet18".into(),
            width: 4,
            stem: Stem::Cifar,
            in_channels: 3,
            classes: 4,
            feature_dim: 8,
            head: HeadSpec::Linear,
            image_size: 8,
            drop_path: None,
        };
        let mut ps = ParamStore::new();
        let mut rng = crate::rng::Rng::new(3);
        let net = Network::new(spec, &mut ps, crate::tensor::DType::F32, &mut rng).unwrap();
        let x: Vec<f32> = (0..2 * 3 * 8 * 8).map(|_| rng.normal() as f32).collect();
        let loss_of = |ps: &mut ParamStore, t: &mut Tape| {
            let xv = t.constant(Tensor::from_vec(&[2, 3, 8, 8], x.clone()));
            let out = net.forward(t, ps, &xv);
            let labels = crate::loss::labels_tensor(&[1, 3], out.logits.value());
            crate::loss::softmax_cross_entropy(t, &out.logits, &labels)
        };
        // The final gradients, from a plain backward pass.
        let mut t = Tape::train();
        let l = loss_of(&mut ps, &mut t);
        ps.zero_grad();
        t.backward(&l, &mut ps);
        let want: Vec<Option<Vec<f32>>> = ps
            .iter()
            .map(|p| p.grad.as_ref().map(|g| g.to_vec_f32()))
            .collect();
        // Again, reporting.
        let plan = plan(&ps, 2_000);
        assert!(plan.len() > 4, "several buckets: {plan:?}");
        let mut sched = Schedule::new(&plan);
        let mut reported: Vec<usize> = Vec::new();
        let mut launched: Vec<usize> = Vec::new();
        let mut t = Tape::train();
        let l = loss_of(&mut ps, &mut t);
        ps.zero_grad();
        t.backward_then(&l, &mut ps, &mut |ps: &mut ParamStore, id: ParamId| {
            let g = ps.get(id).grad.as_ref().map(|g| g.to_vec_f32());
            assert_eq!(
                g,
                want[id.0],
                "{} reported before its gradient was final",
                ps.get(id).name
            );
            reported.push(id.0);
            launched.extend(sched.ready(id.0));
        });
        let trainable = ps.iter().filter(|p| p.kind == ParamKind::Trainable).count();
        let mut once = reported.clone();
        once.sort_unstable();
        once.dedup();
        assert_eq!((reported.len(), once.len()), (trainable, trainable));
        assert_eq!(launched, (0..plan.len()).collect::<Vec<_>>());
        assert!(
            sched.done(),
            "every bucket launched during the backward pass"
        );
    }
}
