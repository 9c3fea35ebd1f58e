//! Choosing the device a computation runs on: `--device auto|cpu|cuda|cuda:N`.
//!
//! `auto` takes GPU 0 when the driver, a device and every library podgpu needs (NVRTC, cuBLAS,
//! cuBLASLt, cuDNN) are usable, else the CPU with a one-line note saying why. `cuda`/`cuda:N` fail
//! with an error naming what is missing instead of falling back. Nothing here panics: cudarc's
//! panicking loaders are only reached after the library checks passed.

use crate::cuda::libs::{self, Lib};
use crate::cuda::Gpu;
use crate::tensor::Device;
use anyhow::{bail, Result};

/// The libraries a GPU run needs besides the driver.
const GPU_LIBS: [Lib; 4] = [Lib::Nvrtc, Lib::Cublas, Lib::CublasLt, Lib::Cudnn];

/// Resolves a `--device` value. Returns the device and, for `auto` falling back to the CPU, a note
/// saying why (print it: users should know their GPU was not used).
pub fn select(spec: &str) -> Result<(Device, Option<String>)> {
    match parse(spec)? {
        Some(Device::Cpu) => Ok((Device::Cpu, None)),
        None => match usable_gpu(0) {
            Ok(()) => Ok((Device::Cuda(0), None)),
            Err(why) => Ok((
                Device::Cpu,
                Some(format!("using the CPU: no usable GPU ({why})")),
            )),
        },
        Some(Device::Cuda(i)) => cuda(i),
    }
}

/// The syntax of a `--device` value, without probing any hardware: `None` for `auto`.
pub fn parse(spec: &str) -> Result<Option<Device>> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "auto" => Ok(None),
        "cpu" => Ok(Some(Device::Cpu)),
        "cuda" | "gpu" => Ok(Some(Device::Cuda(0))),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Some(Device::Cuda(i))),
            _ => bail!("unknown device {spec:?}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

fn cuda(ordinal: usize) -> Result<(Device, Option<String>)> {
    match usable_gpu(ordinal) {
        Ok(()) => Ok((Device::Cuda(ordinal), None)),
        Err(why) => bail!(
            "--device cuda:{ordinal} is not usable: {why}; run with --device cpu (or auto) to use the CPU"
        ),
    }
}

/// Checks the driver, the device and every library, in that order; the error says what failed.
pub fn usable_gpu(ordinal: usize) -> std::result::Result<(), String> {
    let report = libs::ensure_loaded();
    if !report.has(Lib::Driver) {
        return Err(format!(
            "no CUDA driver; {}",
            report.missing_message(&[Lib::Driver])
        ));
    }
    let gpu = Gpu::get(ordinal)?;
    let missing: Vec<Lib> = GPU_LIBS
        .iter()
        .copied()
        .filter(|l| !report.has(*l))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} found, but {}",
            gpu.info.name,
            report.missing_message(&missing)
        ));
    }
    Ok(())
}

/// A multi-line description of the CUDA setup for `podgpu device` and tools/gpu-check.sh: the
/// device, the library versions the libraries report, then (after every library is open, as cudarc
/// opens it) the chosen files and every CUDA library file actually mapped, with its version. Never
/// panics.
pub fn describe() -> String {
    use std::fmt::Write as _;
    let report = libs::ensure_loaded();
    let mut s = String::new();
    match Gpu::get(0) {
        Ok(g) => {
            let i = &g.info;
            let _ = writeln!(
                s,
                "device cuda:0            {} (compute {}.{}, {} SMs, {:.1} GiB), driver API {}",
                i.name,
                i.compute_capability.0,
                i.compute_capability.1,
                i.multiprocessors,
                i.total_memory as f64 / (1u64 << 30) as f64,
                i.driver_version
            );
            match g.kernel_arch() {
                Ok(a) => {
                    let _ = writeln!(s, "kernels compiled for    {a}");
                }
                Err(e) => {
                    let _ = writeln!(s, "kernels: {e}");
                }
            }
            if report.has(Lib::Cublas) {
                match crate::cuda::blas::version(&g) {
                    Ok(v) => {
                        let _ = writeln!(s, "cuBLAS version           {v}");
                    }
                    Err(e) => {
                        let _ = writeln!(s, "cuBLAS: {e}");
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(s, "device: {e}");
        }
    }
    if let Ok((ma, mi)) = crate::cuda::nvrtc::version() {
        let _ = writeln!(s, "NVRTC version            {ma}.{mi}");
    }
    if let Ok(v) = crate::cuda::dnn::version() {
        let _ = writeln!(s, "cuDNN version            {v}");
    }
    libs::open_as_cudarc_does();
    s.push_str(&libs::describe_libraries());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_bad_specs() {
        assert_eq!(select("cpu").unwrap(), (Device::Cpu, None));
        assert_eq!(select(" CPU ").unwrap().0, Device::Cpu);
        let e = select("tpu").unwrap_err().to_string();
        assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        assert!(select("cuda:x").is_err());
    }

    #[test]
    fn device_names_parse() {
        assert_eq!(parse("auto").unwrap(), None);
        assert_eq!(parse("cpu").unwrap(), Some(Device::Cpu));
        assert_eq!(parse("cuda").unwrap(), Some(Device::Cuda(0)));
        assert_eq!(parse("cuda:3").unwrap(), Some(Device::Cuda(3)));
        assert!(parse("cuda:x").is_err());
    }
}
