//! cuBLAS: row-major matrix products for linear layers, the PEDCC projection and the SC Gram terms,
//! in f32/TF32 (`gemm`) and with bf16 inputs (`gemm_bf16`, the bf16 path).
//!
//! cuBLAS is column-major. A row-major [r, c] matrix is the same memory as a column-major [c, r]
//! matrix, its transpose, so the row-major product C = op(A)·op(B) is computed as the column-major
//! product Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands, keep each operand's transpose flag, and pass the
//! row-major leading dimensions.

use super::libs::{self, Lib};
use super::{math_mode, CudaBuf, Gpu, MathMode};
use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::CudaBlas;
use std::sync::atomic::{AtomicU8, Ordering};

/// The device's cuBLAS handle (bound to its stream) and the math mode last set on it.
pub struct Blas {
    handle: CudaBlas,
    mode: AtomicU8,
    /// The handle's workspace, set once (`cublasSetWorkspace`): without it cuBLAS would allocate
    /// its own inside a CUDA graph capture.
    _workspace: cudarc::driver::CudaSlice<u8>,
}

/// cuBLAS's workspace: NVIDIA's recommendation for Hopper (32 MiB; 4 MiB suffices before it).
const WORKSPACE_BYTES: usize = 32 << 20;

impl Blas {
    fn new(gpu: &Gpu) -> Result<Blas, String> {
        let report = libs::ensure_loaded();
        if !report.has(Lib::Cublas) || !report.has(Lib::CublasLt) {
            return Err(format!(
                "cuBLAS is not available ({})",
                report.missing_message(&[Lib::Cublas, Lib::CublasLt])
            ));
        }
        let handle =
            CudaBlas::new(gpu.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))?;
        // A synchronous allocation: the handle may be created while a graph is being captured.
        let workspace = (|| {
            gpu.ctx.bind_to_thread()?;
            // SAFETY: a fresh allocation owned by the returned slice (freed on drop).
            unsafe {
                let p = cudarc::driver::result::malloc_sync(WORKSPACE_BYTES)?;
                Ok::<_, cudarc::driver::DriverError>(
                    gpu.stream.upgrade_device_ptr::<u8>(p, WORKSPACE_BYTES),
                )
            }
        })()
        .map_err(|e| format!("cuBLAS workspace: {e}"))?;
        let ws = cudarc::driver::DevicePtr::device_ptr(&workspace, &gpu.stream).0;
        // SAFETY: valid handle; the workspace lives as long as the handle (same struct) and is only
        // used on the handle's stream.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *handle.handle(),
                ws as *mut std::ffi::c_void,
                WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| format!("cublasSetWorkspace: {e:?}"))?;
        Ok(Blas {
            handle,
            mode: AtomicU8::new(u8::MAX),
            _workspace: workspace,
        })
    }

    /// Sets the handle's math mode when it differs from the requested one.
    fn apply_mode(&self, mode: MathMode) -> Result<(), String> {
        if self.mode.load(Ordering::Relaxed) == mode as u8 {
            return Ok(());
        }
        let m = match mode {
            // Default math in CUDA ≥ 11 is true fp32 (TF32 only when asked for).
            MathMode::Fp32 => cublasMath_t::CUBLAS_DEFAULT_MATH,
            MathMode::Tf32 => cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: valid handle; sets a host-side flag.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*self.handle.handle(), m) }
            .result()
            .map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
        self.mode.store(mode as u8, Ordering::Relaxed);
        Ok(())
    }
}

impl Blas {
    /// Sets the math mode for the next call (panics on a cuBLAS error: a broken device).
    pub(crate) fn set_mode(&self, mode: MathMode) {
        self.apply_mode(mode).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The raw handle, for the calls made outside this file (strided-batched GEMMs).
    pub(crate) fn raw(&self) -> cudarc::cublas::sys::cublasHandle_t {
        *self.handle.handle()
    }
}

/// The device's cuBLAS handle, created at first use.
pub fn handle(gpu: &Gpu) -> Result<&Blas, String> {
    gpu.blas
        .get_or_init(|| Blas::new(gpu))
        .as_ref()
        .map_err(Clone::clone)
}

/// cuBLAS's version number (e.g. 130001), or an error naming what is missing.
pub fn version(gpu: &Gpu) -> Result<i32, String> {
    let b = handle(gpu)?;
    let mut v = 0;
    // SAFETY: valid handle; writes one int.
    unsafe { cudarc::cublas::sys::cublasGetVersion_v2(*b.handle.handle(), &mut v) }
        .result()
        .map_err(|e| format!("cublasGetVersion: {e:?}"))?;
    Ok(v)
}

/// Row-major `c = alpha · op(a) · op(b) + beta · c` with op(a) [m, k], op(b) [k, n], c [m, n];
/// `ta`/`tb` say the stored matrix is the transpose ([k, m] / [n, k]). Panics on a cuBLAS error
/// (a device fault or a bug: shapes were checked by the caller).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &CudaBuf,
    ta: bool,
    b: &CudaBuf,
    tb: bool,
    beta: f32,
    c: &mut CudaBuf,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm: buffers too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    let blas = handle(gpu).unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
    // cuBLAS uses the calling thread's current context; test and rayon threads may have none.
    gpu.ctx
        .bind_to_thread()
        .unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
    blas.apply_mode(math_mode())
        .unwrap_or_else(|e| panic!("{e}"));
    // Column-major: C' (n x m) = op(B)' (n x k) · op(A)' (k x m).
    let (op_b, ld_b) = col_major_operand(tb, k, n);
    let (op_a, ld_a) = col_major_operand(ta, m, k);
    let (pa, pb, pc) = (a.device_ptr(), b.device_ptr(), c.device_ptr());
    // SAFETY: pointers are live device buffers of the sizes asserted above; the handle is bound to
    // the stream that owns them. k == 0 is legal (C = beta C).
    let r = unsafe {
        cudarc::cublas::result::sgemm(
            *blas.handle.handle(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            &alpha,
            pb as *const f32,
            ld_b.max(1) as i32,
            pa as *const f32,
            ld_a.max(1) as i32,
            &beta,
            pc as *mut f32,
            n as i32,
        )
    };
    r.unwrap_or_else(|e| panic!("cuBLAS sgemm (m={m} k={k} n={n} ta={ta} tb={tb}) failed: {e:?}"));
}

/// cuBLAS's operation and leading dimension for a row-major operand `op(X)` of `rows × cols`,
/// stored transposed when `t`. cuBLAS is column-major: a row-major matrix is its transpose there,
/// with the stored row length as leading dimension (the `gemm`s compute C' = op(B)'·op(A)').
pub(super) fn col_major_operand(t: bool, rows: usize, cols: usize) -> (cublasOperation_t, usize) {
    match t {
        true => (cublasOperation_t::CUBLAS_OP_T, rows),
        false => (cublasOperation_t::CUBLAS_OP_N, cols),
    }
}

/// Row-major `c = op(a) · op(b)` (f32 output) with `a` and `b` in bf16 and f32 accumulation:
/// `cublasGemmEx` with `CUDA_R_16BF` inputs, a `CUDA_R_32F` output and `CUBLAS_COMPUTE_32F` (not
/// the TF32 compute types: the products of bf16 values are exact in f32). This is the GEMM of the
/// bf16 path and the arithmetic the CPU's emulation computes (bf16 inputs, f32 sums, f32 output;
/// `cpu::bf16`). Shapes and transposes as `gemm`. Panics on a cuBLAS error.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    gpu: &Gpu,
    m: usize,
    k: usize,
    n: usize,
    a: &super::bf16::Bf16Buf,
    ta: bool,
    b: &super::bf16::Bf16Buf,
    tb: bool,
    c: &mut CudaBuf,
) {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm_bf16: buffers too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    let blas = handle(gpu).unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
    gpu.ctx
        .bind_to_thread()
        .unwrap_or_else(|e| panic!("cuda:{}: {e}", gpu.ordinal));
    // Column-major: C' (n x m) = op(B)' (n x k) · op(A)' (k x m), as in `gemm`.
    let (op_b, ld_b) = col_major_operand(tb, k, n);
    let (op_a, ld_a) = col_major_operand(ta, m, k);
    let (pa, pb, pc) = (a.device_ptr(), b.device_ptr(), c.device_ptr());
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: a and b hold at least m·k and k·n bf16 values, c m·n floats (asserted); alpha and
    // beta are f32 as CUBLAS_COMPUTE_32F requires; the handle is bound to the buffers' stream.
    let r = unsafe {
        cudarc::cublas::result::gemm_ex(
            blas.raw(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const std::ffi::c_void,
            pb as *const std::ffi::c_void,
            cudaDataType::CUDA_R_16BF,
            ld_b.max(1) as i32,
            pa as *const std::ffi::c_void,
            cudaDataType::CUDA_R_16BF,
            ld_a.max(1) as i32,
            (&beta) as *const f32 as *const std::ffi::c_void,
            pc as *mut std::ffi::c_void,
            cudaDataType::CUDA_R_32F,
            n as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    };
    r.unwrap_or_else(|e| {
        panic!("cuBLAS GemmEx bf16 (m={m} k={k} n={n} ta={ta} tb={tb}) failed: {e:?}")
    });
}
