//! Exact resume (issue 4 item 9, issue 7): `--epochs 2` in one go equals `--epochs 1` then
//! `--resume DIR --epochs 2`, bit for bit on the CPU — every tensor of last.safetensors (weights, BN
//! buffers, momentum), the training state (step, δ, M, best accuracy) and the metrics.

mod common;

use common::*;
use std::path::Path;

/// A small real run on the shipped MNIST subset.
fn base_args<'a>(out: &'a str, epochs: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "resnet18",
        "--data",
        "datasets/mnist-small.bin",
        "--width",
        "4",
        "--limit-train",
        "256",
        "--limit-test",
        "100",
        "--batch-size",
        "32",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--seed",
        "11",
        "--epochs",
        epochs,
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

fn check_resume_is_exact(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let split = tmp.path().join("split");
    let (w, s) = (whole.to_str().unwrap(), split.to_str().unwrap());

    assert_ok(&run(&base_args(w, "2", extra)));
    assert_ok(&run(&base_args(s, "1", extra)));
    let o = run(&["train", "--resume", s, "--epochs", "2", "--threads", "2"]);
    assert_ok(&o);
    let (out, _) = text(&o);
    assert!(out.contains("resuming"), "{out}");
    assert!(out.contains("epoch   2/2"), "{out}");
    assert!(
        !out.contains("epoch   1/2"),
        "epoch 1 was trained again:\n{out}"
    );

    assert_same_checkpoint(
        &whole.join("last.safetensors"),
        &split.join("last.safetensors"),
    );
    assert_same_checkpoint(
        &whole.join("best.safetensors"),
        &split.join("best.safetensors"),
    );
    let (mw, ms) = (exact_metrics(&whole), exact_metrics(&split));
    assert_eq!(mw.len(), 2);
    assert_eq!(mw, ms, "metrics differ");
    // The CSV has one header and one row per epoch (nothing duplicated by the resume).
    let csv = std::fs::read_to_string(split.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    // The saved settings now say 2 epochs, so a plain `--resume` has nothing left to do.
    let cfg = podgpu::train::TrainConfig::load(&split.join("config.toml")).unwrap();
    assert_eq!(cfg.epochs, 2);
    let ck = podgpu::train::load_checkpoint(&split.join("last.safetensors")).unwrap();
    assert_eq!(ck.state.config["epochs"], 2);
    for f in ["loss.png", "accuracy.png", "config.toml"] {
        assert!(Path::new(&split.join(f)).exists(), "{f} missing");
    }
    let pod = !extra.contains(&"softmax");
    assert_eq!(split.join("pedcc.safetensors").exists(), pod);
}

#[test]
fn pod_resume_is_bit_identical() {
    check_resume_is_exact(&[]);
}

/// The reference variant resets momentum at each lr milestone: a milestone right at the resume point
/// must be handled exactly once.
#[test]
fn reference_variant_with_a_milestone_at_the_resume_point_is_bit_identical() {
    check_resume_is_exact(&["--variant", "reference", "--milestones", "1"]);
}

#[test]
fn softmax_resume_is_bit_identical() {
    check_resume_is_exact(&["--loss", "softmax"]);
}
