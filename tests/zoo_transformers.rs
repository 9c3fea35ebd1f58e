//! The transformers' training pieces (issue 13): AdamW against PyTorch's, the per-iteration
//! warm-up + cosine schedule, gradient clipping, the recipes, exact resume with AdamW and drop path,
//! `podgpu models` FLOPs against the published figures, image-size checks.

mod common;

use common::*;
use podgpu::autograd::{ParamKind, ParamStore};
use podgpu::cli::models::{describe, Args as ModelsArgs};
use podgpu::nn::pretrained::read_state_dict;
use podgpu::optim::{clip_grad_norm, AdamW, Decay, LrSchedule, Optimizer, StepSchedule};
use podgpu::tensor::rel_error;
use podgpu::train::TrainConfig;
use podgpu::Tensor;
use std::collections::BTreeSet;

#[test]
fn adamw_matches_pytorch() {
    let f = read_state_dict(&repo().join("tests/fixtures/timm/adamw.safetensors")).unwrap();
    let t = |k: &str| Tensor::from_vec(&f[k].0, f[k].1.clone());
    for dtype in [podgpu::DType::F64, podgpu::DType::F32] {
        let mut ps = ParamStore::new();
        let w = ps.add(
            "blocks.0.mlp.fc1.weight",
            t("input.w").to_dtype(dtype),
            ParamKind::Trainable,
        );
        let b = ps.add(
            "blocks.0.mlp.fc1.bias",
            t("input.b").to_dtype(dtype),
            ParamKind::Trainable,
        );
        let mut opt = AdamW::new(0.9, 0.99, 1e-6, 0.05).unwrap();
        opt.no_decay = BTreeSet::from(["blocks.0.mlp.fc1.bias".to_string()]);
        for i in 0..3 {
            ps.get_mut(w).grad = Some(t(&format!("input.grad_w.{i}")).to_dtype(dtype));
            ps.get_mut(b).grad = Some(t(&format!("input.grad_b.{i}")).to_dtype(dtype));
            opt.step_unless(&mut ps, 1e-2, None);
            for (id, key) in [(w, "w"), (b, "b")] {
                let want = &f[&format!("expected.{key}.{i}")].1;
                let e = rel_error(&ps.value(id).to_vec_f64(), want);
                let tol = if dtype == podgpu::DType::F64 {
                    1e-14
                } else {
                    1e-6
                };
                assert!(e < tol, "{dtype:?} step {i} {key}: relative error {e}");
            }
        }
        // The state round-trips through the checkpoint's buffer map.
        let mut again = Optimizer::AdamW(AdamW::new(0.9, 0.99, 1e-6, 0.05).unwrap());
        again.load_state(opt.state(), &ps).unwrap();
        assert_eq!(again.state().steps, 3);
        assert_eq!(again.state().momentum.len(), 4);
    }
}

#[test]
fn warmup_then_cosine_per_iteration() {
    let step = StepSchedule::new(0.1, &[], 0.1).unwrap();
    let s = LrSchedule::new(step, Decay::Cosine, 2.0, 0.0, 0.001, 10).unwrap();
    let batches = 4;
    // Linear warm-up over the first two epochs' iterations, from 0 to the base lr.
    assert_eq!(s.lr(0, 0, batches), 0.0);
    assert!((s.lr(0, 2, batches) - 0.025).abs() < 1e-15);
    assert!((s.lr(1, 2, batches) - 0.075).abs() < 1e-15);
    assert!((s.lr(2, 0, batches) - 0.1).abs() < 1e-15);
    // Half way through the cosine: the mean of the base and the floor; strictly decreasing.
    assert!((s.lr(6, 0, batches) - (0.1 + 0.001) / 2.0).abs() < 1e-12);
    let mut last = f64::INFINITY;
    for e in 2..10 {
        for b in 0..batches {
            let lr = s.lr(e, b, batches);
            assert!(lr < last && lr > 0.001, "epoch {e} batch {b}: {lr}");
            last = lr;
        }
    }
    // The step decay with warm-up keeps its milestones.
    let step = StepSchedule::new(0.1, &[3], 0.1).unwrap();
    let s = LrSchedule::new(step, Decay::Step, 1.0, 0.0, 0.0, 5).unwrap();
    assert!((s.lr(0, 1, 2) - 0.05).abs() < 1e-15);
    assert_eq!(s.lr(2, 1, 2), 0.1);
    assert!((s.lr(3, 0, 2) - 0.01).abs() < 1e-15);
    assert!(s.is_milestone(3));
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let mut ps = ParamStore::new();
    let a = ps.add(
        "a",
        Tensor::from_vec(&[2], vec![0.0f64, 0.0]),
        ParamKind::Trainable,
    );
    let b = ps.add(
        "b",
        Tensor::from_vec(&[1], vec![0.0f64]),
        ParamKind::Trainable,
    );
    ps.get_mut(a).grad = Some(Tensor::from_vec(&[2], vec![3.0f64, 0.0]));
    ps.get_mut(b).grad = Some(Tensor::from_vec(&[1], vec![4.0f64]));
    let norm = clip_grad_norm(&mut ps, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let g: Vec<f64> = [a, b]
        .iter()
        .flat_map(|&id| ps.get(id).grad.as_ref().unwrap().to_vec_f64())
        .collect();
    let n2: f64 = g.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((n2 - 5.0 / (5.0 + 1e-6)).abs() < 1e-12, "{g:?}");
    // Under the limit nothing changes.
    let before = g.clone();
    clip_grad_norm(&mut ps, 10.0);
    let after: Vec<f64> = [a, b]
        .iter()
        .flat_map(|&id| ps.get(id).grad.as_ref().unwrap().to_vec_f64())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn recipes_set_the_papers_values_and_flags_override_them() {
    let mut c = TrainConfig {
        model: "swin_b".into(),
        ..TrainConfig::default()
    };
    c.apply_recipe("swin").unwrap();
    assert_eq!(c.optimizer, podgpu::train::config::OptimizerKind::Adamw);
    assert_eq!(
        (c.lr, c.weight_decay, c.batch_size, c.epochs),
        (1e-3, 0.05, 256, 300)
    );
    assert_eq!((c.warmup_epochs, c.schedule), (20.0, Decay::Cosine));
    assert_eq!(c.drop_path, Some(0.5));
    c.validate().unwrap();
    let line = c.recipe_line();
    assert!(
        line.contains("AdamW lr 0.001") && line.contains("warm-up 20 epochs"),
        "{line}"
    );
    c.apply_recipe("vit-finetune").unwrap();
    assert_eq!((c.lr, c.momentum, c.weight_decay), (0.01, 0.9, 0.0));
    assert_eq!(c.clip_grad, Some(1.0));
    assert!(c
        .apply_recipe("imagenet")
        .unwrap_err()
        .to_string()
        .contains("unknown recipe"));
    // Through the CLI: the recipe, then the flags.
    let a = podgpu::cli::train::Args {
        model: Some("vit_tiny_patch16_224".into()),
        lr: Some(0.003),
        transformer: podgpu::cli::train::TransformerArgs {
            recipe: Some("vit-finetune".into()),
            image_size: Some(224),
            test_resize: Some(256),
            ..Default::default()
        },
        ..Default::default()
    };
    let c = podgpu::cli::train::resolve(&a).unwrap();
    assert_eq!(
        (c.lr, c.weight_decay, c.image_size, c.test_resize),
        (0.003, 0.0, Some(224), Some(256))
    );
    assert_eq!(c.recipe.as_deref(), Some("vit-finetune"));
}

/// AdamW (the swin recipe) with warm-up and drop path on a tiny Swin: stopping after epoch 1 and
/// resuming gives bit for bit the run that went straight through (optimiser moments, step count,
/// per-iteration lr, drop-path draws). The step decay here: a cosine's length is the run's epoch
/// count, which `--resume --epochs N` changes.
#[test]
fn adamw_runs_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tiny.bin");
    tiny_dataset(&data, 16, 3, 48, 12);
    let model = "swin(patch=2,window=4,dim=8,depths=2-2,heads=2-2,mlp_ratio=2)";
    let base = |out: &std::path::Path, epochs: &str| {
        let o = run(&[
            "train",
            model,
            "--data",
            data.to_str().unwrap(),
            "--recipe",
            "swin",
            "--epochs",
            epochs,
            "--batch-size",
            "16",
            "--warmup-epochs",
            "1.5",
            "--drop-path",
            "0.3",
            "--lr",
            "0.002",
            "--schedule",
            "step",
            "--milestones",
            "2",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--deterministic",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_ok(&o);
        text(&o).0
    };
    let straight = tmp.path().join("straight");
    let said = base(&straight, "3");
    assert!(said.contains("recipe swin: AdamW"), "{said}");
    let split = tmp.path().join("split");
    base(&split, "1");
    let o = run(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--epochs",
        "3",
    ]);
    assert_ok(&o);
    assert_same_checkpoint(
        &straight.join("last.safetensors"),
        &split.join("last.safetensors"),
    );
    let bits = checkpoint_bits(&straight.join("last.safetensors"));
    assert!(
        bits.keys()
            .any(|k| k.starts_with("optim.momentum.exp_avg_sq.")),
        "{:?}",
        bits.keys()
    );
}

#[test]
fn models_lists_transformers_with_the_published_flops() {
    let a = ModelsArgs::default();
    for (name, gmac, params_m) in [("vit_b16", 17.6, 85.8), ("swin_b", 15.4, 86.7)] {
        let m = describe(name, &a).unwrap();
        let g = m.flops as f64 / 1e9;
        assert!(
            (g - gmac).abs() / gmac < 0.01,
            "{name}: {g} GMAC, published {gmac}"
        );
        let p = m.params as f64 / 1e6;
        assert!(
            (p - params_m).abs() / params_m < 0.01,
            "{name}: {p} M parameters"
        );
        assert_eq!(m.image_size, 224);
    }
}

#[test]
fn image_sizes_a_model_cannot_use_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&[
        "train",
        "swin_tiny_patch4_window7_224",
        "--data",
        "datasets/cifar10-small.bin",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let (_, err) = text(&o);
    assert!(err.contains("32×32") && err.contains("224"), "{err}");
    let o = run(&["train", "vit(patch=16,dim=8)", "--epochs", "1"]);
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("model `vit(...)` needs `") && err.contains("=`"),
        "{err}"
    );
}

/// `--image-size` feeds the network images resized on the fly (training: random-resized-crop +
/// flip; test: resize + centre crop), and the loader delivers that size.
#[test]
fn images_are_resized_on_the_fly() {
    use podgpu::data::{Augment, Loader, LoaderConfig};
    let ds = podgpu::data::Dataset::open(repo().join("datasets/cifar10-small.bin")).unwrap();
    let test = ds.split("test").unwrap();
    for (aug, size) in [
        (Augment::train_at(48), 48),
        (
            Augment::ResizeCenterCrop {
                resize: 56,
                size: 48,
            },
            48,
        ),
        (
            Augment::ResizeCenterCrop {
                resize: 40,
                size: 40,
            },
            40,
        ),
    ] {
        let l = Loader::new(
            test.clone(),
            LoaderConfig {
                augment: aug,
                ..LoaderConfig::eval(4)
            },
        )
        .unwrap();
        assert_eq!(l.image_shape(), [3, size, size]);
        let b = l.epoch(0).next().unwrap();
        assert_eq!(b.shape, [4, 3, size, size]);
        assert!(b.images.iter().all(|v| v.is_finite()));
        // Not a constant image: the content survived the resize.
        let (lo, hi) = b
            .images
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, c), &v| (a.min(v), c.max(v)));
        assert!(hi - lo > 0.5, "{aug:?}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&[
        "train",
        "vit(patch=8,dim=16,depth=1,heads=2)",
        "--image-size",
        "48",
        "--test-resize",
        "56",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--limit-train",
        "64",
        "--limit-test",
        "32",
        "--device",
        "cpu",
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_ok(&o);
    let said = text(&o).0;
    assert!(
        said.contains("images resized on the fly from 32×32 to 48×48"),
        "{said}"
    );
    assert!(said.contains("test: resize 56 + centre crop 48"), "{said}");
    assert!(said.contains("(48×48 images)"), "{said}");
}
