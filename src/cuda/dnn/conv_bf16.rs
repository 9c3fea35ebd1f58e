//! bf16 convolutions, the first cuDNN piece of the bf16 path (issue 12 item 1): the forward pass
//! with x, w and y stored in bf16 (`CUDNN_DATA_BFLOAT16`), f32 compute (the convolution
//! descriptor's type) and tensor-op math — the arithmetic the CPU's emulation computes (bf16
//! inputs, f32 sums, y rounded to bf16; `cpu::bf16`).
//!
//! Not yet the fast path's form: descriptors are made per call (as candle does; no plan cache), the
//! algorithm is the first of a fixed list that cuDNN accepts for the shape (no measured choice),
//! layouts are NCHW, and the backward passes are still to write (docs/GPU.md, "fast path").

use super::{alloc, ok, with_dnn, ConvDesc, ConvGeom, FilterDesc, TensorDesc};
use crate::cuda::bf16::{bf16_buf, Bf16Buf};
use crate::tensor::{DType, Tensor};
use cudarc::cudnn::sys;
use std::ffi::c_void;

const BF16: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;

fn tensor_desc(d: [usize; 4]) -> Result<TensorDesc, String> {
    let t = TensorDesc(
        cudarc::cudnn::result::create_tensor_descriptor().map_err(|e| format!("{e:?}"))?,
    );
    // SAFETY: fresh descriptor, configured once.
    ok(
        unsafe {
            sys::cudnnSetTensor4dDescriptor(
                t.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                BF16,
                d[0] as i32,
                d[1] as i32,
                d[2] as i32,
                d[3] as i32,
            )
        },
        "cudnnSetTensor4dDescriptor (bf16)",
    )?;
    Ok(t)
}

fn shape4(t: &Tensor, what: &str) -> [usize; 4] {
    assert_eq!(
        t.dtype(),
        DType::Bf16,
        "{what}: expected a bf16 GPU tensor, got {t:?}"
    );
    t.shape()
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: expected an NCHW tensor, got {t:?}"))
}

/// y = conv2d(x, w) with bf16 x [N, C, H, W], w [K, C/groups, R, S] and a bf16 y [N, K, OH, OW].
pub fn conv2d_fwd_bf16(x: &Tensor, w: &Tensor, geom: &ConvGeom) -> Tensor {
    let (xs, ws) = (
        shape4(x, "conv2d_fwd_bf16 x"),
        shape4(w, "conv2d_fwd_bf16 w"),
    );
    let (xb, wb) = (bf16_buf(x), bf16_buf(w));
    let gpu = xb.gpu().clone();
    let (oh, ow) = geom.out_hw(xs[2], xs[3], ws[2], ws[3]);
    let ys = [xs[0], ws[0], oh, ow];
    let y = with_dnn(&gpu, |d| {
        let (xd, yd) = (tensor_desc(xs)?, tensor_desc(ys)?);
        let wd = FilterDesc(
            cudarc::cudnn::result::create_filter_descriptor().map_err(|e| format!("{e:?}"))?,
        );
        let cd = ConvDesc(
            cudarc::cudnn::result::create_convolution_descriptor().map_err(|e| format!("{e:?}"))?,
        );
        // SAFETY: fresh descriptors, configured once.
        unsafe {
            ok(
                sys::cudnnSetFilter4dDescriptor(
                    wd.0,
                    BF16,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    ws[0] as i32,
                    ws[1] as i32,
                    ws[2] as i32,
                    ws[3] as i32,
                ),
                "cudnnSetFilter4dDescriptor (bf16)",
            )?;
            ok(
                sys::cudnnSetConvolution2dDescriptor(
                    cd.0,
                    geom.pad[0] as i32,
                    geom.pad[1] as i32,
                    geom.stride[0] as i32,
                    geom.stride[1] as i32,
                    geom.dilation[0] as i32,
                    geom.dilation[1] as i32,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    // f32 accumulation over bf16 data.
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "cudnnSetConvolution2dDescriptor (bf16)",
            )?;
            ok(
                sys::cudnnSetConvolutionGroupCount(cd.0, geom.groups as i32),
                "cudnnSetConvolutionGroupCount",
            )?;
            ok(
                sys::cudnnSetConvolutionMathType(cd.0, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH),
                "cudnnSetConvolutionMathType",
            )?;
        }
        // The first algorithm cuDNN accepts for this shape with bf16 data (it answers
        // NOT_SUPPORTED for the others when asked for their workspace).
        use sys::cudnnConvolutionFwdAlgo_t as A;
        let mut chosen = None;
        for algo in [
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        ] {
            let mut bytes = 0usize;
            // SAFETY: configured descriptors; writes one size.
            let s = unsafe {
                sys::cudnnGetConvolutionForwardWorkspaceSize(
                    d.handle, xd.0, wd.0, cd.0, yd.0, algo, &mut bytes,
                )
            };
            if s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                chosen = Some((algo, bytes));
                break;
            }
        }
        let (algo, ws_bytes) = chosen.ok_or_else(|| {
            format!("cuDNN offers no bf16 forward algorithm for x {xs:?}, w {ws:?}, {geom:?}")
        })?;
        let out = Bf16Buf::try_alloc(&gpu, ys.iter().product())?;
        let wsb = alloc(&gpu, ws_bytes.div_ceil(4))?;
        let (one, zero) = (1.0f32, 0.0f32);
        // SAFETY: x, w and out hold the bf16 values the descriptors describe; the workspace has
        // the bytes cuDNN asked for; alpha and beta are f32 as the f32 compute type requires.
        let status = unsafe {
            sys::cudnnConvolutionForward(
                d.handle,
                (&one) as *const f32 as *const c_void,
                xd.0,
                xb.device_ptr() as *const c_void,
                wd.0,
                wb.device_ptr() as *const c_void,
                cd.0,
                algo,
                wsb.device_ptr() as *mut c_void,
                ws_bytes,
                (&zero) as *const f32 as *const c_void,
                yd.0,
                out.device_ptr() as *mut c_void,
            )
        };
        ok(status, &format!("cudnnConvolutionForward (bf16, {algo:?})"))?;
        Ok(out)
    });
    Tensor::from_device_buffer(&ys, Box::new(y))
}
