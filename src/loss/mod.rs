//! Losses: POD (= NaC + λ·SC over the frozen PEDCC head, DESIGN.md §1.3–1.5), softmax cross-entropy,
//! the δ schedule, and the small helpers a trainer needs around them (logits, predictions, norms).
//!
//! Every loss is a scalar `Var` of shape [1] (mean over the batch). Labels are a [B] tensor of class
//! indices on the same device as the features (`labels_tensor`, which documents the encoding), so GPU
//! kernels read them without a host round trip. The PEDCC `P` [K, n] is a plain tensor: it is frozen,
//! no gradient ever flows into it.

pub mod baselines;
mod delta;
mod nac;
mod pod;
mod sc;
mod softmax;

pub use delta::{DeltaSchedule, NormSource, ALPHA, INITIAL_DELTA, INITIAL_MEAN_NORM};
pub use nac::{nac, nac_fwd};
pub use pod::{pod, PodConfig, PodLoss};
pub use sc::{
    col_sumsq_fwd, sc, sc_coefficient, sc_grad_fwd, sc_of_normalized, sc_value_fwd,
    sub_class_centroids_fwd, ScForm,
};
pub use softmax::{softmax_ce_fwd, softmax_cross_entropy};

use crate::autograd::{Tape, Var};
use crate::cuda;
use crate::ops;
use crate::ops::dispatch;
use crate::tensor::{Device, Elem, Storage, Tensor};
use std::fmt;
use std::str::FromStr;

/// Which form of the POD loss: the paper's equations, or what the public reference code computes
/// (DESIGN.md §1.6).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// NaC denominator ‖x‖ + δ; SC not divided by n−1; δ from mean ‖x‖, starting at α·0.05.
    #[default]
    Paper,
    /// NaC denominator √(‖x‖² + δ²); SC divided by n−1; δ from mean ‖xPᵀ‖, starting at 0.05.
    Reference,
}

impl Variant {
    /// The NaC form flag the CUDA kernel reads.
    pub fn nac_form(self) -> i32 {
        match self {
            Variant::Paper => cuda::loss_kernels::NAC_PAPER,
            Variant::Reference => cuda::loss_kernels::NAC_REFERENCE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Paper => "paper",
            Variant::Reference => "reference",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Variant> {
        match s {
            "paper" => Ok(Variant::Paper),
            "reference" => Ok(Variant::Reference),
            _ => anyhow::bail!("unknown POD variant `{s}`; expected `paper` or `reference`"),
        }
    }
}

// ---- labels ----

/// Class indices as a [B] tensor on `like`'s device: what the loss ops take (and what
/// `argmax_rows_fwd` returns).
///
/// The encoding depends on the device:
/// - host: the indices as values of `like`'s dtype (f32 or f64), so gradient checks run in f64;
/// - GPU: the indices as i32 bit patterns in the tensor's 32-bit words (`cuda::loss_kernels::
///   labels_to_gpu`), which is what the CUDA kernels index with. Such a tensor is not f32 data:
///   read it with `label_values` (never `to_vec_f64` or `to_device(Cpu)`).
///
/// Making the GPU tensor is one host-to-device copy per batch, which the host does not wait for
/// (`Gpu::upload_owned`); no op reads labels back to the host.
/// Indices are not range-checked on the GPU: the data loader validates them against the classes.
pub fn labels_tensor(labels: &[usize], like: &Tensor) -> Tensor {
    match like.device() {
        Device::Cuda(_) => {
            let ints: Vec<i32> = labels.iter().map(|&l| label_i32(l as f64)).collect();
            labels_up(&cuda::buf(like).gpu, &ints)
        }
        Device::Cpu => {
            let v: Vec<f64> = labels.iter().map(|&l| l as f64).collect();
            Tensor::from_f64_as(&[labels.len()], &v, like.dtype())
        }
    }
}

fn label_i32(l: f64) -> i32 {
    assert!(
        l >= 0.0 && l.fract() == 0.0 && l <= i32::MAX as f64,
        "label {l} is not a class index"
    );
    l as i32
}

/// i32 labels into a GPU tensor [len] (bit for bit in its words), uploaded without waiting for the
/// copy (`Gpu::upload_owned`): one per training step.
fn labels_up(gpu: &std::sync::Arc<cuda::Gpu>, ints: &[i32]) -> Tensor {
    let words: Vec<f32> = ints.iter().map(|&v| f32::from_bits(v as u32)).collect();
    cuda::tensor(&[ints.len()], gpu.upload_owned(words))
}

/// The values of a host labels tensor, read in place (a CPU kernel's access, not a host read).
fn host_label_values(labels: &Tensor) -> Vec<f64> {
    match labels.storage() {
        Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Storage::F64(v) => v.clone(),
        Storage::Bf16(_) | Storage::Cuda(_) => {
            unreachable!("host_label_values of a {labels:?} (labels are f32/f64 on the host)")
        }
    }
}

/// The values of a labels tensor (or of `argmax_rows_fwd`'s predictions) on the host, decoding
/// either encoding of `labels_tensor`. Reads a GPU tensor back (synchronises).
pub fn label_values(labels: &Tensor) -> Vec<f64> {
    if labels.is_cuda() {
        cuda::loss_kernels::ints_to_host(labels)
            .into_iter()
            .map(f64::from)
            .collect()
    } else {
        host_label_values(labels)
    }
}

/// The labels as the i32 GPU tensor the CUDA kernels read, on `like`'s GPU: a GPU labels tensor as
/// it is, a host one (values) converted and uploaded.
pub(crate) fn cuda_labels(labels: &Tensor, like: &Tensor) -> Tensor {
    if labels.is_cuda() {
        return labels.clone();
    }
    let ints: Vec<i32> = host_label_values(labels)
        .into_iter()
        .map(label_i32)
        .collect();
    labels_up(&cuda::buf(like).gpu, &ints)
}

/// The class indices of a labels tensor, checked against `classes` and the batch size.
/// Panics on a bad label: data loaders and fixture readers validate labels before they get here.
pub(crate) fn label_indices(labels: &Tensor, batch: usize, classes: usize) -> Vec<usize> {
    assert_eq!(
        labels.shape(),
        &[batch],
        "labels must be [{batch}], got {:?}",
        labels.shape()
    );
    label_values(labels)
        .iter()
        .map(|&l| {
            assert!(
                l >= 0.0 && l.fract() == 0.0 && (l as usize) < classes,
                "label {l} is not a class index in 0..{classes}"
            );
            l as usize
        })
        .collect()
}

// ---- scale by a scalar tensor ----

/// x · s for a one-element tensor s: the upstream gradient of a loss scales its saved gradient
/// without reading the scalar back to the host.
pub fn scale_by_scalar_fwd(x: &Tensor, s: &Tensor) -> Tensor {
    assert_eq!(
        s.numel(),
        1,
        "scale_by_scalar: s must have one element, got {:?}",
        s.shape()
    );
    ops::assert_same_place("scale_by_scalar", &[x, s]);
    dispatch!(x, scale_by_scalar_host, cuda::nn_kernels::scale_by, x, s)
}

fn scale_by_scalar_host<T: Elem>(x: &Tensor, s: &Tensor) -> Tensor {
    let s = s.host::<T>()[0];
    Tensor::from_vec(x.shape(), x.host::<T>().iter().map(|&v| v * s).collect())
}

// ---- the PEDCC head and classification ----

/// logits = x Pᵀ [B, K] with the frozen PEDCC P [K, n] (the gradient flows into x only).
pub fn pedcc_logits(t: &mut Tape, x: &Var, p: &Tensor) -> Var {
    let pv = t.constant(p.clone());
    ops::matmul(t, x, false, &pv, true)
}

/// Index of the largest entry of every row → [B], encoded like `labels_tensor` (floats on the host,
/// i32 on a GPU). With unit-norm PEDCC rows the argmax of x Pᵀ is the argmax of the cosine
/// (DESIGN.md §1.2). Ties go to the lowest index (as `torch.argmax`); NaN rows give index 0 on the host.
pub fn argmax_rows_fwd(logits: &Tensor) -> Tensor {
    assert_eq!(logits.rank(), 2, "argmax_rows of {:?}", logits.shape());
    dispatch!(logits, argmax_rows_host, argmax_rows_cuda, logits)
}

fn argmax_rows_cuda(logits: &Tensor) -> Tensor {
    cuda::loss_kernels::argmax_rows(logits, None, None)
}

fn argmax_rows_host<T: Elem>(logits: &Tensor) -> Tensor {
    let (b, k) = (logits.dim(0), logits.dim(1));
    let idx: Vec<T> = logits
        .host::<T>()
        .chunks_exact(k.max(1))
        .map(|row| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            T::of(best as f64)
        })
        .collect();
    Tensor::from_vec(&[b], idx)
}

/// Predicted classes on the host.
pub fn predictions(logits: &Tensor) -> Vec<usize> {
    label_values(&argmax_rows_fwd(logits))
        .iter()
        .map(|&v| v as usize)
        .collect()
}

/// How many rows of `logits` have their argmax at the label. On a GPU the count is made there and
/// only that one number is read back.
pub fn count_correct(logits: &Tensor, labels: &[usize]) -> usize {
    assert_eq!(
        logits.rank(),
        2,
        "count_correct of logits {:?}",
        logits.shape()
    );
    assert_eq!(
        logits.dim(0),
        labels.len(),
        "count_correct: batch sizes differ"
    );
    if logits.is_cuda() {
        let gpu = cuda::buf(logits).gpu.clone();
        let y = labels_tensor(labels, logits);
        let correct = cuda::loss_kernels::accumulator(&gpu);
        cuda::loss_kernels::argmax_rows(logits, Some(&y), Some(&correct));
        return cuda::loss_kernels::ints_to_host(&correct)[0] as usize;
    }
    let pred = predictions(logits);
    pred.iter().zip(labels).filter(|(p, l)| p == l).count()
}

/// Σ_b ‖x_b‖ over the rows of x (the δ schedule accumulates these; divide by the sample count). On a
/// GPU the sum is made there and one number is read back.
pub fn sum_row_norms(x: &Tensor) -> f64 {
    let norms = ops::row_norms_fwd(x);
    if norms.is_cuda() {
        return cuda::loss_kernels::sum(&norms).item();
    }
    host_norm_sum(&norms)
}

/// Σ of a host tensor of norms in f64, in order: the δ schedule's sum on the CPU (the trainer's step
/// ledger adds exactly this).
pub fn host_norm_sum(norms: &Tensor) -> f64 {
    match norms.storage() {
        Storage::F32(v) => v.iter().map(|&x| x as f64).sum(),
        Storage::F64(v) => v.iter().sum(),
        Storage::Bf16(_) | Storage::Cuda(_) => {
            panic!("host_norm_sum of a {norms:?} (norms are f32/f64 on the host)")
        }
    }
}

/// mean_b ‖x_b‖ (paper δ schedule: the latent features x).
pub fn mean_row_norm(x: &Tensor) -> f64 {
    sum_row_norms(x) / x.dim(0).max(1) as f64
}

/// What the δ schedule of `variant` needs from a batch: Σ_b ‖x_b‖ (paper) or Σ_b ‖x_b Pᵀ‖ (reference),
/// given the features and the logits x Pᵀ of the same batch.
pub fn delta_norm_sum(variant: Variant, x: &Tensor, logits: &Tensor) -> f64 {
    match DeltaSchedule::norm_source(variant) {
        NormSource::Features => sum_row_norms(x),
        NormSource::Logits => sum_row_norms(logits),
    }
}

/// The per-row norms whose sum `delta_norm_sum` is, left on the tensors' device: ‖x_b‖ (paper) or
/// ‖x_b Pᵀ‖ (reference).
pub fn delta_norms(variant: Variant, x: &Tensor, logits: &Tensor) -> Tensor {
    match DeltaSchedule::norm_source(variant) {
        NormSource::Features => ops::row_norms_fwd(x),
        NormSource::Logits => ops::row_norms_fwd(logits),
    }
}
