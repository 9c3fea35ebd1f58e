//! PEDCC files: safetensors with one tensor `pedcc` [K, n] f32, plus metadata saying how it was made.

use super::Pedcc;
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// The tensor name inside a PEDCC file.
pub const TENSOR_NAME: &str = "pedcc";

/// Largest |‖p_i‖ − 1| a loaded file may have: f32 rounding gives ~1e-7; more means it is no PEDCC.
const NORM_TOLERANCE: f64 = 1e-3;

/// Writes the centroids as f32 to `path` atomically (a temporary file in the same folder, renamed over
/// the target), so a crash never leaves a half-written PEDCC behind.
pub fn save(path: &Path, pedcc: &Pedcc) -> Result<()> {
    let data: Vec<u8> = pedcc
        .values
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::F32, vec![pedcc.classes, pedcc.dim], &data)
        .map_err(|e| anyhow!("building the PEDCC tensor: {e}"))?;
    let meta: HashMap<String, String> = [
        ("classes", pedcc.classes.to_string()),
        ("dim", pedcc.dim.to_string()),
        ("method", pedcc.method.name().to_string()),
        ("seed", pedcc.seed.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::serialize([(TENSOR_NAME, view)], Some(meta))
        .map_err(|e| anyhow!("serialising the PEDCC: {e}"))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// Reads a PEDCC file: tensor `pedcc` [K, n] (f32 or f64) with unit rows → f32 host tensor [K, n].
pub fn load(path: &Path) -> Result<Tensor> {
    let bytes = crate::fsutil::read_regular(path)
        .with_context(|| format!("cannot read PEDCC file {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "{} is not a safetensors file ({e}); make one with `podgpu pedcc`",
            path.display()
        )
    })?;
    let view = st.tensor(TENSOR_NAME).map_err(|_| {
        anyhow!(
            "{} has no tensor named `{TENSOR_NAME}` (it has: {}); make one with `podgpu pedcc`",
            path.display(),
            st.names().join(", ")
        )
    })?;
    let shape = view.shape().to_vec();
    if shape.len() != 2 || shape[0] < 2 || shape[1] < 1 {
        bail!(
            "{}: tensor `{TENSOR_NAME}` has shape {shape:?}; expected [classes ≥ 2, dim ≥ 1]",
            path.display()
        );
    }
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => view
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        d => bail!(
            "{}: tensor `{TENSOR_NAME}` is {d:?}; expected F32 (or F64)",
            path.display()
        ),
    };
    if values.iter().any(|v| !v.is_finite()) {
        bail!(
            "{}: the PEDCC contains NaN or infinite values",
            path.display()
        );
    }
    // Checking it needs the K×K inner products (in blocks): refused when K is beyond the machine.
    super::check_size(shape[0], shape[1])
        .with_context(|| format!("PEDCC file {}", path.display()))?;
    let v64: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let max_norm_error = v64
        .chunks_exact(shape[1])
        .map(|r| (r.iter().map(|v| v * v).sum::<f64>().sqrt() - 1.0).abs())
        .fold(0.0, f64::max);
    if max_norm_error > NORM_TOLERANCE {
        bail!(
            "{}: PEDCC rows must have unit norm, but one is off by {:.3e}; regenerate it with \
             `podgpu pedcc`",
            path.display(),
            max_norm_error
        );
    }
    super::check_distinct(
        &v64,
        shape[0],
        shape[1],
        &format!("the PEDCC in {}", path.display()),
    )?;
    Ok(Tensor::from_vec(&shape, values))
}
