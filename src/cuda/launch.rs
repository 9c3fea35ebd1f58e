//! Small helpers shared by the launchers: launch geometry, kernel lookup, error handling.
//!
//! Launchers return `Tensor`s (the op dispatch has no error path), so a failing CUDA call inside one
//! panics with a message naming the kernel: it means a broken device or a bug, not bad user input
//! (user input is validated before the dispatch).

use super::bf16::{bf16_buf, Bf16Buf};
use super::{buf, tensor, CudaBuf, Gpu};
use crate::tensor::{DType, Layout, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
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

/// The 32-bit words holding a GPU tensor's values, f32 or bf16 (kernel arguments).
pub fn words(t: &Tensor) -> &CudaSlice<f32> {
    match t.dtype() {
        DType::Bf16 => bf16_buf(t).words().raw(),
        _ => buf(t).raw(),
    }
}

/// An output buffer in f32 or bf16 storage.
pub enum Out {
    F32(CudaBuf),
    Bf16(Bf16Buf),
}

impl Out {
    pub fn alloc(gpu: &Arc<Gpu>, dtype: DType, n: usize) -> Out {
        match dtype {
            DType::Bf16 => Out::Bf16(Bf16Buf::alloc(gpu, n)),
            _ => Out::F32(gpu.alloc(n)),
        }
    }

    pub fn words_mut(&mut self) -> &mut CudaSlice<f32> {
        match self {
            Out::F32(b) => b.raw_mut(),
            Out::Bf16(b) => b.words_mut().raw_mut(),
        }
    }

    pub fn into_tensor(self, shape: &[usize], layout: Layout) -> Tensor {
        match self {
            Out::F32(b) => tensor(shape, b),
            Out::Bf16(b) => b.into_tensor(shape),
        }
        .with_layout(layout)
    }
}

/// y = f(inputs…) elementwise with kernel `name(y, inputs…, n)` of `module`: y has the first
/// input's shape, storage (f32 or bf16) and layout; every input has its element count.
pub fn elementwise(module: &'static str, name: &'static str, inputs: &[&Tensor]) -> Tensor {
    let x = inputs[0];
    for t in inputs {
        assert_eq!(t.numel(), x.numel(), "{name}: sizes differ");
    }
    let gpu = gpu_of(x);
    let n = x.numel();
    let mut y = Out::alloc(&gpu, x.dtype(), n);
    if n > 0 {
        let f = func(&gpu, module, name);
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(y.words_mut());
        for t in inputs {
            l.arg(words(t));
        }
        l.arg(&n64);
        // SAFETY: matches `name(T*, const T*…, i64)` with T the storage of the output and of every
        // input (the callers' kernels); every buffer holds n values.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, name);
    }
    y.into_tensor(x.shape(), x.layout())
}
