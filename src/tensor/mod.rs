//! Tensors: a shape, a layout and a buffer that lives on exactly one device.
//!
//! Element type (`DType`) and memory layout (`Layout`) are properties of the tensor that ops check
//! (`ops::expect_layout`, the `dispatch!` macro), not conventions each op assumes. Host buffers
//! come in three element types: f32 for training, f64 for gradient checks and bf16 (stored bits,
//! for conversions and reading GPU bf16 data; the host kernels do not compute in it: the CPU's bf16
//! emulation rounds f32 values instead, see `crate::cpu::bf16`). Device buffers are trait objects
//! of a backend (`backend.rs` is the whole boundary: this module imports nothing from `crate::cuda`).
//! A `Tensor` is cheap to clone (the buffer is reference counted), which is what lets the tape save
//! activations without copying them.

pub mod backend;
pub mod bf16;
mod elem;

pub use backend::{DeviceBackend, DeviceBuffer};
pub use elem::Elem;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Tensor value reads to the host so far in this process, on any device (see `host_reads`).
static HOST_READS: AtomicU64 = AtomicU64::new(0);

/// How many times, in this process, a `Tensor` read API brought tensor values to the host: `item`,
/// `to_vec_f32`, `to_vec_f64`, `to_dtype` and `to_device(Device::Cpu)` of a GPU tensor, `max_abs`,
/// `all_finite`. Counted on every device: on a GPU each such read waits for the device, on the CPU
/// it is free, but counting it there lets a CPU test show how often code (the trainer's step) would
/// wait on a GPU. Kernels' own access to host buffers (`Tensor::host`) is not a read.
pub fn host_reads() -> u64 {
    HOST_READS.load(Ordering::Relaxed)
}

fn count_host_read() {
    HOST_READS.fetch_add(1, Ordering::Relaxed);
}

/// Element type of a tensor.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum DType {
    F32,
    F64,
    /// bfloat16 (see `bf16.rs`): storage only on the host.
    Bf16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bf16 => "bf16",
        }
    }
}

/// Memory order of a tensor's elements. The shape is always the logical one ([N, C, H, W] for
/// images); the layout says how those elements lie in the buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Default)]
pub enum Layout {
    /// Row-major in shape order (NCHW for 4-d images): every tensor starts so.
    #[default]
    RowMajor,
    /// A 4-d [N, C, H, W] tensor stored N, H, W, C ("channels last", cuDNN's NHWC).
    Nhwc,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::RowMajor => "row-major (NCHW)",
            Layout::Nhwc => "NHWC",
        }
    }
}

/// Where a tensor's buffer lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The buffer behind a tensor.
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// bf16 bit patterns (`bf16::f32_to_bf16_bits`).
    Bf16(Vec<u16>),
    /// Memory of the registered CUDA backend (`backend.rs`).
    Cuda(Box<dyn DeviceBuffer>),
}

/// An n-dimensional array with its element type, device and memory layout.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    layout: Layout,
    storage: Arc<Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?}, {}{})",
            self.shape,
            self.dtype(),
            self.device(),
            if self.layout == Layout::Nhwc {
                ", NHWC"
            } else {
                ""
            }
        )
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A host tensor from a vector of f32 or f64 values.
    pub fn from_vec<T: Elem>(shape: &[usize], data: Vec<T>) -> Tensor {
        assert_eq!(
            numel(shape),
            data.len(),
            "shape {shape:?} does not match {} values",
            data.len()
        );
        Tensor {
            shape: shape.to_vec(),
            layout: Layout::RowMajor,
            storage: Arc::new(T::wrap(data)),
        }
    }

    pub fn from_storage(shape: &[usize], storage: Storage) -> Tensor {
        if let Storage::Cuda(b) = &storage {
            debug_assert_eq!(numel(shape), b.len());
        }
        Tensor {
            shape: shape.to_vec(),
            layout: Layout::RowMajor,
            storage: Arc::new(storage),
        }
    }

    /// A device tensor around a backend's buffer (row-major).
    pub fn from_device_buffer(shape: &[usize], buf: Box<dyn DeviceBuffer>) -> Tensor {
        Tensor::from_storage(shape, Storage::Cuda(buf))
    }

    /// The backend of a device, panicking with the backend's reason when it is not usable (the
    /// CLI selects and checks the device before any tensor is made there).
    fn backend(device: Device) -> Arc<dyn DeviceBackend> {
        backend::backend_of(device)
            .unwrap_or_else(|e| panic!("{device} requested but not usable: {e}"))
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Tensor {
        Tensor::full(shape, 0.0, dtype, device)
    }

    /// A tensor filled with `value`. On a GPU it is filled there (no host buffer, no copy): the
    /// tape's backward seed and fresh momentum buffers are made this way on every step.
    pub fn full(shape: &[usize], value: f64, dtype: DType, device: Device) -> Tensor {
        if let Device::Cuda(_) = device {
            let buf = Tensor::backend(device).full_f32(numel(shape), value as f32);
            return Tensor::from_device_buffer(shape, buf);
        }
        let n = numel(shape);
        match dtype {
            DType::F32 => Tensor::from_vec(shape, vec![value as f32; n]),
            DType::F64 => Tensor::from_vec(shape, vec![value; n]),
            DType::Bf16 => Tensor::from_storage(
                shape,
                Storage::Bf16(vec![bf16::f32_to_bf16_bits(value as f32); n]),
            ),
        }
    }

    /// A host tensor of the given dtype from f64 values (converted).
    pub fn from_f64_as(shape: &[usize], data: &[f64], dtype: DType) -> Tensor {
        match dtype {
            DType::F32 => Tensor::from_vec(shape, data.iter().map(|&v| v as f32).collect()),
            DType::F64 => Tensor::from_vec(shape, data.to_vec()),
            DType::Bf16 => Tensor::from_storage(
                shape,
                Storage::Bf16(
                    data.iter()
                        .map(|&v| bf16::f32_to_bf16_bits(v as f32))
                        .collect(),
                ),
            ),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::Bf16(_) => DType::Bf16,
            Storage::Cuda(b) => b.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cuda(b) => b.device(),
            _ => Device::Cpu,
        }
    }

    /// How the elements lie in memory (see `Layout`).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The same buffer declared to be in `layout`, for a backend that wrote its output in that
    /// order. Only 4-d tensors have an NHWC layout.
    pub fn with_layout(mut self, layout: Layout) -> Tensor {
        assert!(
            layout == Layout::RowMajor || self.rank() == 4,
            "an NHWC layout needs a 4-d [N, C, H, W] tensor, got shape {:?}",
            self.shape
        );
        self.layout = layout;
        self
    }

    /// A host tensor's values reordered into `layout` (a copy; same tensor when already there).
    /// Device tensors are reordered by their backend's kernels, not here.
    pub fn to_layout(&self, layout: Layout) -> Tensor {
        if self.layout == layout {
            return self.clone();
        }
        assert!(
            !self.is_cuda(),
            "to_layout of a device tensor {self:?}: use the backend's layout kernels"
        );
        let [n, c, h, w] = <[usize; 4]>::try_from(self.shape.as_slice()).unwrap_or_else(|_| {
            panic!(
                "an NHWC layout needs a 4-d tensor, got shape {:?}",
                self.shape
            )
        });
        let src = self.values_f64();
        let mut dst = vec![0.0; src.len()];
        for ni in 0..n {
            for ci in 0..c {
                for hi in 0..h {
                    for wi in 0..w {
                        let nchw = ((ni * c + ci) * h + hi) * w + wi;
                        let nhwc = ((ni * h + hi) * w + wi) * c + ci;
                        match layout {
                            Layout::Nhwc => dst[nhwc] = src[nchw],
                            Layout::RowMajor => dst[nchw] = src[nhwc],
                        }
                    }
                }
            }
        }
        Tensor::from_f64_as(&self.shape, &dst, self.dtype()).with_layout(layout)
    }

    pub fn is_cuda(&self) -> bool {
        matches!(&*self.storage, Storage::Cuda(_))
    }

    /// The device buffer of a device tensor (panics for host tensors: callers dispatch on
    /// `device()` first). The backend downcasts it to its own type.
    pub fn device_buf(&self) -> &dyn DeviceBuffer {
        match &*self.storage {
            Storage::Cuda(b) => b.as_ref(),
            _ => panic!("device_buf of a host tensor {self:?}"),
        }
    }

    /// The host slice of element type `T`. Panics if the tensor is on the GPU or of another dtype:
    /// callers dispatch on `dtype()`/`device()` first, so a panic here is a bug in podgpu.
    pub fn host<T: Elem>(&self) -> &[T] {
        T::slice(&self.storage)
            .unwrap_or_else(|| panic!("expected a host {:?} tensor, got {self:?}", T::DTYPE))
    }

    /// Mutable host slice; copies the buffer first if it is shared.
    pub fn host_mut<T: Elem>(&mut self) -> &mut [T] {
        if Arc::get_mut(&mut self.storage).is_none() {
            let copy = self.host::<T>().to_vec();
            self.storage = Arc::new(T::wrap(copy));
        }
        let storage = Arc::get_mut(&mut self.storage).expect("unique after copy");
        T::slice_mut(storage).unwrap_or_else(|| panic!("expected a host {:?} tensor", T::DTYPE))
    }

    /// Mutable access to a GPU tensor's device buffer, for in-place updates (the optimizer step,
    /// a bias added onto a fresh output). Like `host_mut`, it first copies the buffer (on the device)
    /// when another tensor shares it, so clones never see the update. Panics for host tensors.
    pub fn device_buf_mut(&mut self) -> &mut dyn DeviceBuffer {
        if Arc::get_mut(&mut self.storage).is_none() {
            let copy = match &*self.storage {
                Storage::Cuda(b) => b.duplicate(),
                _ => panic!("device_buf_mut of a host tensor {self:?}"),
            };
            self.storage = Arc::new(Storage::Cuda(copy));
        }
        match Arc::get_mut(&mut self.storage).expect("unique after copy") {
            Storage::Cuda(b) => b.as_mut(),
            _ => panic!("device_buf_mut of a host tensor"),
        }
    }

    /// Overwrites this tensor's values with `src`'s in this tensor's own memory (a host copy, or a
    /// device copy queued on the device), so the buffer keeps its address; it is first made
    /// unique if shared (`host_mut`, `device_buf_mut`), so clones never see the change. Shapes,
    /// dtypes, devices and layouts must match.
    pub fn assign(&mut self, src: &Tensor) {
        assert!(
            self.shape == src.shape
                && self.dtype() == src.dtype()
                && self.device() == src.device()
                && self.layout == src.layout,
            "assign: {src:?} into {self:?}"
        );
        match &*src.storage {
            Storage::F32(v) => self.host_mut::<f32>().copy_from_slice(v),
            Storage::F64(v) => self.host_mut::<f64>().copy_from_slice(v),
            // bf16 host tensors are storage only: nothing keeps their address.
            Storage::Bf16(v) => self.storage = Arc::new(Storage::Bf16(v.clone())),
            Storage::Cuda(b) => self.device_buf_mut().copy_from(b.as_ref()),
        }
    }

    /// Same buffer, new shape (the element count must match). Row-major tensors only: the
    /// elements of an NHWC tensor are not in shape order, so reshaping it would mix channels.
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            numel(shape),
            self.numel(),
            "cannot reshape {:?} to {shape:?}",
            self.shape
        );
        assert!(
            self.layout == Layout::RowMajor || shape == self.shape.as_slice(),
            "cannot reshape the NHWC tensor {self:?} to {shape:?}: convert it to row-major first \
             (to_layout(Layout::RowMajor))"
        );
        Tensor {
            shape: shape.to_vec(),
            layout: self.layout,
            storage: self.storage.clone(),
        }
    }

    /// All values as f64 on the host (copies from the GPU when needed). Counts as a host read.
    pub fn to_vec_f64(&self) -> Vec<f64> {
        count_host_read();
        self.values_f64()
    }

    /// `to_vec_f64` without counting (for the conversions below, which count once themselves).
    fn values_f64(&self) -> Vec<f64> {
        match &*self.storage {
            Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::F64(v) => v.clone(),
            Storage::Bf16(v) => v
                .iter()
                .map(|&b| bf16::bf16_bits_to_f32(b) as f64)
                .collect(),
            Storage::Cuda(b) => b.to_host_f32().iter().map(|&x| x as f64).collect(),
        }
    }

    /// All values as f32 on the host (copies from the GPU when needed). Counts as a host read.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        count_host_read();
        self.values_f32()
    }

    /// `to_vec_f32` without counting: a host tensor's values copied for an upload.
    fn values_f32(&self) -> Vec<f32> {
        match &*self.storage {
            Storage::F32(v) => v.clone(),
            Storage::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::Bf16(v) => v.iter().map(|&b| bf16::bf16_bits_to_f32(b)).collect(),
            Storage::Cuda(b) => b.to_host_f32(),
        }
    }

    /// A single-element tensor's value.
    pub fn item(&self) -> f64 {
        assert_eq!(
            self.numel(),
            1,
            "item() of a tensor of shape {:?}",
            self.shape
        );
        self.to_vec_f64()[0]
    }

    /// Converts to a host tensor of the given dtype (no-op when already there). A GPU tensor's
    /// values come to the host (a host read, as is a conversion between host dtypes).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if self.dtype() == dtype && !self.is_cuda() {
            return self.clone();
        }
        Tensor::from_f64_as(&self.shape, &self.to_vec_f64(), dtype).with_layout(self.layout)
    }

    /// Moves the tensor to a device, keeping its layout. GPU tensors are f32 here; f64 and bf16
    /// host data are converted.
    ///
    /// GPU → host is a host read (it waits for the device). Host → GPU does not wait: the values are
    /// copied into a buffer the GPU keeps until its stream has read them (`Gpu::upload_owned`), so a
    /// training step's batch goes up without a synchronisation.
    pub fn to_device(&self, device: Device) -> Tensor {
        match (device, &*self.storage) {
            (Device::Cpu, Storage::Cuda(b)) => {
                count_host_read();
                Tensor::from_vec(&self.shape, b.to_host_f32()).with_layout(self.layout)
            }
            (Device::Cpu, _) => self.clone(),
            (Device::Cuda(_), Storage::Cuda(b)) if b.device() == device => self.clone(),
            (Device::Cuda(_), _) => {
                let backend = Tensor::backend(device);
                let values = match &*self.storage {
                    Storage::Cuda(b) => {
                        // Another GPU's tensor passes through the host (a read of that GPU).
                        count_host_read();
                        b.to_host_f32()
                    }
                    _ => self.values_f32(),
                };
                Tensor::from_device_buffer(&self.shape, backend.upload_f32(values))
                    .with_layout(self.layout)
            }
        }
    }

    /// Largest absolute value (f64), for quick checks and guards.
    pub fn max_abs(&self) -> f64 {
        self.to_vec_f64().iter().fold(0.0, |m, &v| m.max(v.abs()))
    }

    pub fn all_finite(&self) -> bool {
        self.to_vec_f64().iter().all(|v| v.is_finite())
    }
}

/// ‖a − b‖ / ‖b‖ over all elements (the fidelity metric of DESIGN.md §2). NaN anywhere gives NaN.
pub fn rel_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_error of tensors of different sizes");
    let mut num = 0.0;
    let mut den = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if num.is_nan() || den.is_nan() {
        return f64::NAN;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panic_text(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let e = std::panic::catch_unwind(f).expect_err("should panic");
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn nhwc_round_trips_and_orders_channels_last() {
        // [N=1, C=2, H=1, W=3]: NCHW 0 1 2 | 3 4 5 → NHWC 0 3 1 4 2 5.
        let t = Tensor::from_vec(&[1, 2, 1, 3], vec![0f32, 1., 2., 3., 4., 5.]);
        let n = t.to_layout(Layout::Nhwc);
        assert_eq!(n.layout(), Layout::Nhwc);
        assert_eq!(n.shape(), t.shape(), "the shape stays the logical one");
        assert_eq!(n.host::<f32>(), &[0., 3., 1., 4., 2., 5.]);
        let back = n.to_layout(Layout::RowMajor);
        assert_eq!(back.layout(), Layout::RowMajor);
        assert_eq!(back.host::<f32>(), t.host::<f32>());
    }

    #[test]
    fn layouts_are_checked_not_assumed() {
        let t = Tensor::from_vec(&[1, 2, 2, 2], vec![1f32; 8]).to_layout(Layout::Nhwc);
        let e = panic_text(|| drop(t.reshape(&[2, 4])));
        assert!(e.contains("cannot reshape the NHWC tensor"), "{e}");
        let w = Tensor::from_vec(&[1, 2, 1, 1], vec![1f32; 2]);
        let spec = crate::ops::Conv2dSpec::new(1, 0);
        let e = panic_text(|| drop(crate::ops::conv2d_fwd(&t, &w, None, spec)));
        assert!(e.contains("tensors in different layouts"), "{e}");
        let wn = w.to_layout(Layout::Nhwc);
        let e = panic_text(|| drop(crate::ops::conv2d_fwd(&t, &wn, None, spec)));
        assert!(e.contains("expects row-major (NCHW) tensors"), "{e}");
        let e =
            panic_text(|| drop(Tensor::from_vec(&[2, 3], vec![0f32; 6]).with_layout(Layout::Nhwc)));
        assert!(e.contains("needs a 4-d"), "{e}");
    }

    #[test]
    fn bf16_host_tensors_are_storage_that_ops_refuse() {
        let t = Tensor::from_f64_as(&[3], &[1.0, 1.0 + 1.0 / 512.0, -2.5], DType::Bf16);
        assert_eq!(t.dtype(), DType::Bf16);
        // 1 + 2⁻⁹ is below half a bf16 ulp at 1: it rounds to 1.
        assert_eq!(t.to_vec_f32(), vec![1.0, 1.0, -2.5]);
        assert_eq!(t.to_dtype(DType::F32).dtype(), DType::F32);
        assert_eq!(
            Tensor::full(&[2], 3.0, DType::Bf16, Device::Cpu).to_vec_f32(),
            vec![3.0; 2]
        );
        let e = panic_text(|| drop(crate::ops::relu_fwd(&t)));
        assert!(
            e.contains("bf16 host tensor") && e.contains("to_dtype"),
            "{e}"
        );
    }

    #[test]
    fn no_device_backend_until_a_gpu_is_opened() {
        // Opening a GPU registers the backend: where one is usable this cannot be checked.
        if crate::device::usable_gpu(0).is_ok() {
            println!("SKIPPED: a GPU is usable here, so the CUDA backend is registered");
            return;
        }
        let e = backend::backend_of(Device::Cuda(0)).err().unwrap();
        assert!(e.contains("no CUDA device has been opened"), "{e}");
        assert!(backend::backend_of(Device::Cpu).is_err());
    }
}
