//! Shared pieces of the `bench-*` binaries (issue 6): timing (CUDA events on a GPU, the wall clock
//! on the CPU, median of many samples after warm-up), result checks against the CPU reference,
//! aligned tables and the one JSON line each binary ends with, FLOP counts of the networks, and
//! peak-memory readings.
//!
//! Every binary takes the same [`CommonArgs`] (`--device`, `--threads`, `--warmup`, `--samples`,
//! `--min-sample-ms`). With `--device auto` (the default) on a machine without a usable GPU the
//! benchmarks run on the CPU and the GPU parts print `GPU: skipped (why)`.

pub mod check;
pub mod flops;
pub mod memory;
pub mod table;
pub mod timing;

pub use check::{check_outputs, CheckResult};
pub use flops::{conv_flops, gemm_flops, StepFlops};
pub use table::Table;
pub use timing::{Clock, Settings, Stats};

use crate::tensor::Device;
use anyhow::Result;

/// Options every `bench-*` binary accepts.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// auto (the GPU when usable, else the CPU), cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (rayon); default: all cores
    #[arg(long)]
    pub threads: Option<usize>,
    /// Untimed runs before measuring
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed samples; the median is reported
    #[arg(long, default_value_t = 15)]
    pub samples: usize,
    /// Each sample repeats the operation until it lasts at least this long (milliseconds)
    #[arg(long, default_value_t = 20.0)]
    pub min_sample_ms: f64,
    /// Stop sampling one case after this many seconds (at least 3 samples are always taken)
    #[arg(long, default_value_t = 10.0)]
    pub max_case_s: f64,
}

impl CommonArgs {
    /// Sizes the rayon pool, resolves `--device` and says which clock is used. On `auto` without a
    /// GPU it prints `GPU: skipped (why)`.
    pub fn setup(&self) -> Result<Device> {
        if self.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        // Fails only when the pool already exists (then its size stays). The benchmark's main
        // thread joins the pool, as the `podgpu` program's does in training; 0 = rayon's default.
        crate::cpu::size_pool_with_caller(self.threads.unwrap_or(0));
        let (device, note) = crate::device::select(&self.device)?;
        if let Some(note) = note {
            println!("GPU: skipped ({note})");
        }
        Ok(device)
    }

    pub fn settings(&self) -> Settings {
        Settings {
            warmup: self.warmup,
            samples: self.samples.max(3),
            min_sample_s: self.min_sample_ms / 1e3,
            max_case_s: self.max_case_s,
        }
    }
}

/// What the JSON lines say about the machine: CPU model, cores, rayon threads, and the GPU.
pub fn machine(device: Device) -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let gpu = match device {
        Device::Cuda(i) => crate::cuda::Gpu::get(i).ok().map(|g| {
            serde_json::json!({
                "name": g.info.name,
                "compute_capability": format!("{}.{}", g.info.compute_capability.0, g.info.compute_capability.1),
                "multiprocessors": g.info.multiprocessors,
                "memory_bytes": g.info.total_memory,
                "driver_api": g.info.driver_version,
            })
        }),
        Device::Cpu => None,
    };
    serde_json::json!({
        "cpu": cpu,
        "cores": cores,
        "threads": rayon::current_num_threads(),
        "gpu": gpu,
    })
}

/// One line describing where a benchmark runs, printed above its table.
pub fn describe(device: Device) -> String {
    let m = machine(device);
    let host = format!(
        "{} ({} cores, {} rayon threads)",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["threads"]
    );
    match device {
        Device::Cpu => format!("device: CPU, {host}; timing: wall clock"),
        Device::Cuda(i) => format!(
            "device: cuda:{i} {} ; host {host}; timing: CUDA events",
            m["gpu"]["name"].as_str().unwrap_or("?")
        ),
    }
}

/// Prints the closing JSON line of a benchmark: `{"bench": name, "machine": …, …fields}`.
pub fn print_json(name: &str, device: Device, mut fields: serde_json::Value) {
    if let Some(obj) = fields.as_object_mut() {
        obj.insert("bench".into(), name.into());
        obj.insert("machine".into(), machine(device));
    }
    println!("{fields}");
}

/// Ends a benchmark binary: prints `error: …` (with its causes) and exits with status 1 on an
/// error, as `podgpu` does, instead of a debug dump of the error.
pub fn exit_on_error(result: Result<()>) {
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
