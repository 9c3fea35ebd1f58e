//! Every distinct convolution of ResNet50-CIFAR (or another `--model`), derived from the network
//! definition (`Network::conv_shapes`) at the training batch: forward, backward-data and
//! backward-filter, TFLOP/s per math mode and, on a GPU, the algorithm cuDNN chose. Each shape is
//! first checked against the f64 CPU result at `--check-batch`. Ends with the convolutions' share of
//! a training step (each shape's time × how often it occurs) and one JSON line.
//!
//! ```text
//! cargo run --release --bin bench-conv                          # GPU: batch 128
//! cargo run --release --bin bench-conv -- --device cpu --batch 8
//! ```
//!
//! Modes: `fp32`, `tf32` (NCHW f32), `bf16` (bf16 storage, f32 accumulation: the bf16 step's
//! convolutions) and `tf32-nhwc`, `bf16-nhwc` (channels last, as `PODGPU_GPU_LAYOUT=nhwc` runs
//! them); the weight is given in the layout the convolution takes (its per-step cast and reorder
//! are not timed here), the weight gradient comes back NCHW (its reorder is timed).

use anyhow::{bail, Result};
use clap::Parser;
use podgpu::autograd::ParamStore;
use podgpu::bench::{self, check_outputs, conv_flops, table, CheckResult, Clock, Stats, Table};
use podgpu::cuda::{self, MathMode};
use podgpu::gradcheck::randn;
use podgpu::nn::{ConvShape, HeadSpec, ModelSpec, Network, Stem};
use podgpu::ops;
use podgpu::rng::Rng;
use podgpu::tensor::{DType, Device, Layout, Tensor};

#[derive(Parser)]
#[command(
    about = "Time every distinct convolution of a ResNet (forward, backward-data, backward-filter)"
)]
struct Args {
    #[arg(long, default_value = "resnet50")]
    model: String,
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Batch (default: 128 on a GPU, 8 on the CPU)
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long, default_value_t = 32)]
    image: usize,
    /// Modes: fp32, tf32, bf16, tf32-nhwc, bf16-nhwc (all but fp32: GPU only)
    #[arg(long, value_delimiter = ',', default_value = "fp32,tf32")]
    modes: Vec<String>,
    /// Batch of the f64 CPU reference check (0: no check)
    #[arg(long, default_value_t = 2)]
    check_batch: usize,
    #[command(flatten)]
    common: bench::CommonArgs,
}

/// One distinct convolution shape, with how often and where it occurs.
struct Distinct {
    shape: ConvShape,
    count: usize,
    /// The first convolution reads the images: no backward-data in training.
    is_first: bool,
}

fn distinct_convs(args: &Args, batch: usize) -> Result<Vec<Distinct>> {
    let mut ps = ParamStore::new();
    let spec = ModelSpec {
        arch: args.model.clone(),
        width: args.width,
        stem: Stem::Cifar,
        in_channels: 3,
        classes: 10,
        feature_dim: 256,
        head: HeadSpec::Linear,
        image_size: args.image,
        drop_path: None,
    };
    let net =
        Network::new(spec, &mut ps, DType::F32, &mut Rng::new(1)).map_err(anyhow::Error::msg)?;
    let mut out: Vec<Distinct> = Vec::new();
    for (i, c) in net
        .conv_shapes(&ps, [batch, 3, args.image, args.image])
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .enumerate()
    {
        match out
            .iter_mut()
            .find(|d| d.shape.x == c.x && d.shape.w == c.w && d.shape.spec == c.spec)
        {
            Some(d) => d.count += 1,
            None => out.push(Distinct {
                shape: c,
                count: 1,
                is_first: i == 0,
            }),
        }
    }
    Ok(out)
}

fn with_batch(s: [usize; 4], n: usize) -> [usize; 4] {
    [n, s[1], s[2], s[3]]
}

/// How a mode stores and computes: the math mode, bf16 storage, channels-last layout.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    math: MathMode,
    bf16: bool,
    nhwc: bool,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::of("fp32", MathMode::Fp32, false, false),
        Mode::of("tf32", MathMode::Tf32, false, false),
        Mode::of("bf16", MathMode::Fp32, true, false),
        Mode::of("tf32-nhwc", MathMode::Tf32, false, true),
        Mode::of("bf16-nhwc", MathMode::Fp32, true, true),
    ];

    const fn of(name: &'static str, math: MathMode, bf16: bool, nhwc: bool) -> Mode {
        Mode {
            name,
            math,
            bf16,
            nhwc,
        }
    }

    /// An f32 NCHW GPU tensor in this mode's storage and layout.
    fn prepare(&self, t: &Tensor) -> Tensor {
        let t = ops::store_bf16(self.bf16, t);
        match self.nhwc {
            true => ops::to_layout_fwd(&t, Layout::Nhwc),
            false => t,
        }
    }

    /// The relative error allowed against the f64 reference: fp32's, TF32's (inputs rounded to
    /// 11 bits), bf16's (8 bits: TF32's × 8).
    fn tolerance(&self) -> f64 {
        match (self.bf16, self.math) {
            (true, _) => 8e-2,
            (false, MathMode::Tf32) => 1e-2,
            (false, MathMode::Fp32) => 1e-4,
        }
    }
}

/// The three passes on (x, w, dy), as training runs them.
fn passes(x: &Tensor, w: &Tensor, dy: &Tensor, spec: ops::Conv2dSpec) -> [Tensor; 3] {
    [
        ops::conv2d_fwd(x, w, None, spec),
        ops::conv2d_bwd_data(dy, w, x.shape(), spec),
        ops::conv2d_bwd_weight(x, dy, w.shape(), spec),
    ]
}

fn check(d: &Distinct, n: usize, device: Device, mode: Mode) -> CheckResult {
    if n == 0 {
        return CheckResult::skipped("--check-batch 0");
    }
    let mut rng = Rng::new(11);
    let c = &d.shape;
    let x = randn(&with_batch(c.x, n), &mut rng);
    let w = randn(&c.w, &mut rng);
    let dy = randn(&with_batch(c.y(), n), &mut rng);
    let want = passes(&x, &w, &dy, c.spec);
    let on = |t: &Tensor| mode.prepare(&t.to_dtype(DType::F32).to_device(device));
    // Compared in NCHW order (an NHWC tensor's values are stored in NHWC order).
    let got = passes(&on(&x), &on(&w), &on(&dy), c.spec)
        .map(|t| ops::to_layout_fwd(&t, Layout::RowMajor));
    check_outputs(&got, &want, mode.tolerance())
}

struct Row {
    d_index: usize,
    mode: &'static str,
    times: [Stats; 3],
    check: CheckResult,
    algos: [Option<(String, usize)>; 3],
}

fn main() {
    // A table piped into `head` ends quietly, without a panic trace.
    podgpu::cli::end_quietly_when_output_closes();
    podgpu::cuda::libs::reexec_with_chosen_libraries();
    bench::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = Args::parse();
    let device = args.common.setup()?;
    let settings = args.common.settings();
    let batch = args.batch.unwrap_or(match device {
        Device::Cpu => 8,
        Device::Cuda(_) => 128,
    });
    println!("{}", bench::describe(device));
    let mut modes = Vec::new();
    for m in &args.modes {
        let Some(mode) = Mode::ALL.iter().find(|k| k.name == m.as_str()) else {
            bail!("unknown mode {m:?}: expected fp32, tf32, bf16, tf32-nhwc or bf16-nhwc");
        };
        match device {
            Device::Cpu if mode.name != "fp32" => {
                println!(
                    "{}: skipped (GPU only; the CPU computes in fp32, NCHW)",
                    mode.name
                )
            }
            _ => modes.push(*mode),
        }
    }
    let convs = distinct_convs(&args, batch)?;
    let clock = Clock::for_device(device)?;
    let mut rng = Rng::new(5);
    let mut rows = Vec::new();
    for (i, d) in convs.iter().enumerate() {
        let c = &d.shape;
        let x32 = randn(&c.x, &mut rng).to_dtype(DType::F32).to_device(device);
        let w32 = randn(&c.w, &mut rng).to_dtype(DType::F32).to_device(device);
        let dy32 = randn(&c.y(), &mut rng)
            .to_dtype(DType::F32)
            .to_device(device);
        for &mode in &modes {
            cuda::set_math_mode(mode.math);
            let name = mode.name;
            let chk = check(d, args.check_batch, device, mode);
            let (x, w, dy) = (mode.prepare(&x32), mode.prepare(&w32), mode.prepare(&dy32));
            let times = [
                clock.measure(&settings, || drop(ops::conv2d_fwd(&x, &w, None, c.spec))),
                clock.measure(&settings, || {
                    drop(ops::conv2d_bwd_data(&dy, &w, &c.x, c.spec))
                }),
                clock.measure(&settings, || {
                    drop(ops::conv2d_bwd_weight(&x, &dy, &c.w, c.spec))
                }),
            ];
            let algos = match device {
                Device::Cuda(o) => {
                    let gpu = cuda::Gpu::get(o).map_err(anyhow::Error::msg)?;
                    let geom = cuda::dnn::ConvGeom {
                        stride: [c.spec.stride.0, c.spec.stride.1],
                        pad: [c.spec.padding.0, c.spec.padding.1],
                        dilation: [1, 1],
                        groups: c.spec.groups,
                    };
                    let storage = match mode.bf16 {
                        true => cuda::dnn::Storage::Bf16,
                        false => cuda::dnn::Storage::F32,
                    };
                    let layout = match mode.nhwc {
                        true => Layout::Nhwc,
                        false => Layout::RowMajor,
                    };
                    cuda::dnn::chosen_algorithms(&gpu, c.x, c.w, &geom, storage, layout)
                }
                Device::Cpu => [None, None, None],
            };
            println!(
                "  {:<28} {name}: fwd {:>9} µs, data {:>9} µs, filter {:>9} µs, check {}",
                c.name.trim_end_matches(".weight"),
                table::num(times[0].us()),
                table::num(times[1].us()),
                table::num(times[2].us()),
                chk.cell()
            );
            rows.push(Row {
                d_index: i,
                mode: name,
                times,
                check: chk,
                algos,
            });
        }
    }
    cuda::set_math_mode(MathMode::Fp32);

    let mut t = Table::new(&[
        "convolution",
        "input",
        "weight",
        "s",
        "×",
        "mode",
        "fwd µs",
        "TF/s",
        "data µs",
        "TF/s",
        "filter µs",
        "TF/s",
        "check",
    ]);
    let tf = |f: f64, s: &Stats| format!("{:.2}", f / s.median / 1e12);
    for r in &rows {
        let d = &convs[r.d_index];
        let f = conv_flops(&d.shape);
        t.row(vec![
            d.shape.name.trim_end_matches(".weight").to_string(),
            format!("{:?}", d.shape.x),
            format!("{:?}", d.shape.w),
            d.shape.spec.stride.0.to_string(),
            d.count.to_string(),
            r.mode.into(),
            table::num(r.times[0].us()),
            tf(f, &r.times[0]),
            table::num(r.times[1].us()),
            tf(f, &r.times[1]),
            table::num(r.times[2].us()),
            tf(f, &r.times[2]),
            r.check.cell(),
        ]);
    }
    println!(
        "\n{} distinct convolutions of {} (width {}, {}×{} input) at batch {} ({}, median per call; \
         × = occurrences in the network):\n{t}",
        convs.len(),
        args.model,
        args.width,
        args.image,
        args.image,
        batch,
        clock.name()
    );
    if device != Device::Cpu {
        let mut a = Table::new(&[
            "convolution",
            "mode",
            "forward",
            "backward-data",
            "backward-filter",
        ]);
        let name = |x: &Option<(String, usize)>| {
            x.as_ref().map_or("-".to_string(), |(n, ws)| {
                format!(
                    "{} ({})",
                    n.trim_start_matches("CUDNN_CONVOLUTION_"),
                    table::bytes(*ws as f64)
                )
            })
        };
        for r in &rows {
            a.row(vec![
                convs[r.d_index]
                    .shape
                    .name
                    .trim_end_matches(".weight")
                    .to_string(),
                r.mode.into(),
                name(&r.algos[0]),
                name(&r.algos[1]),
                name(&r.algos[2]),
            ]);
        }
        println!("cuDNN's choices (algorithm, workspace):\n{a}");
    }
    // Per mode: the convolutions' time in one training step.
    let mut per_mode = Vec::new();
    for mode in &modes {
        let name = mode.name;
        let (mut secs, mut flops) = (0.0, 0.0);
        for r in rows.iter().filter(|r| r.mode == name) {
            let d = &convs[r.d_index];
            let f = conv_flops(&d.shape);
            let data = if d.is_first { 0.0 } else { 1.0 };
            secs +=
                d.count as f64 * (r.times[0].median + data * r.times[1].median + r.times[2].median);
            flops += d.count as f64 * f * (2.0 + data);
        }
        println!(
            "{name}: all convolutions of one training step at batch {batch}: {:.2} ms, {:.3} TFLOP/s \
             ({:.1} GFLOP)",
            secs * 1e3,
            flops / secs / 1e12,
            flops / 1e9
        );
        per_mode
            .push(serde_json::json!({"mode": name, "step_conv_s": secs, "step_conv_flops": flops}));
    }
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let d = &convs[r.d_index];
            let f = conv_flops(&d.shape);
            serde_json::json!({
                "name": d.shape.name, "x": d.shape.x, "w": d.shape.w,
                "stride": d.shape.spec.stride.0, "padding": d.shape.spec.padding.0,
                "count": d.count, "mode": r.mode,
                "layout": if r.mode.ends_with("nhwc") { "NHWC" } else { "NCHW" }, "flops": f,
                "fwd_us": r.times[0].us(), "data_us": r.times[1].us(), "filter_us": r.times[2].us(),
                "fwd_tflops": f / r.times[0].median / 1e12,
                "data_tflops": f / r.times[1].median / 1e12,
                "filter_tflops": f / r.times[2].median / 1e12,
                "algorithms": r.algos.iter().map(|a| a.as_ref().map(|(n, ws)| serde_json::json!({"algo": n, "workspace_bytes": ws}))).collect::<Vec<_>>(),
                "check": r.check.to_json(),
            })
        })
        .collect();
    let failed = rows.iter().any(|r| !r.check.ok());
    bench::print_json(
        "conv",
        device,
        serde_json::json!({
            "device": device.to_string(),
            "model": args.model, "width": args.width, "batch": batch, "image": args.image,
            "distinct": convs.len(), "per_step": per_mode, "results": results,
        }),
    );
    if failed {
        bail!("a convolution did not match the CPU reference (see the check column)");
    }
    Ok(())
}
