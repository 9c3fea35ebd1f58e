//! The CPU's direct convolutions (`cpu::conv_same`: stride-1 "same" 3×3 on AVX-512) against the
//! im2col path they replace, per ResNet layer shape, in one process: the two paths alternate within
//! every round (this machine's speed drifts between runs and even between processes, so paths
//! timed in separate runs are not comparable), and each figure is the fastest round's time of one
//! call on the whole batch, in process CPU time. Ends with a table and one JSON line.
//!
//! ```text
//! cargo run --release --bin bench-cpu-conv -- [--threads 1] [--batch 32] [--rounds 9]
//! taskset -c 0 target/release/bench-cpu-conv --threads 1     # one core: steadier figures
//! ```
//!
//! The shapes are the 3×3 convolutions of ResNet18-CIFAR at widths 16 and 64 (channels × plane:
//! 16×32², 32×16², 64×8², 128×4² and 64×32², 128×16², 256×8², 512×4²).

use anyhow::{bail, Result};
use clap::Parser;
use podgpu::bench::timing::process_cpu_s;
use podgpu::cpu::conv_same;
use podgpu::ops::{conv2d_bwd_data, conv2d_bwd_weight, conv2d_fwd, Conv2dSpec};
use podgpu::rng::Rng;
use podgpu::tensor::Tensor;

#[derive(Parser)]
#[command(about = "Time the CPU's direct 3×3 convolutions against the im2col path")]
struct Args {
    /// CPU threads (rayon); default: all cores
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Rounds per shape (each times both paths, all three passes); the fastest round counts
    #[arg(long, default_value_t = 9)]
    rounds: usize,
}

/// Channels (in = out) and plane side of each shape.
const SHAPES: [(usize, usize); 8] = [
    (16, 32),
    (32, 16),
    (64, 8),
    (128, 4),
    (64, 32),
    (128, 16),
    (256, 8),
    (512, 4),
];

fn timed(f: impl FnOnce() -> Tensor) -> f64 {
    let t = process_cpu_s();
    std::hint::black_box(f());
    process_cpu_s() - t
}

fn main() -> Result<()> {
    // A table piped into `head` ends quietly, without a panic trace.
    podgpu::cli::end_quietly_when_output_closes();
    let args = Args::parse();
    if args.batch == 0 || args.rounds == 0 {
        bail!("--batch and --rounds must be at least 1");
    }
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    conv_same::set_enabled(true);
    if !conv_same::available() {
        bail!(
            "the direct convolutions cannot run here: they need AVX-512 and the fast kernels \
             (unset PODGPU_CPU_KERNELS)"
        );
    }
    let threads = rayon::current_num_threads();
    let n = args.batch;
    let mut rng = Rng::new(1);
    let mut rows = Vec::new();
    println!(
        "direct 3×3 convolutions vs im2col, batch {n}, {threads} thread(s), fastest of {} rounds, \
         process CPU time per call (ms); ratio = im2col / direct",
        args.rounds
    );
    println!(
        "{:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6}",
        "channels",
        "plane",
        "fwd i2c",
        "direct",
        "ratio",
        "data i2c",
        "direct",
        "ratio",
        "filt i2c",
        "direct",
        "ratio"
    );
    for &(c, side) in &SHAPES {
        let spec = Conv2dSpec::new(1, 1);
        let (xs, ws) = ([n, c, side, side], [c, c, 3, 3]);
        let mut randn = |shape: &[usize]| {
            let v = (0..shape.iter().product::<usize>())
                .map(|_| rng.normal() as f32)
                .collect::<Vec<f32>>();
            Tensor::from_vec(shape, v)
        };
        let (x, w, dy) = (randn(&xs), randn(&ws), randn(&xs));
        // best[path][pass]: path 0 = im2col, 1 = direct.
        let mut best = [[f64::MAX; 3]; 2];
        for _ in 0..args.rounds {
            for (path, times) in best.iter_mut().enumerate() {
                conv_same::set_enabled(path == 1);
                let t = [
                    timed(|| conv2d_fwd(&x, &w, None, spec)),
                    timed(|| conv2d_bwd_data(&dy, &w, &xs, spec)),
                    timed(|| conv2d_bwd_weight(&x, &dy, &ws, spec)),
                ];
                for (b, t) in times.iter_mut().zip(t) {
                    *b = b.min(t);
                }
            }
        }
        conv_same::set_enabled(true);
        let ms = |s: f64| s * 1e3;
        println!(
            "{c:>8} {:>6} | {:>8.2} {:>8.2} {:>5.2}× | {:>8.2} {:>8.2} {:>5.2}× | {:>8.2} {:>8.2} {:>5.2}×",
            format!("{side}×{side}"),
            ms(best[0][0]),
            ms(best[1][0]),
            best[0][0] / best[1][0],
            ms(best[0][1]),
            ms(best[1][1]),
            best[0][1] / best[1][1],
            ms(best[0][2]),
            ms(best[1][2]),
            best[0][2] / best[1][2],
        );
        rows.push(serde_json::json!({
            "channels": c, "plane": side,
            "im2col_ms": [ms(best[0][0]), ms(best[0][1]), ms(best[0][2])],
            "direct_ms": [ms(best[1][0]), ms(best[1][1]), ms(best[1][2])],
        }));
    }
    println!(
        "(ops::conv keeps the im2col path for the weight gradient on planes smaller than 8×8 and \
         for the forward and backward-data from 512 input channels, where it measured faster: \
         there both columns time the im2col path)"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "cpu-conv", "batch": n, "threads": threads, "rounds": args.rounds,
            "passes": ["forward", "backward-data", "weight gradient"], "results": rows,
        })
    );
    Ok(())
}
