//! Launchers of the trainer's step ledger kernels (cuda/guard.cu): an epoch's running sums and the
//! numerics guard kept on the device, so that a training step never waits for the host.
//!
//! The ledger is a GPU tensor of 32-bit words (`layout`) holding f64/i64/i32/f32 fields bit for
//! bit; the trainer's `train::ledger::StepLedger` owns it, runs the host versions of these kernels on
//! the CPU, and decodes the words after one read. Nothing here synchronises.

use super::launch::{check, func, gpu_of, one_block, NULL, THREADS};
use super::loss_kernels;
use super::{buf, Gpu};
use crate::tensor::Tensor;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Word offsets of the ledger's fields (the `L_*` defines of cuda/guard.cu).
pub mod layout {
    /// f64: Σ (f64)loss · batch size.
    pub const LOSS_SUM: usize = 0;
    /// f64: Σ of the δ schedule's per-step norm sums.
    pub const NORM_SUM: usize = 2;
    /// i64: correctly classified training images.
    pub const CORRECT: usize = 4;
    /// i64: the 1-based step whose loss or gradient was first not finite; 0 while none was.
    pub const BAD_STEP: usize = 6;
    /// i32: 1 from that step on (sticky); SGD skips while it is set.
    pub const FLAG: usize = 8;
    /// f32: the loss of that step.
    pub const BAD_LOSS: usize = 9;
    /// f32: the latest step's loss.
    pub const LAST_LOSS: usize = 10;
    /// i32: how many tensors each step guards (the gradients, then the loss).
    pub const ENTRIES: usize = 11;
    /// u32 [2 · entries]: NaN and ±inf counts of every guarded tensor at the first bad step.
    pub const RECORD: usize = 12;

    /// The ledger's length in words for `entries` guarded tensors.
    pub fn words(entries: usize) -> usize {
        RECORD + 2 * entries
    }
}

/// One row of `guard_count_f32`'s table; the layout matches `struct GuardEntry` in cuda/guard.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct GuardEntry {
    p: u64,
    n: i64,
}

/// A zeroed i32 counter [1] for `add_step` (one per ledger; the kernel resets it each step).
pub fn counter(gpu: &Arc<Gpu>) -> Tensor {
    loss_kernels::accumulator(gpu)
}

/// One step's statistics into `ledger`: loss · b, the correct predictions of `logits` against the
/// i32 `labels`, and Σ `norms` (summed in f32 on the device, as `loss::sum_row_norms` does on a GPU).
/// `correct` is the ledger's i32 counter (`counter`).
pub fn add_step(
    ledger: &Tensor,
    correct: &Tensor,
    loss: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    norms: &Tensor,
    batch: usize,
) {
    let gpu = gpu_of(ledger);
    loss_kernels::argmax_rows(logits, Some(labels), Some(correct));
    let norm_sum = loss_kernels::sum(norms);
    let f = func(&gpu, "guard", "ledger_add_step");
    let b = batch as f64;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(buf(ledger).raw())
        .arg(buf(correct).raw())
        .arg(buf(loss).raw())
        .arg(buf(&norm_sum).raw())
        .arg(&b);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches ledger_add_step(unsigned*, int*, const float*, const float*, double); the
    // ledger holds at least `layout::RECORD` words, the others one element each.
    check(unsafe { l.launch(one) }, "ledger_add_step");
}

/// The numerics guard of one step: counts the NaN and ±inf values of every tensor in `guarded`
/// (the gradients, then the loss as the last entry; `None` for a parameter without a gradient this
/// step) into `counts` [2 · entries], then records the counts, `step` and the loss in `ledger` and
/// sets its flag when a count is non-zero and no earlier step was bad. Two launches and one table
/// upload, no wait.
///
/// `step_dev`: the device address of an i64 that overrides `step` (a CUDA graph's step scalars,
/// `cuda::graph::StepScalars`).
pub fn guard(
    ledger: &Tensor,
    counts: &Tensor,
    guarded: &[Option<&Tensor>],
    step: u64,
    step_dev: Option<u64>,
) {
    let Some(Some(loss)) = guarded.last() else {
        panic!("guard: the loss must be the table's last entry")
    };
    let gpu = gpu_of(ledger);
    let count = guarded.len();
    assert!(
        count <= 65_535,
        "guard: {count} tensors exceed one launch's grid"
    );
    assert!(
        counts.numel() >= 2 * count && ledger.numel() >= layout::words(count),
        "guard: the ledger was made for fewer tensors"
    );
    let mut max_n = 0usize;
    let table: Vec<GuardEntry> = guarded
        .iter()
        .map(|t| match t {
            Some(t) => {
                max_n = max_n.max(t.numel());
                GuardEntry {
                    p: buf(t).device_ptr(),
                    n: t.numel() as i64,
                }
            }
            None => GuardEntry { p: 0, n: 0 },
        })
        .collect();
    let dev_table = gpu.upload_constant(bytemuck::cast_slice(&table).to_vec());
    let blocks_x = max_n
        .div_ceil(THREADS as usize)
        .clamp(1, gpu.info.multiprocessors.max(1) * 4);
    let cfg = LaunchConfig {
        grid_dim: (blocks_x as u32, count as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let c32 = count as i32;
    let f = func(&gpu, "guard", "guard_count_f32");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dev_table.raw()).arg(&c32).arg(buf(counts).raw());
    // SAFETY: matches guard_count_f32(const GuardEntry*, int, unsigned*); every table pointer is a
    // live buffer of n floats (kept alive by `guarded` until queued, then by stream order) or null
    // with n = 0; counts holds 2·count words.
    check(unsafe { l.launch(cfg) }, "guard_count_f32");
    let f = func(&gpu, "guard", "guard_finalize");
    let s64 = step as i64;
    let step_dev = step_dev.unwrap_or(NULL);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(buf(ledger).raw())
        .arg(buf(counts).raw())
        .arg(&c32)
        .arg(&s64)
        .arg(&step_dev)
        .arg(buf(loss).raw());
    // SAFETY: matches guard_finalize(unsigned*, unsigned*, int, i64, const i64*, const float*); the
    // ledger has `layout::words(count)` words, the loss at least one element; `step_dev` is null
    // or the address of a live i64 on this GPU.
    check(unsafe { l.launch(one_block()) }, "guard_finalize");
}

/// The device address of the ledger's flag word (what `cuda::optim::sgd_step_guarded` skips on).
pub fn flag_ptr(ledger: &Tensor) -> u64 {
    buf(ledger).device_ptr() + 4 * layout::FLAG as u64
}

#[cfg(test)]
mod tests {
    use super::layout;

    #[test]
    fn entry_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<super::GuardEntry>(), 16);
    }

    #[test]
    fn the_layout_matches_the_kernel_defines() {
        let src = include_str!("../../cuda/guard.cu");
        for (name, word) in [
            ("L_LOSS_SUM", layout::LOSS_SUM),
            ("L_NORM_SUM", layout::NORM_SUM),
            ("L_CORRECT", layout::CORRECT),
            ("L_BAD_STEP", layout::BAD_STEP),
            ("L_FLAG", layout::FLAG),
            ("L_BAD_LOSS", layout::BAD_LOSS),
            ("L_LAST_LOSS", layout::LAST_LOSS),
            ("L_ENTRIES", layout::ENTRIES),
            ("L_RECORD", layout::RECORD),
        ] {
            assert!(
                src.contains(&format!("#define {name} {word} ")),
                "cuda/guard.cu: {name} is not {word}"
            );
        }
        // The 8-byte fields are 8-byte aligned in a pool block.
        for w in [
            layout::LOSS_SUM,
            layout::NORM_SUM,
            layout::CORRECT,
            layout::BAD_STEP,
        ] {
            assert_eq!(w % 2, 0);
        }
    }
}
