//! The numerics guard (issue 7): a non-finite loss or gradient stops the run naming the step, the
//! tensor and the last good checkpoint; `--detect-anomaly` (the tape's anomaly detection) names the
//! first op that produced a non-finite value, forward or backward.

mod common;

use common::*;
use podgpu::autograd::anomaly::Phase;
use podgpu::autograd::BackwardFn;
use podgpu::{ops, Tape, Tensor};

#[test]
fn the_tape_names_the_first_op_whose_output_is_not_finite() {
    // relu keeps the large values; x·xᵀ overflows f32 (1e25² > 3.4e38); the scale after it turns inf
    // into more infs. The first is the matmul.
    let x = Tensor::from_vec(&[2, 3], vec![1e25f32, -2.0, 3.0, 0.5, 1e25, -1.0]);
    let mut tape = Tape::train().with_anomaly_detection(true);
    let xv = tape.leaf(x.clone());
    let r = ops::relu(&mut tape, &xv);
    assert!(tape.anomaly().is_none(), "relu's output is finite");
    let g = ops::matmul(&mut tape, &r, false, &r, true);
    let _ = ops::scale(&mut tape, &g, 2.0);
    let a = tape.anomaly().expect("the overflow is detected");
    assert_eq!(a.op, "ops::linear::matmul");
    assert_eq!(a.phase, Phase::Forward);
    assert_eq!(a.shape, vec![2, 2]);
    assert_eq!((a.nan, a.inf), (0, 2));
    let msg = a.to_string();
    assert!(
        msg.contains("`ops::linear::matmul` (forward)") && msg.contains("2 infinite"),
        "{msg}"
    );

    // The same computation without detection records nothing (and costs nothing).
    let mut tape = Tape::train();
    let xv = tape.leaf(x);
    let r = ops::relu(&mut tape, &xv);
    let _ = ops::matmul(&mut tape, &r, false, &r, true);
    assert!(tape.anomaly().is_none());
}

/// An op with a finite forward and a NaN gradient, the kind of bug only the backward check finds.
fn broken_sqrt(t: &mut Tape, x: &podgpu::Var) -> podgpu::Var {
    let xs = x.value().to_vec_f32();
    let y: Vec<f32> = xs.iter().map(|v| v.abs().sqrt()).collect();
    let shape = x.shape().to_vec();
    t.op(Tensor::from_vec(&shape, y), &[x], move || -> BackwardFn {
        Box::new(move |dy, _| {
            // d√x/dx = 1/(2√x): infinite at 0, and 0·inf = NaN.
            let g: Vec<f32> = dy
                .to_vec_f32()
                .iter()
                .zip(&xs)
                .map(|(d, v)| d / (2.0 * v.sqrt()) * v)
                .collect();
            vec![Some(Tensor::from_vec(&shape, g))]
        })
    })
}

#[test]
fn the_tape_names_the_op_whose_backward_produced_a_non_finite_gradient() {
    let mut store = podgpu::ParamStore::new();
    let mut tape = Tape::train().with_anomaly_detection(true);
    let x = tape.leaf(Tensor::from_vec(&[4], vec![4.0f32, 0.0, 1.0, 9.0]));
    let y = broken_sqrt(&mut tape, &x);
    let y = ops::relu(&mut tape, &y);
    let s = ops::reshape(&mut tape, &y, &[1, 4]);
    let ones = tape.constant(Tensor::from_vec(&[4, 1], vec![1.0f32; 4]));
    let loss = ops::matmul(&mut tape, &s, false, &ones, false);
    let loss = ops::reshape(&mut tape, &loss, &[1]);
    assert!(tape.anomaly().is_none(), "the forward pass is finite");
    tape.backward(&loss, &mut store);
    let a = tape.anomaly().expect("the NaN gradient is detected");
    assert_eq!(a.phase, Phase::Backward { input: 0 });
    assert!(a.op.ends_with("broken_sqrt"), "{}", a.op);
    assert_eq!((a.nan, a.inf), (1, 0));
    assert!(a.to_string().contains("(backward)"), "{a}");
}

fn train(s: &tempfile::TempDir, out: &str, extra: &[&str]) -> std::process::Output {
    let data = s.path().join("tiny.bin");
    if !data.exists() {
        tiny_dataset(&data, 12, 3, 64, 16);
    }
    let out = s.path().join(out);
    let mut args = vec![
        "train",
        "resnet18",
        "--width",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn a_diverging_first_epoch_stops_with_the_step_and_tensor_named() {
    let s = tempfile::tempdir().unwrap();
    let o = train(&s, "run", &["--epochs", "2", "--lr", "1e30"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("at epoch 1, batch "), "{err}");
    assert!(err.contains("(step "), "{err}");
    assert!(
        err.contains("a non-finite gradient") || err.contains("the loss became"),
        "{err}"
    );
    if err.contains("a non-finite gradient") {
        assert!(err.contains("the gradient of `"), "{err}");
    }
    assert!(
        err.contains("No checkpoint was written yet") && err.contains("lower --lr"),
        "{err}"
    );
    assert!(err.contains("--detect-anomaly"), "{err}");
    assert!(!s.path().join("run/last.safetensors").exists());
}

#[test]
fn detect_anomaly_names_the_first_op() {
    let s = tempfile::tempdir().unwrap();
    let o = train(
        &s,
        "run",
        &["--epochs", "1", "--lr", "1e30", "--detect-anomaly"],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--detect-anomaly at epoch 1, batch "), "{err}");
    assert!(
        err.contains("the first non-finite value appeared in") && err.contains("`ops::"),
        "{err}"
    );
}

#[test]
fn divergence_after_a_good_epoch_keeps_and_names_its_checkpoint() {
    let s = tempfile::tempdir().unwrap();
    // lr 0.05 in epoch 1, then ×1e12.
    let o = train(
        &s,
        "run",
        &[
            "--epochs",
            "3",
            "--lr",
            "0.05",
            "--milestones",
            "1",
            "--gamma",
            "1e12",
        ],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("at epoch 2, batch "), "{err}");
    let run = s.path().join("run");
    assert!(
        err.contains(&format!(
            "The last good checkpoint is {} (end of epoch 1)",
            run.join("last.safetensors").display()
        )),
        "{err}"
    );
    assert!(err.contains("podgpu train --resume"), "{err}");
    let ck = podgpu::train::load_checkpoint(&run.join("last.safetensors")).unwrap();
    assert_eq!(ck.state.epoch, 1);
    assert!(ck.tensors.values().all(|t| t.all_finite()));
    assert_eq!(exact_metrics(&run).len(), 1);
}

#[test]
fn a_gradient_poisoned_at_a_known_step_is_named_at_that_step() {
    // 64 images in batches of 16: 4 steps per epoch. A NaN is put into `fc.weight`'s gradient at
    // step 6 (epoch 2, batch 2); the host reads the guard only at the epoch's end (step 8), but the
    // error names step 6, and the checkpoint is the one before it (end of epoch 1).
    let s = tempfile::tempdir().unwrap();
    let data = s.path().join("tiny.bin");
    tiny_dataset(&data, 12, 3, 64, 16);
    let run_dir = s.path().join("run");
    let o = podgpu()
        .env(podgpu::train::trainer::TEST_NAN_GRADIENT_ENV, "6:fc.weight")
        .env(podgpu::train::ledger::READ_EVERY_ENV, "1000")
        .args([
            "train",
            "resnet18",
            "--width",
            "2",
            "--batch-size",
            "16",
            "--epochs",
            "3",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a non-finite gradient at epoch 2, batch 2 of 4 (step 6) (the loss was "),
        "{err}"
    );
    assert!(
        err.contains("the gradient of `fc.weight` has 1 NaN and 0 infinite values of "),
        "{err}"
    );
    assert!(!err.contains("parameters have non-finite"), "{err}");
    assert!(
        err.contains(&format!(
            "The last good checkpoint is {} (end of epoch 1)",
            run_dir.join("last.safetensors").display()
        )),
        "{err}"
    );
    let ck = podgpu::train::load_checkpoint(&run_dir.join("last.safetensors")).unwrap();
    assert_eq!((ck.state.epoch, ck.state.global_step), (1, 4));
    assert!(ck.tensors.values().all(|t| t.all_finite()));
    assert_eq!(exact_metrics(&run_dir).len(), 1);
}

/// Parameters, momentum and guard of `steps` SGD steps on a small store, the trainer's order (guard,
/// then the update that skips while the guard's flag is set), with a NaN in `b`'s gradient at step
/// `poison`; the ledger is read once, after the last step.
fn guarded_steps(
    steps: u64,
    poison: Option<u64>,
) -> (
    podgpu::ParamStore,
    podgpu::optim::Sgd,
    podgpu::train::ledger::Reading,
) {
    use podgpu::train::ledger::StepLedger;
    use podgpu::train::tally::EpochTally;
    use podgpu::ParamKind;
    let mut ps = podgpu::ParamStore::new();
    ps.add(
        "a",
        Tensor::from_vec(&[3], vec![0.5f32, -1.0, 2.0]),
        ParamKind::Trainable,
    );
    ps.add(
        "b",
        Tensor::from_vec(&[2], vec![1.5f32, 0.25]),
        ParamKind::Trainable,
    );
    ps.add(
        "frozen",
        Tensor::from_vec(&[2], vec![1.0f32, 1.0]),
        ParamKind::Frozen,
    );
    let mut sgd = podgpu::optim::Sgd::new(0.9, 5e-4, false).unwrap();
    let mut ledger = StepLedger::new(podgpu::Device::Cpu, &EpochTally::default(), &ps);
    let loss = Tensor::from_vec(&[1], vec![0.75f32]);
    for step in 1..=steps {
        for p in ps.iter_mut() {
            let n = p.value.numel();
            let mut g: Vec<f32> = (0..n).map(|i| (step as f32 + i as f32).sin()).collect();
            if p.name == "b" && poison == Some(step) {
                g[1] = f32::NAN;
            }
            p.grad = Some(Tensor::from_vec(&[n], g));
        }
        ledger.guard(step, &ps, &loss);
        sgd.step_unless(&mut ps, 0.1, Some(ledger.skip_flag()));
        ps.zero_grad();
    }
    let r = ledger.read();
    (ps, sgd, r)
}

#[test]
fn updates_stop_at_the_bad_step_although_it_is_read_later() {
    let (after, sgd, r) = guarded_steps(6, Some(3));
    let bad = r.bad.expect("the guard recorded the bad step");
    assert_eq!(bad.step, 3);
    assert_eq!(bad.loss, 0.75);
    assert_eq!(bad.counts, vec![(0, 0), (1, 0), (0, 0)]);
    // The weights and momentum are those after step 2, bit for bit.
    let (before, sgd2, r2) = guarded_steps(2, None);
    assert_eq!(r2.bad, None);
    for (p, q) in after.iter().zip(before.iter()) {
        let bits = |t: &Tensor| {
            t.to_vec_f32()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&p.value), bits(&q.value), "{}", p.name);
    }
    for (name, m) in &sgd.state().momentum {
        let m2 = &sgd2.state().momentum[name];
        assert_eq!(m.to_vec_f32(), m2.to_vec_f32(), "momentum of {name}");
    }
}
