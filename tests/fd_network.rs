//! Finite differences (f64) through whole networks: a ResNet18 and a ResNet50 topology at tiny width,
//! batch norm in training mode, POD loss on top — every parameter and the input image.

use podgpu::autograd::ParamStore;
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::loss::{self, PodConfig, Variant};
use podgpu::nn::{HeadSpec, ModelSpec, Network, Stem};
use podgpu::pedcc::{self, Method};
use podgpu::rng::Rng;
use podgpu::DType;

/// `eps`: the deep, 2-channel-narrow ResNet50 has so many ReLU inputs near zero that a step of 1e-5
/// already crosses kinks (the error then shrinks in proportion to eps); 1e-7 in f64 stays clear of
/// them with rounding still far below the tolerance.
fn check_network(arch: &str, width: usize, variant: Variant, max_elems: usize, eps: f64) {
    let (classes, dim, batch) = (4, 6, 4);
    let centroids = pedcc::generate(classes, dim, 3, Method::Simplex)
        .unwrap()
        .to_tensor_f64();
    let spec = ModelSpec {
        arch: arch.into(),
        width,
        stem: Stem::Cifar,
        in_channels: 3,
        classes,
        feature_dim: dim,
        head: HeadSpec::Pedcc(centroids.clone()),
        image_size: 16,
        drop_path: None,
    };
    let mut ps = ParamStore::new();
    let net = Network::new(spec, &mut ps, DType::F64, &mut Rng::new(11)).unwrap();
    let mut rng = Rng::new(5);
    // 16×16 keeps layer4 at 2×2: at 1×1 only the centre tap of a 3×3 conv gets a gradient.
    let image = randn(&[batch, 3, 16, 16], &mut rng);
    let labels = loss::labels_tensor(&[0, 1, 2, 3], &image);
    let cfg = PodConfig {
        variant,
        ..PodConfig::default()
    };
    let reports = check(
        &[("image", image)],
        &mut ps,
        |t, ps: &mut ParamStore, v| {
            let out = net.forward(t, ps, &v[0]);
            loss::pod(t, &out.features, &centroids, &labels, 0.3, &cfg).loss
        },
        &GradCheckOptions {
            max_elems,
            eps,
            ..GradCheckOptions::default()
        },
    );
    // Every trainable tensor was checked, from the stem to FC1; the frozen head gets no gradient.
    assert!(reports
        .iter()
        .any(|r| r.name == "param pre_layers.0.weight"));
    assert!(reports.iter().any(|r| r.name == "param fc.bias"));
    assert!(!reports.iter().any(|r| r.name.contains("out.weight")));
    assert_close(&reports, 1e-5);
}

#[test]
fn resnet18_pod_paper_whole_network() {
    check_network("resnet18", 2, Variant::Paper, 3, 1e-6);
}

#[test]
fn resnet50_pod_reference_whole_network() {
    check_network("resnet50", 2, Variant::Reference, 2, 1e-7);
}
