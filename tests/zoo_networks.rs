//! Every network of `podgpu models`: a forward and backward pass on the CPU at a small input and width
//! with each stem, gradients reaching every trainable parameter, the torchvision parameter layouts,
//! FLOP counts against hand counts, and a finite-difference check of a whole small network.

use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::cli::models::{describe, Args as ModelsArgs};
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::nn::{flops, HeadSpec, ModelSpec, Network, Stem, MODEL_NAMES};
use podgpu::rng::Rng;
use podgpu::{loss, DType, Tensor};

fn spec(arch: &str, width: usize, stem: Stem, channels: usize, head: HeadSpec) -> ModelSpec {
    ModelSpec {
        arch: arch.into(),
        width,
        stem,
        in_channels: channels,
        classes: 3,
        feature_dim: 4,
        head,
        image_size: 32,
        drop_path: None,
    }
}

fn images(n: usize, c: usize, s: usize, rng: &mut Rng) -> Tensor {
    let v: Vec<f32> = (0..n * c * s * s).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(&[n, c, s, s], v)
}

/// One training step's forward and backward; returns the names of trainable parameters without a
/// finite gradient, or weights whose gradient is zero. (A BN bias may legitimately get none: when its
/// output reaches the loss only through 1×1-spatial or 1×1 convolutions and a training-mode BN, a
/// per-channel shift is removed again by that BN's mean, as in PyTorch.)
fn step(net: &Network, ps: &mut ParamStore, x: Tensor, labels: &[usize]) -> Vec<String> {
    let mut t = Tape::train();
    let xv = t.constant(x);
    let out = net.forward(&mut t, ps, &xv);
    assert_eq!(out.features.shape(), &[labels.len(), 4]);
    assert_eq!(out.logits.shape(), &[labels.len(), 3]);
    assert!(out.logits.value().all_finite());
    let lt = loss::labels_tensor(labels, out.logits.value());
    let l = loss::softmax_cross_entropy(&mut t, &out.logits, &lt);
    t.backward(&l, ps);
    ps.iter()
        .filter(|p| p.kind == ParamKind::Trainable)
        .filter(|p| {
            !p.grad.as_ref().is_some_and(|g| {
                g.all_finite() && (g.max_abs() > 0.0 || !p.name.ends_with(".weight"))
            })
        })
        .map(|p| p.name.clone())
        .collect()
}

#[test]
fn every_network_trains_a_step_with_every_stem() {
    let mut rng = Rng::new(1);
    for &arch in MODEL_NAMES {
        for (stem, size) in [
            (Stem::Cifar, 16),
            (Stem::TinyImageNet, 16),
            (Stem::ImageNet, 32),
        ] {
            if arch == "smallcnn" && stem != Stem::Cifar {
                continue; // one stem only
            }
            // The deep ResNets once, with the CIFAR stem: the stems are ResNet18's job.
            if (arch == "resnet101" || arch == "resnet152") && stem != Stem::Cifar {
                continue;
            }
            let mut ps = ParamStore::new();
            let net = Network::new(
                spec(arch, 8, stem, 3, HeadSpec::Linear),
                &mut ps,
                DType::F32,
                &mut rng,
            )
            .unwrap();
            let bad = step(&net, &mut ps, images(2, 3, size, &mut rng), &[0, 2]);
            assert!(bad.is_empty(), "{arch} {stem:?}: no gradient for {bad:?}");
        }
    }
}

#[test]
fn every_head_gives_its_logits() {
    let mut rng = Rng::new(2);
    let p = podgpu::pedcc::generate(3, 4, 0, podgpu::pedcc::Method::Simplex)
        .unwrap()
        .to_tensor();
    for head in [
        HeadSpec::Pedcc(p.clone()),
        HeadSpec::Linear,
        HeadSpec::Cosine,
    ] {
        let mut ps = ParamStore::new();
        let net = Network::new(
            spec("smallcnn", 8, Stem::Cifar, 1, head.clone()),
            &mut ps,
            DType::F32,
            &mut rng,
        )
        .unwrap();
        let mut t = Tape::inference();
        let x = t.constant(images(3, 1, 12, &mut rng));
        let out = net.forward(&mut t, &mut ps, &x);
        let (f, z) = (
            out.features.value().to_vec_f64(),
            out.logits.value().to_vec_f64(),
        );
        for b in 0..3 {
            let xb = &f[b * 4..(b + 1) * 4];
            let norm = xb.iter().map(|v| v * v).sum::<f64>().sqrt();
            match head {
                HeadSpec::Pedcc(_) => {
                    // x Pᵀ, and `out.weight` is the frozen n×K transpose.
                    let pv = p.to_vec_f64();
                    for k in 0..3 {
                        let want: f64 = (0..4).map(|j| xb[j] * pv[k * 4 + j]).sum();
                        assert!((z[b * 3 + k] - want).abs() < 1e-5);
                    }
                    let w = ps.get(ps.find("out.weight").unwrap());
                    assert_eq!(
                        (w.value.shape(), w.kind),
                        (&[4usize, 3][..], ParamKind::Frozen)
                    );
                }
                HeadSpec::Cosine => {
                    let w = ps.value(ps.find("out.weight").unwrap()).to_vec_f64();
                    assert_eq!(ps.find("out.bias"), None);
                    for k in 0..3 {
                        let wk = &w[k * 4..(k + 1) * 4];
                        let wn = wk.iter().map(|v| v * v).sum::<f64>().sqrt();
                        let want: f64 = (0..4).map(|j| xb[j] * wk[j]).sum::<f64>() / (norm * wn);
                        assert!((z[b * 3 + k] - want).abs() < 1e-5, "cosine logits");
                    }
                }
                HeadSpec::Linear => assert!(ps.find("out.bias").is_some()),
            }
        }
    }
}

#[test]
fn parameter_names_follow_torchvision() {
    let mut rng = Rng::new(3);
    let mut names = |arch: &str| {
        let mut ps = ParamStore::new();
        Network::new(
            spec(arch, 8, Stem::Cifar, 3, HeadSpec::Linear),
            &mut ps,
            DType::F32,
            &mut rng,
        )
        .unwrap();
        ps.iter()
            .map(|p| (p.name.clone(), p.value.shape().to_vec()))
            .collect::<Vec<_>>()
    };
    let has = |list: &[(String, Vec<usize>)], name: &str, shape: &[usize]| {
        let found = list.iter().find(|(n, _)| n == name);
        assert_eq!(found.map(|(_, s)| s.as_slice()), Some(shape), "{name}");
    };
    // DenseNet at width 8: growth 4, bottleneck 16, 8 stem channels; CIFAR stem conv is 3×3.
    let d = names("densenet121");
    has(&d, "features.conv0.weight", &[8, 3, 3, 3]);
    has(&d, "features.norm0.running_var", &[8]);
    has(&d, "features.denseblock1.denselayer1.norm1.weight", &[8]);
    has(
        &d,
        "features.denseblock1.denselayer1.conv1.weight",
        &[16, 8, 1, 1],
    );
    has(
        &d,
        "features.denseblock1.denselayer1.conv2.weight",
        &[4, 16, 3, 3],
    );
    has(
        &d,
        "features.denseblock1.denselayer6.conv1.weight",
        &[16, 28, 1, 1],
    );
    // 8 + 6·4 = 32 → 16 after transition1.
    has(&d, "features.transition1.conv.weight", &[16, 32, 1, 1]);
    has(
        &d,
        "features.denseblock4.denselayer16.conv2.weight",
        &[4, 16, 3, 3],
    );
    // Final channels: ((((8+24)/2 + 48)/2 + 96)/2 + 64) = 128.
    has(&d, "features.norm5.weight", &[128]);
    has(&d, "fc.weight", &[4, 128]);
    assert_eq!(
        d.iter()
            .filter(|(n, _)| n.ends_with("conv2.weight"))
            .count(),
        58
    );

    // MobileNetV2 at width 8 (α = 1/8): channels round up to 8; last conv keeps 1280.
    let m = names("mobilenetv2");
    has(&m, "features.0.0.weight", &[8, 3, 3, 3]);
    has(&m, "features.0.1.weight", &[8]);
    has(&m, "features.1.conv.0.0.weight", &[8, 1, 3, 3]); // depthwise
    has(&m, "features.1.conv.1.weight", &[8, 8, 1, 1]);
    has(&m, "features.1.conv.2.weight", &[8]);
    has(&m, "features.2.conv.0.0.weight", &[48, 8, 1, 1]); // expand ×6
    has(&m, "features.2.conv.1.0.weight", &[48, 1, 3, 3]);
    has(&m, "features.2.conv.2.weight", &[8, 48, 1, 1]);
    has(&m, "features.2.conv.3.running_mean", &[8]);
    has(&m, "features.17.conv.2.weight", &[40, 144, 1, 1]); // 6·24 (160/8 → 24) → 320/8 = 40
    has(&m, "features.18.0.weight", &[1280, 40, 1, 1]);
    has(&m, "fc.weight", &[4, 1280]);

    let s = names("smallcnn");
    has(&s, "features.0.weight", &[2, 3, 3, 3]);
    has(&s, "features.4.weight", &[4, 2, 3, 3]);
    has(&s, "features.8.weight", &[8, 4, 3, 3]);
    has(&s, "features.9.num_batches_tracked", &[]);
}

#[test]
fn flops_match_hand_counts() {
    // smallcnn, width 8, 1×12×12: convs 1→2 at 12², 2→4 at 6², 4→8 at 3²; FC 8→4; PEDCC head 4→3.
    let a = ModelsArgs {
        image_size: 12,
        channels: 1,
        classes: 3,
        feature_dim: Some(4),
        width: 8,
        models: None,
        transformer_size: None,
    };
    let m = describe("smallcnn", &a).unwrap();
    let want = 2 * 9 * 144 + 4 * 2 * 9 * 36 + 8 * 4 * 9 * 9 + 8 * 4 + 4 * 3;
    assert_eq!(m.flops, want as u64);
    assert_eq!(m.params, (18 + 72 + 288) + 2 * (2 + 4 + 8) + (32 + 4));
    let ((), n) = flops::count(|| ());
    assert_eq!(n, 0);
}

#[test]
fn resnet50_cifar_is_about_1_3_gflop() {
    let m = describe("resnet50", &ModelsArgs::default()).unwrap();
    assert!((1.25e9..1.35e9).contains(&(m.flops as f64)), "{}", m.flops);
    assert_eq!(m.pooled_dim, 2048);
}

#[test]
fn whole_small_network_passes_finite_differences() {
    // smallcnn (f64), BN in training mode, through FC1 and the cosine head.
    let mut rng = Rng::new(4);
    let mut ps = ParamStore::new();
    let net = Network::new(
        spec("smallcnn", 8, Stem::Cifar, 1, HeadSpec::Cosine),
        &mut ps,
        DType::F64,
        &mut rng,
    )
    .unwrap();
    let x = randn(&[3, 1, 8, 8], &mut rng);
    let opts = GradCheckOptions {
        eps: 1e-6,
        max_elems: 6,
        seed: 2,
    };
    let r = check(
        &[("images", x)],
        &mut ps,
        |t, s, v| net.forward(t, s, &v[0]).logits,
        &opts,
    );
    assert_close(&r, 1e-5);
}
