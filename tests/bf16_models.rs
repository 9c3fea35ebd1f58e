//! Whole models under the CPU's bf16 emulation (issue 12 item 6): the committed PyTorch model
//! fixtures at bf16 tolerances, and ResNet-18 trained on the shipped CIFAR-10 subset in bf16
//! tracking the fp32 run's loss curve.
//!
//! Tolerance of a fixture (`fidelity::bf16_tolerance`, also `podgpu fidelity --precision bf16`).
//! To first order a computation's relative error is linear in the unit
//! roundoff of the arithmetic: a network that turns f32 rounding (ε = 2⁻²⁴) into a relative error
//! e₃₂ in its loss and gradients turns bf16 storage rounding (u = 2⁻⁸) into about e₃₂·u/ε = e₃₂·2¹⁶.
//! The fixtures record e₃₂ as PyTorch's own float32 error (`torch_f32_rel_error`), so the bf16
//! tolerance is 2¹⁶·e₃₂ with a factor 4 for the spread between rounding patterns, and at least 4·u·√L
//! for L ≈ 100 stored tensors rounded independently (errors adding in quadrature): 0.16. Where
//! 2¹⁶·e₃₂ is above 1 (the ResNet-50 fixtures: BN over 8 images of 1×1 maps at the last stage
//! makes them ill-conditioned), no bf16 tolerance means anything and the fixture is only checked
//! for finite results that differ from the f32 run (the rounding happened).

mod common;

use common::*;
use podgpu::cli::fidelity::{bf16_tolerance, compare, run_fixture, Place};
use podgpu::cpu::bf16 as emu;
use podgpu::fixture::Fixture;
use podgpu::tensor::{DType, Device};
use podgpu::train::read_jsonl;
use std::path::PathBuf;

fn model_fixtures() -> Vec<PathBuf> {
    let dir = repo().join("tests/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("model_")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn model_fixtures_pass_at_bf16_tolerances() {
    let place = Place {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let mut checked = 0;
    for path in model_fixtures() {
        let fx = Fixture::read(&path).unwrap();
        let f32_rows = compare(&fx, &run_fixture(&fx, place).unwrap(), 1.0).unwrap();
        let bf16_out = {
            let _on = emu::scope(true);
            run_fixture(&fx, place).unwrap()
        };
        let tol = bf16_tolerance(&fx).ok();
        let rows = compare(&fx, &bf16_out, tol.unwrap_or(f64::INFINITY)).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let worst = rows.iter().map(|r| r.rel_error).fold(0.0, f64::max);
        let worst32 = f32_rows.iter().map(|r| r.rel_error).fold(0.0, f64::max);
        println!("{name}: bf16 worst rel error {worst:.3e} (f32 {worst32:.3e}), tolerance {tol:?}");
        for r in &rows {
            assert!(
                r.rel_error.is_finite(),
                "{name}: {} is not finite in bf16",
                r.name
            );
            if tol.is_some() {
                assert!(
                    r.passed,
                    "{name}: {} rel error {:.3e} above the bf16 tolerance {tol:?}",
                    r.name, r.rel_error
                );
            }
        }
        // The emulation changed the result (else this test would prove nothing about bf16).
        let loss = |rs: &[podgpu::cli::fidelity::Comparison]| {
            rs.iter().find(|r| r.name == "loss").unwrap().rel_error
        };
        assert!(
            loss(&rows) > loss(&f32_rows),
            "{name}: bf16 loss error {:.3e} not above the f32 one {:.3e}",
            loss(&rows),
            loss(&f32_rows)
        );
        checked += tol.is_some() as usize;
    }
    assert!(checked >= 4, "only {checked} fixtures had a bf16 tolerance");
}

/// ResNet-18 trained on datasets/cifar10-small.bin (1,500 images) in fp32 and in bf16 emulation
/// with the same seed: the bf16 run's training loss per epoch stays within `band` (relative) of the
/// fp32 run's, both learn (loss falling by 10% or more), the runs differ (the rounding happened),
/// and the bf16 run's checkpoint is f32 and scores the same in `eval` at either precision. The
/// band: bf16 storage perturbs each step's gradients by a relative O(u·√L) ≈ 4% (u = 2⁻⁸, L ≈ 100
/// stored tensors; module comment), which SGD averages over the ~47 steps of an epoch, so the
/// epoch means should differ by a few percent at most while the trajectories have not drifted
/// apart (the first epochs). Returns the two curves.
fn train_fp32_and_bf16(width: usize, epochs: usize, band: f64) -> (Vec<f64>, Vec<f64>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut curves = Vec::new();
    let (width, epoch_count) = (width.to_string(), epochs.to_string());
    for precision in ["fp32", "bf16"] {
        let dir = tmp.path().join(precision);
        let o = run(&[
            "train",
            "resnet18",
            "--data",
            "datasets/cifar10-small.bin",
            "--width",
            &width,
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--epochs",
            &epoch_count,
            "--seed",
            "0",
            "--deterministic",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--precision",
            precision,
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert_ok(&o);
        let losses: Vec<f64> = read_jsonl(&dir.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|r| r.train_loss)
            .collect();
        println!("{precision}: train loss per epoch {losses:?}");
        assert_eq!(losses.len(), epochs);
        assert!(
            losses[epochs - 1] < 0.9 * losses[0],
            "{precision}: loss did not fall: {losses:?}"
        );
        curves.push(losses);
    }
    // The bf16 run's checkpoint is f32, and scores the same way in either precision.
    let ckpt = tmp.path().join("bf16/last.safetensors");
    let loaded = podgpu::train::load_checkpoint(&ckpt).unwrap();
    assert!(loaded.tensors.values().all(|t| t.dtype() == DType::F32));
    let mut accuracy = Vec::new();
    for precision in ["fp32", "bf16"] {
        let o = run(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--device",
            "cpu",
            "--precision",
            precision,
            "--json",
        ]);
        assert_ok(&o);
        let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
        accuracy.push(v["accuracy"].as_f64().unwrap());
    }
    println!(
        "test accuracy of the bf16 run's checkpoint: fp32 eval {}, bf16 eval {}",
        accuracy[0], accuracy[1]
    );
    // 500 test images: a few predictions may flip under bf16 rounding, not many.
    assert!((accuracy[0] - accuracy[1]).abs() <= 0.03, "{accuracy:?}");
    let (fp32, bf16) = (curves[0].clone(), curves[1].clone());
    assert_ne!(fp32, bf16, "the bf16 run must differ from the fp32 run");
    for (e, (a, b)) in fp32.iter().zip(&bf16).enumerate() {
        let rel = (b - a).abs() / a.abs();
        assert!(
            rel < band,
            "epoch {}: bf16 loss {b} vs fp32 {a} ({:.1}% apart, band {:.0}%)",
            e + 1,
            100.0 * rel,
            100.0 * band
        );
    }
    (fp32, bf16)
}

/// Two epochs of a width-4 ResNet-18 (the quick form, a few seconds per run).
#[test]
fn resnet18_trains_in_bf16_emulation_like_fp32() {
    // Measured here: 3.1% and 2.7% apart; a width-4 network amplifies rounding more than a wider
    // one (its batch norms see 4 channels), hence a wider band than the width-8 test.
    train_fp32_and_bf16(4, 2, 0.08);
}

/// Three epochs at width 8. Measured on the 2-core build machine (with the rounding points of the
/// GPU's bf16 step: batch norm's incoming gradient, the residual sum): train loss fp32 1.372,
/// 1.041, 0.958; bf16 1.339, 1.039, 0.933 (2.4%, 0.2%, 2.6% apart); test accuracy of the bf16
/// checkpoint 25% in both fp32 and bf16 evaluation.
#[test]
#[ignore = "about 65 s in release on 2 cores (3 epochs × 2 runs of a width-8 ResNet-18); run with \
            --ignored"]
fn resnet18_width8_three_epochs_in_bf16_emulation_like_fp32() {
    train_fp32_and_bf16(8, 3, 0.05);
}

#[test]
fn bf16_on_a_gpu_is_refused_for_networks_without_bf16_gpu_ops() {
    use podgpu::train::{trainer::check_gpu_bf16, Precision};
    for arch in [
        "densenet121",
        "mobilenetv2",
        "smallcnn",
        "vit_tiny_patch16_224",
    ] {
        let e = check_gpu_bf16(Precision::Bf16, Device::Cuda(0), arch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ResNets only") && e.contains(arch), "{e}");
        assert!(
            e.contains("--precision tf32") && e.contains("--device cpu"),
            "{e}"
        );
        // The CPU's emulation and the other precisions run every network.
        assert!(check_gpu_bf16(Precision::Bf16, Device::Cpu, arch).is_ok());
        assert!(check_gpu_bf16(Precision::Tf32, Device::Cuda(0), arch).is_ok());
    }
    for arch in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] {
        assert!(
            check_gpu_bf16(Precision::Bf16, Device::Cuda(0), arch).is_ok(),
            "{arch}"
        );
    }
}
