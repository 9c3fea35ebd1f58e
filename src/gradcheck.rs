//! Central finite differences in f64 against the tape's analytic gradients.
//!
//! A check takes a function from (tape, parameters, input vars) to an output var. When the output is
//! not a scalar, the check reduces it to `L = Σ out ∘ R` with a fixed random `R`, so every element of
//! the output's gradient is exercised. Analytic gradients come from one backward pass; numeric ones
//! from `(L(θ+ε) − L(θ−ε)) / 2ε` per element (a seeded random subset for large tensors). The report
//! gives ‖analytic − numeric‖ / ‖numeric‖ per tensor (DESIGN.md §2).

use crate::autograd::{ParamKind, ParamStore, Tape, Var};
use crate::rng::Rng;
use crate::tensor::{rel_error, DType, Tensor};

#[derive(Clone, Debug)]
pub struct GradCheckOptions {
    pub eps: f64,
    /// At most this many elements of each tensor are perturbed (chosen at random).
    pub max_elems: usize,
    pub seed: u64,
}

impl Default for GradCheckOptions {
    fn default() -> Self {
        GradCheckOptions {
            eps: 1e-6,
            max_elems: 64,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GradReport {
    pub name: String,
    pub rel_error: f64,
    pub max_abs_error: f64,
    pub checked: usize,
    /// Largest |numeric gradient| among checked elements: a check of an all-zero gradient proves little.
    pub max_abs_grad: f64,
}

impl std::fmt::Display for GradReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<40} rel {:.2e}  max|Δ| {:.2e}  max|g| {:.2e}  ({} elems)",
            self.name, self.rel_error, self.max_abs_error, self.max_abs_grad, self.checked
        )
    }
}

/// Gaussian random f64 tensor (never all-zero inputs, DESIGN.md §2).
pub fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = crate::tensor::numel(shape);
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal()).collect::<Vec<f64>>())
}

/// Σ out ∘ r as a scalar var (f64, host), differentiable in `out`.
fn project(t: &mut Tape, out: &Var, r: &Tensor) -> Var {
    let v: f64 = out
        .value()
        .host::<f64>()
        .iter()
        .zip(r.host::<f64>())
        .map(|(a, b)| a * b)
        .sum();
    let r = r.clone();
    let shape = out.shape().to_vec();
    t.op(Tensor::from_vec(&[1], vec![v]), &[out], move || {
        Box::new(move |g, _| {
            let gv = g.host::<f64>()[0];
            let d: Vec<f64> = r.host::<f64>().iter().map(|x| x * gv).collect();
            vec![Some(Tensor::from_vec(&shape, d))]
        })
    })
}

/// Checks the gradients of `f` with respect to every input and every trainable parameter.
/// `inputs` and the store must hold f64 host tensors.
pub fn check<F>(
    inputs: &[(&str, Tensor)],
    store: &mut ParamStore,
    f: F,
    opts: &GradCheckOptions,
) -> Vec<GradReport>
where
    F: Fn(&mut Tape, &mut ParamStore, &[Var]) -> Var,
{
    for (name, x) in inputs {
        assert_eq!(x.dtype(), DType::F64, "gradcheck input {name} must be f64");
    }
    let mut rng = Rng::new(opts.seed ^ 0x5EED);
    let probe = {
        let mut t = Tape::inference().with_training(true);
        let vars: Vec<Var> = inputs.iter().map(|(_, x)| t.constant(x.clone())).collect();
        f(&mut t, store, &vars)
    };
    let r = if probe.value().numel() == 1 {
        Tensor::from_vec(probe.shape(), vec![1.0f64])
    } else {
        randn(probe.shape(), &mut rng)
    };

    // Analytic gradients from one backward pass.
    store.zero_grad();
    let mut tape = Tape::train();
    let vars: Vec<Var> = inputs.iter().map(|(_, x)| tape.leaf(x.clone())).collect();
    let out = f(&mut tape, store, &vars);
    let loss = project(&mut tape, &out, &r);
    tape.backward(&loss, store);

    // The loss at perturbed values (no recording, training-mode batch norm).
    let eval = |store: &mut ParamStore, xs: &[Tensor]| -> f64 {
        let mut t = Tape::inference().with_training(true);
        let vars: Vec<Var> = xs.iter().map(|x| t.constant(x.clone())).collect();
        let out = f(&mut t, store, &vars);
        out.value()
            .host::<f64>()
            .iter()
            .zip(r.host::<f64>())
            .map(|(a, b)| a * b)
            .sum()
    };

    let mut reports = Vec::new();
    let mut xs: Vec<Tensor> = inputs.iter().map(|(_, x)| x.clone()).collect();
    for (i, (name, _)) in inputs.iter().enumerate() {
        let analytic = tape
            .grad_of(&vars[i])
            .map(|g| g.to_vec_f64())
            .unwrap_or_else(|| vec![0.0; xs[i].numel()]);
        let idx = pick(xs[i].numel(), opts.max_elems, &mut rng);
        let mut num = Vec::with_capacity(idx.len());
        for &j in &idx {
            let orig = xs[i].host::<f64>()[j];
            xs[i].host_mut::<f64>()[j] = orig + opts.eps;
            let lp = eval(store, &xs);
            xs[i].host_mut::<f64>()[j] = orig - opts.eps;
            let lm = eval(store, &xs);
            xs[i].host_mut::<f64>()[j] = orig;
            num.push((lp - lm) / (2.0 * opts.eps));
        }
        reports.push(report(format!("input {name}"), &idx, &analytic, &num));
    }

    let ids: Vec<_> = store
        .ids()
        .filter(|&id| store.get(id).kind == ParamKind::Trainable)
        .collect();
    for id in ids {
        let name = store.get(id).name.clone();
        let analytic = store
            .get(id)
            .grad
            .as_ref()
            .map(|g| g.to_vec_f64())
            .unwrap_or_else(|| vec![0.0; store.get(id).value.numel()]);
        let idx = pick(store.get(id).value.numel(), opts.max_elems, &mut rng);
        let mut num = Vec::with_capacity(idx.len());
        for &j in &idx {
            let orig = store.get(id).value.host::<f64>()[j];
            store.get_mut(id).value.host_mut::<f64>()[j] = orig + opts.eps;
            let lp = eval(store, &xs);
            store.get_mut(id).value.host_mut::<f64>()[j] = orig - opts.eps;
            let lm = eval(store, &xs);
            store.get_mut(id).value.host_mut::<f64>()[j] = orig;
            num.push((lp - lm) / (2.0 * opts.eps));
        }
        reports.push(report(format!("param {name}"), &idx, &analytic, &num));
    }
    reports
}

fn pick(n: usize, max: usize, rng: &mut Rng) -> Vec<usize> {
    if n <= max {
        (0..n).collect()
    } else {
        let mut p = rng.permutation(n);
        p.truncate(max);
        p
    }
}

fn report(name: String, idx: &[usize], analytic: &[f64], numeric: &[f64]) -> GradReport {
    let a: Vec<f64> = idx.iter().map(|&j| analytic[j]).collect();
    let max_abs_error = a
        .iter()
        .zip(numeric)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    GradReport {
        name,
        rel_error: rel_error(&a, numeric),
        max_abs_error,
        checked: idx.len(),
        max_abs_grad: numeric.iter().fold(0.0, |m, v| m.max(v.abs())),
    }
}

/// Panics with the whole report unless every tensor's relative error is below `tol` and finite, and
/// every checked gradient is non-trivial.
pub fn assert_close(reports: &[GradReport], tol: f64) {
    let table: String = reports.iter().map(|r| format!("  {r}\n")).collect();
    for r in reports {
        assert!(
            r.rel_error.is_finite() && r.rel_error < tol,
            "gradient check failed for {} (tolerance {tol:.0e}):\n{table}",
            r.name
        );
        assert!(
            r.max_abs_grad > 1e-10,
            "gradient of {} is zero everywhere checked: the check proves nothing\n{table}",
            r.name
        );
    }
}
