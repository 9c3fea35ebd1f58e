//! `podgpu fidelity FIXTURE...`: runs the computation a reference fixture describes (DESIGN.md §2,
//! fidelity way (b)) and compares every expected tensor with podgpu's result, ‖a − b‖/‖b‖ per tensor.
//!
//! The fixture schema is in docs/FIXTURES.md. Each `kind` has one runner that turns the fixture into
//! named outputs (`loss`, `grad.<name>`, extras); the comparison is the same for all kinds.

use crate::autograd::{ParamStore, Tape};
use crate::fixture::{Fixture, FixtureTensor};
use crate::loss::{self, PodConfig, ScForm, Variant};
use crate::tensor::{rel_error, DType, Device, Tensor};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fixture files (safetensors; see docs/FIXTURES.md), or folders: every `*.safetensors` in one.
    #[arg(required = true)]
    pub fixtures: Vec<PathBuf>,
    /// Where to run: cpu, cuda (or cuda:N), or auto (cuda when usable, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How matrix products and convolutions run on a GPU: fp32 (the reference accuracy the default
    /// tolerance is meant for) or tf32 (tensor cores; use a tolerance around 1e-2).
    #[arg(long, default_value = "fp32")]
    pub math: crate::cuda::MathMode,
    /// Largest relative error ‖a − b‖/‖b‖ that passes, per tensor. Default: 1e-4; for an f32 run of
    /// a fixture that records PyTorch's own float32 error (`torch_f32_rel_error`), 10× that figure
    /// when it is larger.
    #[arg(long, allow_negative_numbers = true)]
    pub tolerance: Option<f64>,
    /// Precision podgpu computes in: f32 (training precision) or f64 (CPU only; a check of the math).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Training precision to check: fp32 or tf32 (as --math), or bf16 (mixed precision: bf16
    /// storage on a GPU for ResNet fixtures, the CPU's emulation of it on the CPU; judged at the fixture's bf16 tolerance: 2¹⁶× its recorded
    /// float32 error, at least 0.16; see `bf16_tolerance`).
    #[arg(long, value_enum)]
    pub precision: Option<crate::train::Precision>,
}

/// The default tolerance of a bf16 run (`--precision bf16`): to first order a relative error is
/// linear in the unit roundoff, so a fixture whose float32 error is e₃₂ (2⁻²⁴ rounding) has a bf16
/// error of about e₃₂·2¹⁶ (2⁻⁸ rounding); ×4 for the spread between rounding patterns, and at least
/// 4·2⁻⁸·√100 = 0.16 (about 100 stored tensors rounded independently). Above 1 the figure says the
/// fixture is too ill-conditioned for bf16 to mean anything, and the run is refused.
pub fn bf16_tolerance(fx: &Fixture) -> Result<f64> {
    let e32: f64 = if fx.meta.contains_key("torch_f32_rel_error") {
        fx.meta_parse("torch_f32_rel_error")?
    } else {
        0.0
    };
    let t = (4.0 * e32 * 65536.0).max(0.16);
    if t >= 1.0 {
        bail!(
            "{}: its float32 error {e32:.1e} scaled to bf16 is {t:.1}: the fixture is too \
             ill-conditioned for a bf16 check (give --tolerance to run it anyway)",
            fx.path.display()
        );
    }
    Ok(t)
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        _ => Err(format!("unknown dtype `{s}`; use f32 or f64")),
    }
}

/// Where and in which precision a fixture runs.
#[derive(Clone, Copy, Debug)]
pub struct Place {
    pub device: Device,
    pub dtype: DType,
}

impl Place {
    fn put(&self, t: &FixtureTensor) -> Tensor {
        t.to_tensor(self.dtype, self.device)
    }
}

/// Named results of a computation (`loss`, `grad.x`, ...), matched against `expected.<name>`.
pub type Outputs = BTreeMap<String, Tensor>;

/// Runs the computation of any fixture kind.
pub fn run_fixture(fx: &Fixture, place: Place) -> Result<Outputs> {
    match fx.kind()? {
        "pod_loss" => run_pod_loss(fx, place),
        "softmax_ce" => run_softmax_ce(fx, place),
        "model" => run_model(fx, place),
        other => bail!(
            "{}: unknown fixture kind `{other}`; podgpu knows pod_loss, softmax_ce and model \
             (see docs/FIXTURES.md)",
            fx.path.display()
        ),
    }
}

/// kind = pod_loss: POD = NaC + λ·SC of `input.x` [B, n] against `input.pedcc` [K, n].
/// Outputs: loss, nac, sc, grad.x.
fn run_pod_loss(fx: &Fixture, place: Place) -> Result<Outputs> {
    let path = fx.path.display();
    let variant: Variant = fx.meta("variant")?.parse()?;
    let lambda: f64 = fx.meta_parse("lambda")?;
    let delta: f64 = fx.meta_parse("delta")?;
    if !lambda.is_finite() || !delta.is_finite() || delta < 0.0 {
        bail!("{path}: λ = {lambda} and δ = {delta} must be finite, δ ≥ 0");
    }
    let x = fx.tensor("input.x")?;
    x.expect_shape(&[None, None])?;
    let (b, n) = (x.shape[0], x.shape[1]);
    let p = fx.tensor("input.pedcc")?;
    p.expect_shape(&[None, Some(n)])?;
    let k = p.shape[0];
    fx.check_meta_usize("batch", b)?;
    fx.check_meta_usize("feature_dim", n)?;
    fx.check_meta_usize("classes", k)?;
    if b < 2 {
        bail!("{path}: the SC loss needs a batch of at least 2 samples; input.x has {b}");
    }
    if variant == Variant::Reference && n < 2 {
        bail!("{path}: the reference SC divides by n−1 and needs a feature dim ≥ 2");
    }
    let labels = fx.labels("input.labels", b, k)?;

    let xs = place.put(x);
    let pt = place.put(p);
    let lt = loss::labels_tensor(&labels, &xs);
    let cfg = PodConfig {
        variant,
        lambda,
        sc_form: ScForm::Auto,
    };
    let mut tape = Tape::train();
    let xv = tape.leaf(xs);
    let out = loss::pod(&mut tape, &xv, &pt, &lt, delta, &cfg);
    tape.backward(&out.loss, &mut ParamStore::new());
    let gx = tape
        .grad_of(&xv)
        .cloned()
        .ok_or_else(|| anyhow!("no gradient reached x"))?;
    Ok(BTreeMap::from([
        ("loss".to_string(), out.loss.value().clone()),
        ("nac".to_string(), out.nac.value().clone()),
        ("sc".to_string(), out.sc.value().clone()),
        ("grad.x".to_string(), gx),
    ]))
}

/// kind = softmax_ce: mean cross-entropy of `input.logits` [B, K]. Outputs: loss, grad.logits.
fn run_softmax_ce(fx: &Fixture, place: Place) -> Result<Outputs> {
    let z = fx.tensor("input.logits")?;
    z.expect_shape(&[None, None])?;
    let (b, k) = (z.shape[0], z.shape[1]);
    if b == 0 || k == 0 {
        bail!("{}: input.logits is empty", fx.path.display());
    }
    fx.check_meta_usize("batch", b)?;
    fx.check_meta_usize("classes", k)?;
    let labels = fx.labels("input.labels", b, k)?;
    let zs = place.put(z);
    let lt = loss::labels_tensor(&labels, &zs);
    let mut tape = Tape::train();
    let zv = tape.leaf(zs);
    let l = loss::softmax_cross_entropy(&mut tape, &zv, &lt);
    tape.backward(&l, &mut ParamStore::new());
    let gz = tape
        .grad_of(&zv)
        .cloned()
        .ok_or_else(|| anyhow!("no gradient reached the logits"))?;
    Ok(BTreeMap::from([
        ("loss".to_string(), l.value().clone()),
        ("grad.logits".to_string(), gz),
    ]))
}

/// kind = model: a whole network's training step (schema in docs/FIXTURES.md): the network named by
/// `model` (`base_width`, `stem`, `classes`, `feature_dim`), every `param.<state_dict key>` loaded by
/// name, forward in training mode, the loss named by `loss`, backward. Outputs: loss, grad.image,
/// grad.<key> of every trainable parameter, buffer.<key> (BN statistics after the forward pass).
pub fn run_model(fx: &Fixture, place: Place) -> Result<Outputs> {
    use crate::nn::{HeadSpec, ModelSpec, Network, Stem};
    let path = fx.path.display();
    let arch = fx.meta("model")?.to_string();
    // The transformers (`vit(...)`, `swin(...)`, timm's names) have no width or stem; their
    // PEDCC is timm's classifier weight [K, n] (`head.weight`, Swin `head.fc.weight`).
    let transformer = crate::nn::TransformerConfig::parse(&arch)
        .transpose()
        .map_err(|e| anyhow!("{path}: {e}"))?;
    let width: usize = match &transformer {
        Some(_) => fx.meta_parse("base_width").unwrap_or(64),
        None => fx.meta_parse("base_width")?,
    };
    let classes: usize = fx.meta_parse("classes")?;
    let feature_dim: usize = fx.meta_parse("feature_dim")?;
    let stem = match fx.meta("stem").unwrap_or("cifar") {
        "cifar" => Stem::Cifar,
        "tinyimagenet" => Stem::TinyImageNet,
        "imagenet" => Stem::ImageNet,
        other => bail!("{path}: unknown stem `{other}`; expected cifar, tinyimagenet or imagenet"),
    };
    let loss_kind = fx.meta("loss")?.to_string();
    let image = fx.tensor("input.image")?;
    image.expect_shape(&[None, None, None, None])?;
    let (b, c) = (image.shape[0], image.shape[1]);
    fx.check_meta_usize("batch", b)?;
    let labels = fx.labels("input.labels", b, classes)?;

    let head = match loss_kind.as_str() {
        // The PEDCC is stored transposed, [n, K], as the reference code keeps it.
        "pod" if transformer.is_some() => {
            let key = match transformer {
                Some(crate::nn::TransformerConfig::Swin(_)) => "param.head.fc.weight",
                _ => "param.head.weight",
            };
            let w = fx.tensor(key)?;
            w.expect_shape(&[Some(classes), Some(feature_dim)])?;
            HeadSpec::Pedcc(Tensor::from_f64_as(&w.shape, &w.values, DType::F64))
        }
        "pod" => {
            let w = fx.tensor("param.out.weight")?;
            w.expect_shape(&[Some(feature_dim), Some(classes)])?;
            let t = Tensor::from_f64_as(&w.shape, &w.values, DType::F64);
            HeadSpec::Pedcc(crate::nn::layers::transpose2d(&t))
        }
        "softmax" => HeadSpec::Linear,
        other => {
            bail!("{path}: unknown loss `{other}` for a model fixture; expected pod or softmax")
        }
    };
    let spec = ModelSpec {
        arch,
        width,
        stem,
        in_channels: c,
        classes,
        feature_dim,
        head,
        image_size: image.shape[2],
        drop_path: Some(0.0),
    };
    let mut ps = ParamStore::new();
    crate::budget::check_network(
        &spec,
        [c, image.shape[2], image.shape[3]],
        b,
        true,
        crate::budget::NetworkFlags {
            size: "the fixture's base_width, feature_dim or classes are larger than this machine \
                   can build; check its metadata",
            inputs: "the fixture's batch of images is larger than this machine can train on",
        },
    )
    .map_err(|e| anyhow!("{path}: {e}"))?;
    let net = Network::new(spec, &mut ps, place.dtype, &mut crate::rng::Rng::new(0))
        .map_err(|e| anyhow!("{path}: {e}"))?;
    // Every parameter and buffer comes from the fixture, by its state_dict key; nothing may be left
    // over on either side (a renamed layer must not pass silently).
    let given: BTreeMap<&str, &FixtureTensor> = fx.params().into_iter().collect();
    let mut missing = Vec::new();
    for id in ps.ids().collect::<Vec<_>>() {
        let name = ps.get(id).name.clone();
        match given.get(name.as_str()) {
            Some(t) if t.numel() == ps.get(id).value.numel() => {
                let shape = ps.get(id).value.shape().to_vec();
                ps.get_mut(id).value = Tensor::from_f64_as(&shape, &t.values, place.dtype);
            }
            Some(t) => bail!(
                "{path}: param.{name} has shape {:?} but the network's {name} is {:?}",
                t.shape,
                ps.get(id).value.shape()
            ),
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{path}: the fixture lacks parameters the network has: {}",
            missing.join(", ")
        );
    }
    let unknown: Vec<&str> = given
        .keys()
        .copied()
        .filter(|k| ps.find(k).is_none())
        .collect();
    if !unknown.is_empty() {
        bail!(
            "{path}: the fixture has parameters the network does not: {}",
            unknown.join(", ")
        );
    }
    ps.to_device(place.device);

    let mut tape = Tape::train();
    let x = tape.leaf(place.put(image));
    let out = net.forward(&mut tape, &mut ps, &x);
    let lt = loss::labels_tensor(&labels, out.features.value());
    let l = if loss_kind == "pod" {
        let cfg = PodConfig {
            variant: fx.meta("variant")?.parse()?,
            lambda: fx.meta_parse("lambda")?,
            sc_form: ScForm::Auto,
        };
        let delta: f64 = fx.meta_parse("delta")?;
        let p = net.centroids(&ps).expect("a PEDCC head");
        loss::pod(&mut tape, &out.features, &p, &lt, delta, &cfg).loss
    } else {
        loss::softmax_cross_entropy(&mut tape, &out.logits, &lt)
    };
    tape.backward(&l, &mut ps);
    let mut outputs = BTreeMap::from([("loss".to_string(), l.value().clone())]);
    if let Some(g) = tape.grad_of(&x) {
        outputs.insert("grad.image".to_string(), g.clone());
    }
    for p in ps.iter() {
        match (&p.grad, p.kind) {
            (Some(g), _) => {
                outputs.insert(format!("grad.{}", p.name), g.clone());
            }
            (None, crate::autograd::ParamKind::Buffer) => {
                outputs.insert(format!("buffer.{}", p.name), p.value.clone());
            }
            _ => {}
        }
    }
    Ok(outputs)
}

const DEFAULT_TOLERANCE: f64 = 1e-4;

/// The tolerance for one fixture: the user's, else 1e-4 — raised for f32 runs to 10× the float32
/// error PyTorch itself makes on the fixture (metadata `torch_f32_rel_error`), since a small, narrow
/// network with batch norm over few values amplifies float32 rounding in any implementation.
pub fn fixture_tolerance(fx: &Fixture, given: Option<f64>, dtype: DType) -> Result<f64> {
    if let Some(t) = given {
        return Ok(t);
    }
    if dtype == DType::F32 && fx.meta.contains_key("torch_f32_rel_error") {
        let torch: f64 = fx.meta_parse("torch_f32_rel_error")?;
        if !(torch.is_finite() && torch >= 0.0) {
            bail!(
                "{}: torch_f32_rel_error must be a number ≥ 0",
                fx.path.display()
            );
        }
        return Ok(DEFAULT_TOLERANCE.max(10.0 * torch));
    }
    Ok(DEFAULT_TOLERANCE)
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub rel_error: f64,
    pub max_abs_error: f64,
    pub passed: bool,
}

/// Compares every `expected.*` tensor with the output of the same name.
pub fn compare(fx: &Fixture, outputs: &Outputs, tolerance: f64) -> Result<Vec<Comparison>> {
    let mut expected = fx.expected();
    // The loss first, then the other outputs, then the gradients.
    expected.sort_by_key(|(n, _)| (*n != "loss", n.starts_with("grad."), n.to_string()));
    if !expected.iter().any(|(n, _)| *n == "loss") {
        bail!(
            "{}: no `expected.loss` tensor; a fixture must give at least the loss",
            fx.path.display()
        );
    }
    let mut rows = Vec::new();
    for (name, want) in expected {
        let got = outputs.get(name).ok_or_else(|| {
            anyhow!(
                "{}: `expected.{name}` is not an output of a {} computation (outputs: {})",
                fx.path.display(),
                fx.kind().unwrap_or("?"),
                outputs.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        // A scalar loss may be stored as [] (PyTorch) or [1]; everything else must match exactly.
        let same_shape =
            got.shape() == want.shape.as_slice() || (got.numel() == 1 && want.numel() == 1);
        if !same_shape {
            bail!(
                "{}: `expected.{name}` has shape {:?} but podgpu's {name} is {:?}",
                fx.path.display(),
                want.shape,
                got.shape()
            );
        }
        let a = got.to_vec_f64();
        let rel = rel_error(&a, &want.values);
        let max_abs =
            a.iter()
                .zip(&want.values)
                .map(|(x, y)| (x - y).abs())
                .fold(
                    0.0,
                    |m: f64, d| if d.is_nan() { f64::NAN } else { m.max(d) },
                );
        rows.push(Comparison {
            name: name.to_string(),
            rel_error: rel,
            max_abs_error: max_abs,
            // NaN never passes (DESIGN.md §2): `<` is false for NaN.
            passed: rel < tolerance,
        });
    }
    Ok(rows)
}

fn describe(fx: &Fixture) -> String {
    let keys = [
        "variant",
        "model",
        "base_width",
        "batch",
        "feature_dim",
        "classes",
        "lambda",
        "delta",
    ];
    let parts: Vec<String> = keys
        .iter()
        .filter_map(|k| fx.meta.get(*k).map(|v| format!("{k}={v}")))
        .collect();
    format!("{} {}", fx.kind().unwrap_or("?"), parts.join(" "))
}

pub fn run(args: Args) -> Result<()> {
    let (device, note) = crate::device::select(&args.device)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    if device != Device::Cpu && args.dtype == DType::F64 {
        bail!("--dtype f64 runs on the CPU only; use --device cpu or --dtype f32");
    }
    if let Some(t) = args.tolerance {
        if t.is_nan() || t <= 0.0 {
            bail!("--tolerance must be a positive number, got {t}");
        }
    }
    let bf16 = args.precision == Some(crate::train::Precision::Bf16);
    if bf16 && args.dtype != DType::F32 {
        bail!("--precision bf16 computes in f32 with bf16 storage; drop --dtype f64");
    }
    crate::cuda::set_math_mode(match args.precision {
        Some(crate::train::Precision::Tf32) => crate::cuda::MathMode::Tf32,
        Some(crate::train::Precision::Fp32) => crate::cuda::MathMode::Fp32,
        _ => args.math,
    });
    let precision = args.precision.unwrap_or(crate::train::Precision::Fp32);
    crate::train::trainer::set_precision(precision);
    let place = Place {
        device,
        dtype: args.dtype,
    };
    let dt = if bf16 { "bf16" } else { args.dtype.name() };
    let fixtures = expand_folders(&args.fixtures)?;
    let mut failures: Vec<String> = Vec::new();
    for path in &fixtures {
        println!("{}", path.display());
        let mut tolerance = args.tolerance.unwrap_or(DEFAULT_TOLERANCE);
        let result = Fixture::read(path).and_then(|fx| {
            tolerance = match (args.tolerance, bf16) {
                (None, true) => bf16_tolerance(&fx)?,
                _ => fixture_tolerance(&fx, args.tolerance, args.dtype)?,
            };
            let math = match (device, args.math) {
                (Device::Cpu, _) => String::new(),
                (_, m) => format!(
                    " ({})",
                    if m == crate::cuda::MathMode::Fp32 {
                        "fp32"
                    } else {
                        "tf32"
                    }
                ),
            };
            println!(
                "  [{}]  on {device} {dt}{math}, tolerance {tolerance:.1e}",
                describe(&fx)
            );
            if let Ok(arch) = fx.meta("model") {
                crate::train::trainer::check_gpu_bf16(precision, device, arch)?;
            }
            let outputs = run_fixture(&fx, place)?;
            compare(&fx, &outputs, tolerance)
        });
        match result {
            Ok(rows) => {
                println!(
                    "  {:<28} {:>12} {:>12}  result",
                    "tensor", "rel error", "max |Δ|"
                );
                for r in &rows {
                    println!(
                        "  {:<28} {:>12.3e} {:>12.3e}  {}",
                        r.name,
                        r.rel_error,
                        r.max_abs_error,
                        if r.passed { "ok" } else { "FAIL" }
                    );
                    if !r.passed {
                        failures.push(format!(
                            "{}: {} (tolerance {tolerance:.1e})",
                            path.display(),
                            r.name
                        ));
                    }
                }
            }
            Err(e) => {
                println!("  error: {e:#}");
                failures.push(format!("{}: {e:#}", path.display()));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} check(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    println!("all {} fixture(s) within tolerance", fixtures.len());
    Ok(())
}

/// Replaces each folder among `paths` by the `*.safetensors` files in it (sorted); files stay.
fn expand_folders(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let entries = std::fs::read_dir(p)
            .map_err(|e| anyhow!("cannot list the fixture folder {}: {e}", p.display()))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if found.is_empty() {
            bail!(
                "the fixture folder {} holds no *.safetensors files",
                p.display()
            );
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}
