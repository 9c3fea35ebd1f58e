//! Synchronised batch norm (`--sync-bn`): the statistics of every batch-norm layer over the global
//! batch, summed across ranks, as PyTorch's `SyncBatchNorm`.
//!
//! While a step runs with `activate`, `ops::batch_norm2d` in training mode comes here. Forward: each
//! rank's per-channel Σx and Σx² (f64) are summed across ranks; the mean and the biased variance of
//! the global batch normalise every rank's images, and the running statistics take the global
//! (unbiased) variance, so every rank keeps the same buffers. Backward, with w_r = b_r / B (this
//! rank's share of the global batch, whose loss L = Σ_r w_r·L_r the step minimises): Σ w_r·Σdy and
//! Σ w_r·Σdy·x̂ are summed across ranks, giving the global sums of ∂L/∂y, and
//!
//!   dx = γ·invstd·(dy − (Σ_g ∂L/∂y)/(w_r·M) − x̂·(Σ_g ∂L/∂y·x̂)/(w_r·M)),
//!
//! the gradient of L_r's share, so that `grads::combine_gradients` (Σ_r w_r·g_r) gives ∂L/∂θ
//! exactly; dγ and dβ are the rank's own sums. With equal batches this is PyTorch's formula.
//!
//! Host arithmetic (f64 sums): on a GPU the tensors go through the host until the NCCL path exists.
//! A collective that fails (another rank stopped) leaves the rank's own statistics in place and is
//! reported by `take_failure` after the step.

use super::{Collective, RankFailed};
use crate::autograd::{ParamStore, Tape, Var};
use crate::ops::{store_running_stats, BatchNormIds, BN_EPS, BN_MOMENTUM};
use crate::tensor::Tensor;
use std::cell::RefCell;
use std::rc::Rc;

struct Context {
    comm: Rc<dyn Collective>,
    /// This rank's share of the global batch, b_r / B.
    share: f64,
    failure: Option<RankFailed>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Batch norm synchronised across `comm`'s ranks on this thread until the guard drops; `share` is
/// this rank's share of the global batch (b_r / B).
pub fn activate(comm: Rc<dyn Collective>, share: f64) -> Active {
    ACTIVE.with(|a| {
        *a.borrow_mut() = Some(Context {
            comm,
            share,
            failure: None,
        })
    });
    Active(())
}

/// Keeps synchronised batch norm on; dropping it turns it off.
pub struct Active(());

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = None);
    }
}

/// Whether batch norm is synchronised on this thread now.
pub fn is_active() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// A collective of this step that failed (another rank stopped), once.
pub fn take_failure() -> Option<RankFailed> {
    ACTIVE.with(|a| a.borrow_mut().as_mut().and_then(|c| c.failure.take()))
}

/// Sums `v` across the ranks of the active context (unchanged when a rank has failed: the step
/// is abandoned by the trainer after `take_failure`). Returns this rank's share.
fn all_reduce(v: &mut [f64]) -> f64 {
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let c = a.as_mut().expect("synchronised batch norm is active");
        if c.failure.is_none() {
            if let Err(e) = c.comm.all_reduce_sum(v) {
                c.failure = Some(e);
            }
        }
        c.share
    })
}

/// Per-channel sums over an NCHW host buffer: Σ f(i, value) for each channel.
fn channel_sums(
    shape: &[usize],
    x: &[f64],
    mut f: impl FnMut(usize, usize, f64) -> f64,
) -> Vec<f64> {
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    let mut s = vec![0f64; c];
    for b in 0..n {
        for (ch, sum) in s.iter_mut().enumerate() {
            let at = (b * c + ch) * hw;
            for (k, &v) in x[at..at + hw].iter().enumerate() {
                *sum += f(ch, at + k, v);
            }
        }
    }
    s
}

/// Training-mode batch norm with global statistics (see the module's comment).
pub fn batch_norm2d(t: &mut Tape, store: &mut ParamStore, x: &Var, bn: &BatchNormIds) -> Var {
    let gamma = t.param(store, bn.weight);
    let beta = t.param(store, bn.bias);
    let xv = x.value();
    let shape = xv.shape().to_vec();
    assert_eq!(
        shape.len(),
        4,
        "batch_norm2d: input must be NCHW, got {shape:?}"
    );
    let (device, dtype) = (xv.device(), xv.dtype());
    let c = shape[1];
    let hx = xv.to_vec_f64();
    let local = (shape[0] * shape[2] * shape[3]) as f64;
    // Σx, Σx² per channel and the count, summed across ranks.
    let mut sums = channel_sums(&shape, &hx, |_, _, v| v);
    sums.extend(channel_sums(&shape, &hx, |_, _, v| v * v));
    sums.push(local);
    all_reduce(&mut sums);
    let m = sums[2 * c];
    let mean: Vec<f64> = (0..c).map(|ch| sums[ch] / m).collect();
    let var: Vec<f64> = (0..c)
        .map(|ch| (sums[c + ch] / m - mean[ch] * mean[ch]).max(0.0))
        .collect();
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
    let g = gamma.value().to_vec_f64();
    let bt = beta.value().to_vec_f64();
    let hw = shape[2] * shape[3];
    let y: Vec<f64> = hx
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = i / hw % c;
            (v - mean[ch]) * invstd[ch] * g[ch] + bt[ch]
        })
        .collect();
    // Running statistics from the global batch (unbiased variance), as one process would.
    let unbiased = m / (m - 1.0).max(1.0);
    let update = |id, batch: &dyn Fn(usize) -> f64| {
        let old = store.value(id).to_vec_f64();
        let new: Vec<f64> = (0..c)
            .map(|ch| (1.0 - BN_MOMENTUM) * old[ch] + BN_MOMENTUM * batch(ch))
            .collect();
        Tensor::from_f64_as(&[c], &new, store.value(id).dtype()).to_device(device)
    };
    let rm = update(bn.running_mean, &|ch| mean[ch]);
    let rv = update(bn.running_var, &|ch| var[ch] * unbiased);
    store_running_stats(store, bn, rm, rv);
    let y = Tensor::from_f64_as(&shape, &y, dtype).to_device(device);
    t.op(y, &[x, &gamma, &beta], move || {
        Box::new(move |dy, needs| {
            let d = dy.to_vec_f64();
            let xhat = |i: usize, v: f64| {
                let ch = i / hw % c;
                (v - mean[ch]) * invstd[ch]
            };
            let sdy = channel_sums(&shape, &d, |_, _, v| v);
            let sdyx = channel_sums(&shape, &d, |_, i, v| v * xhat(i, hx[i]));
            // The global sums of ∂L/∂y = w_r·dy, and this rank's share to scale them back.
            let mut global: Vec<f64> = sdy.iter().chain(&sdyx).copied().collect();
            let share = ACTIVE.with(|a| a.borrow().as_ref().map(|c| c.share));
            let share = match share {
                Some(s) => {
                    global.iter_mut().for_each(|v| *v *= s);
                    all_reduce(&mut global);
                    s
                }
                // Outside a synchronised step (a recorded tape replayed later): local statistics.
                None => 1.0,
            };
            let dx: Vec<f64> = d
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let ch = i / hw % c;
                    let k = 1.0 / (share * m);
                    g[ch] * invstd[ch] * (v - global[ch] * k - xhat(i, hx[i]) * global[c + ch] * k)
                })
                .collect();
            let per_channel = |v: &[f64]| Tensor::from_f64_as(&[c], v, dtype).to_device(device);
            vec![
                needs[0].then(|| Tensor::from_f64_as(&shape, &dx, dtype).to_device(device)),
                needs[1].then(|| per_channel(&sdyx)),
                needs[2].then(|| per_channel(&sdy)),
            ]
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::local;
    use crate::rng::Rng;

    /// The loss Σ_i Σ_j y_ij·r_ij / b over a rank's images (r fixed), through batch norm: its
    /// gradients with synchronised statistics over 2 ranks × 3 images, combined as the trainer
    /// does, equal one process's over the 6 images.
    fn grads(images: &[f32], ranks: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (c, h, w) = (2, 2, 3);
        let per = c * h * w;
        let n = images.len() / per;
        let mut rng = Rng::new(3);
        let r: Vec<f32> = (0..images.len()).map(|_| rng.normal() as f32).collect();
        let out: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = local::group(ranks)
                .into_iter()
                .map(|rank| {
                    let r = &r;
                    s.spawn(move || {
                        let b = n / ranks;
                        let at = rank.rank() * b * per..(rank.rank() + 1) * b * per;
                        let comm: Rc<dyn Collective> = Rc::new(rank);
                        let _on = (ranks > 1).then(|| activate(comm.clone(), 1.0 / ranks as f64));
                        let mut ps = ParamStore::new();
                        let bn = BatchNormIds::register(&mut ps, "bn", c);
                        ps.set_value(bn.weight, Tensor::from_vec(&[c], vec![1.5f32, 0.5]));
                        let mut t = Tape::train();
                        let x =
                            t.leaf(Tensor::from_vec(&[b, c, h, w], images[at.clone()].to_vec()));
                        let y = match ranks {
                            1 => crate::ops::batch_norm2d(&mut t, &mut ps, &x, &bn),
                            _ => batch_norm2d(&mut t, &mut ps, &x, &bn),
                        };
                        // dL/dy = r / b: the loss Σ y·r / b.
                        let dy: Vec<f32> = r[at].iter().map(|v| v / b as f32).collect();
                        t.backward_with(&y, Tensor::from_vec(&[b, c, h, w], dy), &mut ps);
                        let dx = t.grad_of(&x).unwrap().to_vec_f64();
                        let mut gw = ps.get(bn.weight).grad.as_ref().unwrap().to_vec_f64();
                        let mut gb = ps.get(bn.bias).grad.as_ref().unwrap().to_vec_f64();
                        // The trainer's combine: Σ_r w_r·g_r with w_r = 1/ranks.
                        for g in [&mut gw, &mut gb] {
                            g.iter_mut().for_each(|v| *v /= ranks as f64);
                            comm.all_reduce_sum(g).unwrap();
                        }
                        // dx is of this rank's share: the global loss's is w_r·dx.
                        let dx: Vec<f64> = dx.iter().map(|v| v / ranks as f64).collect();
                        let rm = ps.value(bn.running_var).to_vec_f64();
                        (dx, gw, gb, rm)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let dx = out.iter().flat_map(|o| o.0.clone()).collect();
        (dx, out[0].1.clone(), out[0].2.clone(), out[0].3.clone())
    }

    #[test]
    fn two_ranks_with_synchronised_statistics_give_one_process_s_gradients() {
        let mut rng = Rng::new(9);
        let images: Vec<f32> = (0..6 * 12)
            .map(|_| (rng.normal() * 2.0 + 0.5) as f32)
            .collect();
        let (dx1, gw1, gb1, rv1) = grads(&images, 1);
        let (dx2, gw2, gb2, rv2) = grads(&images, 2);
        for (what, a, b) in [
            ("dx", &dx1, &dx2),
            ("dγ", &gw1, &gw2),
            ("dβ", &gb1, &gb2),
            ("running var", &rv1, &rv2),
        ] {
            let e = crate::tensor::rel_error(b, a);
            // f32 kernels on one side, f64 sums on the other: f32 rounding of the terms.
            assert!(e < 1e-5, "{what}: relative error {e:.2e}\n{a:?}\n{b:?}");
        }
    }

    /// A small ResNet in f64 (so that rounding is far below what the test can see): the
    /// gradients of every parameter with synchronised batch norm over `ranks` ranks, combined as
    /// the trainer does, and the running statistics.
    fn resnet_grads(ranks: usize) -> Vec<(String, Vec<f64>)> {
        use crate::nn::{HeadSpec, ModelSpec, Network, Stem};
        let (n, c, h) = (8, 3, 8);
        let per = c * h * h;
        let mut rng = Rng::new(4);
        let images: Vec<f64> = (0..n * per).map(|_| rng.normal()).collect();
        let r: Vec<f64> = (0..n * 6).map(|_| rng.normal()).collect();
        let out: Vec<Vec<(String, Vec<f64>)>> = std::thread::scope(|s| {
            let hs: Vec<_> = local::group(ranks)
                .into_iter()
                .map(|rank| {
                    let (images, r) = (&images, &r);
                    s.spawn(move || {
                        let b = n / ranks;
                        let first = rank.rank() * b;
                        let comm: Rc<dyn Collective> = Rc::new(rank);
                        let spec = ModelSpec {
                            arch: "resnet18".into(),
                            width: 4,
                            stem: Stem::Cifar,
                            in_channels: c,
                            classes: 3,
                            feature_dim: 6,
                            head: HeadSpec::Linear,
                            image_size: h,
                            drop_path: None,
                        };
                        let mut ps = ParamStore::new();
                        let net = Network::new(
                            spec,
                            &mut ps,
                            crate::tensor::DType::F64,
                            &mut Rng::new(1),
                        )
                        .unwrap();
                        let _on = (ranks > 1).then(|| activate(comm.clone(), 1.0 / ranks as f64));
                        let mut t = Tape::train();
                        let x = t.constant(Tensor::from_vec(
                            &[b, c, h, h],
                            images[first * per..(first + b) * per].to_vec(),
                        ));
                        let o = net.forward(&mut t, &mut ps, &x);
                        // dL/dfeatures = r / b: the loss Σ features·r / b of this rank's images.
                        let dy: Vec<f64> = r[first * 6..(first + b) * 6]
                            .iter()
                            .map(|v| v / b as f64)
                            .collect();
                        t.backward_with(&o.features, Tensor::from_vec(&[b, 6], dy), &mut ps);
                        drop(t);
                        crate::dist::grads::combine_gradients(&*comm, &mut ps, b).unwrap();
                        ps.iter()
                            .map(|p| match &p.grad {
                                Some(g) => (format!("grad {}", p.name), g.to_vec_f64()),
                                None => (p.name.clone(), p.value.to_vec_f64()),
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &out {
            assert_eq!(
                o, &out[0],
                "every rank holds the same gradients and buffers"
            );
        }
        out.into_iter().next().unwrap()
    }

    #[test]
    fn a_resnet_with_synchronised_statistics_on_two_ranks_has_one_process_s_gradients() {
        let (one, two) = (resnet_grads(1), resnet_grads(2));
        assert_eq!(one.len(), two.len());
        let mut bn = 0;
        for ((name, a), (name_b, b)) in one.iter().zip(&two) {
            assert_eq!(name, name_b);
            if name.contains("running") {
                bn += 1;
            }
            // f64 sums in another order: rounding of about 1e-16 per term, amplified by the
            // cancellations of batch norm's backward by far less than 1e6.
            let scale = a.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-3);
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-10 * scale,
                "{name}: {worst:.2e} (scale {scale:.2e})"
            );
        }
        assert!(
            bn >= 2 * 20,
            "the running statistics of every batch norm were compared"
        );
    }
}
