//! SGD against the PyTorch update rule computed by hand, and the step lr schedule.

use podgpu::optim::{Sgd, StepSchedule};
use podgpu::{ParamKind, ParamStore, Tensor};

const W0: [f64; 3] = [0.5, -1.25, 2.0];
const G1: [f64; 3] = [0.1, 0.3, -0.7];
const G2: [f64; 3] = [-0.2, 0.05, 0.4];

/// A store with one trainable weight, a frozen PEDCC-like head and a buffer, every one with a gradient
/// (the frozen and buffer gradients must be ignored).
fn store_f64() -> ParamStore {
    let mut s = ParamStore::new();
    s.add(
        "fc.weight",
        Tensor::from_vec(&[3], W0.to_vec()),
        ParamKind::Trainable,
    );
    s.add(
        "out.weight",
        Tensor::from_vec(&[2], vec![0.6, 0.8]),
        ParamKind::Frozen,
    );
    s.add(
        "bn.running_mean",
        Tensor::from_vec(&[2], vec![0.3, -0.4]),
        ParamKind::Buffer,
    );
    s
}

fn set_grads(s: &mut ParamStore, g: &[f64; 3]) {
    for id in s.ids().collect::<Vec<_>>() {
        let p = s.get_mut(id);
        let n = p.value.numel();
        let grad = if n == 3 { g.to_vec() } else { vec![1.5; n] };
        p.grad = Some(Tensor::from_vec(p.value.shape(), grad));
    }
}

fn values(s: &ParamStore, name: &str) -> Vec<f64> {
    s.get(s.find(name).unwrap()).value.to_vec_f64()
}

/// PyTorch's SGD (dampening 0) for one parameter vector, step by step.
fn reference(steps: &[(&[f64; 3], f64)], m: f64, wd: f64, nesterov: bool) -> Vec<f64> {
    let mut w = W0.to_vec();
    let mut buf: Option<Vec<f64>> = None;
    for (grad, lr) in steps {
        let g: Vec<f64> = (0..3).map(|i| grad[i] + wd * w[i]).collect();
        let b: Vec<f64> = match &buf {
            None => g.clone(),
            Some(b) => (0..3).map(|i| m * b[i] + g[i]).collect(),
        };
        let d: Vec<f64> = if nesterov {
            (0..3).map(|i| g[i] + m * b[i]).collect()
        } else {
            b.clone()
        };
        for i in 0..3 {
            w[i] -= lr * d[i];
        }
        buf = Some(b);
    }
    w
}

#[test]
fn two_steps_follow_the_pytorch_rule_exactly_in_f64() {
    let (m, wd) = (0.9, 5e-4);
    let mut s = store_f64();
    let mut sgd = Sgd::new(m, wd, false).unwrap();
    set_grads(&mut s, &G1);
    sgd.step(&mut s, 0.1);
    set_grads(&mut s, &G2);
    sgd.step(&mut s, 0.01);
    let want = reference(&[(&G1, 0.1), (&G2, 0.01)], m, wd, false);
    assert_eq!(values(&s, "fc.weight"), want);
    // Momentum made a difference: plain SGD would land elsewhere.
    assert_ne!(want, reference(&[(&G1, 0.1), (&G2, 0.01)], 0.0, wd, false));
    assert_eq!(sgd.state().steps, 2);
    assert_eq!(sgd.state().momentum.len(), 1);
}

#[test]
fn frozen_parameters_and_buffers_are_never_touched() {
    let mut s = store_f64();
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    for g in [&G1, &G2] {
        set_grads(&mut s, g);
        sgd.step(&mut s, 0.1);
    }
    assert_eq!(values(&s, "out.weight"), vec![0.6, 0.8]);
    assert_eq!(values(&s, "bn.running_mean"), vec![0.3, -0.4]);
    assert!(!sgd.state().momentum.contains_key("out.weight"));
    assert!(!sgd.state().momentum.contains_key("bn.running_mean"));
}

#[test]
fn nesterov_and_plain_sgd_follow_their_rules() {
    let mut s = store_f64();
    let mut sgd = Sgd::new(0.9, 1e-2, true).unwrap();
    for g in [&G1, &G2] {
        set_grads(&mut s, g);
        sgd.step(&mut s, 0.05);
    }
    assert_eq!(
        values(&s, "fc.weight"),
        reference(&[(&G1, 0.05), (&G2, 0.05)], 0.9, 1e-2, true)
    );

    let mut s = store_f64();
    let mut sgd = Sgd::new(0.0, 0.0, false).unwrap();
    set_grads(&mut s, &G1);
    sgd.step(&mut s, 0.1);
    let want: Vec<f64> = (0..3).map(|i| W0[i] - 0.1 * G1[i]).collect();
    assert_eq!(values(&s, "fc.weight"), want);
    assert!(sgd.state().momentum.is_empty());
    assert!(Sgd::new(0.0, 0.0, true).is_err());
    assert!(Sgd::new(-0.1, 0.0, false).is_err());
    assert!(Sgd::new(0.9, f64::NAN, false).is_err());
}

#[test]
fn reset_momentum_restarts_the_buffer_from_the_gradient() {
    let mut s = store_f64();
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    set_grads(&mut s, &G1);
    sgd.step(&mut s, 0.1);
    sgd.reset_momentum();
    assert!(sgd.state().momentum.is_empty());
    set_grads(&mut s, &G2);
    sgd.step(&mut s, 0.01);
    // The second step is a first step from the weights after step one.
    let after_one = reference(&[(&G1, 0.1)], 0.9, 5e-4, false);
    let want: Vec<f64> = (0..3)
        .map(|i| after_one[i] - 0.01 * (G2[i] + 5e-4 * after_one[i]))
        .collect();
    assert_eq!(values(&s, "fc.weight"), want);
}

#[test]
fn trainable_parameters_without_a_gradient_are_skipped() {
    let mut s = store_f64();
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    sgd.step(&mut s, 0.1);
    assert_eq!(values(&s, "fc.weight"), W0.to_vec());
    assert!(sgd.state().momentum.is_empty());
}

#[test]
fn f32_update_agrees_with_f64() {
    let mut s64 = store_f64();
    let mut s32 = store_f64();
    s32.to_dtype(podgpu::DType::F32);
    let mut a = Sgd::new(0.9, 5e-4, false).unwrap();
    let mut b = Sgd::new(0.9, 5e-4, false).unwrap();
    for g in [&G1, &G2, &G1] {
        set_grads(&mut s64, g);
        a.step(&mut s64, 0.1);
        for id in s32.ids().collect::<Vec<_>>() {
            let p = s32.get_mut(id);
            let grad = if p.value.numel() == 3 {
                g.to_vec()
            } else {
                vec![1.5; p.value.numel()]
            };
            p.grad = Some(Tensor::from_f64_as(
                p.value.shape(),
                &grad,
                podgpu::DType::F32,
            ));
        }
        b.step(&mut s32, 0.1);
    }
    let w32 = values(&s32, "fc.weight");
    assert_eq!(
        s32.get(s32.find("fc.weight").unwrap()).value.dtype(),
        podgpu::DType::F32
    );
    let err = podgpu::tensor::rel_error(&w32, &values(&s64, "fc.weight"));
    assert!(err < 1e-6, "f32 vs f64 relative error {err}");
}

#[test]
fn state_export_and_import_continue_the_same_trajectory() {
    let mut s = store_f64();
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    set_grads(&mut s, &G1);
    sgd.step(&mut s, 0.1);
    let saved_state = sgd.state().clone();
    let mut s2 = s.clone();

    set_grads(&mut s, &G2);
    sgd.step(&mut s, 0.1);

    let mut restored = Sgd::new(0.9, 5e-4, false).unwrap();
    restored.load_state(saved_state.clone(), &s2).unwrap();
    set_grads(&mut s2, &G2);
    restored.step(&mut s2, 0.1);
    assert_eq!(values(&s2, "fc.weight"), values(&s, "fc.weight"));
    assert_eq!(restored.state().steps, 2);

    // Buffers that do not fit the model are refused with the parameter named.
    let mut wrong = saved_state.clone();
    let buf = wrong.momentum.remove("fc.weight").unwrap();
    wrong.momentum.insert("fc.bias".into(), buf);
    let e = restored.load_state(wrong, &s2).unwrap_err().to_string();
    assert!(e.contains("fc.bias"), "{e}");
    let mut frozen = saved_state.clone();
    frozen
        .momentum
        .insert("out.weight".into(), Tensor::from_vec(&[2], vec![1.0, 1.0]));
    let e = restored.load_state(frozen, &s2).unwrap_err().to_string();
    assert!(e.contains("not a trainable"), "{e}");
    let mut shape = saved_state;
    shape
        .momentum
        .insert("fc.weight".into(), Tensor::from_vec(&[2], vec![1.0, 1.0]));
    let e = restored.load_state(shape, &s2).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn step_schedule_matches_multistep_lr() {
    let s = StepSchedule::paper();
    let (lr1, lr2, lr3) = (0.1 * 0.1, 0.1 * 0.1 * 0.1, 0.1 * 0.1 * 0.1 * 0.1);
    for (epoch, want) in [
        (0, 0.1),
        (29, 0.1),
        (30, lr1),
        (59, lr1),
        (60, lr2),
        (89, lr2),
        (90, lr3),
        (99, lr3),
    ] {
        assert_eq!(s.lr_at(epoch), want, "epoch {epoch}");
    }
    assert!(s.is_milestone(30) && s.is_milestone(90) && !s.is_milestone(31));

    let custom = StepSchedule::new(0.05, &[2, 5], 0.5).unwrap();
    assert_eq!(
        (0..7).map(|e| custom.lr_at(e)).collect::<Vec<_>>(),
        vec![0.05, 0.05, 0.025, 0.025, 0.025, 0.0125, 0.0125]
    );
    assert!(StepSchedule::new(0.1, &[30, 30], 0.1).is_err());
    assert!(StepSchedule::new(-0.1, &[30], 0.1).is_err());
    assert!(StepSchedule::new(0.1, &[30], f64::NAN).is_err());
}
