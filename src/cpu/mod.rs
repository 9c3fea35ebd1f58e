//! Shared pieces of the CPU backend: parallel GEMM and the thresholds that decide when rayon is worth it.

pub mod arena;
pub mod bf16;
pub mod conv_same;
pub mod kernels;

use crate::tensor::Elem;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Deterministic mode (`podgpu train --deterministic`): every reduction over a batch is split into
/// chunks that do not depend on the thread count, so a seed gives bit-identical results on any
/// number of threads. Off by default because the fixed chunking can use fewer threads.
static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Turns deterministic mode on or off for the whole process.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(on, Ordering::Relaxed);
}

/// Whether deterministic mode is on (see `set_deterministic`).
pub fn deterministic() -> bool {
    DETERMINISTIC.load(Ordering::Relaxed)
}

/// Sizes rayon's global pool to `threads` (once per process; later calls keep the first size and
/// return false) with the calling thread as one of its workers, so that a parallel op called from
/// it runs there and on the other workers, instead of being handed to a pool thread while the
/// caller waits. With one thread that is the difference between every op running on the thread
/// that holds its data and every op moving to the pool's thread and back: an unpinned one-thread
/// ResNet18 step went from 126–140 ms to 94–110 ms (BENCHMARKS.md, issue 15), since the two
/// threads were often on different cores with different caches.
///
/// Only for a caller that never blocks outside rayon while another thread needs the global pool,
/// and that lives as long as the process: such a thread's work would wait for the caller (with
/// one thread, forever). So the data loaders take a private pool once this has run
/// (`caller_joined_pool`), ranks that run as threads (`dist::local`) size the pool without it, and
/// the trainer does this only in a program that said so (`let_main_thread_join_pool`: the
/// `podgpu` binary and the benchmarks, not the test harness, whose test threads end).
pub fn size_pool_with_caller(threads: usize) -> bool {
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .build_global()
        .is_ok();
    if built {
        CALLER_JOINED_POOL.store(true, Ordering::Relaxed);
    }
    built
}

/// Whether `size_pool_with_caller` built the global pool (a thread of it may then block outside
/// rayon, so other threads should not queue work on it and wait).
pub fn caller_joined_pool() -> bool {
    CALLER_JOINED_POOL.load(Ordering::Relaxed)
}

static CALLER_JOINED_POOL: AtomicBool = AtomicBool::new(false);

/// Called by a program's main thread, which lives as long as the process: the trainer may then size
/// the pool with that thread in it (`size_pool_with_caller`).
pub fn let_main_thread_join_pool() {
    MAIN_MAY_JOIN_POOL.store(true, Ordering::Relaxed);
}

/// Whether `let_main_thread_join_pool` was called.
pub fn main_thread_may_join_pool() -> bool {
    MAIN_MAY_JOIN_POOL.load(Ordering::Relaxed)
}

static MAIN_MAY_JOIN_POOL: AtomicBool = AtomicBool::new(false);

/// Below this many multiply-adds a loop runs on one thread: rayon's fork/join costs more than it saves.
pub const PAR_MIN_WORK: usize = 1 << 15;

/// Row-major C[m×n] = alpha·op(A)·op(B) + beta·C, with op = transpose when the flag says so.
/// A is stored m×k (or k×m when `ta`), B is k×n (or n×k when `tb`). Rows of C are split over rayon;
/// every element is the same dot product in the same order however the rows are split (the split only
/// changes which thread computes it), so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Elem>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    beta: T,
    c: &mut [T],
) {
    assert_eq!(
        a.len(),
        m * k,
        "gemm: A has {} values, expected {m}×{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "gemm: B has {} values, expected {k}×{n}",
        b.len()
    );
    assert_eq!(
        c.len(),
        m * n,
        "gemm: C has {} values, expected {m}×{n}",
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    let work = m * n * k.max(1);
    let threads = rayon::current_num_threads();
    if work < PAR_MIN_WORK * 4 || threads == 1 || m < 2 * threads {
        T::gemm(
            m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, n as isize, 1,
        );
        return;
    }
    // Split C (and A) by row blocks; each block is an independent GEMM.
    let rows = m.div_ceil(threads * 2).max(8);
    c.par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(blk, cb)| {
            let r0 = blk * rows;
            let mb = cb.len() / n;
            let a_off = if ta { r0 } else { r0 * k };
            T::gemm(
                mb,
                k,
                n,
                alpha,
                &a[a_off..],
                rsa,
                csa,
                b,
                rsb,
                csb,
                beta,
                cb,
                n as isize,
                1,
            );
        });
}

/// Runs `f(i, chunk)` over equal chunks of `out` in parallel when the work is large enough.
pub fn par_chunks<T: Send, F>(out: &mut [T], chunk: usize, work_per_chunk: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Send + Sync,
{
    if chunk == 0 {
        return;
    }
    if out.len() / chunk * work_per_chunk < PAR_MIN_WORK {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// Zeroes the few entries at a row's edge that a tap reads from the padding (at most the padding,
/// usually one): a store or two in place, where `fill` would call `memset` for every row of every
/// tap (millions of calls a step, 3% of a ResNet18 step in perf).
#[inline(always)]
pub fn zero_edge<T: Elem>(edge: &mut [T]) {
    match edge.len() {
        0 => {}
        1 => edge[0] = T::zero(),
        2 => {
            edge[0] = T::zero();
            edge[1] = T::zero();
        }
        _ => edge.fill(T::zero()),
    }
}
