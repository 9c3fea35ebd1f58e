//! Every `--loss` trains: `smallcnn` on real MNIST digits (datasets/mnist-small.bin) for a short CPU run
//! through `podgpu train`'s own loop reaches clearly better than chance (more than 2× the 10% of a
//! guess) on the test split. Also: the Center Loss centres move and are checkpointed, and a COT run
//! resumes.

use podgpu::train::config::{LossKind, TrainConfig};
use podgpu::train::{load_checkpoint, trainer};
use std::path::PathBuf;

fn mnist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/mnist-small.bin")
}

/// A short run: all 1000 training images, 3 epochs, the lr divided by 10 for the last one so that the
/// weights and the BN statistics settle before the test. Feature dim 64 is inside the paper's range
/// 2K ≤ n ≤ 40K. The margin losses (s = 30) get gradients about s times larger than softmax's, so
/// their short run uses a 25× smaller lr (with the softmax lr their feature norms explode first).
fn quick(loss: LossKind, out: PathBuf) -> TrainConfig {
    let margin = matches!(
        loss,
        LossKind::AmSoftmax | LossKind::Arcface | LossKind::CombinedMargin
    );
    TrainConfig {
        model: "smallcnn".into(),
        width: 32,
        data: Some(mnist()),
        loss,
        device: "cpu".into(),
        seed: 3,
        epochs: 3,
        batch_size: 32,
        lr: if margin { 0.002 } else { 0.05 },
        milestones: vec![2],
        feature_dim: Some(64),
        limit_test: Some(300),
        eval_every: 3,
        out: Some(out),
        ..TrainConfig::default()
    }
}

fn trains(loss: LossKind) {
    let dir = tempfile::tempdir().unwrap();
    let s = trainer::train(quick(loss, dir.path().join("run"))).unwrap();
    let acc = s.final_test_acc.expect("the last epoch is evaluated");
    assert!(
        s.final_train_loss.is_finite(),
        "{loss}: train loss {}",
        s.final_train_loss
    );
    assert!(
        acc > 0.2,
        "{loss}: test accuracy {acc} is not above 2× chance (0.2)"
    );
}

macro_rules! loss_trains {
    ($($name:ident => $kind:expr),* $(,)?) => {
        $( #[test] fn $name() { trains($kind); } )*
    };
}

loss_trains! {
    softmax_trains => LossKind::Softmax,
    center_trains => LossKind::Center,
    am_softmax_trains => LossKind::AmSoftmax,
    arcface_trains => LossKind::Arcface,
    combined_margin_trains => LossKind::CombinedMargin,
    cot_trains => LossKind::Cot,
    pedcc_loss_trains => LossKind::PedccLoss,
    cosine_trains => LossKind::Cosine,
    nac_trains => LossKind::Nac,
    pod_trains => LossKind::Pod,
}

#[test]
fn center_loss_centres_are_a_checkpointed_buffer_that_moves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        eval_every: 1,
        limit_train: Some(128),
        ..quick(LossKind::Center, dir.path().join("run"))
    };
    trainer::train(cfg).unwrap();
    let ck = load_checkpoint(&dir.path().join("run/last.safetensors")).unwrap();
    let c = &ck.tensors["center_loss.centers"];
    assert_eq!(c.shape(), &[10, 64]);
    // Started at zero; four updates moved every class seen towards its features.
    let v = c.to_vec_f64();
    let moved = v.chunks(64).filter(|r| r.iter().any(|x| *x != 0.0)).count();
    assert!(moved >= 8, "only {moved} of 10 centres moved");
    assert!(
        !ck.optim.momentum.contains_key("center_loss.centers"),
        "SGD must not touch the centres"
    );
}

#[test]
fn cot_and_margin_runs_resume() {
    for loss in [LossKind::Cot, LossKind::Arcface] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let cfg = TrainConfig {
            epochs: 1,
            eval_every: 1,
            limit_train: Some(96),
            ..quick(loss, run.clone())
        };
        trainer::train(cfg).unwrap();
        let s = trainer::resume(&run, Some(2), None, None).unwrap();
        assert_eq!(s.epochs, 2);
        assert!(s.final_train_loss.is_finite());
    }
}
