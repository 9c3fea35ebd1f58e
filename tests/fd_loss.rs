//! Finite-difference checks (f64) of the POD loss (NaC, SC, POD; both variants; n > B and n < B), of
//! row normalisation and of softmax cross-entropy; plus the loss values against direct evaluations of
//! the paper's formulas written independently here.

use podgpu::autograd::{ParamStore, Tape};
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::loss::{self, PodConfig, ScForm, Variant};
use podgpu::ops;
use podgpu::pedcc::{self, Method};
use podgpu::rng::Rng;
use podgpu::Tensor;

const VARIANTS: [Variant; 2] = [Variant::Paper, Variant::Reference];

/// (B, n, K): n > B and n < B, K ≤ n+1 (simplex) and K > n+1 (repulsion).
const SHAPES: [(usize, usize, usize); 3] = [(5, 12, 4), (9, 4, 3), (8, 3, 6)];

struct Case {
    x: Tensor,
    p: Tensor,
    labels: Vec<usize>,
    delta: f64,
}

/// Features near their class centroids with varied norms (0.5…3), as in training, so that the cosines
/// and correlations are far from trivial values.
fn case(b: usize, n: usize, k: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let method = if k <= n + 1 {
        Method::Simplex
    } else {
        Method::Repulsion
    };
    let p = pedcc::generate(k, n, seed, method).unwrap().to_tensor_f64();
    let labels: Vec<usize> = (0..b).map(|i| (i + rng.below(k)) % k).collect();
    let noise = randn(&[b, n], &mut rng);
    let mut x = vec![0.0; b * n];
    for i in 0..b {
        let r = 0.5 + 2.5 * rng.uniform();
        for j in 0..n {
            x[i * n + j] =
                r * (p.host::<f64>()[labels[i] * n + j] + 0.7 * noise.host::<f64>()[i * n + j]);
        }
    }
    Case {
        x: Tensor::from_vec(&[b, n], x),
        p,
        labels,
        delta: 0.4,
    }
}

fn opts() -> GradCheckOptions {
    GradCheckOptions {
        eps: 1e-6,
        max_elems: 40,
        seed: 11,
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let n = t.dim(1);
    t.host::<f64>().chunks(n).map(|r| r.to_vec()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// NaC by the formula, sample by sample.
fn nac_direct(c: &Case, variant: Variant) -> f64 {
    let (x, p) = (rows(&c.x), rows(&c.p));
    let mut sum = 0.0;
    for (xb, &y) in x.iter().zip(&c.labels) {
        let r = dot(xb, xb).sqrt();
        let q = match variant {
            Variant::Paper => r + c.delta,
            // The reference code appends δ as an extra coordinate and takes the norm.
            Variant::Reference => {
                let mut ext = xb.clone();
                ext.push(c.delta);
                dot(&ext, &ext).sqrt()
            }
        };
        let cos = dot(xb, &p[y]) / q;
        sum += (1.0 - cos).powi(2);
    }
    sum / x.len() as f64
}

/// SC by the definition: the n×n matrix R = DᵀD/(B−1) and its off-diagonal squares.
fn sc_direct(c: &Case, variant: Variant) -> f64 {
    let (x, p) = (rows(&c.x), rows(&c.p));
    let (b, n) = (x.len(), x[0].len());
    let d: Vec<Vec<f64>> = x
        .iter()
        .zip(&c.labels)
        .map(|(xb, &y)| {
            let r = dot(xb, xb).sqrt();
            xb.iter().zip(&p[y]).map(|(v, pv)| v / r - pv).collect()
        })
        .collect();
    let mut l = 0.0;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let r: f64 = (0..b).map(|s| d[s][i] * d[s][j]).sum::<f64>() / (b - 1) as f64;
                l += r * r;
            }
        }
    }
    match variant {
        Variant::Paper => l,
        Variant::Reference => l / (n - 1) as f64,
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-300)
}

#[test]
fn nac_value_and_gradient_both_variants() {
    for (s, &(b, n, k)) in SHAPES.iter().enumerate() {
        let c = case(b, n, k, 100 + s as u64);
        let lt = loss::labels_tensor(&c.labels, &c.x);
        for variant in VARIANTS {
            let mut t = Tape::inference();
            let xv = t.constant(c.x.clone());
            let v = loss::nac(&mut t, &xv, &c.p, &lt, c.delta, variant)
                .value()
                .item();
            let want = nac_direct(&c, variant);
            assert!(
                close(v, want, 1e-12),
                "NaC {variant} B={b} n={n}: {v} vs {want}"
            );

            let r = check(
                &[("x", c.x.clone())],
                &mut ParamStore::new(),
                |t, _, vs| loss::nac(t, &vs[0], &c.p, &lt, c.delta, variant),
                &opts(),
            );
            assert_close(&r, 1e-6);
        }
    }
}

#[test]
fn sc_value_and_gradient_both_variants_both_forms() {
    for (s, &(b, n, k)) in SHAPES.iter().enumerate() {
        let c = case(b, n, k, 200 + s as u64);
        let lt = loss::labels_tensor(&c.labels, &c.x);
        for variant in VARIANTS {
            let want = sc_direct(&c, variant);
            let mut grads = Vec::new();
            for form in [ScForm::Gram, ScForm::Covariance, ScForm::Auto] {
                // Value, and the analytic gradient of each form for the cross-form comparison.
                let mut t = Tape::train();
                let xv = t.leaf(c.x.clone());
                let l = loss::sc(&mut t, &xv, &c.p, &lt, variant, form);
                let v = l.value().item();
                assert!(
                    close(v, want, 1e-10),
                    "SC {variant} {form:?} B={b} n={n}: {v} vs {want}"
                );
                t.backward(&l, &mut ParamStore::new());
                grads.push(t.grad_of(&xv).unwrap().to_vec_f64());

                let r = check(
                    &[("x", c.x.clone())],
                    &mut ParamStore::new(),
                    |t, _, vs| loss::sc(t, &vs[0], &c.p, &lt, variant, form),
                    &opts(),
                );
                assert_close(&r, 1e-6);
            }
            let e = podgpu::tensor::rel_error(&grads[0], &grads[1]);
            assert!(
                e < 1e-12,
                "Gram and n×n forms give different SC gradients: {e:e}"
            );
        }
    }
}

#[test]
fn pod_is_nac_plus_lambda_sc_and_its_gradient_checks() {
    for (s, &(b, n, k)) in SHAPES.iter().enumerate() {
        let c = case(b, n, k, 300 + s as u64);
        let lt = loss::labels_tensor(&c.labels, &c.x);
        for variant in VARIANTS {
            let cfg = PodConfig {
                variant,
                lambda: 0.7,
                sc_form: ScForm::Auto,
            };
            let mut t = Tape::inference();
            let xv = t.constant(c.x.clone());
            let out = loss::pod(&mut t, &xv, &c.p, &lt, c.delta, &cfg);
            let want = nac_direct(&c, variant) + 0.7 * sc_direct(&c, variant);
            assert!(close(out.loss.value().item(), want, 1e-10));
            assert!(close(
                out.nac.value().item(),
                nac_direct(&c, variant),
                1e-12
            ));
            assert_eq!(t.len(), 0, "an inference tape must record nothing");

            let r = check(
                &[("x", c.x.clone())],
                &mut ParamStore::new(),
                |t, _, vs| loss::pod(t, &vs[0], &c.p, &lt, c.delta, &cfg).loss,
                &opts(),
            );
            assert_close(&r, 1e-6);
        }
    }
}

#[test]
fn pod_gradient_through_a_linear_layer_and_scaled_upstream() {
    // The loss inside a graph: FC1 → POD, times 3 (the upstream gradient of the loss is not 1).
    let c = case(6, 10, 5, 400);
    let lt = loss::labels_tensor(&c.labels, &c.x);
    let mut rng = Rng::new(4);
    let mut store = ParamStore::new();
    let w = store.add(
        "fc.weight",
        randn(&[10, 10], &mut rng),
        podgpu::ParamKind::Trainable,
    );
    let cfg = PodConfig {
        variant: Variant::Reference,
        lambda: 1.0,
        sc_form: ScForm::Auto,
    };
    let r = check(
        &[("x", c.x.clone())],
        &mut store,
        |t, s, vs| {
            let wv = t.param(s, w);
            let h = ops::linear(t, &vs[0], &wv, None);
            let l = loss::pod(t, &h, &c.p, &lt, c.delta, &cfg).loss;
            ops::scale(t, &l, 3.0)
        },
        &opts(),
    );
    assert_close(&r, 1e-6);
}

#[test]
fn row_normalize_gradient_and_unit_rows() {
    let mut rng = Rng::new(5);
    let x = randn(&[4, 7], &mut rng);
    let y = ops::row_normalize_fwd(&x);
    for row in rows(&y) {
        assert!((dot(&row, &row) - 1.0).abs() < 1e-14);
    }
    let r = check(
        &[("x", x)],
        &mut ParamStore::new(),
        |t, _, vs| ops::row_normalize(t, &vs[0]),
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn softmax_cross_entropy_value_and_gradient() {
    let mut rng = Rng::new(6);
    let (b, k) = (5, 7);
    // Large logits: the stable form must not overflow.
    let z = Tensor::from_vec(
        &[b, k],
        randn(&[b, k], &mut rng)
            .host::<f64>()
            .iter()
            .map(|v| 4.0 * v + 300.0)
            .collect::<Vec<f64>>(),
    );
    let labels: Vec<usize> = (0..b).map(|_| rng.below(k)).collect();
    let lt = loss::labels_tensor(&labels, &z);

    let mut want = 0.0;
    for (row, &y) in rows(&z).iter().zip(&labels) {
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        want += lse - row[y];
    }
    want /= b as f64;
    let mut t = Tape::inference();
    let zv = t.constant(z.clone());
    let v = loss::softmax_cross_entropy(&mut t, &zv, &lt).value().item();
    assert!(v.is_finite() && close(v, want, 1e-12), "{v} vs {want}");

    let r = check(
        &[("z", z)],
        &mut ParamStore::new(),
        |t, _, vs| loss::softmax_cross_entropy(t, &vs[0], &lt),
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn logits_predictions_and_norm_helpers() {
    let c = case(7, 6, 4, 500);
    let mut t = Tape::inference();
    let xv = t.constant(c.x.clone());
    let logits = loss::pedcc_logits(&mut t, &xv, &c.p);
    assert_eq!(logits.shape(), &[7, 4]);
    // Prediction = argmax of the cosine with each centroid, computed here directly.
    let (x, p) = (rows(&c.x), rows(&c.p));
    let want: Vec<usize> = x
        .iter()
        .map(|xb| {
            let cos: Vec<f64> = p
                .iter()
                .map(|pk| dot(xb, pk) / dot(xb, xb).sqrt())
                .collect();
            (0..cos.len()).fold(0, |best, j| if cos[j] > cos[best] { j } else { best })
        })
        .collect();
    assert_eq!(loss::predictions(logits.value()), want);
    let correct = want.iter().zip(&c.labels).filter(|(a, b)| a == b).count();
    assert_eq!(loss::count_correct(logits.value(), &c.labels), correct);

    let mean: f64 = x.iter().map(|r| dot(r, r).sqrt()).sum::<f64>() / 7.0;
    assert!(close(loss::mean_row_norm(&c.x), mean, 1e-14));
    let l = rows(logits.value());
    let lsum: f64 = l.iter().map(|r| dot(r, r).sqrt()).sum();
    assert!(close(
        loss::delta_norm_sum(Variant::Reference, &c.x, logits.value()),
        lsum,
        1e-14
    ));
    assert!(close(
        loss::delta_norm_sum(Variant::Paper, &c.x, logits.value()),
        mean * 7.0,
        1e-14
    ));
}

#[test]
fn f32_losses_agree_with_f64() {
    let c = case(16, 32, 10, 600);
    for variant in VARIANTS {
        let cfg = PodConfig {
            variant,
            lambda: 1.0,
            sc_form: ScForm::Auto,
        };
        let run = |x: &Tensor, p: &Tensor| {
            let lt = loss::labels_tensor(&c.labels, x);
            let mut t = Tape::train();
            let xv = t.leaf(x.clone());
            let out = loss::pod(&mut t, &xv, p, &lt, c.delta, &cfg);
            t.backward(&out.loss, &mut ParamStore::new());
            (
                out.loss.value().item(),
                t.grad_of(&xv).unwrap().to_vec_f64(),
            )
        };
        let (l64, g64) = run(&c.x, &c.p);
        let x32 = c.x.to_dtype(podgpu::DType::F32);
        let p32 = c.p.to_dtype(podgpu::DType::F32);
        let (l32, g32) = run(&x32, &p32);
        assert!(close(l32, l64, 1e-5), "{variant}: {l32} vs {l64}");
        let e = podgpu::tensor::rel_error(&g32, &g64);
        assert!(e < 1e-5, "{variant}: f32 gradient off by {e:e}");
    }
}
