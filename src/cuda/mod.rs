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
//! `dnn` (cuDNN convolution and batch norm), `graph` (a step captured as one CUDA graph), `nn_kernels`, `loss_kernels`, `optim` and `guard` (the
//! trainer's step ledger): launchers of our other kernels; `bf16` (bf16 storage and conversions).

pub mod adamw;
pub mod baseline_kernels;
pub mod bf16;
pub mod bf16_ops;
pub mod blas;
pub mod blaslt;
pub mod bn_train;
pub mod dnn;
pub mod graph;
pub mod guard;
pub mod kernels;
pub mod launch;
pub mod libs;
pub mod loss_kernels;
pub mod nhwc;
pub mod nn_kernels;
pub mod nvrtc;
pub mod optim;
pub mod pinned;
pub mod pod_head;
pub mod pool;
pub mod stager;
pub mod transformer;

use crate::tensor::{DType, Device, DeviceBackend, DeviceBuffer, Storage, Tensor};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView,
};
use libs::Lib;
use pool::{Pool, PoolStats};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

/// Locks a mutex even if a thread panicked while holding it. Every lock here guards caches and
/// counters that stay valid after a panic (the panicking operation's own result is what is lost),
/// so one failed test or op must not turn every later use of the GPU into a poisoned-lock panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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
    /// Host buffers of `upload_owned` copies, each with an event recorded after its copy: a buffer
    /// is dropped only once its event has completed (the copy may read it until then).
    staged: Mutex<Vec<(CudaEvent, Vec<f32>)>>,
    /// How many times the host waited for this GPU (stream synchronisations, device→host copies).
    host_waits: AtomicU64,
    /// Compiled modules by `.cu` name and loaded functions by kernel name (names are unique).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    pub(crate) blas: OnceLock<Result<blas::Blas, String>>,
    pub(crate) dnn: Mutex<Option<Result<dnn::Dnn, String>>>,
    /// Whether a CUDA graph is being captured on the stream (`graph::StepGraph::capture`):
    /// nothing may then wait for the device or copy host data that a replay would not see anew.
    capturing: AtomicBool,
    /// Host memory the capture's constant uploads read (`upload_constant`), handed to the graph.
    pub(crate) capture_keep: Mutex<Vec<pinned::PinnedWords>>,
}

/// What `upload` and `upload_owned` say during a capture: the graph would copy the capture's
/// values at every replay. Data that changes per step goes through the graph's input buffers.
const CAPTURED_UPLOAD: &str = "copies host data to the GPU (fixed at capture: new data must be \
    copied into the graph's input buffers before each replay)";

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

    /// Copies the buffer to host memory, waiting for the stream (and so for every kernel queued
    /// before). Panics on a device error (a broken device or a podgpu bug).
    pub fn to_host(&self) -> Vec<f32> {
        self.try_to_host()
            .unwrap_or_else(|e| panic!("copy from cuda:{} failed: {e}", self.gpu.ordinal))
    }

    /// `to_host` that returns device errors (e.g. a kernel queued earlier that faulted).
    pub fn try_to_host(&self) -> Result<Vec<f32>, String> {
        self.gpu
            .refuse_in_capture("reads a GPU buffer to the host")?;
        let mut out = vec![0f32; self.len];
        if self.len > 0 {
            self.gpu
                .stream
                .memcpy_dtoh(&self.view(), &mut out)
                .map_err(|e| e.to_string())?;
        }
        // The copy is queued with cuMemcpyDtoHAsync into pageable memory, and CUDA does not
        // promise that it has finished when that call returns: wait for the stream explicitly.
        self.gpu.synchronize()?;
        Ok(out)
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

    /// Overwrites the first `len` words with `src`'s (same GPU, same length) in place: a device copy
    /// queued on the stream.
    pub fn copy_from_buf(&mut self, src: &CudaBuf) {
        assert!(
            src.len == self.len && src.gpu.ordinal == self.gpu.ordinal,
            "copy_from: {} words on cuda:{} into {} on cuda:{}",
            src.len,
            src.gpu.ordinal,
            self.len,
            self.gpu.ordinal
        );
        if self.len == 0 {
            return;
        }
        let gpu = self.gpu.clone();
        let from = src.view();
        let mut to = self.raw_mut().slice_mut(0..src.len);
        gpu.stream
            .memcpy_dtod(&from, &mut to)
            .unwrap_or_else(|e| panic!("copy on cuda:{} failed: {e}", gpu.ordinal));
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
            lock(&self.gpu.pool).give_back(s);
        }
    }
}

/// A device allocation that failed even after the pool gave its cached blocks back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfMemory {
    pub ordinal: usize,
    /// Bytes asked for.
    pub requested: usize,
    /// Bytes held by podgpu's live buffers, and the most it held.
    pub in_use: usize,
    pub peak: usize,
    /// What the driver reports free and in total on the device (0 when it could not be asked).
    pub free: usize,
    pub total: usize,
}

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "cuda:{} is out of memory: {:.2} GiB requested while podgpu holds {:.2} GiB (peak \
             {:.2} GiB) and the device has {:.2} GiB free of {:.2} GiB",
            self.ordinal,
            gib(self.requested),
            gib(self.in_use),
            gib(self.peak),
            gib(self.free),
            gib(self.total)
        )
    }
}

impl OutOfMemory {
    /// The message with what to change: a smaller batch (half of `batch`, when known).
    pub fn advice(&self, batch: Option<usize>) -> String {
        self.advice_for("--batch-size", batch)
    }

    /// `advice` for a command whose batch flag is `flag` (e.g. `--batch` of the bench tools).
    pub fn advice_for(&self, flag: &str, batch: Option<usize>) -> String {
        match batch {
            Some(b) if b > 1 => format!(
                "{self}; try a smaller batch, e.g. {flag} {} (now {b}), or free the GPU from \
                 other processes (nvidia-smi lists them)",
                (b / 2).max(1)
            ),
            _ => format!(
                "{self}; try a smaller {flag}, or free the GPU from other processes (nvidia-smi \
                 lists them)"
            ),
        }
    }
}

thread_local! {
    static CATCHING_OOM: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs `f`; an out-of-memory failure inside it (raised by `Gpu::alloc`, which has no error path
/// because the ops that call it have none) comes back as `Err` instead of unwinding further. Any
/// other panic continues unwinding. Everything `f` allocated is freed by the unwinding, so the GPU
/// stays usable (e.g. to retry with a smaller batch).
pub fn catch_oom<R>(f: impl FnOnce() -> R) -> Result<R, OutOfMemory> {
    CATCHING_OOM.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING_OOM.with(|c| c.set(c.get() - 1));
    match r {
        Ok(v) => Ok(v),
        Err(payload) => match payload.downcast::<OutOfMemory>() {
            Ok(oom) => Err(*oom),
            Err(other) => std::panic::resume_unwind(other),
        },
    }
}

/// Whether this thread is inside `catch_oom` (the panic hook stays silent then: the caller reports).
pub fn catching_oom() -> bool {
    CATCHING_OOM.with(|c| c.get() > 0)
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
        let mut gpus = lock(GPUS.get_or_init(|| Mutex::new(Vec::new())));
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
            staged: Mutex::new(Vec::new()),
            host_waits: AtomicU64::new(0),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            dnn: Mutex::new(None),
            capturing: AtomicBool::new(false),
            capture_keep: Mutex::new(Vec::new()),
        });
        gpus[ordinal] = Some(gpu.clone());
        // From now on the tensor can make buffers on this backend's devices.
        crate::tensor::backend::register_cuda(open_backend);
        Ok(gpu)
    }

    /// An uninitialised buffer of `n` f32 elements from the pool. When the device is out of memory
    /// even after the cache was released, unwinds with an `OutOfMemory` payload (after the pool's
    /// lock is released): `catch_oom` turns it into an error for the user, with what to change.
    pub fn alloc(self: &Arc<Self>, n: usize) -> CudaBuf {
        match self.try_alloc(n) {
            Ok(b) => b,
            Err(oom) => std::panic::panic_any(oom),
        }
    }

    /// `alloc` that returns out-of-memory as an error.
    pub fn try_alloc(self: &Arc<Self>, n: usize) -> Result<CudaBuf, OutOfMemory> {
        let taken = {
            let mut pool = lock(&self.pool);
            pool.take(&self.stream, n).map_err(|_| pool.stats())
        };
        match taken {
            Ok(slice) => Ok(CudaBuf {
                slot: Some(slice),
                len: n,
                gpu: self.clone(),
            }),
            Err(stats) => {
                let (free, total) = self.mem_info().unwrap_or((0, 0));
                Err(OutOfMemory {
                    ordinal: self.ordinal,
                    requested: pool::size_class(n) * 4,
                    in_use: stats.bytes_in_use,
                    peak: stats.peak_bytes_in_use,
                    free,
                    total,
                })
            }
        }
    }

    /// (free, total) bytes of device memory as the driver reports them.
    pub fn mem_info(&self) -> Result<(usize, usize), String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        cudarc::driver::result::mem_get_info().map_err(|e| e.to_string())
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

    /// Copies `host` into a new buffer and waits until the copy has read it (`host` is borrowed and
    /// may be freed as soon as this returns; CUDA does not promise that an asynchronous copy from
    /// pageable memory has read it before the call returns). For data made for the copy, use
    /// `upload_owned`, which does not wait.
    pub fn upload(self: &Arc<Self>, host: &[f32]) -> CudaBuf {
        self.refuse_in_capture(CAPTURED_UPLOAD)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = self.alloc(host.len());
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, b.raw_mut())
                .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
            self.synchronize()
                .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
        }
        b
    }

    /// Copies `host` into a new buffer without waiting: `host` is kept alive until an event
    /// recorded after the copy has completed (checked, and finished buffers dropped, at each later
    /// `upload_owned` and at every wait).
    pub fn upload_owned(self: &Arc<Self>, host: Vec<f32>) -> CudaBuf {
        self.refuse_in_capture(CAPTURED_UPLOAD)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = self.alloc(host.len());
        if !host.is_empty() {
            self.stream
                .memcpy_htod(&host, b.raw_mut())
                .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
            match self.stream.record_event(None) {
                Ok(done) => {
                    let mut staged = lock(&self.staged);
                    staged.retain(|(ev, _)| !ev.is_complete());
                    staged.push((done, host));
                }
                // Without an event the only safe release is after the copy: wait for it.
                Err(_) => {
                    let _ = self.synchronize();
                }
            }
        }
        b
    }

    /// Uploads values that are the same at every replay of a CUDA graph being captured (pointer
    /// tables of multi-tensor kernels, whose buffers the graph keeps): during a capture from
    /// page-locked memory the graph owns, so that each replay copies them again; otherwise as
    /// `upload_owned`.
    pub fn upload_constant(self: &Arc<Self>, host: Vec<f32>) -> CudaBuf {
        if !self.is_capturing() {
            return self.upload_owned(host);
        }
        let mut b = self.alloc(host.len());
        if !host.is_empty() {
            let pinned = pinned::PinnedWords::copy_of(&self.ctx, &host)
                .unwrap_or_else(|e| panic!("page-locked copy on cuda:{}: {e}", self.ordinal));
            pinned
                .copy_to(b.raw_mut(), &self.stream)
                .unwrap_or_else(|e| panic!("copy to cuda:{} failed: {e}", self.ordinal));
            lock(&self.capture_keep).push(pinned);
        }
        b
    }

    /// Whether a CUDA graph is being captured on this GPU's stream.
    pub fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    pub(crate) fn set_capturing(&self, on: bool) {
        self.capturing.store(on, Ordering::Release);
    }

    /// An error saying that `what` cannot be part of a captured step, while a capture is on.
    fn refuse_in_capture(&self, what: &str) -> Result<(), String> {
        if self.is_capturing() {
            return Err(format!(
                "cuda:{}: the step {what} while it is being captured as a CUDA graph; a replay \
                 would not repeat it. Run it before or after the captured step, or without \
                 --cuda-graph",
                self.ordinal
            ));
        }
        Ok(())
    }

    /// Uploads 32-bit integers (labels) into a buffer, bit for bit, without waiting.
    pub fn upload_i32(self: &Arc<Self>, host: &[i32]) -> CudaBuf {
        let words: Vec<f32> = host.iter().map(|&v| f32::from_bits(v as u32)).collect();
        self.upload_owned(words)
    }

    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.pool).stats()
    }

    pub fn reset_peak_memory(&self) {
        lock(&self.pool).reset_peak();
    }

    /// Frees every cached block back to the driver (waits for the stream first: a host wait).
    pub fn release_cached_memory(&self) -> Result<(), String> {
        self.host_waits.fetch_add(1, Ordering::Relaxed);
        lock(&self.pool)
            .release_cached(&self.stream)
            .map_err(|e| e.to_string())
    }

    /// Waits for all queued work; surfaces asynchronous kernel errors. Counted in `host_waits`.
    pub fn synchronize(&self) -> Result<(), String> {
        self.refuse_in_capture("waits for the GPU")?;
        self.host_waits.fetch_add(1, Ordering::Relaxed);
        self.stream
            .synchronize()
            .map_err(|e| format!("cuda:{}: {e}", self.ordinal))?;
        lock(&self.staged).clear();
        Ok(())
    }

    /// How many times the host has waited for this GPU so far (every `synchronize`, so every
    /// device→host copy): a training step should not wait at all.
    pub fn host_waits(&self) -> u64 {
        self.host_waits.load(Ordering::Relaxed)
    }

    /// The targets our kernels are compiled for on this device, preferred first (`sm_90`, then
    /// `compute_90` on an H200).
    pub fn kernel_arch(&self) -> Result<String, String> {
        let (ma, mi) = self.info.compute_capability;
        nvrtc::targets_for(ma, mi).map(|t| t.join(", then "))
    }

    /// A kernel of one of our `.cu` modules, compiling and loading the module at first use.
    pub fn func(&self, module: &'static str, kernel: &'static str) -> Result<CudaFunction, String> {
        if let Some(f) = lock(&self.funcs).get(kernel) {
            return Ok(f.clone());
        }
        let m = {
            let mut mods = lock(&self.modules);
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
        lock(&self.funcs).insert(kernel, f.clone());
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MathMode {
    /// Plain fp32 (reference accuracy).
    Fp32,
    /// TF32 tensor cores for GEMMs and convolutions (10-bit mantissa inputs, fp32 accumulation).
    Tf32,
}

static MATH_MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide math mode. Prefer `math_mode_scope`, which restores the previous mode.
pub fn set_math_mode(mode: MathMode) {
    MATH_MODE.store(mode as u8, Ordering::Relaxed);
}

/// Sets the math mode until the returned guard drops, then restores the one before (also when a
/// panic unwinds past the guard, so a failing test cannot leave TF32 on for the tests after it).
#[must_use = "the mode is restored when the guard drops"]
pub fn math_mode_scope(mode: MathMode) -> MathModeGuard {
    let previous = math_mode();
    set_math_mode(mode);
    MathModeGuard { previous }
}

/// Restores the previous math mode on drop (see `math_mode_scope`).
pub struct MathModeGuard {
    previous: MathMode,
}

impl Drop for MathModeGuard {
    fn drop(&mut self) {
        set_math_mode(self.previous);
    }
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

// ---- the tensor's backend boundary (src/tensor/backend.rs) ----

impl DeviceBuffer for CudaBuf {
    fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn to_host_f32(&self) -> Vec<f32> {
        self.to_host()
    }
    fn duplicate(&self) -> Box<dyn DeviceBuffer> {
        Box::new(CudaBuf::duplicate(self))
    }
    fn copy_from(&mut self, src: &dyn DeviceBuffer) {
        let src = src
            .as_any()
            .downcast_ref::<CudaBuf>()
            .expect("copy_from: an f32 CUDA buffer");
        self.copy_from_buf(src);
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// An opened GPU as the tensor sees it. A newtype because the methods need the `Arc` (buffers
/// keep their GPU alive).
struct GpuBackend(Arc<Gpu>);

impl DeviceBackend for GpuBackend {
    fn full_f32(&self, n: usize, value: f32) -> Box<dyn DeviceBuffer> {
        Box::new(if value == 0.0 {
            self.0.alloc_zeros(n)
        } else {
            nn_kernels::fill_buf(n, value, &self.0)
        })
    }
    fn upload_f32(&self, values: Vec<f32>) -> Box<dyn DeviceBuffer> {
        Box::new(self.0.upload_owned(values))
    }
}

/// `backend::OpenCuda`: what the tensor calls to reach GPU `ordinal`.
fn open_backend(ordinal: usize) -> Result<Arc<dyn DeviceBackend>, String> {
    Ok(Arc::new(GpuBackend(Gpu::get(ordinal)?)))
}

/// The device buffer of a GPU tensor (panics for host tensors: callers dispatch on device first).
pub fn buf(t: &Tensor) -> &CudaBuf {
    match t.storage() {
        Storage::Cuda(b) => b
            .as_any()
            .downcast_ref::<CudaBuf>()
            .unwrap_or_else(|| panic!("expected a CUDA buffer, got {t:?}")),
        _ => panic!("expected a GPU tensor, got {t:?}"),
    }
}

/// The device buffer of a GPU tensor for an in-place update, copied first (on the device) when
/// another tensor shares it (`Tensor::device_buf_mut`), so clones never see the update.
pub fn buf_mut(t: &mut Tensor) -> &mut CudaBuf {
    t.device_buf_mut()
        .as_any_mut()
        .downcast_mut::<CudaBuf>()
        .expect("a GPU tensor's buffer is a CudaBuf")
}

/// A GPU tensor around a buffer.
pub fn tensor(shape: &[usize], b: CudaBuf) -> Tensor {
    Tensor::from_device_buffer(shape, Box::new(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom() -> OutOfMemory {
        OutOfMemory {
            ordinal: 0,
            requested: 3 << 30,
            in_use: 130 << 30,
            peak: 131 << 30,
            free: 1 << 29,
            total: 140 << 30,
        }
    }

    #[test]
    fn a_panic_inside_a_math_mode_scope_restores_the_mode() {
        set_math_mode(MathMode::Fp32);
        let r = std::panic::catch_unwind(|| {
            let _tf32 = math_mode_scope(MathMode::Tf32);
            assert_eq!(math_mode(), MathMode::Tf32);
            panic!("a failing TF32 test");
        });
        assert!(r.is_err());
        assert_eq!(math_mode(), MathMode::Fp32);
    }

    #[test]
    fn catch_oom_returns_out_of_memory_and_lets_other_panics_through() {
        let got = catch_oom(|| -> u32 { std::panic::panic_any(oom()) });
        assert_eq!(got, Err(oom()));
        assert!(!catching_oom());
        assert_eq!(catch_oom(|| 7), Ok(7));
        let other = std::panic::catch_unwind(|| catch_oom(|| panic!("a bug")));
        assert!(
            other.is_err(),
            "a panic that is not out-of-memory keeps unwinding"
        );
        assert!(!catching_oom());
    }

    #[test]
    fn out_of_memory_says_how_much_and_what_to_change() {
        let text = oom().advice(Some(128));
        assert!(
            text.starts_with("cuda:0 is out of memory: 3.00 GiB requested"),
            "{text}"
        );
        assert!(
            text.contains("holds 130.00 GiB (peak 131.00 GiB)"),
            "{text}"
        );
        assert!(text.contains("0.50 GiB free of 140.00 GiB"), "{text}");
        assert!(text.contains("--batch-size 64 (now 128)"), "{text}");
        assert!(oom().advice(None).contains("try a smaller --batch-size"));
    }

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = Mutex::new(5);
        let _ = std::panic::catch_unwind(|| {
            let _g = m.lock().unwrap();
            panic!("panic while holding the lock");
        });
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 6);
    }
}
