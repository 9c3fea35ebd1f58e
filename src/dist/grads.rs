//! The gradient of the global batch from every rank's gradient.
//!
//! Rank r computed g_r, the gradient of its mean loss over its b_r images. The gradient of the mean
//! loss over the whole global batch is g = Σ_r b_r·g_r / Σ_r b_r — the plain average when every rank
//! had a full batch, and still exact for the shorter last batch of an epoch (`shard`). Each rank
//! sends b_r·g_r in f64, in buckets of trainable gradients taken in reverse parameter order
//! (`buckets::plan`: the order backward produces them; GPU ranks overlap their sums with the
//! backward pass, `nccl::Overlap`), and writes g back in its gradient's precision.
//!
//! Every trainable parameter takes part, a missing gradient (a rank with no images this step, or a
//! parameter its forward did not reach) counting as zeros, so that every rank sends the same
//! buckets; afterwards every trainable parameter has the combined gradient.
//!
//! Host tensors only here; gradients on a GPU go through the host until the NCCL path exists.

use super::{Collective, RankFailed};
use crate::autograd::ParamStore;
use crate::tensor::Tensor;

pub use super::buckets::BUCKET_VALUES;

/// Replaces every trainable gradient in `store` with the gradient of the global batch, given that
/// this rank's gradients are those of its mean loss over `batch` images. Returns the global batch
/// size. A rank with no images this step (`batch` 0) passes zero gradients and still takes part.
pub fn combine_gradients(
    c: &dyn Collective,
    store: &mut ParamStore,
    batch: usize,
) -> Result<usize, RankFailed> {
    combine_in_buckets(c, store, batch, BUCKET_VALUES)
}

/// `combine_gradients` with buckets of at most `bucket` values (a tensor larger than a bucket is a
/// bucket of its own).
pub fn combine_in_buckets(
    c: &dyn Collective,
    store: &mut ParamStore,
    batch: usize,
    bucket: usize,
) -> Result<usize, RankFailed> {
    // The global batch size first: every rank needs it to scale the sums.
    let mut total = [batch as f64];
    c.all_reduce_sum(&mut total)?;
    let total = total[0];
    if total == 0.0 {
        return Ok(0);
    }
    let plan = super::buckets::plan(store, bucket);
    let params: Vec<&mut crate::autograd::Param> = store.iter_mut().collect();
    let mut params: Vec<Option<&mut crate::autograd::Param>> =
        params.into_iter().map(Some).collect();
    for ids in &plan {
        let values = ids
            .iter()
            .map(|&i| params[i].as_ref().expect("param").value.numel())
            .sum();
        let mut flat = Vec::with_capacity(values);
        for &i in ids {
            let p = params[i].as_ref().expect("param");
            match &p.grad {
                Some(g) if batch > 0 => {
                    flat.extend(g.to_vec_f64().into_iter().map(|v| v * batch as f64))
                }
                _ => flat.resize(flat.len() + p.value.numel(), 0.0),
            }
        }
        c.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for &i in ids {
            let p = params[i].take().expect("each parameter once");
            let v = &p.value;
            let n = v.numel();
            let vals: Vec<f64> = flat[at..at + n].iter().map(|v| v / total).collect();
            at += n;
            let combined = Tensor::from_f64_as(v.shape(), &vals, v.dtype()).to_device(v.device());
            p.grad = Some(combined);
        }
    }
    Ok(total as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::ParamKind;
    use crate::dist::local;
    use crate::dist::shard::rank_slice;

    /// Least squares on a linear model: loss = mean_i (w·x_i − y_i)², gradient
    /// 2/b Σ_i (w·x_i − y_i) x_i, in f32 as a rank would compute it over its images.
    fn grad_over(w: &[f32], xs: &[Vec<f32>], ys: &[f32], idx: std::ops::Range<usize>) -> Vec<f32> {
        let b = idx.len().max(1) as f32;
        let mut g = vec![0f32; w.len()];
        for i in idx {
            let r: f32 = w.iter().zip(&xs[i]).map(|(a, x)| a * x).sum::<f32>() - ys[i];
            for (gj, xj) in g.iter_mut().zip(&xs[i]) {
                *gj += 2.0 * r * xj / b;
            }
        }
        g
    }

    fn store_with(grad: &[f32], frozen: &[f32]) -> ParamStore {
        let mut ps = ParamStore::new();
        let w = ps.add(
            "w",
            Tensor::from_vec(&[grad.len()], vec![0f32; grad.len()]),
            ParamKind::Trainable,
        );
        ps.get_mut(w).grad = Some(Tensor::from_vec(&[grad.len()], grad.to_vec()));
        let f = ps.add(
            "frozen",
            Tensor::from_vec(&[frozen.len()], frozen.to_vec()),
            ParamKind::Frozen,
        );
        ps.get_mut(f).grad = Some(Tensor::from_vec(&[frozen.len()], frozen.to_vec()));
        ps
    }

    /// `ranks` ranks of `batch` images each over the first global batch of `n` images give the
    /// gradient one rank computes over all of them.
    fn check(n: usize, ranks: usize, batch: usize, bucket: usize) {
        let mut rng = crate::rng::Rng::new(7);
        let dim = 13;
        let xs: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..dim).map(|_| rng.normal() as f32).collect())
            .collect();
        let ys: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let w: Vec<f32> = (0..dim).map(|_| rng.normal() as f32).collect();
        let whole = grad_over(&w, &xs, &ys, 0..n.min(ranks * batch));
        let combined: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = local::group(ranks)
                .into_iter()
                .map(|r| {
                    let (xs, ys, w) = (&xs, &ys, &w);
                    s.spawn(move || {
                        let idx = rank_slice(n, ranks, batch, 0, r.rank());
                        let mine = idx.len();
                        let mut ps = store_with(&grad_over(w, xs, ys, idx), &[5.0, 6.0]);
                        let total = combine_in_buckets(&r, &mut ps, mine, bucket).unwrap();
                        assert_eq!(total, n.min(ranks * batch));
                        let frozen = ps.iter().find(|p| p.name == "frozen").unwrap();
                        assert_eq!(frozen.grad.as_ref().unwrap().to_vec_f32(), vec![5.0, 6.0]);
                        let g = ps
                            .iter()
                            .next()
                            .unwrap()
                            .grad
                            .as_ref()
                            .unwrap()
                            .to_vec_f32();
                        g
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in &combined {
            assert_eq!(g, &combined[0], "every rank holds the same gradient");
        }
        let e = crate::tensor::rel_error(
            &combined[0].iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &whole.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        // Both are f32 sums of the same terms in different orders: a few ulps of the terms.
        assert!(e < 1e-5, "{ranks} ranks × {batch}: relative error {e:.2e}");
    }

    #[test]
    fn two_ranks_of_32_give_the_gradient_of_one_rank_of_64() {
        check(64, 2, 32, BUCKET_VALUES);
        check(64, 1, 64, BUCKET_VALUES);
    }

    #[test]
    fn a_short_last_batch_is_weighted_by_each_rank_s_images() {
        // 50 images over 3 ranks of 32: 17, 17 and 16 images, weighted accordingly.
        check(50, 3, 32, BUCKET_VALUES);
        // One value per bucket: the bucketing does not change the result.
        check(50, 3, 32, 1);
    }
}
