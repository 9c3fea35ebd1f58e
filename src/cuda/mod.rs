//! The CUDA backend: context, library loading, memory, cuBLAS, cuDNN and NVRTC-compiled kernels.
//!
//! Every CUDA library is loaded at run time (cudarc `dynamic-loading`), so podgpu builds and runs on
//! machines without CUDA. Before any cudarc call touches a library, `libs::ensure_loaded` has found
//! it (or reported it missing): cudarc panics when it cannot open a library, podgpu must not.
//!
//! One `Gpu` per device ordinal, created once: its context, the single stream all work goes to (so
//! buffers need no cross-stream events: event tracking is switched off), the caching allocator, the
//! compiled kernel modules and the cuBLAS/cuDNN handles.
//!
//! Files: `libs` (finding libraries), `pool` (allocator), `nvrtc` (kernel compilation and cache),
//! `launch` (launch helpers), `kernels` (the launchers the op dispatch calls), `blas` (cuBLAS),
//! `dnn` (cuDNN convolution and batch norm), `nn_kernels`, `loss_kernels`, `optim` and `guard` (the
//! trainer's step ledger): launchers of our other kernels.

pub mod blas;
pub mod dnn;
pub mod guard;
pub mod kernels;
pub mod launch;
pub mod libs;
pub mod loss_kernels;
pub mod nn_kernels;
pub mod nvrtc;
pub mod optim;
pub mod pool;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView};
use libs::Lib;
use pool::{Pool, PoolStats};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What the GPU reports about itself.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    /// Compute capability (9, 0 on H100/H200).
    pub compute_capability: (i32, i32),
    pub multiprocessors: usize,
    pub total_memory: usize,
    /// CUDA driver API version, e.g. 13000.
    pub driver_version: i32,
}

/// One GPU: its context and the stream all of podgpu's work goes to.
pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub info: DeviceInfo,
    pool: Mutex<Pool>,
    /// Compiled modules by `.cu` name and loaded functions by kernel name (names are unique).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    pub(crate) blas: OnceLock<Result<blas::Blas, String>>,
    pub(crate) dnn: Mutex<Option<Result<dnn::Dnn, String>>>,
    /// Uploads in flight and the count of host waits (`upload_owned`, `host_waits`).
    host_sync: HostSync,
}

/// f32 data in device memory, from the caching pool (returned to it on drop).
///
/// The backing block may be longer than `len` (it is rounded to a size class); kernels only touch
/// the first `len` elements. Some buffers hold 32-bit integers (labels, arg-max indices, counters)
/// bit for bit in the same words: see `Gpu::upload_i32` and `CudaBuf::to_host_i32`.
pub struct CudaBuf {
    slot: Option<CudaSlice<f32>>,
    len: usize,
    pub gpu: Arc<Gpu>,
}

impl CudaBuf {
    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole pooled block (at least `len` elements), for kernel arguments.
    pub fn raw(&self) -> &CudaSlice<f32> {
        self.slot.as_ref().expect("live CudaBuf has a block")
    }

    pub fn raw_mut(&mut self) -> &mut CudaSlice<f32> {
        self.slot.as_mut().expect("live CudaBuf has a block")
    }

    /// The first `len` elements.
    pub fn view(&self) -> CudaView<'_, f32> {
        self.raw().slice(0..self.len)
    }

    /// The device address of the first element (for pointer tables).
    pub fn device_ptr(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let (p, _sync) = self.raw().device_ptr(&self.gpu.stream);
        p
    }

    /// Copies the buffer to host memory (synchronises the stream; a host wait).
    pub fn to_host(&self) -> Vec<f32> {
        let v = self
            .gpu
            .stream
            .clone_dtoh(&self.view())
            .unwrap_or_else(|e| panic!("copy from cuda:{} failed: {e}", self.gpu.ordinal));
        self.gpu.note_host_wait();
        v
    }

    /// A copy of the first `len` elements in a fresh pooled buffer (queued on the stream, no sync).
    pub fn duplicate(&self) -> CudaBuf {
        let mut out = self.gpu.alloc(self.len);
        if self.len > 0 {
            let src = self.view();
            let mut dst = out.raw_mut().slice_mut(0..self.len);
            self.gpu
                .stream
                .memcpy_dtod(&src, &mut dst)
                .unwrap_or_else(|e| panic!("copy on cuda:{} failed: {e}", self.gpu.ordinal));
        }
        out
    }

    /// The buffer's words read as i32 (labels, indices, counters).
    pub fn to_host_i32(&self) -> Vec<i32> {
        self.to_host()
            .into_iter()
            .map(f32::to_bits)
            .map(|b| b as i32)
            .collect()
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            if let Ok(mut pool) = self.gpu.pool.lock() {
                pool.give_back(s);
            }
        }
    }
}

static GPUS: OnceLock<Mutex<Vec<Option<Arc<Gpu>>>>> = OnceLock::new();

impl Gpu {
    /// The GPU with this ordinal, initialised once. Errors say what is missing; never panics.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>, String> {
        let report = libs::ensure_loaded();
        // cudarc panics when libcuda cannot be loaded: check first.
        if !report.has(Lib::Driver) {
            return Err(format!(
                "no CUDA driver: {}",
                report.missing_message(&[Lib::Driver])
            ));
        }
        let mut gpus = GPUS.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
        if let Some(Some(g)) = gpus.get(ordinal) {
            return Ok(g.clone());
        }
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
        if ordinal >= count.max(0) as usize {
            return Err(format!(
                "cuda:{ordinal} requested but the driver reports {count} device(s)"
            ));
        }
        if gpus.len() <= ordinal {
            gpus.resize(ordinal + 1, None);
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        // One stream for everything: buffers need no per-use events.
        // SAFETY: no CudaSlice exists yet in this context, and all work goes to `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| format!("cuda:{ordinal}: stream: {e}"))?;
        let info = device_info(&ctx).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        let gpu = Arc::new(Gpu {
            ordinal,
            ctx,
            stream,
            info,
            pool: Mutex::new(Pool::new()),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            dnn: Mutex::new(None),
            host_sync: HostSync::default(),
        });
        gpus[ordinal] = Some(gpu.clone());
        Ok(gpu)
    }

    /// An uninitialised buffer of `n` f32 elements from the pool. Panics when the device is out of
    /// memory even after the cache was released (an unrecoverable state for a training step).
    pub fn alloc(self: &Arc<Self>, n: usize) -> CudaBuf {
        let slice = self
            .pool
            .lock()
            .unwrap()
            .take(&self.stream, n)
            .unwrap_or_else(|e| {
                panic!(
                    "cuda:{}: cannot allocate {} bytes: {e}",
                    self.ordinal,
                    n * 4
                )
            });
        CudaBuf {
            slot: Some(slice),
            len: n,
            gpu: self.clone(),
        }
    }

    /// A zero-filled buffer of `n` elements.
    pub fn alloc_zeros(self: &Arc<Self>, n: usize) -> CudaBuf {
        let mut b = self.alloc(n);
        if n > 0 {
            let mut v = b.raw_mut().slice_mut(0..n);
            self.stream
                .memset_zeros(&mut v)
                .unwrap_or_else(|e| panic!("cuda memset: {e}"));
        }
        b
    }

    pub fn upload(self: &Arc<Self>, host: &[f32]) -> CudaBuf {
        let mut b = self.alloc(host.len());
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, b.raw_mut())
                .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
        }
        b
    }

    /// Uploads 32-bit integers (labels) into a buffer, bit for bit.
    pub fn upload_i32(self: &Arc<Self>, host: &[i32]) -> CudaBuf {
        let words: Vec<f32> = host.iter().map(|&v| f32::from_bits(v as u32)).collect();
        self.upload(&words)
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.lock().unwrap().stats()
    }

    pub fn reset_peak_memory(&self) {
        self.pool.lock().unwrap().reset_peak();
    }

    /// Frees every cached block back to the driver (waits for the stream first: a host wait).
    pub fn release_cached_memory(&self) -> Result<(), String> {
        let r = self
            .pool
            .lock()
            .unwrap()
            .release_cached(&self.stream)
            .map_err(|e| e.to_string());
        self.note_host_wait();
        r
    }

    /// Waits for all queued work; surfaces asynchronous kernel errors. A host wait.
    pub fn synchronize(&self) -> Result<(), String> {
        let r = self
            .stream
            .synchronize()
            .map_err(|e| format!("cuda:{}: {e}", self.ordinal));
        self.note_host_wait();
        r
    }

    /// The targets our kernels are compiled for on this device, preferred first (`sm_90`, then
    /// `compute_90` on an H200).
    pub fn kernel_arch(&self) -> Result<String, String> {
        let (ma, mi) = self.info.compute_capability;
        nvrtc::targets_for(ma, mi).map(|t| t.join(", then "))
    }

    /// A kernel of one of our `.cu` modules, compiling and loading the module at first use.
    pub fn func(&self, module: &'static str, kernel: &'static str) -> Result<CudaFunction, String> {
        if let Some(f) = self.funcs.lock().unwrap().get(kernel) {
            return Ok(f.clone());
        }
        let m = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let src = nvrtc::source(module)
                        .ok_or_else(|| format!("no kernel module {module}"))?;
                    let m = self.load_kernel_module(src)?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m
            .load_function(kernel)
            .map_err(|e| format!("kernel {kernel} not in cuda/{module}.cu: {e}"))?;
        self.funcs.lock().unwrap().insert(kernel, f.clone());
        Ok(f)
    }
}

impl Gpu {
    /// Compiles (or takes from the disk cache) and loads one `.cu` module: CUBIN for the device's
    /// exact architecture first, PTX for the JIT as the fallback. Errors list every attempt.
    fn load_kernel_module(&self, src: &nvrtc::KernelSource) -> Result<Arc<CudaModule>, String> {
        let (ma, mi) = self.info.compute_capability;
        let mut errors = Vec::new();
        for target in nvrtc::targets_for(ma, mi)? {
            let image = match nvrtc::image_cached(src, &target) {
                Ok(i) => i,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let ptx = match image {
                nvrtc::Image::Ptx(p) => cudarc::nvrtc::Ptx::from_src(p),
                nvrtc::Image::Cubin(b) => cudarc::nvrtc::Ptx::from_binary(b),
            };
            match self.ctx.load_module(ptx) {
                Ok(m) => return Ok(m),
                Err(e) => errors.push(format!(
                    "loading cuda/{}.cu ({target}) failed: {e} (driver API {}; PTX newer than the \
                     driver is rejected: use NVRTC 13.0 with driver 580)",
                    src.name, self.info.driver_version
                )),
            }
        }
        Err(errors.join("; "))
    }
}

// ---- Uploads without a wait, and the count of host waits (issue 10, item 8) ----
//
// `upload` copies from a borrowed host slice, so it must not return before the copy has read it;
// per-step uploads (a batch's images and labels, the SGD and guard pointer tables) use
// `upload_owned` instead, which takes the host vector and keeps it alive until an event recorded
// after the copy has completed, without waiting. Finished copies are released lazily: on later
// uploads and after every host wait. `host_waits` counts the host's waits on the device
// (synchronisations and device-to-host copies), which is what the trainer's "no host
// synchronisation inside a step" is measured by.

/// What a `Gpu` keeps for `upload_owned` and `host_waits`.
#[derive(Default)]
struct HostSync {
    /// Host vectors of copies the stream may not have read yet, each with an event recorded after
    /// its copy, oldest first.
    in_flight: Mutex<std::collections::VecDeque<(cudarc::driver::CudaEvent, Vec<f32>)>>,
    /// Host waits so far (`Gpu::host_waits`).
    waits: std::sync::atomic::AtomicU64,
}

impl Gpu {
    /// Copies `host` into a fresh buffer without waiting for the copy: the vector is kept until the
    /// stream has passed the copy (CUDA does not promise that an asynchronous copy from pageable
    /// memory has read its source when the call returns).
    pub fn upload_owned(self: &Arc<Self>, host: Vec<f32>) -> CudaBuf {
        self.release_finished_uploads();
        let mut b = self.alloc(host.len());
        if !host.is_empty() {
            self.stream
                .memcpy_htod(&host, b.raw_mut())
                .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
            match self.stream.record_event(None) {
                Ok(done) => self
                    .host_sync
                    .in_flight
                    .lock()
                    .unwrap()
                    .push_back((done, host)),
                // Without an event the only safe release is after the copy: wait for it.
                Err(_) => {
                    let _ = self.synchronize();
                }
            }
        }
        b
    }

    /// How many times the host has waited for this GPU so far (stream synchronisations,
    /// device-to-host copies).
    pub fn host_waits(&self) -> u64 {
        self.host_sync.waits.load(Ordering::Relaxed)
    }

    /// Records a host wait (call it after every synchronisation or device-to-host copy); the wait
    /// also lets the copies it waited for release their host vectors.
    pub(crate) fn note_host_wait(&self) {
        self.host_sync.waits.fetch_add(1, Ordering::Relaxed);
        self.release_finished_uploads();
    }

    /// Drops the host vectors of the uploads the stream has passed (oldest first; stops at the
    /// first one still pending).
    fn release_finished_uploads(&self) {
        let mut q = self.host_sync.in_flight.lock().unwrap();
        while q.front().is_some_and(|(done, _)| done.is_complete()) {
            q.pop_front();
        }
    }
}

// ---- end of the upload/host-wait block ----

fn device_info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, cudarc::driver::DriverError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let mut driver_version = 0;
    // SAFETY: the driver is loaded (a context exists); writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }.result()?;
    Ok(DeviceInfo {
        name: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        multiprocessors: ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
        total_memory: ctx.total_mem()?,
        driver_version,
    })
}

/// How fp32 matrix products and convolutions are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MathMode {
    /// Plain fp32 (reference accuracy).
    Fp32,
    /// TF32 tensor cores for GEMMs and convolutions (10-bit mantissa inputs, fp32 accumulation).
    Tf32,
}

static MATH_MODE: AtomicU8 = AtomicU8::new(0);

pub fn set_math_mode(mode: MathMode) {
    MATH_MODE.store(mode as u8, Ordering::Relaxed);
}

pub fn math_mode() -> MathMode {
    match MATH_MODE.load(Ordering::Relaxed) {
        0 => MathMode::Fp32,
        _ => MathMode::Tf32,
    }
}

impl std::str::FromStr for MathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(MathMode::Fp32),
            "tf32" => Ok(MathMode::Tf32),
            _ => Err(format!("unknown math mode {s:?}: expected fp32 or tf32")),
        }
    }
}

/// The device buffer of a GPU tensor (panics for host tensors: callers dispatch on device first).
pub fn buf(t: &crate::tensor::Tensor) -> &CudaBuf {
    match t.storage() {
        crate::tensor::Storage::Cuda(b) => b,
        _ => panic!("expected a GPU tensor, got {t:?}"),
    }
}

/// A GPU tensor around a buffer.
pub fn tensor(shape: &[usize], b: CudaBuf) -> crate::tensor::Tensor {
    debug_assert_eq!(crate::tensor::numel(shape), b.len());
    crate::tensor::Tensor::from_storage(shape, crate::tensor::Storage::Cuda(b))
}
