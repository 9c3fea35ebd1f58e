//! bf16 storage on the GPU (cuda/bf16.cu): a bf16 buffer type the tensor sees as `DType::Bf16`,
//! and the f32 ↔ bf16 conversions, bit for bit those of the CPU (`tensor::bf16`), so that the
//! GPU's bf16 path and the CPU's emulation (`cpu::bf16`) store the same values.
//!
//! A `Bf16Buf` of `len` elements lives in ⌈len/2⌉ 32-bit words of the caching pool (the pool
//! hands out f32 blocks; two bf16 values share a word). cuDNN and cuBLAS read it through its
//! device pointer with `CUDNN_DATA_BFLOAT16` / `CUDA_R_16BF` descriptors.

use super::launch::{check, func, grid_1d};
use super::{buf, tensor, CudaBuf, Gpu};
use crate::tensor::bf16::bf16_bits_to_f32;
use crate::tensor::{DType, Device, DeviceBuffer, Tensor};
use cudarc::driver::PushKernelArg;
use std::sync::Arc;

/// `len` bf16 values in device memory.
pub struct Bf16Buf {
    words: CudaBuf,
    len: usize,
}

impl Bf16Buf {
    /// Uninitialised storage for `len` bf16 values.
    pub fn alloc(gpu: &Arc<Gpu>, len: usize) -> Bf16Buf {
        Bf16Buf {
            words: gpu.alloc(len.div_ceil(2)),
            len,
        }
    }

    /// `alloc` that returns out-of-memory as an error.
    pub fn try_alloc(gpu: &Arc<Gpu>, len: usize) -> Result<Bf16Buf, super::OutOfMemory> {
        Ok(Bf16Buf {
            words: gpu.try_alloc(len.div_ceil(2))?,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.words.gpu
    }

    /// The device address of the first value (for cuDNN/cuBLAS descriptors).
    pub fn device_ptr(&self) -> u64 {
        self.words.device_ptr()
    }

    /// The 32-bit pool words holding the values (kernel arguments: `unsigned short*`).
    pub(super) fn words(&self) -> &CudaBuf {
        &self.words
    }

    pub(super) fn words_mut(&mut self) -> &mut CudaBuf {
        &mut self.words
    }

    /// The buffer as a GPU tensor of `shape` (`DType::Bf16`, row-major).
    pub fn into_tensor(self, shape: &[usize]) -> Tensor {
        Tensor::from_device_buffer(shape, Box::new(self))
    }

    /// The stored bit patterns (waits for the device).
    pub fn to_host_bits(&self) -> Vec<u16> {
        let words = self.words.to_host();
        let mut out = Vec::with_capacity(self.len);
        for w in words {
            let b = w.to_bits();
            // Little-endian: element 2i is the low half of word i.
            out.push(b as u16);
            out.push((b >> 16) as u16);
        }
        out.truncate(self.len);
        out
    }
}

impl DeviceBuffer for Bf16Buf {
    fn device(&self) -> Device {
        Device::Cuda(self.words.gpu.ordinal)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        DType::Bf16
    }
    fn to_host_f32(&self) -> Vec<f32> {
        self.to_host_bits()
            .into_iter()
            .map(bf16_bits_to_f32)
            .collect()
    }
    fn duplicate(&self) -> Box<dyn DeviceBuffer> {
        Box::new(Bf16Buf {
            words: self.words.duplicate(),
            len: self.len,
        })
    }
    fn copy_from(&mut self, src: &dyn DeviceBuffer) {
        let src = src
            .as_any()
            .downcast_ref::<Bf16Buf>()
            .expect("copy_from: a bf16 CUDA buffer");
        assert_eq!(src.len, self.len, "copy_from: bf16 lengths differ");
        self.words.copy_from_buf(&src.words);
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The bf16 storage of a `DType::Bf16` GPU tensor (panics for others: callers check the dtype).
pub fn bf16_buf(t: &Tensor) -> &Bf16Buf {
    t.device_buf()
        .as_any()
        .downcast_ref::<Bf16Buf>()
        .unwrap_or_else(|| panic!("expected a bf16 GPU tensor, got {t:?}"))
}

/// An f32 GPU tensor converted to a bf16 one (round to nearest even).
pub fn to_bf16(x: &Tensor) -> Tensor {
    let src = buf(x);
    let gpu = src.gpu.clone();
    let n = x.numel();
    let mut out = Bf16Buf::alloc(&gpu, n);
    if n > 0 {
        let f = func(&gpu, "bf16", "pack_bf16_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.words.raw_mut()).arg(src.raw()).arg(&n64);
        // SAFETY: matches pack_bf16_f32(unsigned short*, const float*, i64); out holds ⌈n/2⌉
        // words = n bf16 values, src n floats.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "pack_bf16_f32");
    }
    Tensor::from_device_buffer(x.shape(), Box::new(out)).with_layout(x.layout())
}

/// A bf16 GPU tensor converted to f32 (exact).
pub fn to_f32(x: &Tensor) -> Tensor {
    let src = bf16_buf(x);
    let gpu = src.gpu().clone();
    let n = x.numel();
    let mut out = gpu.alloc(n);
    if n > 0 {
        let f = func(&gpu, "bf16", "unpack_bf16_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(out.raw_mut()).arg(src.words.raw()).arg(&n64);
        // SAFETY: matches unpack_bf16_f32(float*, const unsigned short*, i64).
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "unpack_bf16_f32");
    }
    tensor(x.shape(), out).with_layout(x.layout())
}

/// An f32 GPU tensor with its values rounded to bf16, still in f32 words (the GPU twin of
/// `cpu::bf16::round_if`).
pub fn round_to_bf16(x: &Tensor) -> Tensor {
    let mut y = x.clone();
    let n = y.numel();
    if n > 0 {
        let b = super::buf_mut(&mut y);
        let gpu = b.gpu.clone();
        let f = func(&gpu, "bf16", "round_bf16_f32");
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(b.raw_mut()).arg(&n64);
        // SAFETY: matches round_bf16_f32(float*, i64); the buffer is this tensor's alone.
        check(unsafe { l.launch(grid_1d(&gpu, n)) }, "round_bf16_f32");
    }
    y
}

/// op(A)·op(B) of two f32 GPU tensors (2-d) with bf16 GEMM inputs and an f32 output: both are
/// converted to bf16 (`to_bf16`), multiplied by `blas::gemm_bf16`. The GPU form of the CPU
/// emulation's linear-layer product (`ops::linear` under `cpu::bf16`).
pub fn matmul_bf16_inputs(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Tensor {
    assert!(a.rank() == 2 && b.rank() == 2, "matmul of {a:?} and {b:?}");
    let (m, k) = if ta {
        (a.dim(1), a.dim(0))
    } else {
        (a.dim(0), a.dim(1))
    };
    let (k2, n) = if tb {
        (b.dim(1), b.dim(0))
    } else {
        (b.dim(0), b.dim(1))
    };
    assert_eq!(k, k2, "matmul_bf16_inputs: inner dimensions differ");
    let (ab, bb) = (to_bf16(a), to_bf16(b));
    let gpu = buf(a).gpu.clone();
    let mut c = gpu.alloc(m * n);
    super::blas::gemm_bf16(&gpu, m, k, n, bf16_buf(&ab), ta, bf16_buf(&bb), tb, &mut c);
    tensor(&[m, n], c)
}

/// conv2d of two f32 GPU tensors through bf16 storage: x and w converted to bf16, the bf16
/// convolution (`dnn::conv2d_fwd_bf16`, f32 compute), y back to f32 (exact). The GPU form of the
/// CPU emulation's convolution forward (`ops::conv2d` under `cpu::bf16`): y = bf16(conv(bf16(x),
/// bf16(w))).
pub fn conv2d_bf16_inputs(x: &Tensor, w: &Tensor, geom: &super::dnn::ConvGeom) -> Tensor {
    to_f32(&super::dnn::conv2d_fwd_bf16(&to_bf16(x), &to_bf16(w), geom))
}

/// dx of a convolution of f32 GPU tensors through bf16 storage: dy and w converted to bf16, the
/// bf16 backward-data convolution (`dnn::conv2d_bwd_data_bf16`), dx back to f32 (exact). The GPU
/// form of the emulation's dx = bf16(conv_bwd_data(bf16(dy), bf16(w))).
pub fn conv2d_bwd_data_bf16_inputs(
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    geom: &super::dnn::ConvGeom,
) -> Tensor {
    let dx = super::dnn::conv2d_bwd_data_bf16(&to_bf16(dy), &to_bf16(w), x_shape, geom);
    to_f32(&dx)
}

/// dw of a convolution of f32 GPU tensors through bf16 storage: x and dy converted to bf16, the
/// bf16 backward-filter convolution (`dnn::conv2d_bwd_filter_bf16`), whose dw is f32 already. The
/// GPU form of the emulation's dw = conv_bwd_weight(bf16(x), bf16(dy)), kept f32.
pub fn conv2d_bwd_filter_bf16_inputs(
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    geom: &super::dnn::ConvGeom,
) -> Tensor {
    super::dnn::conv2d_bwd_filter_bf16(&to_bf16(x), &to_bf16(dy), w_shape, geom)
}
