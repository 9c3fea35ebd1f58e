//! cuBLASLt: the linear layer's product with its bias added in the GEMM's epilogue
//! (`CUBLASLT_EPILOGUE_BIAS`), one launch instead of a GEMM and a bias kernel (issue 12 item 4:
//! FC1 and the head).
//!
//! We call `cublaslt::result` directly: cudarc's safe `Matmul<f32>` hard-codes
//! `CUBLAS_COMPUTE_32F_FAST_TF32`, which would make our fp32 mode silently TF32. Here the compute
//! type follows the data and the math mode: f32 inputs take `CUBLAS_COMPUTE_32F` (fp32) or
//! `…_FAST_TF32` (tf32), bf16 inputs `CUBLAS_COMPUTE_32F` (products of bf16 values are exact in
//! f32: the CPU emulation's arithmetic). The output and the bias are always f32 (FC1's output stays
//! f32 in the bf16 path, `cpu::bf16`).
//!
//! Row-major y [m, n] = x [m, k] · wᵀ + b with w [n, k] (PyTorch's Linear) is, column-major,
//! yᵀ (n × m) = op_T(w as k × n) · (x as k × m), so the bias runs along D's rows, which is the
//! vector the epilogue broadcasts across D's columns.
//!
//! One cuBLASLt handle per device (created at first use, kept for the process); descriptors are
//! made per call and the algorithm is cuBLASLt's first heuristic pick within `WORKSPACE_LIMIT`.

use super::bf16::bf16_buf;
use super::libs::{self, Lib};
use super::{buf, math_mode, tensor, Gpu, MathMode};
use crate::tensor::{DType, Tensor};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

/// Most workspace one product may use (from the pool).
pub const WORKSPACE_LIMIT: usize = 32 << 20;

/// A device's cuBLASLt handle.
struct Handle(sys::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle may be used from any thread; ours are only used under `HANDLES`'s lock.
unsafe impl Send for Handle {}

static HANDLES: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();

/// The heuristic's pick per device and product (m, k, n, input type, compute type), asked for
/// once: the query costs more host time than a small product's launch, and the step asks for the
/// same few shapes every time. The pick depends on the descriptors' attributes too, which are the
/// same for every call here (transposes, the bias epilogue, f32 bias and output; the pool's
/// buffers are aligned alike).
type AlgoKey = (usize, [usize; 3], u32, u32);

// SAFETY: plain data (the algorithm's opaque words); only used under `ALGOS`'s lock.
struct Algo(sys::cublasLtMatmulHeuristicResult_t);
unsafe impl Send for Algo {}

static ALGOS: OnceLock<Mutex<HashMap<AlgoKey, Algo>>> = OnceLock::new();

/// Descriptors that destroy themselves.
struct Layout(sys::cublasLtMatrixLayout_t);
struct Desc(sys::cublasLtMatmulDesc_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn err(what: &str) -> impl Fn(cudarc::cublaslt::result::CublasError) -> String + '_ {
    move |e| format!("cuBLASLt {what}: {e:?}")
}

/// Sets one attribute of a matmul descriptor to `v`.
fn set_desc<T>(d: &Desc, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<(), String> {
    // SAFETY: a live descriptor; `v` is the attribute's type, read for its size.
    unsafe {
        lt::set_matmul_desc_attribute(
            d.0,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(err("set_matmul_desc_attribute"))
}

/// y [m, n] = x [m, k] · wᵀ + b for GPU tensors: x and w both f32 or both bf16 (bf16 storage,
/// f32 accumulation), w [n, k], b f32 [n]; y is f32. One cuBLASLt call with the bias epilogue.
/// Shapes or dtypes that do not fit are a caller's bug, named in the panic.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    assert!(
        x.rank() == 2 && w.rank() == 2 && x.dim(1) == w.dim(1) && b.shape() == [w.dim(0)],
        "linear_bias: x {x:?}, w {w:?}, b {b:?} (want x [m, k], w [n, k], b [n])"
    );
    assert!(
        x.dtype() == w.dtype() && matches!(x.dtype(), DType::F32 | DType::Bf16),
        "linear_bias: x and w must both be f32 or both bf16, got {:?} and {:?}",
        x.dtype(),
        w.dtype()
    );
    assert_eq!(b.dtype(), DType::F32, "linear_bias: the bias is f32");
    let (m, k, n) = (x.dim(0), x.dim(1), w.dim(0));
    let bias = buf(b);
    let gpu = bias.gpu.clone();
    let (xp, wp, ty, compute) = match x.dtype() {
        DType::Bf16 => (
            bf16_buf(x).device_ptr(),
            bf16_buf(w).device_ptr(),
            sys::cudaDataType::CUDA_R_16BF,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        _ => (
            buf(x).device_ptr(),
            buf(w).device_ptr(),
            sys::cudaDataType::CUDA_R_32F,
            match math_mode() {
                MathMode::Fp32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                MathMode::Tf32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            },
        ),
    };
    let y = gpu.alloc(m * n);
    if m > 0 && n > 0 {
        let yp = y.device_ptr();
        run(&gpu, [m, k, n], xp, wp, ty, compute, bias.device_ptr(), yp)
            .unwrap_or_else(|e| panic!("cuda:{}: {e} (m={m} k={k} n={n})", gpu.ordinal));
    }
    tensor(&[m, n], y)
}

#[allow(clippy::too_many_arguments)]
fn run(
    gpu: &Arc<Gpu>,
    [m, k, n]: [usize; 3],
    xp: u64,
    wp: u64,
    ty: sys::cudaDataType,
    compute: sys::cublasComputeType_t,
    bias: u64,
    yp: u64,
) -> Result<(), String> {
    let report = libs::ensure_loaded();
    if !report.has(Lib::CublasLt) {
        return Err(format!(
            "cuBLASLt is not available ({})",
            report.missing_message(&[Lib::CublasLt])
        ));
    }
    gpu.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let mut handles = HANDLES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let handle = match handles.entry(gpu.ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut().0,
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(Handle(lt::create_handle().map_err(err("create"))?))
                .0
        }
    };
    let f32t = sys::cudaDataType::CUDA_R_32F;
    // Column-major: A = w as k × n (transposed), B = x as k × m, C = D = y as n × m.
    let a = Layout(lt::create_matrix_layout(ty, k as u64, n as u64, k as i64).map_err(err("A"))?);
    let bl = Layout(lt::create_matrix_layout(ty, k as u64, m as u64, k as i64).map_err(err("B"))?);
    let d = Layout(lt::create_matrix_layout(f32t, n as u64, m as u64, n as i64).map_err(err("D"))?);
    let desc = Desc(lt::create_matmul_desc(compute, f32t).map_err(err("matmul desc"))?);
    use sys::cublasLtMatmulDescAttributes_t as A;
    set_desc(
        &desc,
        A::CUBLASLT_MATMUL_DESC_TRANSA,
        &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
    )?;
    set_desc(
        &desc,
        A::CUBLASLT_MATMUL_DESC_TRANSB,
        &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
    )?;
    set_desc(
        &desc,
        A::CUBLASLT_MATMUL_DESC_EPILOGUE,
        &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
    )?;
    set_desc(
        &desc,
        A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
        &(bias as *const c_void),
    )?;
    // The bias is f32 whatever the inputs (its default would follow the output, f32 too; said
    // explicitly so that a bf16 output later cannot silently change it).
    set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &f32t)?;
    let pref = Pref(lt::create_matmul_pref().map_err(err("preference"))?);
    let limit = WORKSPACE_LIMIT as u64;
    // SAFETY: a live preference; the attribute is a u64.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&limit) as *const u64 as *const c_void,
            std::mem::size_of::<u64>(),
        )
    }
    .map_err(err("workspace preference"))?;
    let key: AlgoKey = (gpu.ordinal, [m, k, n], ty as u32, compute as u32);
    let mut algos = ALGOS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let h = match algos.get(&key) {
        Some(a) => a.0,
        None => {
            // SAFETY: live descriptors describing the buffers below.
            let h = unsafe {
                lt::get_matmul_algo_heuristic(handle, desc.0, a.0, bl.0, d.0, d.0, pref.0)
            }
            .map_err(err("no algorithm for this product (heuristic)"))?;
            algos.insert(key, Algo(h));
            h
        }
    };
    drop(algos);
    let ws = gpu
        .try_alloc(h.workspaceSize.div_ceil(4))
        .map_err(|_| "cuBLASLt workspace: out of GPU memory".to_string())?;
    let (one, zero) = (1.0f32, 0.0f32);
    // SAFETY: w holds n·k and x m·k values of `ty`, y m·n floats and the bias n floats, as the
    // layouts say; alpha and beta are f32 (the scale type); beta = 0 so C (= y) is not read; the
    // workspace has the bytes the heuristic asked for; all on the device's stream.
    unsafe {
        lt::matmul(
            handle,
            desc.0,
            (&one) as *const f32 as *const c_void,
            (&zero) as *const f32 as *const c_void,
            wp as *const c_void,
            a.0,
            xp as *const c_void,
            bl.0,
            yp as *const c_void,
            d.0,
            yp as *mut c_void,
            d.0,
            &h.algo,
            ws.device_ptr() as *mut c_void,
            h.workspaceSize,
            gpu.stream.cu_stream() as sys::cudaStream_t,
        )
    }
    .map_err(err("matmul with the bias epilogue"))
}
