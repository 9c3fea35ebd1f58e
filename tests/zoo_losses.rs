//! Finite-difference checks (f64) of every baseline loss of Table IV (margin softmaxes, Center Loss,
//! COT's complement entropy, Cosine Loss, PEDCC-Loss), with each value also checked against a direct
//! evaluation of its formula written independently here; and the Center Loss centre update against
//! Wen et al.'s rule.

use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::loss::baselines::{self, Margin, PedccLossConfig};
use podgpu::loss::labels_tensor;
use podgpu::ops;
use podgpu::pedcc::{self, Method};
use podgpu::rng::Rng;
use podgpu::Tensor;

fn opts() -> GradCheckOptions {
    GradCheckOptions {
        eps: 1e-6,
        max_elems: 40,
        seed: 5,
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let n = t.dim(1);
    t.to_vec_f64().chunks(n).map(|r| r.to_vec()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn labels(b: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    (0..b).map(|i| (i + rng.below(k)) % k).collect()
}

/// Cosines in (−0.95, 0.95), with one target cosine at −0.99 (ArcFace's region past θ_t).
fn cosines(b: usize, k: usize, ys: &[usize], rng: &mut Rng) -> Tensor {
    let mut v: Vec<f64> = (0..b * k).map(|_| 1.9 * rng.uniform() - 0.95).collect();
    v[ys[0]] = -0.99;
    Tensor::from_vec(&[b, k], v)
}

/// Margin softmax CE by its formula, sample by sample.
fn margin_direct(cos: &Tensor, ys: &[usize], m: Margin, s: f64) -> f64 {
    let mut sum = 0.0;
    for (row, &y) in rows(cos).iter().zip(ys) {
        let theta = row[y].acos();
        let target = if m.m1 * theta + m.m2 <= std::f64::consts::PI {
            (m.m1 * theta + m.m2).cos() - m.m3
        } else {
            let ct = ((std::f64::consts::PI - m.m2) / m.m1).cos();
            row[y] - m.m3 - 1.0 - ct
        };
        let z: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(j, &c)| s * if j == y { target } else { c })
            .collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        sum += lse - z[y];
    }
    sum / ys.len() as f64
}

const MARGINS: [(&str, Margin); 3] = [
    (
        "am-softmax",
        Margin {
            m1: 1.0,
            m2: 0.0,
            m3: 0.35,
        },
    ),
    (
        "arcface",
        Margin {
            m1: 1.0,
            m2: 0.5,
            m3: 0.0,
        },
    ),
    (
        "combined",
        Margin {
            m1: 0.9,
            m2: 0.4,
            m3: 0.15,
        },
    ),
];

#[test]
fn margin_softmaxes_match_their_formula_and_finite_differences() {
    let mut rng = Rng::new(1);
    let (b, k) = (6, 5);
    let ys = labels(b, k, &mut rng);
    let cos = cosines(b, k, &ys, &mut rng);
    let lt = labels_tensor(&ys, &cos);
    for (name, m) in MARGINS {
        for s in [1.0, 7.0] {
            let (v, _) = baselines::margin_softmax_ce_fwd(&cos, &lt, m, s, false);
            let want = margin_direct(&cos, &ys, m, s);
            assert!(
                (v.item() - want).abs() < 1e-12 * want.abs().max(1.0),
                "{name} s={s}: {} vs {want}",
                v.item()
            );
            let mut store = ParamStore::new();
            let r = check(
                &[("cos", cos.clone())],
                &mut store,
                |t, _, v| baselines::margin_softmax_ce(t, &v[0], &lt, m, s),
                &opts(),
            );
            assert_close(&r, 1e-6);
        }
    }
}

#[test]
fn margin_softmax_through_the_normalised_head() {
    // Features and a trainable [K, n] weight, both row-normalised, as the cosine head computes them.
    let mut rng = Rng::new(2);
    let (b, n, k) = (5, 7, 4);
    let ys = labels(b, k, &mut rng);
    let mut store = ParamStore::new();
    let w = store.add("out.weight", randn(&[k, n], &mut rng), ParamKind::Trainable);
    let x = randn(&[b, n], &mut rng);
    let lt = labels_tensor(&ys, &x);
    for (_, m) in MARGINS {
        let r = check(
            &[("x", x.clone())],
            &mut store,
            |t, s, v| {
                let wv = t.param(s, w);
                let wn = ops::row_normalize(t, &wv);
                let xn = ops::row_normalize(t, &v[0]);
                let cos = ops::matmul(t, &xn, false, &wn, true);
                baselines::margin_softmax_ce(t, &cos, &lt, m, 4.0)
            },
            &opts(),
        );
        assert_close(&r, 1e-6);
    }
}

#[test]
fn center_loss_and_update_follow_wen_et_al() {
    let mut rng = Rng::new(3);
    let (b, n, k) = (7, 5, 3);
    let ys = labels(b, k, &mut rng);
    let x = randn(&[b, n], &mut rng);
    let centers = randn(&[k, n], &mut rng);
    let lt = labels_tensor(&ys, &x);

    let (v, _) = baselines::center_loss_fwd(&x, &centers, &lt, false);
    let (xr, cr) = (rows(&x), rows(&centers));
    let want: f64 = xr
        .iter()
        .zip(&ys)
        .map(|(xb, &y)| {
            xb.iter()
                .zip(&cr[y])
                .map(|(a, c)| (a - c) * (a - c))
                .sum::<f64>()
        })
        .sum::<f64>()
        / (2.0 * b as f64);
    assert!((v.item() - want).abs() < 1e-12, "{} vs {want}", v.item());
    let mut store = ParamStore::new();
    let r = check(
        &[("x", x.clone())],
        &mut store,
        |t, _, v| baselines::center_loss(t, &v[0], &centers, &lt),
        &opts(),
    );
    assert_close(&r, 1e-7);

    // c_j ← c_j − α Σ_{y_b = j}(c_j − x_b) / (1 + n_j); a class absent from the batch stays put.
    let alpha = 0.5;
    let ys_missing: Vec<usize> = ys.iter().map(|&y| y.min(k - 2)).collect();
    let lt2 = labels_tensor(&ys_missing, &x);
    let updated = rows(&baselines::center_update_fwd(&centers, &x, &lt2, alpha));
    for j in 0..k {
        let members: Vec<&Vec<f64>> = xr
            .iter()
            .zip(&ys_missing)
            .filter(|(_, &y)| y == j)
            .map(|(r, _)| r)
            .collect();
        for d in 0..n {
            let delta: f64 = members.iter().map(|xb| cr[j][d] - xb[d]).sum::<f64>()
                / (1.0 + members.len() as f64);
            let want = cr[j][d] - alpha * delta;
            assert!((updated[j][d] - want).abs() < 1e-12, "centre {j}[{d}]");
        }
    }
    assert_eq!(
        updated[k - 1],
        cr[k - 1],
        "a class without samples must keep its centre"
    );
}

#[test]
fn complement_entropy_matches_cot_and_finite_differences() {
    let mut rng = Rng::new(4);
    let (b, k) = (6, 5);
    let ys = labels(b, k, &mut rng);
    let z = randn(&[b, k], &mut rng);
    let lt = labels_tensor(&ys, &z);
    // The official code's formula: ŷ = softmax(z), P_j = ŷ_j / (1 − ŷ_y), Σ_{j≠y} P_j log P_j / (B·K).
    let mut want = 0.0;
    for (row, &y) in rows(&z).iter().zip(&ys) {
        let e: Vec<f64> = row.iter().map(|v| v.exp()).collect();
        let sum: f64 = e.iter().sum();
        let yhat: Vec<f64> = e.iter().map(|v| v / sum).collect();
        for j in (0..k).filter(|&j| j != y) {
            let p = yhat[j] / (1.0 - yhat[y]);
            want += p * p.ln();
        }
    }
    want /= (b * k) as f64;
    let (v, _) = baselines::complement_entropy_fwd(&z, &lt, false);
    assert!(
        want < 0.0 && (v.item() - want).abs() < 1e-12,
        "{} vs {want}",
        v.item()
    );
    let mut store = ParamStore::new();
    let r = check(
        &[("logits", z)],
        &mut store,
        |t, _, v| baselines::complement_entropy(t, &v[0], &lt),
        &opts(),
    );
    // The target logit gets no gradient by construction; check the rest.
    assert!(
        r[0].rel_error < 1e-7 && r[0].max_abs_grad > 1e-6,
        "{}",
        r[0]
    );
}

fn pedcc_case(b: usize, n: usize, k: usize, seed: u64) -> (Tensor, Tensor, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let p = pedcc::generate(k, n, seed, Method::Simplex)
        .unwrap()
        .to_tensor_f64();
    let ys = labels(b, k, &mut rng);
    let noise = randn(&[b, n], &mut rng);
    let pv = p.to_vec_f64();
    let x: Vec<f64> = (0..b * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0.5 + r as f64 * 0.3) * (pv[ys[r] * n + c] + 0.8 * noise.to_vec_f64()[i])
        })
        .collect();
    (Tensor::from_vec(&[b, n], x), p, ys)
}

#[test]
fn cosine_loss_is_one_minus_cosine() {
    let (x, p, ys) = pedcc_case(6, 8, 4, 6);
    let lt = labels_tensor(&ys, &x);
    let (xr, pr) = (rows(&x), rows(&p));
    let want = xr
        .iter()
        .zip(&ys)
        .map(|(xb, &y)| 1.0 - dot(xb, &pr[y]) / (dot(xb, xb).sqrt() * dot(&pr[y], &pr[y]).sqrt()))
        .sum::<f64>()
        / ys.len() as f64;
    let (v, _) = baselines::cosine_loss_fwd(&x, &p, &lt, false);
    assert!((v.item() - want).abs() < 1e-12, "{} vs {want}", v.item());
    let mut store = ParamStore::new();
    let r = check(
        &[("x", x)],
        &mut store,
        |t, _, v| baselines::cosine_loss(t, &v[0], &p, &lt),
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn pedcc_loss_is_am_softmax_over_the_pedcc_plus_rooted_mse() {
    let (x, p, ys) = pedcc_case(6, 8, 5, 7);
    let lt = labels_tensor(&ys, &x);
    for cfg in [
        PedccLossConfig::default(),
        PedccLossConfig {
            margin: 0.3,
            scale: 5.0,
            lambda: 0.7,
            root: 2.0,
        },
    ] {
        // Direct: cosines of normalised x with P, AM-Softmax, + λ·((1/2B) Σ ‖x − p_y‖²)^(1/q).
        let (xr, pr) = (rows(&x), rows(&p));
        let cos: Vec<f64> = xr
            .iter()
            .flat_map(|xb| {
                let r = dot(xb, xb).sqrt();
                pr.iter().map(move |pk| dot(xb, pk) / r).collect::<Vec<_>>()
            })
            .collect();
        let cos = Tensor::from_vec(&[ys.len(), pr.len()], cos);
        let am = margin_direct(&cos, &ys, Margin::additive_cosine(cfg.margin), cfg.scale);
        let mse = xr
            .iter()
            .zip(&ys)
            .map(|(xb, &y)| {
                xb.iter()
                    .zip(&pr[y])
                    .map(|(a, c)| (a - c) * (a - c))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / (2.0 * ys.len() as f64);
        let want = am + cfg.lambda * mse.powf(1.0 / cfg.root);
        let mut t = Tape::inference();
        let xv = t.constant(x.clone());
        let got = baselines::pedcc_loss(&mut t, &xv, &p, &lt, &cfg);
        assert!(
            (got.loss.value().item() - want).abs() < 1e-10,
            "{} vs {want}",
            got.loss.value().item()
        );
        assert!((got.mse.value().item() - mse).abs() < 1e-12);

        let mut store = ParamStore::new();
        let r = check(
            &[("x", x.clone())],
            &mut store,
            |t, _, v| baselines::pedcc_loss(t, &v[0], &p, &lt, &cfg).loss,
            &opts(),
        );
        assert_close(&r, 1e-6);
    }
}
