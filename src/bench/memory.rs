//! Peak memory: the process's peak resident set on the CPU (Linux `VmHWM`, reset through
//! `/proc/self/clear_refs`), the caching pool's peak bytes in use on a GPU.

use crate::cuda::Gpu;
use crate::tensor::Device;

/// Starts a new peak measurement.
pub fn reset_peak(device: Device) {
    match device {
        Device::Cpu => {
            // "5" resets the peak RSS to the current RSS (Linux ≥ 4.0); elsewhere the peak is the
            // process's whole-life peak, which the report then says.
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        Device::Cuda(i) => {
            if let Ok(g) = Gpu::get(i) {
                g.reset_peak_memory();
            }
        }
    }
}

/// Peak bytes since the last `reset_peak`: resident memory of the whole process on the CPU, tensor
/// memory in use (the pool's peak, not its cache) on a GPU. `None` when unknown.
pub fn peak_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let s = std::fs::read_to_string("/proc/self/status").ok()?;
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        }
        Device::Cuda(i) => Gpu::get(i)
            .ok()
            .map(|g| g.pool_stats().peak_bytes_in_use as u64),
    }
}

/// What `peak_bytes` measures on this device, for table headers and JSON.
pub fn peak_kind(device: Device) -> &'static str {
    match device {
        Device::Cpu => "peak resident set (process)",
        Device::Cuda(_) => "peak pool bytes in use (device)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_peak_covers_a_touched_allocation() {
        reset_peak(Device::Cpu);
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        if let Some(p) = peak_bytes(Device::Cpu) {
            assert!(p >= 64 << 20, "peak {p}");
        }
    }
}
