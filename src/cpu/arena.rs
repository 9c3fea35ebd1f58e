//! Reuse of large activation buffers between training steps on the CPU.
//!
//! Every step allocates the same activations, gradients and im2col scratch again, each a few MiB.
//! glibc serves blocks above its mmap threshold (128 KiB, raised on the fly only up to the size of the
//! largest block freed so far) with a fresh `mmap` and returns them with `munmap` when freed, so each
//! step page-faults and the kernel zeroes every page of every big buffer again (≈ 4% of a ResNet18
//! step in perf, plus the `memset` of `vec![0; n]` on top). Raising the threshold to glibc's maximum
//! and never trimming the heap turns glibc's heap into the arena: a freed activation goes back to a
//! free list and the next step's allocation of the same size takes it, already mapped. The peak
//! stays what the live tensors need (freed blocks are reused, not added to), which bench-step's
//! peak-memory column checks.
//!
//! `PODGPU_CPU_KEEP_BUFFERS=0` leaves glibc's defaults (to measure the difference). Other C
//! libraries: nothing to set, nothing done.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// The environment variable that turns buffer reuse off (`0`).
pub const KEEP_BUFFERS_ENV: &str = "PODGPU_CPU_KEEP_BUFFERS";

/// glibc's largest mmap threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`, 4 MiB × 8):
/// larger values are refused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;

/// Sets the allocator up once per process (a no-op after the first call, and where reuse is off or
/// the C library is not glibc). Returns whether buffers are kept.
pub fn keep_freed_buffers() -> bool {
    static ONCE: Once = Once::new();
    static KEPT: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        let off = std::env::var(KEEP_BUFFERS_ENV).is_ok_and(|v| v.trim() == "0");
        if off {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is called once, before the worker
        // threads of a step allocate (Once), and glibc serialises it against allocations anyway.
        unsafe {
            let ok_mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1;
            let ok_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1;
            KEPT.store(ok_mmap && ok_trim, Ordering::Relaxed);
        }
    });
    KEPT.load(Ordering::Relaxed)
}

/// A vector of `len` elements whose contents are not initialised: for outputs and scratch that a
/// kernel overwrites completely (a GEMM with beta = 0, im2col, a gather), so that no `memset` runs
/// before them (`vec![0; n]` from a reused heap block is a `memset` of the whole buffer: 7% of a
/// ResNet18 step in perf). candle's CPU backend allocates its outputs the same way.
///
/// # Safety
/// Every element must be written before it is read, and the vector must not be dropped while a
/// reader could still see unwritten elements. `T` is a plain float (`Elem`: f32 or f64), with no
/// drop glue and no invalid bit patterns once written.
// The lint guards against reading the uninitialised elements; the contract above forbids exactly that
// (no element is read before a kernel writes it, so no uninitialised float is ever produced).
#[allow(clippy::uninit_vec)]
pub unsafe fn vec_for_overwrite<T: crate::tensor::Elem>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: capacity is `len`; the caller writes every element before reading it.
    unsafe { v.set_len(len) };
    v
}

/// Sets `v`'s length to `len` without initialising new elements (see `vec_for_overwrite`): scratch
/// that the caller overwrites before reading.
///
/// # Safety
/// As `vec_for_overwrite`: every element up to `len` must be written before it is read.
#[allow(clippy::uninit_vec)]
pub unsafe fn resize_for_overwrite<T: crate::tensor::Elem>(v: &mut Vec<T>, len: usize) {
    if len > v.len() {
        v.reserve(len - v.len());
    }
    // SAFETY: capacity ≥ len; the caller writes every element before reading it.
    unsafe { v.set_len(len) };
}
