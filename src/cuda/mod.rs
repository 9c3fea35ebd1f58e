//! The CUDA backend: context, library loading, memory, cuBLAS, cuDNN and NVRTC-compiled kernels.
//!
//! Every CUDA library is loaded at run time, so podgpu builds and runs on machines without CUDA.

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use std::sync::{Arc, Mutex, OnceLock};

/// One GPU: its context and the stream all of podgpu's work goes to.
pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// f32 data in device memory.
pub struct CudaBuf {
    pub data: CudaSlice<f32>,
    pub gpu: Arc<Gpu>,
}

impl CudaBuf {
    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// Copies the buffer to host memory (synchronises the stream).
    pub fn to_host(&self) -> Vec<f32> {
        self.gpu
            .stream
            .clone_dtoh(&self.data)
            .unwrap_or_else(|e| panic!("copy from cuda:{} failed: {e}", self.gpu.ordinal))
    }
}

static GPUS: OnceLock<Mutex<Vec<Option<Arc<Gpu>>>>> = OnceLock::new();

impl Gpu {
    /// The GPU with this ordinal, initialised once. Errors say what is missing.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>, String> {
        // cudarc panics when libcuda cannot be loaded: check first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) was not found".into());
        }
        let mut gpus = GPUS.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
        if gpus.len() <= ordinal {
            gpus.resize(ordinal + 1, None);
        }
        if let Some(g) = &gpus[ordinal] {
            return Ok(g.clone());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        let stream = ctx.default_stream();
        let gpu = Arc::new(Gpu {
            ordinal,
            ctx,
            stream,
        });
        gpus[ordinal] = Some(gpu.clone());
        Ok(gpu)
    }

    pub fn upload(self: &Arc<Self>, host: &[f32]) -> CudaBuf {
        let data = self
            .stream
            .clone_htod(host)
            .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
        CudaBuf {
            data,
            gpu: self.clone(),
        }
    }
}

/// Placeholder arm of the op dispatch until the CUDA kernels of an op exist.
pub fn not_yet(op: &str) -> ! {
    panic!("op `{op}` has no CUDA implementation yet; run with --device cpu")
}
pub mod kernels;
