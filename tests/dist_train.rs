//! Data-parallel training (issue 16) with ranks as threads of this process (`dist::local::group`),
//! through the same trainer hooks as `mpirun -np N podgpu train` (`tests/dist_mpi.rs` runs the real
//! processes): N ranks × batch B train like one process × batch N·B, every image once per epoch, a
//! run saved with N ranks resumes with another N, and a rank that fails stops the others with one
//! message while the last checkpoint stays good.

mod common;

use common::*;
use podgpu::dist::local;
use podgpu::train::trainer::{self, RankHooks, Ranks, RunSummary};
use podgpu::train::{load_checkpoint, read_jsonl, TrainConfig};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

/// MNIST (28×28), a one-block ViT (layer norm only: every image's loss and gradient are its own),
/// the NaC loss, whose δ schedule uses the epoch's mean feature norm.
fn config(out: &Path, batch: usize, epochs: usize) -> TrainConfig {
    TrainConfig {
        model: "vit(patch=7,dim=16,depth=1,heads=2)".into(),
        data: Some(repo().join("datasets/mnist-small.bin")),
        loss: podgpu::train::LossKind::Nac,
        device: "cpu".into(),
        seed: 5,
        epochs,
        batch_size: batch,
        lr: 0.05,
        limit_train: Some(256),
        limit_test: Some(64),
        threads: Some(2),
        deterministic: true,
        out: Some(out.to_path_buf()),
        ..TrainConfig::default()
    }
}

/// Runs `each(rank, ranks)` on `n` thread ranks; returns every rank's result in rank order.
fn on_ranks(
    n: usize,
    each: impl Fn(usize, Ranks) -> anyhow::Result<RunSummary> + Sync,
) -> Vec<anyhow::Result<RunSummary>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = local::group(n)
            .into_iter()
            .enumerate()
            .map(|(r, rank)| {
                let each = &each;
                s.spawn(move || each(r, Ranks::new(Rc::new(rank))))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn weights(path: &Path) -> Vec<(String, Vec<f64>)> {
    load_checkpoint(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_vec_f64()))
        .collect()
}

fn fresh(out: &Path, batch: usize, epochs: usize, ranks: Ranks) -> anyhow::Result<RunSummary> {
    trainer::train_ranked(config(out, batch, epochs), Default::default(), ranks)
}

fn resume(dir: &Path, epochs: usize, ranks: Ranks) -> anyhow::Result<RunSummary> {
    let opts = trainer::ResumeOptions {
        epochs: Some(epochs),
        ..Default::default()
    };
    trainer::resume_ranked(dir, opts, ranks)
}

#[test]
fn two_ranks_of_32_train_like_one_process_of_64() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    trainer::train(config(&one, 64, 2)).unwrap();
    for r in on_ranks(2, |_, ranks| fresh(&two, 32, 2, ranks)) {
        r.unwrap();
    }
    // 2 epochs of 4 steps. Each gradient value is a sum of 64 per-image terms, added in another
    // order (and through f64 across ranks): a few f32 roundings of the terms per step, compounded
    // over the steps — `steps × images × ε` bounds the relative difference of the weights.
    let steps = 8.0;
    let tol = steps * 64.0 * f64::from(f32::EPSILON);
    let (a, b) = (
        weights(&one.join("last.safetensors")),
        weights(&two.join("last.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for ((name, x), (name_b, y)) in a.iter().zip(&b) {
        assert_eq!(name, name_b);
        let e = podgpu::tensor::rel_error(y, x);
        worst = worst.max(e);
        assert!(
            e < tol,
            "{name}: relative difference {e:.2e} over {tol:.2e}"
        );
    }
    println!("largest relative difference of a weight tensor {worst:.2e} (bound {tol:.2e})");
    // The epochs' sums were combined across ranks: the same losses, accuracies and mean norms
    // (so the same δ schedule) as one process.
    let (ma, mb) = (
        read_jsonl(&one.join("metrics.jsonl")).unwrap(),
        read_jsonl(&two.join("metrics.jsonl")).unwrap(),
    );
    assert_eq!(ma.len(), 2);
    assert_eq!(mb.len(), 2);
    for (x, y) in ma.iter().zip(&mb) {
        assert!((x.train_loss - y.train_loss).abs() <= tol * x.train_loss.abs());
        assert!((x.mean_norm - y.mean_norm).abs() <= tol * x.mean_norm.abs());
        // An argmax may flip on a rounding: at most one image of 256.
        assert!((x.train_acc - y.train_acc).abs() <= 1.0 / 256.0 + 1e-12);
        assert!((x.delta - y.delta).abs() <= tol * x.delta.abs());
    }
    // Rank 0 alone wrote the folder; one checkpoint, whatever the ranks.
    let st = load_checkpoint(&two.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (2, 8));
}

#[test]
fn every_image_is_trained_once_per_epoch_across_three_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // 256 images, 3 ranks × 20: global batches of 60, the last one 16 images (6, 5, 5).
    let seen: Vec<Vec<usize>> = std::thread::scope(|s| {
        let hs: Vec<_> = local::group(3)
            .into_iter()
            .map(|rank| {
                let out = &out;
                s.spawn(move || {
                    let images = Rc::new(RefCell::new(Vec::new()));
                    let hooks = RankHooks {
                        trained_images: Some(images.clone()),
                        ..Default::default()
                    };
                    fresh(out, 20, 2, Ranks::new(Rc::new(rank)).with_hooks(hooks)).unwrap();
                    let v = images.borrow().clone();
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let per_epoch: Vec<usize> = seen.iter().map(|v| v.len() / 2).collect();
    assert_eq!(per_epoch.iter().sum::<usize>(), 256, "{per_epoch:?}");
    for epoch in 0..2 {
        let mut all: Vec<usize> = seen
            .iter()
            .flat_map(|v| v[epoch * v.len() / 2..(epoch + 1) * v.len() / 2].to_vec())
            .collect();
        all.sort_unstable();
        let want: Vec<usize> = {
            // --limit-train 256 takes the first 256 images of the split.
            (0..256).collect()
        };
        assert_eq!(all, want, "epoch {}", epoch + 1);
    }
    // Each rank's share is its slices: 4 × 20 + 6 for rank 0, 4 × 20 + 5 for the others.
    assert_eq!(per_epoch, vec![86, 85, 85]);
    let m = read_jsonl(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 2);
}

#[test]
fn a_run_saved_with_two_ranks_resumes_with_three_and_with_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    for r in on_ranks(2, |_, ranks| fresh(&straight, 16, 2, ranks)) {
        r.unwrap();
    }
    // Stopped by rank 1 in step 3 (as Ctrl-C on one rank): every rank stops after it, rank 0
    // writes the mid-epoch checkpoint.
    let stopped = on_ranks(2, |r, ranks| {
        let hooks = RankHooks {
            stop_at: (r == 1).then_some(3),
            ..Default::default()
        };
        fresh(&split, 16, 2, ranks.with_hooks(hooks))
    });
    for r in &stopped {
        let e = r.as_ref().expect_err("stopped");
        assert!(e.is::<podgpu::train::Interrupted>(), "{e:#}");
    }
    let ck = load_checkpoint(&split.join("last.safetensors")).unwrap();
    assert_eq!((ck.state.epoch, ck.state.global_step), (0, 3));
    // The position is in batches of 16 (what one process counts): 3 global batches of 2 × 16.
    let pending = podgpu::train::tally::EpochTally::from_extra(&ck.state.extra)
        .unwrap()
        .unwrap();
    assert_eq!(pending.next_batch, 6);
    assert_eq!(pending.seen, 96);

    // Resumed with the same two ranks: bit for bit the run that went straight through.
    let again = tmp.path().join("again");
    copy_dir(&split, &again);
    for r in on_ranks(2, |_, ranks| resume(&again, 2, ranks)) {
        r.unwrap();
    }
    assert_same_checkpoint(
        &straight.join("last.safetensors"),
        &again.join("last.safetensors"),
    );
    assert_eq!(exact_metrics(&straight), exact_metrics(&again));

    // With three ranks: the rest of epoch 1 (160 images, global batches of 48: 4 steps), then
    // epoch 2 (6 steps); the schedule goes on from the saved epoch.
    for r in on_ranks(3, |_, ranks| resume(&split, 2, ranks)) {
        r.unwrap();
    }
    let st = load_checkpoint(&split.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (2, 3 + 4 + 6));
    let m = read_jsonl(&split.join("metrics.jsonl")).unwrap();
    assert_eq!(m.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2]);
    // δ of epoch 2 is the paper's α·2·M₁, M₁ the mean norm over every image of epoch 1.
    let alpha = config(&split, 16, 2).alpha;
    assert!((m[1].delta - alpha * 2.0 * m[0].mean_norm).abs() <= 1e-12 * m[1].delta.abs());

    // And one more epoch with one process.
    resume(&split, 3, Ranks::single()).unwrap();
    let st = load_checkpoint(&split.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (3, 13 + 16));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_stops_every_rank_with_one_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // 8 steps an epoch: step 11 is in epoch 2, after epoch 1's checkpoint.
    let got = on_ranks(2, |r, ranks| {
        let hooks = RankHooks {
            nan_gradient_at: (r == 1).then_some(11),
            ..Default::default()
        };
        fresh(&out, 16, 3, ranks.with_hooks(hooks))
    });
    let msg = format!("{:#}", got[0].as_ref().expect_err("rank 0 stopped"));
    assert!(
        msg.contains("non-finite loss or gradient on rank 1 of 2"),
        "{msg}"
    );
    assert!(
        msg.contains("epoch 2, global batch 3 of 8 (step 11)"),
        "{msg}"
    );
    assert!(msg.contains("end of epoch 1"), "{msg}");
    assert!(got[1].is_err());
    let st = load_checkpoint(&out.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (1, 8));
}

#[test]
fn an_error_on_one_rank_stops_the_others_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let got = on_ranks(3, |r, ranks| {
        let hooks = RankHooks {
            fail_at: (r == 2).then_some(7),
            ..Default::default()
        };
        fresh(&out, 16, 3, ranks.with_hooks(hooks))
    });
    // 256 images in global batches of 48: 6 steps an epoch; step 7 is epoch 2's first.
    let own = format!("{:#}", got[2].as_ref().expect_err("rank 2 failed"));
    assert!(own.contains("a test failure at epoch 2"), "{own}");
    for r in [0, 1] {
        let e = got[r].as_ref().expect_err("stopped by rank 2");
        assert!(e.is::<trainer::StoppedTogether>(), "{e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains("rank 2 of 3 failed: a test failure"), "{msg}");
    }
    let st = load_checkpoint(&out.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (1, 6));
}

/// The relative difference of two checkpoints' trainable weights and buffers taken as one vector
/// (‖a − b‖ / ‖a‖), so that small tensors whose values are sums that cancel (batch norm's β
/// gradients nearly vanish when another batch norm follows) do not dominate.
fn model_difference(a: &Path, b: &Path) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for ((na, x), (nb, y)) in weights(a).iter().zip(&weights(b)) {
        assert_eq!(na, nb);
        if na.ends_with("num_batches_tracked") {
            continue;
        }
        for (u, v) in x.iter().zip(y) {
            num += (u - v) * (u - v);
            den += u * u;
        }
    }
    (num / den).sqrt()
}

#[test]
fn with_sync_bn_two_ranks_of_32_train_a_resnet_like_one_process_of_64() {
    let tmp = tempfile::tempdir().unwrap();
    // One step of 64 images: batch norm's sums cancel (the mean is removed), so f32 rounding
    // differences grow by orders of magnitude over a few steps of a BN network (measured: 1.5e-6
    // after one step, 4e-5 after two, 4e-3 after eight); `dist::sync_bn`'s tests check the
    // arithmetic exactly in f64, this one the trainer's wiring.
    let resnet = |out: &Path, batch: usize, sync_bn: bool| TrainConfig {
        model: "resnet18".into(),
        width: 4,
        sync_bn,
        limit_train: Some(64),
        ..config(out, batch, 1)
    };
    let (one, synced, per_rank) = (
        tmp.path().join("one"),
        tmp.path().join("synced"),
        tmp.path().join("per-rank"),
    );
    trainer::train(resnet(&one, 64, false)).unwrap();
    for (dir, sync_bn) in [(&synced, true), (&per_rank, false)] {
        for r in on_ranks(2, |_, ranks| {
            trainer::train_ranked(resnet(dir, 32, sync_bn), Default::default(), ranks)
        }) {
            r.unwrap();
        }
    }
    let last = |d: &Path| d.join("last.safetensors");
    let synced_diff = model_difference(&last(&one), &last(&synced));
    let per_rank_diff = model_difference(&last(&one), &last(&per_rank));
    println!("sync-bn {synced_diff:.2e}, per-rank batch norm {per_rank_diff:.2e}");
    // Sums of 64 images' terms in another order: 64 roundings of ε each at most.
    let tol = 64.0 * f64::from(f32::EPSILON);
    assert!(
        synced_diff < tol,
        "sync-bn: {synced_diff:.2e} over {tol:.2e}"
    );
    // Per-rank statistics (32 images each) are another computation: the check tells them apart.
    assert!(per_rank_diff > 10.0 * tol, "per-rank: {per_rank_diff:.2e}");
}

/// A build without the `distributed` feature started by an MPI launcher of several ranks says so,
/// instead of training N copies of the run into one folder.
#[cfg(not(feature = "distributed"))]
#[test]
fn a_build_without_mpi_under_mpirun_says_how_to_build_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = podgpu()
        .args(["train", "smallcnn", "--epochs", "1", "--out"])
        .arg(&out)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("built without MPI"), "{err}");
    assert!(err.contains("--features distributed"), "{err}");
    assert!(!out.exists(), "nothing written");
}
