//! Small helpers shared by the launchers: launch geometry, kernel lookup, error handling.
//!
//! Launchers return `Tensor`s (the op dispatch has no error path), so a failing CUDA call inside one
//! panics with a message naming the kernel: it means a broken device or a bug, not bad user input
//! (user input is validated before the dispatch).

use super::{buf, Gpu};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{CudaFunction, LaunchConfig};
use std::sync::Arc;

/// Threads per block for elementwise and row kernels.
pub const THREADS: u32 = 256;

/// Grid-stride launch over `n` elements: enough blocks to fill the GPU a few times over.
pub fn grid_1d(gpu: &Gpu, n: usize) -> LaunchConfig {
    let want = n.div_ceil(THREADS as usize).max(1);
    let cap = (gpu.info.multiprocessors.max(1) * 32).max(1);
    LaunchConfig {
        grid_dim: (want.min(cap) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `THREADS` threads per row.
pub fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A single block (device-side reductions to one value).
pub fn one_block() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The (32, 8)-thread column tiles of `sum_rows_f32` and `col_sumsq_f32`.
pub fn column_tiles(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(32).max(1) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel, compiled and loaded at first use; panics with the compiler's message if that fails.
pub fn func(gpu: &Gpu, module: &'static str, kernel: &'static str) -> CudaFunction {
    gpu.func(module, kernel)
        .unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal))
}

/// Unwraps a CUDA result or panics naming what failed.
pub fn check<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e}"))
}

/// The GPU a tensor lives on (f32 or bf16 storage).
pub fn gpu_of(t: &Tensor) -> Arc<Gpu> {
    match t.dtype() {
        DType::Bf16 => super::bf16::bf16_buf(t).gpu().clone(),
        _ => buf(t).gpu.clone(),
    }
}

/// `0` as a kernel pointer argument (an optional output or input left out).
pub const NULL: u64 = 0;
