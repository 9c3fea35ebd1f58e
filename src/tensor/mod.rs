//! Tensors: a shape and a buffer that lives on exactly one device.
//!
//! Host buffers come in two element types: f32 for training and f64 for gradient checks. GPU buffers are
//! f32 master data in device memory (see `crate::cuda`). A `Tensor` is cheap to clone (the buffer is
//! reference counted), which is what lets the tape save activations without copying them.

mod elem;

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
    Cuda(crate::cuda::CudaBuf),
}

/// An n-dimensional array, row-major (NCHW for images).
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?}, {})",
            self.shape,
            self.dtype(),
            self.device()
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
            storage: Arc::new(T::wrap(data)),
        }
    }

    pub fn from_storage(shape: &[usize], storage: Storage) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(storage),
        }
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Tensor {
        Tensor::full(shape, 0.0, dtype, device)
    }

    /// A tensor filled with `value`. On a GPU it is filled there (no host buffer, no copy): the
    /// tape's backward seed and fresh momentum buffers are made this way on every step.
    pub fn full(shape: &[usize], value: f64, dtype: DType, device: Device) -> Tensor {
        if let Device::Cuda(i) = device {
            let gpu = crate::cuda::Gpu::get(i)
                .unwrap_or_else(|e| panic!("cuda:{i} requested but not usable: {e}"));
            if value == 0.0 {
                return crate::cuda::tensor(shape, gpu.alloc_zeros(numel(shape)));
            }
            return crate::cuda::nn_kernels::fill(shape, value as f32, &gpu);
        }
        let n = numel(shape);
        let host = match dtype {
            DType::F32 => Tensor::from_vec(shape, vec![value as f32; n]),
            DType::F64 => Tensor::from_vec(shape, vec![value; n]),
        };
        host.to_device(device)
    }

    /// A host tensor of the given dtype from f64 values (converted).
    pub fn from_f64_as(shape: &[usize], data: &[f64], dtype: DType) -> Tensor {
        match dtype {
            DType::F32 => Tensor::from_vec(shape, data.iter().map(|&v| v as f32).collect()),
            DType::F64 => Tensor::from_vec(shape, data.to_vec()),
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
            Storage::F32(_) | Storage::Cuda(_) => DType::F32,
            Storage::F64(_) => DType::F64,
        }
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
            _ => Device::Cpu,
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(&*self.storage, Storage::Cuda(_))
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
    pub fn cuda_buf_mut(&mut self) -> &mut crate::cuda::CudaBuf {
        if Arc::get_mut(&mut self.storage).is_none() {
            let copy = match &*self.storage {
                Storage::Cuda(b) => b.duplicate(),
                _ => panic!("cuda_buf_mut of a host tensor {self:?}"),
            };
            self.storage = Arc::new(Storage::Cuda(copy));
        }
        match Arc::get_mut(&mut self.storage).expect("unique after copy") {
            Storage::Cuda(b) => b,
            _ => panic!("cuda_buf_mut of a host tensor"),
        }
    }

    /// Same buffer, new shape (the element count must match).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            numel(shape),
            self.numel(),
            "cannot reshape {:?} to {shape:?}",
            self.shape
        );
        Tensor {
            shape: shape.to_vec(),
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
            Storage::Cuda(b) => b.to_host().iter().map(|&x| x as f64).collect(),
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
            Storage::Cuda(b) => b.to_host(),
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
        Tensor::from_f64_as(&self.shape, &self.to_vec_f64(), dtype)
    }

    /// Moves the tensor to a device. GPU tensors are f32; f64 host data is converted.
    ///
    /// GPU → host is a host read (it waits for the device). Host → GPU does not wait: the values are
    /// copied into a buffer the GPU keeps until its stream has read them (`Gpu::upload_owned`), so a
    /// training step's batch goes up without a synchronisation.
    pub fn to_device(&self, device: Device) -> Tensor {
        match (device, &*self.storage) {
            (Device::Cpu, Storage::Cuda(b)) => {
                count_host_read();
                Tensor::from_vec(&self.shape, b.to_host())
            }
            (Device::Cpu, _) => self.clone(),
            (Device::Cuda(i), Storage::Cuda(b)) if b.ordinal() == i => self.clone(),
            (Device::Cuda(i), _) => {
                let gpu = crate::cuda::Gpu::get(i)
                    .unwrap_or_else(|e| panic!("cuda:{i} requested but not usable: {e}"));
                let values = match &*self.storage {
                    Storage::Cuda(b) => {
                        // Another GPU's tensor passes through the host (a read of that GPU).
                        count_host_read();
                        b.to_host()
                    }
                    _ => self.values_f32(),
                };
                Tensor::from_storage(&self.shape, Storage::Cuda(gpu.upload_owned(values)))
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
