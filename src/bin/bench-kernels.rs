//! podgpu's own kernels (everything that is not a cuBLAS GEMM or a cuDNN convolution, plus cuDNN's
//! batch norm for comparison) at ResNet50-CIFAR training sizes: elementwise ops, pools, batch norm and
//! its neighbours, the NaC loss, the SC pieces, softmax cross-entropy and the multi-tensor SGD step.
//! Each is called through its public tensor-level entry point (what a training step calls, output
//! allocation included), checked against the f64 CPU result, then timed. GB/s are compared with a
//! copy measured in the same run (device-to-device on a GPU, a parallel memcpy on the CPU).
//!
//! Bytes per call = every input and output tensor once (the least traffic the op can have); kernels
//! that read an input twice or keep scratch space show up as a lower fraction of the copy.
//!
//! ```text
//! cargo run --release --bin bench-kernels -- [--batch 128] [--device cpu] [--only relu,sgd]
//! ```

use anyhow::{bail, Result};
use clap::Parser;
use podgpu::autograd::{ParamKind, ParamStore};
use podgpu::bench::{self, check_outputs, table, CheckResult, Clock, Settings, Table};
use podgpu::gradcheck::randn;
use podgpu::loss::{self, Variant};
use podgpu::nn::{HeadSpec, ModelSpec, Network, Stem};
use podgpu::ops::{self, Pool2dSpec};
use podgpu::optim::Sgd;
use podgpu::rng::Rng;
use podgpu::tensor::{DType, Device, Tensor};
use rayon::prelude::*;

#[derive(Parser)]
#[command(about = "Time podgpu's own kernels at training sizes; GB/s against a measured copy")]
struct Args {
    /// Batch (default: 128 on a GPU, 32 on the CPU)
    #[arg(long)]
    batch: Option<usize>,
    /// Latent dimension n of the loss kernels
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Classes K of the loss kernels
    #[arg(long, default_value_t = 100)]
    classes: usize,
    /// Only the cases whose name contains one of these words
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[command(flatten)]
    common: bench::CommonArgs,
}

type Make = Box<dyn Fn(Device, DType) -> Vec<Tensor>>;
type Run = Box<dyn Fn(&[Tensor]) -> Vec<Tensor>>;

/// One kernel call at one size.
struct Case {
    name: &'static str,
    size: String,
    /// Inputs on a device in a dtype, the same values every time (seeded).
    make: Make,
    run: Run,
    tol: f64,
    /// Outputs are class indices (GPU: i32 words), compared as decoded values.
    indices: bool,
}

/// Standard normal values, drawn in parallel chunks of 2¹⁶ (each from its own seeded generator, so
/// the values do not depend on the thread count): the GPU cases hold up to 33 M elements per tensor,
/// and drawing them on one thread took most of the first H200 run's 30 s for this benchmark.
fn normal(shape: &[usize], seed: u64, device: Device, dtype: DType) -> Tensor {
    const CHUNK: usize = 1 << 16;
    let n = podgpu::tensor::numel(shape);
    if n <= CHUNK {
        return randn(shape, &mut Rng::new(seed))
            .to_dtype(dtype)
            .to_device(device);
    }
    let mut v = vec![0.0f64; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
        c.iter_mut().for_each(|x| *x = rng.normal());
    });
    Tensor::from_vec(shape, v).to_dtype(dtype).to_device(device)
}

fn shape_str(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

#[allow(clippy::too_many_lines)]
fn cases(b: usize, n: usize, k: usize) -> Vec<Case> {
    // ResNet50-CIFAR: layer1's output [B, 256, 32, 32] is the largest activation; the Tiny-ImageNet
    // stem max-pools [B, 64, 64, 64]; the last stage is [B, 2048, 4, 4].
    let act = [b, 256, 32, 32];
    let stem = [b, 64, 64, 64];
    let last = [b, 2048, 4, 4];
    let half = [b, 128, 32, 32];
    let fc = [b, 2048];
    let pool3 = Pool2dSpec::new(3, 2, 1);
    let pool2 = Pool2dSpec::new(2, 2, 0);
    let labels: Vec<usize> = (0..b).map(|i| (i * 7) % k).collect();
    let mut v: Vec<Case> = Vec::new();
    let mut add = |name, size: String, make: Make, run: Run, tol| {
        v.push(Case {
            name,
            size,
            make,
            run,
            tol,
            indices: false,
        })
    };
    add(
        "relu forward",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&act, 1, d, t)]),
        Box::new(|x| vec![ops::relu_fwd(&x[0])]),
        1e-7,
    );
    add(
        "relu backward",
        shape_str(&act),
        Box::new(move |d, t| vec![ops::relu_fwd(&normal(&act, 1, d, t)), normal(&act, 2, d, t)]),
        Box::new(|x| vec![ops::relu_bwd(&x[0], &x[1])]),
        1e-7,
    );
    add(
        "add (residual)",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&act, 1, d, t), normal(&act, 2, d, t)]),
        Box::new(|x| vec![ops::add_fwd(&x[0], &x[1])]),
        1e-7,
    );
    add(
        "scale",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&act, 1, d, t)]),
        Box::new(|x| vec![ops::scale_fwd(&x[0], 0.5)]),
        1e-7,
    );
    add(
        "bias add (FC1)",
        shape_str(&fc),
        Box::new(move |d, t| vec![normal(&fc, 1, d, t), normal(&[fc[1]], 2, d, t)]),
        Box::new(|x| vec![ops::bias_add_fwd(&x[0], &x[1])]),
        1e-7,
    );
    add(
        "sum rows (FC1 bias grad)",
        shape_str(&fc),
        Box::new(move |d, t| vec![normal(&fc, 1, d, t)]),
        Box::new(|x| vec![ops::sum_rows_fwd(&x[0])]),
        1e-5,
    );
    let bn_inputs = move |d: Device, t: DType| {
        let c = act[1];
        vec![
            normal(&act, 1, d, t),
            Tensor::full(&[c], 1.5, t, d),
            Tensor::full(&[c], 0.1, t, d),
            Tensor::full(&[c], 0.0, t, d),
            Tensor::full(&[c], 1.0, t, d),
        ]
    };
    add(
        "batch norm train forward",
        shape_str(&act),
        Box::new(bn_inputs),
        Box::new(|x| {
            let o = ops::batch_norm2d_train_fwd(&x[0], &x[1], &x[2], &x[3], &x[4], 0.1, 1e-5);
            vec![o.y, o.mean, o.invstd, o.running_mean, o.running_var]
        }),
        1e-4,
    );
    // The tail of a ResNet block in one pass (on a GPU always our kernels, cuda::bn_train).
    add(
        "batch norm + add + ReLU train forward",
        shape_str(&act),
        Box::new(move |d, t| {
            let mut v = bn_inputs(d, t);
            v.push(normal(&act, 3, d, t));
            v
        }),
        Box::new(|x| {
            let o = ops::batch_norm2d_relu_train_fwd(
                &x[0],
                &x[1],
                &x[2],
                &x[3],
                &x[4],
                Some(&x[5]),
                0.1,
                1e-5,
            );
            vec![o.y, o.mean, o.invstd, o.running_mean, o.running_var]
        }),
        1e-4,
    );
    add(
        "batch norm train backward",
        shape_str(&act),
        Box::new(move |d, t| {
            let x = normal(&act, 1, d, t);
            let g = Tensor::full(&[act[1]], 1.5, t, d);
            let r = Tensor::full(&[act[1]], 0.0, t, d);
            let o = ops::batch_norm2d_train_fwd(&x, &g, &r, &r, &r, 0.1, 1e-5);
            vec![x, normal(&act, 2, d, t), g, o.mean, o.invstd]
        }),
        Box::new(|x| {
            let o = ops::batch_norm2d_train_bwd(&x[0], &x[1], &x[2], &x[3], &x[4]);
            vec![o.dx, o.dweight, o.dbias]
        }),
        1e-4,
    );
    add(
        "channel sums (conv bias grad)",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&act, 1, d, t)]),
        Box::new(|x| vec![ops::conv2d_bwd_bias(&x[0])]),
        1e-5,
    );
    add(
        "max pool 3×3/2 forward",
        shape_str(&stem),
        Box::new(move |d, t| vec![normal(&stem, 1, d, t)]),
        Box::new(move |x| vec![ops::max_pool2d_fwd(&x[0], pool3)]),
        1e-7,
    );
    add(
        "max pool 3×3/2 backward",
        shape_str(&stem),
        Box::new(move |d, t| {
            let x = normal(&stem, 1, d, t);
            let y = ops::max_pool2d_fwd(&x, pool3);
            let dy = normal(y.shape(), 2, d, t);
            vec![x, y, dy]
        }),
        Box::new(move |x| vec![ops::max_pool2d_bwd(&x[0], &x[1], &x[2], pool3)]),
        1e-7,
    );
    add(
        "avg pool 2×2/2 forward",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&act, 1, d, t)]),
        Box::new(move |x| vec![ops::avg_pool2d_fwd(&x[0], pool2)]),
        1e-6,
    );
    add(
        "avg pool 2×2/2 backward",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&[b, 256, 16, 16], 1, d, t)]),
        Box::new(move |x| vec![ops::avg_pool2d_bwd(&x[0], &act, pool2)]),
        1e-6,
    );
    add(
        "global avg pool forward",
        shape_str(&last),
        Box::new(move |d, t| vec![normal(&last, 1, d, t)]),
        Box::new(|x| vec![ops::global_avg_pool_fwd(&x[0])]),
        1e-6,
    );
    add(
        "global avg pool backward",
        shape_str(&last),
        Box::new(move |d, t| vec![normal(&last[..2], 1, d, t)]),
        Box::new(move |x| vec![ops::global_avg_pool_bwd(&x[0], &last)]),
        1e-6,
    );
    add(
        "concat channels (2 inputs)",
        format!("2×{}", shape_str(&half)),
        Box::new(move |d, t| vec![normal(&half, 1, d, t), normal(&half, 2, d, t)]),
        Box::new(|x| vec![ops::concat_channels_fwd(&[&x[0], &x[1]])]),
        1e-7,
    );
    add(
        "split channels (2 outputs)",
        shape_str(&act),
        Box::new(move |d, t| vec![normal(&act, 1, d, t)]),
        Box::new(|x| ops::split_channels_fwd(&x[0], &[128, 128])),
        1e-7,
    );
    let feats = [b, n];
    add(
        "row normalize forward",
        shape_str(&feats),
        Box::new(move |d, t| vec![normal(&feats, 1, d, t)]),
        Box::new(|x| vec![ops::row_normalize_fwd(&x[0])]),
        1e-6,
    );
    add(
        "row normalize backward",
        shape_str(&feats),
        Box::new(move |d, t| vec![normal(&feats, 1, d, t), normal(&feats, 2, d, t)]),
        Box::new(|x| vec![ops::row_normalize_bwd(&x[0], &x[1])]),
        1e-5,
    );
    let with_labels = move |labels: Vec<usize>| {
        move |d: Device, t: DType| {
            let x = normal(&[b, n], 1, d, t);
            let p = normal(&[k, n], 2, d, t);
            let y = loss::labels_tensor(&labels, &x);
            vec![x, p, y]
        }
    };
    add(
        "NaC loss + gradient (fused)",
        format!("{}, K={k}", shape_str(&feats)),
        Box::new(with_labels(labels.clone())),
        Box::new(|x| {
            let (l, g) = loss::nac_fwd(&x[0], &x[1], &x[2], 0.05, Variant::Paper, true);
            vec![l, g.expect("asked for the gradient")]
        }),
        1e-5,
    );
    add(
        "SC: D = x̃ − P_y",
        format!("{}, K={k}", shape_str(&feats)),
        Box::new(with_labels(labels.clone())),
        Box::new(|x| vec![loss::sub_class_centroids_fwd(&x[0], &x[1], &x[2])]),
        1e-6,
    );
    add(
        "SC: column sums of squares",
        shape_str(&feats),
        Box::new(move |d, t| vec![normal(&feats, 1, d, t)]),
        Box::new(|x| vec![loss::col_sumsq_fwd(&x[0])]),
        1e-5,
    );
    add(
        "SC: value from Gram and s",
        format!("{}×{b} + {n}", b),
        Box::new(move |d, t| vec![normal(&[b, b], 1, d, t), normal(&[n], 2, d, t)]),
        Box::new(move |x| {
            vec![loss::sc_value_fwd(
                &x[0],
                &x[1],
                1.0 / ((b - 1) * (b - 1)) as f64,
            )]
        }),
        1e-4,
    );
    add(
        "SC: gradient combination",
        shape_str(&feats),
        Box::new(move |d, t| {
            vec![
                normal(&feats, 1, d, t),
                normal(&feats, 2, d, t),
                normal(&[n], 3, d, t),
                Tensor::full(&[1], 0.5, t, d),
            ]
        }),
        Box::new(|x| vec![loss::sc_grad_fwd(&x[0], &x[1], &x[2], &x[3], 1e-3)]),
        1e-6,
    );
    let logits = [b, k];
    let ce_labels = labels.clone();
    add(
        "softmax CE + gradient",
        shape_str(&logits),
        Box::new(move |d, t| {
            let z = normal(&logits, 1, d, t);
            let y = loss::labels_tensor(&ce_labels, &z);
            vec![z, y]
        }),
        Box::new(|x| {
            let (l, g) = loss::softmax_ce_fwd(&x[0], &x[1], true);
            vec![l, g.expect("asked for the gradient")]
        }),
        1e-5,
    );
    v.push(Case {
        name: "arg-max rows (predictions)",
        size: shape_str(&logits),
        make: Box::new(move |d, t| vec![normal(&logits, 1, d, t)]),
        run: Box::new(|x| vec![loss::argmax_rows_fwd(&x[0])]),
        tol: 0.0,
        indices: true,
    });
    v
}

/// Bytes of every input and output, once.
fn traffic(inputs: &[Tensor], outputs: &[Tensor]) -> f64 {
    inputs
        .iter()
        .chain(outputs)
        .map(|t| t.numel() * 4)
        .sum::<usize>() as f64
}

fn decode(ts: Vec<Tensor>) -> Vec<Tensor> {
    ts.iter()
        .map(|t| {
            let v = loss::label_values(t);
            Tensor::from_vec(&[v.len()], v)
        })
        .collect()
}

/// Copy bandwidth (bytes read + written per second) of a 256 MiB buffer on the device.
fn copy_bandwidth(device: Device, clock: &Clock, s: &Settings) -> Result<f64> {
    let n = 64 << 20; // f32 elements
    let st = match device {
        Device::Cuda(i) => {
            let gpu = podgpu::cuda::Gpu::get(i).map_err(anyhow::Error::msg)?;
            let src = gpu.alloc_zeros(n);
            clock.measure(s, || drop(src.duplicate()))
        }
        Device::Cpu => {
            let src = vec![1.0f32; n];
            let mut dst = vec![0.0f32; n];
            let chunk = n / (4 * rayon::current_num_threads()).max(1);
            clock.measure(s, || {
                dst.par_chunks_mut(chunk)
                    .zip(src.par_chunks(chunk))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            })
        }
    };
    Ok(2.0 * 4.0 * n as f64 / st.median)
}

/// SGD over all of ResNet50's trainable tensors (one launch on a GPU), checked against f64.
fn sgd_case(
    device: Device,
    clock: &Clock,
    s: &Settings,
) -> Result<(Vec<String>, serde_json::Value, bool)> {
    let store = |dtype: DType, dev: Device| -> Result<ParamStore> {
        let mut ps = ParamStore::new();
        let spec = ModelSpec {
            arch: "resnet50".into(),
            width: 64,
            stem: Stem::Cifar,
            in_channels: 3,
            classes: 10,
            feature_dim: 256,
            head: HeadSpec::Linear,
            image_size: 32,
            drop_path: None,
        };
        Network::new(spec, &mut ps, DType::F32, &mut Rng::new(3)).map_err(anyhow::Error::msg)?;
        ps.to_dtype(dtype);
        let mut rng = Rng::new(4);
        for p in ps.iter_mut() {
            if p.kind == ParamKind::Trainable {
                p.grad = Some(randn(p.value.shape(), &mut rng).to_dtype(dtype));
            }
        }
        for p in ps.iter_mut() {
            p.value = p.value.to_device(dev);
            p.grad = p.grad.take().map(|g| g.to_device(dev));
        }
        Ok(ps)
    };
    let trainable = |ps: &ParamStore| -> Vec<Tensor> {
        ps.iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .map(|p| p.value.to_device(Device::Cpu))
            .collect()
    };
    // Two steps (the first only sets the momentum buffers) on each side.
    let mut want = store(DType::F64, Device::Cpu)?;
    let mut got = store(DType::F32, device)?;
    let mut sgd_w = Sgd::new(0.9, 5e-4, false)?;
    let mut sgd_g = Sgd::new(0.9, 5e-4, false)?;
    for _ in 0..2 {
        sgd_w.step(&mut want, 0.1);
        sgd_g.step(&mut got, 0.1);
    }
    let chk = check_outputs(&trainable(&got), &trainable(&want), 1e-6);
    let count = got.count(ParamKind::Trainable);
    let tensors = got
        .iter()
        .filter(|p| p.kind == ParamKind::Trainable)
        .count();
    let st = clock.measure(s, || sgd_g.step(&mut got, 0.1));
    // Per parameter: read value, gradient, momentum; write value, momentum.
    let bytes = 5.0 * 4.0 * count as f64;
    let row = vec![
        "SGD step, all tensors (one launch on GPU)".to_string(),
        format!("{tensors} tensors, {count} values"),
        table::num(st.us()),
        table::num(bytes / st.median / 1e9),
    ];
    let json = serde_json::json!({
        "name": "sgd step", "tensors": tensors, "values": count, "us": st.us(),
        "bytes": bytes, "gb_per_s": bytes / st.median / 1e9, "check": chk.to_json(), "time": st.to_json(),
    });
    let mut row = row;
    row.push(chk.cell());
    Ok((row, json, chk.ok()))
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
    let b = args.batch.unwrap_or(match device {
        Device::Cpu => 32,
        Device::Cuda(_) => 128,
    });
    if b < 2 || args.dim < 2 || args.classes < 2 {
        bail!("--batch, --dim and --classes must be at least 2");
    }
    println!("{}", bench::describe(device));
    if matches!(device, Device::Cuda(_)) {
        println!(
            "training-mode batch norm on the GPU: {}",
            if ops::own_gpu_bn() {
                "our kernels (PODGPU_GPU_BN=own)"
            } else {
                "cuDNN (PODGPU_GPU_BN=own for ours)"
            }
        );
    }
    let clock = Clock::for_device(device)?;
    let copy = copy_bandwidth(device, &clock, &settings)?;
    let copy_what = match device {
        Device::Cpu => "parallel memcpy",
        Device::Cuda(_) => "device-to-device copy",
    };
    println!(
        "{copy_what} of 256 MiB: {:.1} GB/s (bytes read + written)",
        copy / 1e9
    );
    let wanted =
        |name: &str| args.only.is_empty() || args.only.iter().any(|w| name.contains(w.as_str()));
    let mut t = Table::new(&["kernel", "size", "µs", "GB/s", "% of copy", "check"]);
    let mut results = Vec::new();
    let mut failed = false;
    for c in cases(b, args.dim, args.classes) {
        if !wanted(c.name) {
            continue;
        }
        let inputs = (c.make)(device, DType::F32);
        let reference = {
            let x = (c.make)(Device::Cpu, DType::F64);
            (c.run)(&x)
        };
        let outputs = (c.run)(&inputs);
        let bytes = traffic(&inputs, &outputs);
        let chk: CheckResult = if c.indices {
            check_outputs(&decode(outputs), &decode(reference), c.tol)
        } else {
            check_outputs(&outputs, &reference, c.tol)
        };
        failed |= !chk.ok();
        let st = clock.measure(&settings, || drop((c.run)(&inputs)));
        let gbs = bytes / st.median / 1e9;
        // One line per case as it finishes, so a run stopped by a time limit keeps what it measured.
        println!(
            "  {:<28} {:>9} µs {:>8.1} GB/s  {}",
            c.name,
            table::num(st.us()),
            gbs,
            chk.cell()
        );
        t.row(vec![
            c.name.into(),
            c.size.clone(),
            table::num(st.us()),
            table::num(gbs),
            format!("{:.0}%", 100.0 * gbs * 1e9 / copy),
            chk.cell(),
        ]);
        results.push(serde_json::json!({
            "name": c.name, "size": c.size, "us": st.us(), "bytes": bytes, "gb_per_s": gbs,
            "fraction_of_copy": gbs * 1e9 / copy, "check": chk.to_json(), "time": st.to_json(),
        }));
    }
    if wanted("sgd") || wanted("SGD") {
        let (mut row, json, ok) = sgd_case(device, &clock, &settings)?;
        failed |= !ok;
        let gbs: f64 = json["gb_per_s"].as_f64().unwrap_or(f64::NAN);
        row.insert(4, format!("{:.0}%", 100.0 * gbs * 1e9 / copy));
        t.row(row);
        results.push(json);
    }
    println!(
        "\nkernels at batch {b} ({}; median per call, output allocation included; bytes = inputs + \
         outputs once; copy = {:.1} GB/s):\n{t}",
        clock.name(),
        copy / 1e9
    );
    bench::print_json(
        "kernels",
        device,
        serde_json::json!({
            "device": device.to_string(),
            "batch": b, "dim": args.dim, "classes": args.classes,
            "copy_gb_per_s": copy / 1e9, "copy": copy_what,
            "results": results,
        }),
    );
    if failed {
        bail!("a kernel did not match the CPU reference (see the check column)");
    }
    Ok(())
}
