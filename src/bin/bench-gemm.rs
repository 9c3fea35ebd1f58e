//! The matrix products of the POD head at training sizes: FC1 (B×2048 → n; forward, backward-data,
//! backward-weight), the PEDCC head's logits (B×n · n×K) and the SC loss's products (the B×B Gram
//! DDᵀ and G·D; the n×n DᵀD and D·C of the other form), for n ∈ {256, 512, 2048} at B = 128, per
//! math mode (fp32, and tf32 on a GPU): TFLOP/s, as a table and one JSON line. Each product is first
//! checked against the f64 CPU result.
//!
//! ```text
//! cargo run --release --bin bench-gemm -- [--dims 256,512,2048] [--batch 128] [--device cpu]
//! ```

use anyhow::{bail, Result};
use clap::Parser;
use podgpu::bench::{self, check_outputs, gemm_flops, table, Clock, Table};
use podgpu::cuda::{self, MathMode};
use podgpu::gradcheck::randn;
use podgpu::ops;
use podgpu::rng::Rng;
use podgpu::tensor::{DType, Device};

#[derive(Parser)]
#[command(about = "Time the GEMMs of FC1, the PEDCC head and the SC loss")]
struct Args {
    /// Latent dimensions n
    #[arg(long, value_delimiter = ',', default_value = "256,512,2048")]
    dims: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Features entering FC1 (2048 for ResNet50, 512 for ResNet18)
    #[arg(long, default_value_t = 2048)]
    pooled: usize,
    /// Math modes: fp32, tf32 (GPU only)
    #[arg(long, value_delimiter = ',', default_value = "fp32,tf32")]
    modes: Vec<String>,
    #[command(flatten)]
    common: bench::CommonArgs,
}

/// One product op(A)·op(B) with A stored [m, k] (or [k, m] when `ta`) and B [k, n] (or [n, k]).
struct Gemm {
    what: &'static str,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
}

/// The class count whose recommended latent dim is n (the paper's Table III): 10 → 256,
/// 100 → 512, 1000 → 2048.
fn classes_for(n: usize) -> usize {
    match n {
        0..=256 => 10,
        257..=1024 => 100,
        _ => 1000,
    }
}

fn products(b: usize, pooled: usize, n: usize) -> Vec<Gemm> {
    let k = classes_for(n);
    let g = |what, m, k, n, ta, tb| Gemm {
        what,
        m,
        k,
        n,
        ta,
        tb,
    };
    vec![
        g("FC1 forward x·Wᵀ", b, pooled, n, false, true),
        g("FC1 backward-data dy·W", b, n, pooled, false, false),
        g("FC1 backward-weight dyᵀ·x", n, b, pooled, true, false),
        g("head logits x·P (K classes)", b, n, k, false, false),
        g("SC Gram D·Dᵀ", b, n, b, false, true),
        g("SC G·D", b, b, n, false, false),
        g("SC DᵀD (n×n form)", n, b, n, true, false),
        g("SC D·C (n×n form)", b, n, n, false, false),
    ]
}

fn stored(rows: usize, cols: usize, t: bool) -> [usize; 2] {
    if t {
        [cols, rows]
    } else {
        [rows, cols]
    }
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
    println!("{}", bench::describe(device));
    let mut modes = Vec::new();
    for m in &args.modes {
        match (m.as_str(), device) {
            ("fp32", _) => modes.push(MathMode::Fp32),
            ("tf32", Device::Cuda(_)) => modes.push(MathMode::Tf32),
            ("tf32", Device::Cpu) => println!("tf32: skipped (GPU only)"),
            (other, _) => bail!("unknown math mode {other:?}: expected fp32 or tf32"),
        }
    }
    let clock = Clock::for_device(device)?;
    let mut rng = Rng::new(7);
    let mut t = Table::new(&["n", "product", "m×k×n", "mode", "µs", "TFLOP/s", "check"]);
    let mut results = Vec::new();
    let mut failed = false;
    for &n in &args.dims {
        for p in products(args.batch, args.pooled, n) {
            let a64 = randn(&stored(p.m, p.k, p.ta), &mut rng);
            let b64 = randn(&stored(p.k, p.n, p.tb), &mut rng);
            let want = ops::matmul_fwd(&a64, p.ta, &b64, p.tb);
            let a = a64.to_dtype(DType::F32).to_device(device);
            let b = b64.to_dtype(DType::F32).to_device(device);
            for &mode in &modes {
                cuda::set_math_mode(mode);
                let (name, tol) = match mode {
                    MathMode::Fp32 => ("fp32", 1e-4),
                    MathMode::Tf32 => ("tf32", 5e-3),
                };
                let got = ops::matmul_fwd(&a, p.ta, &b, p.tb);
                let chk = check_outputs(&[got], std::slice::from_ref(&want), tol);
                failed |= !chk.ok();
                let st = clock.measure(&settings, || drop(ops::matmul_fwd(&a, p.ta, &b, p.tb)));
                let flops = gemm_flops(p.m, p.k, p.n);
                let tflops = flops / st.median / 1e12;
                t.row(vec![
                    n.to_string(),
                    p.what.into(),
                    format!("{}×{}×{}", p.m, p.k, p.n),
                    name.into(),
                    table::num(st.us()),
                    format!("{tflops:.3}"),
                    chk.cell(),
                ]);
                results.push(serde_json::json!({
                    "dim": n, "product": p.what, "m": p.m, "k": p.k, "n": p.n, "ta": p.ta, "tb": p.tb,
                    "mode": name, "us": st.us(), "tflops": tflops, "check": chk.to_json(),
                    "time": st.to_json(),
                }));
            }
            // Tensors of the largest shapes are freed before the next product.
            drop((a, b, want));
        }
    }
    cuda::set_math_mode(MathMode::Fp32);
    println!(
        "\nGEMMs at batch {} ({}; median per call; checked against f64 on the CPU):\n{t}",
        args.batch,
        clock.name()
    );
    bench::print_json(
        "gemm",
        device,
        serde_json::json!({
            "device": device.to_string(),
            "batch": args.batch,
            "pooled": args.pooled,
            "results": results,
        }),
    );
    if failed {
        bail!("a product did not match the CPU reference (see the check column)");
    }
    Ok(())
}
