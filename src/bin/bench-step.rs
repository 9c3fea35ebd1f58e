//! Whole training steps: forward, POD loss, backward and SGD (what `podgpu train` does per batch),
//! for ResNet18/ResNet50 on CIFAR-sized images, or the transformers (`--models vit_b16,swin_b
//! --image 224 --batch 64` on a GPU; forward FLOPs checked against the published figures), per
//! precision: images/s, ms/step, achieved TFLOP/s and peak memory, as a table and one JSON line.
//!
//! Before timing, one step of the same network (same weights, same images) is compared with the CPU
//! reference in f64: the loss and every parameter gradient.
//!
//! ```text
//! cargo run --release --bin bench-step -- --models resnet50 --batch 128            # GPU
//! cargo run --release --bin bench-step -- --device cpu --threads 2 --models resnet18 --width 16 --batch 32
//! cargo run --release --bin bench-step -- --models vit_b16,swin_b --image 224 --batch 64 --check-batch 2
//! cargo run --release --bin bench-step -- --device cpu --threads 2 --models vit_tiny_patch16_224 --image 64 --batch 16
//! ```
//!
//! Defaults: batch 128 and width 64 on a GPU; batch 32 and width 16 on the CPU (a ResNet50 step at
//! batch 128 takes about a minute on two cores).
//!
//! Synthetic data (normal pixels, labels cycling through the classes): the data loader is measured
//! by `bench-data`. Each step uploads its batch and labels to the device like the trainer does.

use anyhow::{bail, Result};
use clap::Parser;
use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::bench::{self, check_outputs, memory, table, CheckResult, Clock, StepFlops, Table};
use podgpu::cuda::{self, MathMode};
use podgpu::loss::{self, PodConfig};
use podgpu::nn::{HeadSpec, ModelSpec, Network, Stem};
use podgpu::optim::Sgd;
use podgpu::pedcc::{self, Method};
use podgpu::rng::Rng;
use podgpu::tensor::{rel_error, DType, Device, Tensor};
use podgpu::train::ledger::StepLedger;
use podgpu::train::tally::EpochTally;

#[derive(Parser)]
#[command(about = "Time whole training steps (forward, POD loss, backward, SGD)")]
struct Args {
    /// Models to time
    #[arg(long, value_delimiter = ',', default_value = "resnet18,resnet50")]
    models: Vec<String>,
    /// Batch (default: 128 on a GPU, 32 on the CPU)
    #[arg(long = "batch")]
    batch_arg: Option<usize>,
    /// Base channel width, 64 in the real network (default: 64 on a GPU, 16 on the CPU)
    #[arg(long = "width")]
    width_arg: Option<usize>,
    /// The batch and width used (resolved from the flags and the device).
    #[arg(skip)]
    batch: usize,
    #[arg(skip)]
    width: usize,
    /// Image height and width (32: CIFAR)
    #[arg(long, default_value_t = 32)]
    image: usize,
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Latent dimension n (default: the paper's for the class count)
    #[arg(long)]
    feature_dim: Option<usize>,
    /// Timed steps per configuration (the warm-up is --warmup)
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Precisions: fp32, tf32 (GPU only) and bf16 (mixed precision: bf16 storage on a GPU, for the
    /// ResNets; on the CPU the emulation of those numerics)
    #[arg(long, value_delimiter = ',', default_value = "fp32,tf32")]
    precision: Vec<String>,
    /// Batch of the f64 CPU reference check (0: no check)
    #[arg(long, default_value_t = 8)]
    check_batch: usize,
    /// Also time steps with what `podgpu train` adds to each step on the device: the numerics guard
    /// over every gradient and the loss, and the epoch sums (loss, accuracy, δ norms); nothing is
    /// read back
    #[arg(long)]
    with_metrics: bool,
    /// GPU: also time each precision with the step captured once as a CUDA graph and replayed
    /// (static input buffers; the row's check compares its final loss with the eager row's)
    #[arg(long)]
    cuda_graph: bool,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    common: bench::CommonArgs,
}

/// The δ of the first epoch of the paper's schedule (α·M₀).
const DELTA: f64 = loss::ALPHA * loss::INITIAL_MEAN_NORM;

struct Setup {
    net: Network,
    ps: ParamStore,
    pedcc: Tensor,
}

/// n: --feature-dim, else a transformer's own width (no FC1), else the paper's for the class count.
fn feature_dim(args: &Args, arch: &str) -> usize {
    args.feature_dim
        .or_else(|| podgpu::nn::native_feature_dim(arch))
        .unwrap_or_else(|| pedcc::recommended_dim(args.classes))
}

fn build(args: &Args, arch: &str, dtype: DType, device: Device) -> Result<Setup> {
    let dim = feature_dim(args, arch);
    let method = if args.classes <= dim + 1 {
        Method::Simplex
    } else {
        Method::Repulsion
    };
    let p = pedcc::generate(args.classes, dim, args.seed, method)?;
    let p = match dtype {
        DType::F64 => p.to_tensor_f64(),
        _ => p.to_tensor(),
    };
    let spec = ModelSpec {
        arch: arch.to_string(),
        width: args.width,
        stem: Stem::Cifar,
        in_channels: 3,
        classes: args.classes,
        feature_dim: dim,
        head: HeadSpec::Pedcc(p.clone()),
        image_size: args.image,
        drop_path: None,
    };
    let mut ps = ParamStore::new();
    // Built in f32 and converted, so that the f64 reference starts from the same weights.
    let net = Network::new(spec, &mut ps, DType::F32, &mut Rng::new(args.seed))
        .map_err(anyhow::Error::msg)?;
    if dtype == DType::F64 {
        ps.to_dtype(DType::F64);
    }
    ps.to_device(device);
    Ok(Setup {
        net,
        ps,
        pedcc: p.to_device(device),
    })
}

fn batch_data(args: &Args, batch: usize, dtype: DType) -> (Tensor, Vec<usize>) {
    let mut rng = Rng::new(args.seed ^ 0x5EED);
    let shape = [batch, 3, args.image, args.image];
    let v: Vec<f64> = (0..podgpu::tensor::numel(&shape))
        .map(|_| rng.normal())
        .collect();
    let labels = (0..batch).map(|i| i % args.classes).collect();
    (Tensor::from_f64_as(&shape, &v, dtype), labels)
}

/// Forward, POD loss and backward; returns the loss (gradients stay in the store). With a ledger,
/// also what the trainer does on the device every step (nothing is read back): the numerics guard
/// over every gradient and the loss, and the step's loss, correct count and δ norms added to the
/// epoch sums (`train::ledger`).
fn forward_backward(
    s: &mut Setup,
    images: &Tensor,
    labels: &[usize],
    device: Device,
    ledger: Option<(&mut StepLedger, u64)>,
) -> Tensor {
    let x = images.to_device(device);
    let y = loss::labels_tensor(labels, &x);
    forward_backward_on(s, &x, &y, labels, ledger)
}

/// `forward_backward` on images and labels already on the device (a captured step's static
/// input buffers).
fn forward_backward_on(
    s: &mut Setup,
    images: &Tensor,
    y: &Tensor,
    labels: &[usize],
    ledger: Option<(&mut StepLedger, u64)>,
) -> Tensor {
    let mut tape = Tape::train();
    let x = tape.constant(images.clone());
    let out = s.net.forward(&mut tape, &mut s.ps, &x);
    let l = loss::pod(
        &mut tape,
        &out.features,
        &s.pedcc,
        y,
        DELTA,
        &PodConfig::default(),
    )
    .loss;
    tape.backward(&l, &mut s.ps);
    if let Some((ledger, step)) = ledger {
        ledger.guard(step, &s.ps, l.value());
        let norms = loss::delta_norms(
            loss::Variant::Paper,
            out.features.value(),
            out.logits.value(),
        );
        ledger.add_step(
            l.value(),
            out.logits.value(),
            y,
            labels,
            &norms,
            labels.len(),
        );
    }
    l.value().clone()
}

/// The loss and every trainable gradient (named) of one forward/backward at `--check-batch`.
struct StepResult {
    outputs: Vec<Tensor>,
    names: Vec<String>,
}

fn one_step(args: &Args, arch: &str, dtype: DType, device: Device) -> Result<StepResult> {
    let mut s = build(args, arch, dtype, device)?;
    let (images, labels) = batch_data(args, args.check_batch, dtype);
    let l = forward_backward(&mut s, &images, &labels, device, None);
    let (mut outputs, mut names) = (vec![l.to_device(Device::Cpu)], vec!["loss".to_string()]);
    for p in s.ps.iter() {
        if p.kind == ParamKind::Trainable {
            match &p.grad {
                Some(g) => outputs.push(g.to_device(Device::Cpu)),
                None => bail!("{} got no gradient", p.name),
            }
            names.push(p.name.clone());
        }
    }
    Ok(StepResult { outputs, names })
}

/// Compares a step on `device` with the f64 CPU reference: the loss with `tol.0`, all gradients as
/// one vector with `tol.1` (so that tiny tensors with near-zero gradients do not dominate).
///
/// The gradient tolerance is loose because float32 gradients of these networks legitimately differ
/// from float64 ones by up to ~2e-2: the backward through many training-mode batch norms over few
/// values amplifies rounding (PyTorch's own float32 gradients of ResNet50 at width 16, batch 8,
/// differ from its float64 ones by 0.9–1.8e-2 whatever the loss, while the forward agrees to 1e-5;
/// see BENCHMARKS.md), and a pre-activation within rounding of zero flips a ReLU. A wrong kernel gives
/// errors of order 1. TF32 (10-bit mantissas, a unit roundoff 8192× float32's) is checked on the loss;
/// its gradient bound only catches garbage: on the H200 (2026-11-30) ResNet50's TF32 gradients at
/// batch 2 differed from float64 by 0.59 as one vector (float32's by 1.6e-2; × 8192 saturates), so
/// the bound is 0.9, under the 1.0 of an all-zero gradient and the ≈1.4 of an unrelated one.
fn check(
    args: &Args,
    arch: &str,
    device: Device,
    want: &StepResult,
    tol: (f64, f64),
) -> Result<CheckResult> {
    let got = one_step(args, arch, DType::F32, device)?;
    let grads = |r: &StepResult| -> Tensor {
        let v: Vec<f64> = r.outputs[1..].iter().flat_map(|t| t.to_vec_f64()).collect();
        Tensor::from_vec(&[v.len()], v)
    };
    let loss = check_outputs(&got.outputs[..1], &want.outputs[..1], tol.0);
    let grad = check_outputs(&[grads(&got)], &[grads(want)], tol.1);
    if !grad.ok() {
        // Say where the difference is: the worst gradients by relative error.
        let mut worst: Vec<(f64, &str)> = got.outputs[1..]
            .iter()
            .zip(&want.outputs[1..])
            .zip(&got.names[1..])
            .map(|((g, w), n)| (rel_error(&g.to_vec_f64(), &w.to_vec_f64()), n.as_str()))
            .collect();
        worst.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (e, n) in worst.iter().take(4) {
            println!("    gradient of {n}: relative error {e:.1e}");
        }
    }
    Ok(CheckResult {
        max_rel_error: loss.max_rel_error.max(grad.max_rel_error),
        tolerance: tol.1,
        problem: loss
            .problem
            .map(|p| format!("loss {p}"))
            .or(grad.problem.map(|p| format!("gradients {p}"))),
        skipped: None,
    })
}

/// The graph row's check: its loss after warm-up + `--steps` replays against the eager row's after
/// as many eager steps (same weights, same batch). Only reordered reductions (cuDNN's algorithms
/// may differ in how they sum) separate the two, so they agree to the loss tolerance of the
/// precision; a replay that did not update the model, or updated it twice, is far outside it.
fn graph_check(graph_loss: f64, eager_loss: f64, tol: f64) -> CheckResult {
    let err = (graph_loss - eager_loss).abs() / eager_loss.abs().max(1e-12);
    let ok = err.is_finite() && err <= tol;
    CheckResult {
        max_rel_error: err,
        tolerance: tol,
        problem: (!ok).then(|| {
            format!(
                "loss after the replays {graph_loss} differs from the eager steps' {eager_loss}"
            )
        }),
        skipped: None,
    }
}

struct Row {
    model: String,
    precision: String,
    metrics: bool,
    stats: bench::Stats,
    /// Every timed step's seconds.
    steps_s: Vec<f64>,
    flops: StepFlops,
    peak: Option<u64>,
    check: CheckResult,
    final_loss: f64,
}

fn time_config(
    args: &Args,
    arch: &str,
    device: Device,
    metrics: bool,
) -> Result<(bench::Stats, Vec<f64>, Option<u64>, f64)> {
    let mut s = build(args, arch, DType::F32, device)?;
    let (images, labels) = batch_data(args, args.batch, DType::F32);
    let mut sgd = Sgd::new(0.9, 5e-4, false)?;
    let clock = Clock::for_device(device)?;
    let mut last = None;
    let mut ledger = metrics.then(|| StepLedger::new(device, &EpochTally::default(), &s.ps));
    let mut step = 0u64;
    let mut one_step = |s: &mut Setup, sgd: &mut Sgd| {
        step += 1;
        let l = forward_backward(
            s,
            &images,
            &labels,
            device,
            ledger.as_mut().map(|g| (g, step)),
        );
        sgd.step_unless(&mut s.ps, args.lr, ledger.as_ref().map(|g| g.skip_flag()));
        s.ps.zero_grad();
        l
    };
    // The warm-up also builds the cuDNN plans and fills the allocator's cache.
    let warm = args.common.warmup.max(1);
    for _ in 0..warm {
        one_step(&mut s, &mut sgd);
    }
    clock.sync();
    memory::reset_peak(device);
    let (stats, steps_s) = clock.measure_steps(0, args.steps, || {
        last = Some(one_step(&mut s, &mut sgd));
    });
    let peak = memory::peak_bytes(device);
    let final_loss = last.map_or(f64::NAN, |l| l.item());
    Ok((stats, steps_s, peak, final_loss))
}

/// `time_config` with the step captured once as a CUDA graph: the same warm-up (eager steps, which
/// also choose the cuDNN algorithms and fill the pool's cache), then one capture and `--steps`
/// replays. Images and labels sit in buffers made before the capture (the same batch every step,
/// as in the eager rows). The capture must leave the parameters, momentum buffers and batch-norm
/// statistics where they were: a replay updates them at those addresses.
fn time_config_graph(
    args: &Args,
    arch: &str,
    device: Device,
) -> Result<(bench::Stats, Vec<f64>, Option<u64>, f64)> {
    let Device::Cuda(ordinal) = device else {
        bail!("--cuda-graph needs a GPU");
    };
    let gpu = cuda::Gpu::get(ordinal).map_err(anyhow::Error::msg)?;
    let mut s = build(args, arch, DType::F32, device)?;
    let (images, labels) = batch_data(args, args.batch, DType::F32);
    let x = images.to_device(device);
    let y = loss::labels_tensor(&labels, &x);
    let mut sgd = Sgd::new(0.9, 5e-4, false)?;
    let clock = Clock::for_device(device)?;
    let step = |s: &mut Setup, sgd: &mut Sgd| {
        let l = forward_backward_on(s, &x, &y, &labels, None);
        sgd.step(&mut s.ps, args.lr);
        s.ps.zero_grad();
        l
    };
    // Two eager steps at least: the first makes the momentum buffers (a capture must not).
    for _ in 0..args.common.warmup.max(2) {
        step(&mut s, &mut sgd);
    }
    clock.sync();
    let state = |s: &Setup, sgd: &Sgd| -> Vec<u64> {
        let params = s.ps.iter().map(|p| &p.value);
        cuda::graph::addresses(params.chain(sgd.state().momentum.values()))
    };
    let before = state(&s, &sgd);
    let (graph, loss_t) = cuda::graph::StepGraph::capture(&gpu, || step(&mut s, &mut sgd))
        .map_err(anyhow::Error::msg)?;
    if state(&s, &sgd) != before {
        bail!(
            "{arch}: the captured step moved a parameter, momentum buffer or batch-norm statistic \
             to new memory; its replays would not update the model"
        );
    }
    memory::reset_peak(device);
    let mut replay_err = None;
    let (stats, steps_s) = clock.measure_steps(0, args.steps, || {
        if let Err(e) = graph.replay() {
            replay_err.get_or_insert(e);
        }
    });
    if let Some(e) = replay_err {
        bail!("{arch}: {e}");
    }
    let peak = memory::peak_bytes(device);
    let final_loss = loss_t.item();
    drop(graph);
    Ok((stats, steps_s, peak, final_loss))
}

fn main() {
    // A table piped into `head` ends quietly, without a panic trace.
    podgpu::cli::end_quietly_when_output_closes();
    podgpu::cuda::libs::reexec_with_chosen_libraries();
    bench::exit_on_error(run());
}

fn run() -> Result<()> {
    let mut args = Args::parse();
    let device = args.common.setup()?;
    let gpu = matches!(device, Device::Cuda(_));
    args.batch = args.batch_arg.unwrap_or(if gpu { 128 } else { 32 });
    args.width = args.width_arg.unwrap_or(if gpu { 64 } else { 16 });
    if !gpu && (args.batch_arg.is_none() || args.width_arg.is_none()) {
        println!(
            "CPU defaults: batch {}, width {} (pass --batch/--width for other sizes)",
            args.batch, args.width
        );
    }
    if args.batch < 2 {
        bail!("--batch must be at least 2 (batch norm and the SC loss need two samples)");
    }
    if args.image < 8 {
        bail!("--image must be at least 8 pixels");
    }
    println!("{}", bench::describe(device));
    // (name, math mode, bf16 path)
    let mut precisions = Vec::new();
    for p in &args.precision {
        match (p.as_str(), device) {
            ("fp32", _) => precisions.push(("fp32", MathMode::Fp32, false)),
            ("tf32", Device::Cuda(_)) => precisions.push(("tf32", MathMode::Tf32, false)),
            ("tf32", Device::Cpu) => println!("tf32: skipped (GPU only; the CPU computes in fp32)"),
            ("bf16", _) => precisions.push(("bf16", MathMode::Fp32, true)),
            (other, _) => bail!("unknown precision {other:?}: expected fp32, tf32 or bf16"),
        }
    }
    if args.cuda_graph && !gpu {
        println!("--cuda-graph: skipped (GPU only; CPU steps have no graphs to replay)");
    }
    let mut rows = Vec::new();
    for arch in &args.models {
        let mut s = build(&args, arch, DType::F32, Device::Cpu)?;
        let image = [3, args.image, args.image];
        let flops = match podgpu::nn::transformer_config(arch) {
            Some(_) => StepFlops::of_transformer(&s.net, &mut s.ps, image, args.batch)?,
            None => StepFlops::of_network(&s.net, &s.ps, image, args.batch)?,
        };
        if let Some(t) = podgpu::nn::transformer_config(arch) {
            // The published forward cost at 224 (timm / the papers): ViT-B/16 17.6, Swin-B 15.4 GMAC.
            let published = match arch.as_str() {
                "vit_b16" | "vit_base_patch16_224" => Some(17.6),
                "swin_b" | "swin_base_patch4_window7_224" => Some(15.4),
                _ => None,
            };
            let gmac = flops.forward() / args.batch as f64 / 2e9;
            match published {
                Some(p) if args.image == t.native_image() => {
                    let off = (gmac - p).abs() / p;
                    println!(
                        "{arch}: {gmac:.2} GMAC forward per image, published {p} ({:.1}% off)",
                        100.0 * off
                    );
                    if off > 0.02 {
                        bail!("{arch}: the counted forward ({gmac:.2} GMAC) is not the published {p} GMAC");
                    }
                }
                _ => println!(
                    "{arch}: {gmac:.3} GMAC forward per image at {0}×{0}",
                    args.image
                ),
            }
        }
        drop(s);
        println!(
            "\n{arch} (width {}, {}×{} images, batch {}, {} classes, feature dim {}):\n{}",
            args.width,
            args.image,
            args.image,
            args.batch,
            args.classes,
            feature_dim(&args, arch),
            flops.explain()
        );
        let reference = if args.check_batch > 0 {
            Some(one_step(&args, arch, DType::F64, Device::Cpu)?)
        } else {
            None
        };
        for &(name, mode, bf16) in &precisions {
            if bf16 && gpu && !podgpu::nn::gpu_bf16_supported(arch) {
                println!(
                    "  {name}: skipped ({})",
                    podgpu::nn::gpu_bf16_unsupported(arch)
                );
                continue;
            }
            cuda::set_math_mode(mode);
            // The one-step check and the timed steps run on this thread.
            let _bf16 = podgpu::cpu::bf16::scope(bf16);
            let tol = match (mode, bf16) {
                (MathMode::Fp32, false) => (1e-4, 5e-2),
                (MathMode::Tf32, _) => (1e-2, 0.9),
                // TF32's, scaled by the ratio of unit roundoffs (2⁻⁸ / 2⁻¹¹ = 8), gradients capped.
                (MathMode::Fp32, true) => (8e-2, 1.0),
            };
            let chk = match &reference {
                Some(want) => check(&args, arch, device, want, tol)?,
                None => CheckResult::skipped("--check-batch 0"),
            };
            println!(
                "  {name}: check vs f64 CPU reference (batch {}): {}",
                args.check_batch,
                chk.cell()
            );
            for metrics in [false, true] {
                if metrics && !args.with_metrics {
                    continue;
                }
                let timed = cuda::catch_oom(|| time_config(&args, arch, device, metrics)).map_err(
                    |oom| {
                        anyhow::anyhow!("{arch}: {}", oom.advice_for("--batch", Some(args.batch)))
                    },
                )?;
                let (stats, steps_s, peak, final_loss) = timed?;
                rows.push(Row {
                    model: arch.clone(),
                    precision: name.into(),
                    metrics,
                    stats,
                    steps_s,
                    flops: flops.clone(),
                    peak,
                    check: chk.clone(),
                    final_loss,
                });
            }
            if args.cuda_graph && gpu {
                let eager_loss = rows.last().map_or(f64::NAN, |r| r.final_loss);
                match cuda::catch_oom(|| time_config_graph(&args, arch, device)) {
                    Ok(Ok((stats, steps_s, peak, final_loss))) => {
                        let check = graph_check(final_loss, eager_loss, tol.0);
                        println!(
                            "  {name}+graph: final loss {final_loss:.6} vs eager {eager_loss:.6}: {}",
                            check.cell()
                        );
                        rows.push(Row {
                            model: arch.clone(),
                            precision: format!("{name}+graph"),
                            metrics: false,
                            stats,
                            steps_s,
                            flops: flops.clone(),
                            peak,
                            check,
                            final_loss,
                        });
                    }
                    Ok(Err(e)) => println!("  {name}+graph: skipped ({e:#})"),
                    Err(oom) => println!("  {name}+graph: skipped ({oom})"),
                }
            }
        }
    }
    cuda::set_math_mode(MathMode::Fp32);

    let mut t = Table::new(&[
        "model",
        "precision",
        "batch",
        "ms/step",
        "images/s",
        "TFLOP/s",
        "peak mem",
        "check",
    ]);
    for r in &rows {
        let ms = r.stats.ms();
        t.row(vec![
            r.model.clone(),
            format!("{}{}", r.precision, if r.metrics { "+metrics" } else { "" }),
            args.batch.to_string(),
            table::num(ms),
            table::num(args.batch as f64 / r.stats.median),
            format!("{:.3}", r.flops.total() / r.stats.median / 1e12),
            r.peak.map_or("?".into(), |b| table::bytes(b as f64)),
            r.check.cell(),
        ]);
    }
    println!(
        "\ntraining steps on {device} ({}; median of {} steps after {} warm-up; peak mem = {}):\n{t}",
        Clock::for_device(device)?.name(),
        args.steps,
        args.common.warmup.max(1),
        memory::peak_kind(device)
    );
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "model": r.model,
                "precision": r.precision,
                "metrics_every_step": r.metrics,
                "batch": args.batch,
                "width": args.width,
                "image": args.image,
                "ms_per_step": r.stats.ms(),
                "images_per_s": args.batch as f64 / r.stats.median,
                "images_per_s_total": (args.batch * args.steps) as f64 / r.steps_s.iter().sum::<f64>(),
                "step_times_s": r.steps_s,
                "tflops": r.flops.total() / r.stats.median / 1e12,
                "flops": r.flops.to_json(),
                "peak_mem_bytes": r.peak,
                "check": r.check.to_json(),
                "final_loss": r.final_loss,
                "time": r.stats.to_json(),
            })
        })
        .collect();
    let failed = rows.iter().any(|r| !r.check.ok());
    bench::print_json(
        "step",
        device,
        serde_json::json!({
            "device": device.to_string(),
            "threads": rayon::current_num_threads(),
            "steps": args.steps,
            "warmup": args.common.warmup.max(1),
            "classes": args.classes,
            "loss": "pod (paper variant, lambda 1)",
            "optimizer": {"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
            "results": results,
        }),
    );
    if failed {
        bail!("a result did not match the CPU reference (see the check column); its timings are not trustworthy");
    }
    Ok(())
}
