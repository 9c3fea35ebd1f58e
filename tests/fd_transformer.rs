//! Finite-difference checks (f64) of the transformer ops and of whole tiny ViT and Swin networks.

use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::nn::{HeadSpec, ModelSpec, Network, Stem};
use podgpu::ops::{self, AttnSpec, RowIndex};
use podgpu::pedcc::{self, Method};
use podgpu::rng::Rng;
use podgpu::{loss, DType, Tensor};
use std::sync::Arc;

fn opts() -> GradCheckOptions {
    GradCheckOptions::default()
}

#[test]
fn erf_matches_known_values() {
    // Reference values of erf (Abramowitz & Stegun table, more digits from mpmath).
    for (x, want) in [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (1.5, 0.966_105_146_475_310_7),
        (2.5, 0.999_593_047_982_555),
        (4.0, 0.999_999_984_582_742_1),
    ] {
        let got = ops::erf(x);
        assert!((got - want).abs() < 1e-15, "erf({x}) = {got}, want {want}");
        assert!((ops::erf(-x) + want).abs() < 1e-15, "erf is odd");
    }
}

#[test]
fn gelu_layer_norm_softmax() {
    let mut rng = Rng::new(1);
    let mut store = ParamStore::new();
    let g = store.add("ln.weight", randn(&[6], &mut rng), ParamKind::Trainable);
    let b = store.add("ln.bias", randn(&[6], &mut rng), ParamKind::Trainable);
    let x = randn(&[2, 3, 6], &mut rng);
    let r = check(
        &[("x", x)],
        &mut store,
        |t, s, v| {
            let (gv, bv) = (t.param(s, g), t.param(s, b));
            let y = ops::layer_norm(t, &v[0], &gv, &bv, 1e-6);
            let y = ops::gelu(t, &y);
            let y = ops::scale(t, &y, 2.0);
            ops::softmax(t, &y)
        },
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn batched_matmul_all_transposes() {
    let mut rng = Rng::new(2);
    let mut store = ParamStore::new();
    let a = randn(&[3, 4, 5], &mut rng);
    let b = randn(&[3, 5, 2], &mut rng);
    let r = check(
        &[("a", a), ("b", b)],
        &mut store,
        |t, _, v| {
            let c = ops::bmm(t, &v[0], false, &v[1], false); // [3, 4, 2]
            let d = ops::bmm(t, &c, true, &v[0], false); // [3, 2, 5]
            let e = ops::bmm(t, &v[1], true, &d, true); // [3, 2, 2]
            ops::bmm(t, &e, false, &c, true) // [3, 2, 4]
        },
        &opts(),
    );
    assert_close(&r, 1e-7);
}

/// Attention against the same computation spelled out with bmm + softmax, and its gradients by
/// finite differences, with a trainable bias and a constant mask over 2 windows.
#[test]
fn attention_with_bias_and_mask() {
    let (heads, windows, batch, n, d) = (2, 2, 2, 4, 3);
    let g = heads * windows * batch;
    let mut rng = Rng::new(3);
    let mut store = ParamStore::new();
    let bias = store.add(
        "bias",
        randn(&[heads, n, n], &mut rng),
        ParamKind::Trainable,
    );
    let mask_v: Vec<f64> = (0..windows * n * n)
        .map(|i| if i % 5 == 0 { -100.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(&[windows, n, n], mask_v);
    let qkv = randn(&[3, g, n, d], &mut rng);
    let spec = AttnSpec {
        heads,
        windows,
        scale: 0.7,
    };
    let m2 = mask.clone();
    let r = check(
        &[("qkv", qkv.clone())],
        &mut store,
        move |t, s, v| {
            let bv = t.param(s, bias);
            ops::attention(t, &v[0], Some(&bv), Some(&m2), spec)
        },
        &opts(),
    );
    assert_close(&r, 1e-7);

    // The fused op equals bmm → scale → + bias + mask → softmax → bmm.
    let (fused, probs) = ops::attention_fwd(&qkv, Some(store.value(bias)), Some(&mask), spec);
    let q = ops::narrow_fwd(&qkv, 0, 0, 1).reshape(&[g, n, d]);
    let k = ops::narrow_fwd(&qkv, 0, 1, 1).reshape(&[g, n, d]);
    let v = ops::narrow_fwd(&qkv, 0, 2, 1).reshape(&[g, n, d]);
    let s = ops::scale_fwd(&ops::bmm_fwd(&q, false, &k, true), 0.7);
    let (bv, mv) = (store.value(bias).host::<f64>(), mask.host::<f64>());
    let mut sv = s.host::<f64>().to_vec();
    for gi in 0..g {
        for e in 0..n * n {
            sv[gi * n * n + e] +=
                bv[(gi % heads) * n * n + e] + mv[((gi / heads) % windows) * n * n + e];
        }
    }
    let p = ops::softmax_fwd(&Tensor::from_vec(&[g, n, n], sv));
    let o = ops::bmm_fwd(&p, false, &v, false);
    let err = podgpu::tensor::rel_error(&fused.to_vec_f64(), &o.to_vec_f64());
    assert!(
        err < 1e-14,
        "fused attention differs from the spelled-out one: {err}"
    );
    let err = podgpu::tensor::rel_error(&probs.to_vec_f64(), &p.to_vec_f64());
    assert!(err < 1e-14, "probabilities differ: {err}");
}

#[test]
fn layout_ops_permute_narrow_roll_gather_scale_rows() {
    let mut rng = Rng::new(4);
    let mut store = ParamStore::new();
    let table = store.add("table", randn(&[5, 3], &mut rng), ParamKind::Trainable);
    // Repeated indices: the scatter backward must add them up.
    let idx = Arc::new(RowIndex::new(5, vec![4, 0, 0, 2, 4, 4, 1, 3]));
    let x = randn(&[2, 4, 3, 2], &mut rng);
    let s = Tensor::from_vec(&[2], vec![0.0f64, 1.25]);
    let r = check(
        &[("x", x)],
        &mut store,
        move |t, st, v| {
            let y = ops::permute(t, &v[0], &[0, 2, 3, 1]); // [2, 3, 2, 4]
            let y = ops::roll2d(t, &y, -1, 1);
            let y = ops::narrow(t, &y, 1, 1, 2); // [2, 2, 2, 4]
            let y = ops::scale_rows(t, &y, &s);
            let y = ops::reshape(t, &y, &[8, 4]);
            let tv = t.param(st, table);
            let gth = ops::gather_rows(t, &tv, &idx); // [8, 3]
            let y = ops::matmul(t, &y, true, &gth, false); // [4, 3]
            ops::permute(t, &y, &[1, 0])
        },
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn permute_and_roll_match_definitions() {
    let x = Tensor::from_vec(&[2, 3, 4, 1], (0..24).map(|v| v as f64).collect::<Vec<_>>());
    let y = ops::permute_fwd(&x, &[2, 0, 3, 1]);
    assert_eq!(y.shape(), &[4, 2, 1, 3]);
    let (xs, ys) = (x.host::<f64>(), y.host::<f64>());
    for a in 0..2 {
        for b in 0..3 {
            for c in 0..4 {
                assert_eq!(ys[(c * 2 + a) * 3 + b], xs[(a * 3 + b) * 4 + c]);
            }
        }
    }
    // torch.roll([[0,1,2],[3,4,5]] as [1,2,3,1], shifts=(1, -1)) = [[4,5,3],[1,2,0]].
    let x = Tensor::from_vec(&[1, 2, 3, 1], vec![0.0f64, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let y = ops::roll2d_fwd(&x, 1, -1);
    assert_eq!(y.host::<f64>(), &[4.0, 5.0, 3.0, 1.0, 2.0, 0.0]);
}

fn tiny_net(
    arch: &str,
    image: usize,
    head: HeadSpec,
    dim: usize,
    classes: usize,
) -> (Network, ParamStore) {
    let spec = ModelSpec {
        arch: arch.into(),
        width: 64,
        stem: Stem::Cifar,
        in_channels: 3,
        classes,
        feature_dim: dim,
        head,
        image_size: image,
        drop_path: Some(0.0),
    };
    let mut ps = ParamStore::new();
    let net = Network::new(spec, &mut ps, DType::F64, &mut Rng::new(11)).unwrap();
    (net, ps)
}

/// A whole tiny network with the POD loss: every parameter's gradient by finite differences.
fn check_transformer(arch: &str, image: usize, dim: usize) {
    let (classes, batch) = (3, 3);
    let centroids = pedcc::generate(classes, dim, 3, Method::Simplex)
        .unwrap()
        .to_tensor_f64();
    let (net, mut ps) = tiny_net(
        arch,
        image,
        HeadSpec::Pedcc(centroids.clone()),
        dim,
        classes,
    );
    let mut rng = Rng::new(5);
    let images = randn(&[batch, 3, image, image], &mut rng);
    let labels = loss::labels_tensor(&[0, 1, 2], &images);
    let cfg = loss::PodConfig::default();
    let r = check(
        &[("image", images)],
        &mut ps,
        |t: &mut Tape, s, v| {
            let out = net.forward(t, s, &v[0]);
            loss::pod(t, &out.features, &centroids, &labels, 0.05, &cfg).loss
        },
        // eps 1e-5: some tensors (the first stage's bias tables, norms) get gradients near 1e-4,
        // where the rounding noise of a 1e-6 step (~1e-10 absolute) alone is a 1e-6 relative
        // error; at 1e-4 the O(eps²) truncation error of the large-gradient biases reaches 1e-5.
        &GradCheckOptions {
            max_elems: 6,
            eps: 1e-5,
            ..opts()
        },
    );
    // Every trainable tensor was checked, the frozen PEDCC head got none.
    assert!(r.iter().any(|x| x.name == "param patch_embed.proj.weight"));
    assert!(!r.iter().any(|x| x.name.contains("head")));
    assert_close(&r, 1e-5);
}

#[test]
fn tiny_vit_pod_gradients() {
    check_transformer("vit(patch=4,dim=8,depth=2,heads=2,mlp_ratio=2)", 8, 8);
}

#[test]
fn tiny_swin_pod_gradients() {
    // 16 px, patch 2: stages at 8×8 (window 4, shifted blocks) and 4×4 (one window, no shift).
    check_transformer(
        "swin(patch=2,window=4,dim=4,depths=2-2,heads=1-2,mlp_ratio=2)",
        16,
        8,
    );
}

/// Drop path and dropout: the identity at inference; in training each sample (element) is either
/// zeroed or scaled by 1/(1 − p), drawn from the tape's seeded stream (the same seed, the same
/// draws), and the gradient follows the same mask.
#[test]
fn drop_path_and_dropout_follow_the_tapes_stream() {
    let mut rng = Rng::new(8);
    let x = randn(&[64, 5], &mut rng);
    let mut t = Tape::inference();
    let v = t.constant(x.clone());
    assert_eq!(
        ops::drop_path(&mut t, &v, 0.5).value().host::<f64>(),
        x.host::<f64>()
    );
    assert_eq!(
        ops::dropout(&mut t, &v, 0.5).value().host::<f64>(),
        x.host::<f64>()
    );
    let run = |seed: u64, dropout: bool| {
        let mut t = Tape::train().with_rng(Rng::new(seed));
        let v = t.leaf(x.clone());
        let y = match dropout {
            true => ops::dropout(&mut t, &v, 0.25),
            false => ops::drop_path(&mut t, &v, 0.25),
        };
        let yv = y.value().clone();
        let s = ops::scale(&mut t, &y, 1.0);
        let mut ps = ParamStore::new();
        t.backward_with(
            &s,
            Tensor::full(&[64, 5], 1.0, DType::F64, podgpu::Device::Cpu),
            &mut ps,
        );
        (yv.to_vec_f64(), t.grad_of(&v).unwrap().to_vec_f64())
    };
    for dropout in [false, true] {
        let (y, g) = run(3, dropout);
        assert_eq!(
            (y.clone(), g.clone()),
            run(3, dropout),
            "same seed, same draws"
        );
        assert_ne!(y, run(4, dropout).0, "another seed, other draws");
        let xs = x.host::<f64>();
        let mut kept = 0;
        for (i, (&yi, &gi)) in y.iter().zip(&g).enumerate() {
            if yi == 0.0 {
                assert_eq!(gi, 0.0);
            } else {
                assert!((yi - xs[i] / 0.75).abs() < 1e-12 && (gi - 1.0 / 0.75).abs() < 1e-12);
                kept += 1;
            }
        }
        // About 75% kept; drop path keeps or drops whole samples.
        assert!((150..=330).contains(&kept), "{kept} of 320 kept");
        if !dropout {
            for row in y.chunks(5) {
                assert!(row.iter().all(|&v| v == 0.0) || row.iter().all(|&v| v != 0.0));
            }
        }
    }
}
