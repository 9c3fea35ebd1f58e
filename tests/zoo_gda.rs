//! GDA (shared covariance) on latent features: the decision rule on data whose answer is known, accuracy
//! against the Bayes classifier of the true distribution, and bad input.

use podgpu::rng::Rng;
use podgpu::train::gda;

/// Samples of K Gaussians with means `mu` [K][n] and the shared covariance L Lᵀ (L lower triangular).
fn sample(
    mu: &[Vec<f64>],
    l: &[Vec<f64>],
    per_class: &[usize],
    rng: &mut Rng,
) -> (Vec<f32>, Vec<usize>) {
    let n = mu[0].len();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (k, &count) in per_class.iter().enumerate() {
        for _ in 0..count {
            let z: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            for i in 0..n {
                let v: f64 = (0..=i).map(|j| l[i][j] * z[j]).sum();
                x.push((mu[k][i] + v) as f32);
            }
            y.push(k);
        }
    }
    (x, y)
}

#[test]
fn one_dimension_equal_priors_splits_at_the_midpoint() {
    // Class 0 around −1, class 1 around 3, same spread: the boundary is at 1.
    let x: Vec<f32> = vec![-2.0, -1.0, 0.0, 2.0, 3.0, 4.0];
    let y = vec![0, 0, 0, 1, 1, 1];
    let g = gda::fit(&x, &y, 2).unwrap();
    assert_eq!(g.means, vec![-1.0, 3.0]);
    assert_eq!(g.predict(&[0.9, 1.1, -5.0, 10.0]), vec![0, 1, 0, 1]);
}

#[test]
fn matches_the_bayes_classifier_on_correlated_gaussians() {
    let mut rng = Rng::new(7);
    let mu = vec![
        vec![0.0, 0.0, 0.0, 0.0],
        vec![2.0, 1.0, 0.0, -1.0],
        vec![0.0, 2.5, 1.0, 1.0],
    ];
    // A strongly correlated covariance: a nearest-mean rule does worse than GDA here.
    let l = vec![
        vec![1.0, 0.0, 0.0, 0.0],
        vec![0.9, 0.5, 0.0, 0.0],
        vec![-0.5, 0.3, 0.6, 0.0],
        vec![0.2, -0.4, 0.1, 0.7],
    ];
    let (xt, yt) = sample(&mu, &l, &[400, 200, 300], &mut rng);
    let (xe, ye) = sample(&mu, &l, &[1000, 500, 750], &mut rng);
    let g = gda::fit(&xt, &yt, 3).unwrap();
    for (k, m) in mu.iter().enumerate() {
        for (i, &v) in m.iter().enumerate() {
            assert!(
                (g.means[k * 4 + i] - v).abs() < 0.2,
                "mean {k}[{i}] = {}",
                g.means[k * 4 + i]
            );
        }
    }
    assert!((g.priors[1] - 200.0 / 900.0).abs() < 1e-12);
    let acc = g.accuracy(&xe, &ye);

    // The Bayes rule with the true parameters, and the nearest-mean rule, on the same test set.
    let truth = gda::fit(&xe, &ye, 3).unwrap(); // fitted on 2250 samples: close to the true model
    let bayes = truth.accuracy(&xe, &ye);
    let nearest = xe
        .chunks(4)
        .zip(&ye)
        .filter(|(x, &y)| {
            let d = |k: usize| {
                (0..4)
                    .map(|i| (x[i] as f64 - mu[k][i]).powi(2))
                    .sum::<f64>()
            };
            (0..3).min_by(|&a, &b| d(a).total_cmp(&d(b))).unwrap() == y
        })
        .count() as f64
        / ye.len() as f64;
    assert!(acc > bayes - 0.02, "GDA {acc} vs Bayes {bayes}");
    assert!(
        acc > nearest + 0.02,
        "GDA {acc} should beat nearest mean {nearest} on correlated data"
    );
}

#[test]
fn a_class_without_training_samples_is_never_predicted() {
    let mut rng = Rng::new(8);
    let mu = vec![vec![0.0, 0.0], vec![3.0, 0.0], vec![0.0, 3.0]];
    let l = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let (x, y) = sample(&mu, &l, &[50, 0, 50], &mut rng);
    let g = gda::fit(&x, &y, 3).unwrap();
    let (xe, _) = sample(&mu, &l, &[20, 20, 20], &mut rng);
    assert!(g.predict(&xe).iter().all(|&p| p != 1));
}

#[test]
fn bad_input_is_an_error() {
    assert!(gda::fit(&[], &[], 2).is_err());
    let e = gda::fit(&[1.0, 2.0, 3.0], &[0, 1], 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not split"), "{e}");
    let e = gda::fit(&[1.0, 2.0], &[0, 5], 2).unwrap_err().to_string();
    assert!(e.contains("label 5"), "{e}");
    let e = gda::fit(&[1.0, 2.0], &[0, 1], 2).unwrap_err().to_string();
    assert!(e.contains("more training samples"), "{e}");
}
