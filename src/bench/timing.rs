//! Timing: the median of many samples after warm-up.
//!
//! A sample repeats the operation `reps` times, chosen so that one sample lasts at least
//! `min_sample_s`: short kernels are then timed over many back-to-back launches (what a training step
//! does) rather than one launch plus the timer's own overhead. On a GPU a sample is the time between
//! two CUDA events recorded on podgpu's stream around the repetitions, so it measures the device's
//! timeline (kernels, copies and the gaps between them), not the host's; on the CPU it is the wall
//! clock.

use crate::cuda::Gpu;
use crate::tensor::Device;
use anyhow::{anyhow, Result};
use std::sync::Arc;
use std::time::Instant;

/// How one case is measured.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub warmup: usize,
    pub samples: usize,
    pub min_sample_s: f64,
    /// Sampling stops after this long (always at least three samples).
    pub max_case_s: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            warmup: 3,
            samples: 15,
            min_sample_s: 0.02,
            max_case_s: 10.0,
        }
    }
}

/// Per-call times of one case, in seconds.
#[derive(Clone, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Samples taken and calls per sample.
    pub samples: usize,
    pub reps: usize,
}

impl Stats {
    /// From per-call times of each sample.
    pub fn from_samples(mut t: Vec<f64>, reps: usize) -> Stats {
        assert!(!t.is_empty(), "no samples");
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let median = if n % 2 == 1 {
            t[n / 2]
        } else {
            0.5 * (t[n / 2 - 1] + t[n / 2])
        };
        Stats {
            median,
            min: t[0],
            max: t[n - 1],
            samples: n,
            reps,
        }
    }

    pub fn ms(&self) -> f64 {
        self.median * 1e3
    }

    pub fn us(&self) -> f64 {
        self.median * 1e6
    }

    /// The spread (max − min) / median, to judge how noisy a number is.
    pub fn spread(&self) -> f64 {
        (self.max - self.min) / self.median
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "samples": self.samples,
            "reps": self.reps,
        })
    }
}

/// Where times come from.
#[derive(Clone)]
pub enum Clock {
    /// The wall clock (CPU work).
    Host,
    /// CUDA events on the device's stream.
    Cuda(Arc<Gpu>),
}

/// `PODGPU_BENCH_CLOCK=cpu`: the host clock measures the CPU time the process is charged instead of
/// the wall clock. On a machine that other jobs share, with one thread (`--threads 1`), that is what
/// the work itself costs; with several threads it also counts time spent waiting at a barrier.
fn host_cpu_clock() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PODGPU_BENCH_CLOCK").is_ok_and(|v| v.trim() == "cpu"))
}

/// CPU seconds (user + system) of this process so far.
pub fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

impl Clock {
    pub fn for_device(device: Device) -> Result<Clock> {
        Ok(match device {
            Device::Cpu => Clock::Host,
            Device::Cuda(i) => Clock::Cuda(Gpu::get(i).map_err(|e| anyhow!(e))?),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Clock::Host if host_cpu_clock() => "process CPU time (PODGPU_BENCH_CLOCK=cpu)",
            Clock::Host => "wall clock",
            Clock::Cuda(_) => "CUDA events",
        }
    }

    /// Waits for queued device work (no-op on the host).
    pub fn sync(&self) {
        if let Clock::Cuda(g) = self {
            g.synchronize()
                .unwrap_or_else(|e| panic!("benchmark: device error: {e}"));
        }
    }

    /// Seconds for `reps` calls of `f`, back to back.
    pub fn time<F: FnMut()>(&self, reps: usize, f: &mut F) -> f64 {
        match self {
            Clock::Host if host_cpu_clock() => {
                let t0 = process_cpu_s();
                for _ in 0..reps {
                    f();
                }
                process_cpu_s() - t0
            }
            Clock::Host => {
                let t0 = Instant::now();
                for _ in 0..reps {
                    f();
                }
                t0.elapsed().as_secs_f64()
            }
            Clock::Cuda(g) => {
                use cudarc::driver::sys::CUevent_flags;
                let ev = || {
                    g.stream
                        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .unwrap_or_else(|e| panic!("benchmark: cuEventRecord: {e}"))
                };
                let start = ev();
                for _ in 0..reps {
                    f();
                }
                let end = ev();
                let ms = start
                    .elapsed_ms(&end)
                    .unwrap_or_else(|e| panic!("benchmark: cuEventElapsedTime: {e}"));
                ms as f64 / 1e3
            }
        }
    }

    /// Warm-up, then the median of up to `s.samples` samples of `reps` calls each (`reps` sized so
    /// that a sample lasts at least `s.min_sample_s`).
    pub fn measure<F: FnMut()>(&self, s: &Settings, mut f: F) -> Stats {
        for _ in 0..s.warmup.max(1) {
            f();
        }
        self.sync();
        // One call to size the samples.
        let one = self.time(1, &mut f).max(1e-7);
        let reps = ((s.min_sample_s / one).ceil() as usize).clamp(1, 100_000);
        let started = Instant::now();
        let mut t = Vec::with_capacity(s.samples);
        while t.len() < s.samples.max(1) {
            t.push(self.time(reps, &mut f) / reps as f64);
            if t.len() >= 3 && started.elapsed().as_secs_f64() > s.max_case_s {
                break;
            }
        }
        Stats::from_samples(t, reps)
    }

    /// Times `steps` consecutive calls one by one after `warmup` calls: for whole training steps,
    /// long enough on their own. On a GPU an event is recorded after each call and the times are
    /// read after the last one, so the host is never made to wait inside the measured run (what a
    /// training loop without per-step reads sees). Returns the stats and every call's seconds.
    pub fn measure_steps<F: FnMut()>(
        &self,
        warmup: usize,
        steps: usize,
        mut f: F,
    ) -> (Stats, Vec<f64>) {
        for _ in 0..warmup {
            f();
        }
        self.sync();
        let steps = steps.max(1);
        let t: Vec<f64> = match self {
            Clock::Host => (0..steps)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64()
                })
                .collect(),
            Clock::Cuda(g) => {
                use cudarc::driver::sys::CUevent_flags;
                let ev = || {
                    g.stream
                        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .unwrap_or_else(|e| panic!("benchmark: cuEventRecord: {e}"))
                };
                let mut events = vec![ev()];
                for _ in 0..steps {
                    f();
                    events.push(ev());
                }
                events
                    .windows(2)
                    .map(|w| {
                        let ms = w[0]
                            .elapsed_ms(&w[1])
                            .unwrap_or_else(|e| panic!("benchmark: cuEventElapsedTime: {e}"));
                        ms as f64 / 1e3
                    })
                    .collect()
            }
        };
        (Stats::from_samples(t.clone(), 1), t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_sample_counts() {
        let s = Stats::from_samples(vec![3.0, 1.0, 2.0], 1);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stats::from_samples(vec![4.0, 1.0, 3.0, 2.0], 5);
        assert_eq!(s.median, 2.5);
        assert_eq!(s.reps, 5);
    }

    #[test]
    fn host_clock_counts_warmup_sizing_and_samples() {
        let mut calls = 0usize;
        let s = Settings {
            warmup: 1,
            samples: 3,
            min_sample_s: 0.002,
            max_case_s: 1.0,
        };
        let st = Clock::Host.measure(&s, || {
            calls += 1;
            std::thread::sleep(std::time::Duration::from_micros(200));
        });
        assert_eq!(calls, 1 + 1 + 3 * st.reps);
        // A sleep never returns early, so the per-call time is at least its length.
        assert!(st.median >= 200e-6, "median {}", st.median);
    }
}
