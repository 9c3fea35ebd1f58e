//! Reference fixtures: safetensors files that describe one computation, its inputs and its expected
//! results (written by `tools/make_fixtures.py` or by users; the schema is in docs/FIXTURES.md).
//!
//! A fixture is self-describing: the safetensors metadata (`__metadata__`, a string map) names the
//! computation (`kind`) and its settings; tensors are named `input.<name>`, `param.<state_dict key>`
//! and `expected.<output>`, where the outputs are `loss`, `grad.<input or param name>` and per-kind
//! extras. This module only reads and checks the file; `cli::fidelity` runs the computations.

use crate::tensor::{DType, Device, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The `format` metadata value of a podgpu fixture (optional; when present it must be this).
pub const FORMAT: &str = "podgpu-fixture";
pub const INPUT_PREFIX: &str = "input.";
pub const PARAM_PREFIX: &str = "param.";
pub const EXPECTED_PREFIX: &str = "expected.";

/// One tensor of a fixture, converted to f64 (floats exactly; integers exactly up to 2^53).
#[derive(Clone, Debug)]
pub struct FixtureTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype in the file (e.g. "F32", "I64").
    pub stored_as: String,
    pub values: Vec<f64>,
}

impl FixtureTensor {
    pub fn numel(&self) -> usize {
        self.values.len()
    }

    /// A host tensor of the given dtype on the given device.
    pub fn to_tensor(&self, dtype: DType, device: Device) -> Tensor {
        Tensor::from_f64_as(&self.shape, &self.values, dtype).to_device(device)
    }

    /// Errors unless the shape is `want` (a `None` entry matches any size).
    pub fn expect_shape(&self, want: &[Option<usize>]) -> Result<()> {
        let ok = self.shape.len() == want.len()
            && self
                .shape
                .iter()
                .zip(want)
                .all(|(&s, w)| w.is_none_or(|w| w == s));
        if !ok {
            let want: Vec<String> = want
                .iter()
                .map(|w| w.map_or("*".to_string(), |w| w.to_string()))
                .collect();
            bail!(
                "tensor `{}` has shape {:?}; expected [{}]",
                self.name,
                self.shape,
                want.join(", ")
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Fixture {
    pub path: PathBuf,
    pub meta: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, FixtureTensor>,
}

impl Fixture {
    /// Reads a fixture file; errors say what is wrong with it.
    pub fn read(path: &Path) -> Result<Fixture> {
        let bytes = crate::fsutil::read_regular(path)
            .with_context(|| format!("cannot read fixture {}", path.display()))?;
        Fixture::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Fixture> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("{} is not a safetensors file: {e}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow!("{} is not a safetensors file: {e}", path.display()))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let values = decode(view.dtype(), view.data())
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
            tensors.insert(
                name.clone(),
                FixtureTensor {
                    name: name.clone(),
                    shape: view.shape().to_vec(),
                    stored_as: format!("{:?}", view.dtype()),
                    values,
                },
            );
        }
        let fx = Fixture {
            path: path.to_path_buf(),
            meta,
            tensors,
        };
        if let Some(f) = fx.meta.get("format") {
            if f != FORMAT {
                bail!(
                    "{}: metadata format is `{f}`, not `{FORMAT}`; this is not a podgpu fixture",
                    path.display()
                );
            }
        }
        fx.kind()?;
        Ok(fx)
    }

    /// The computation this fixture describes (metadata `kind`).
    pub fn kind(&self) -> Result<&str> {
        self.meta.get("kind").map(String::as_str).ok_or_else(|| {
            anyhow!(
                "{}: no `kind` in the safetensors metadata; a fixture must say what it computes \
                 (pod_loss, softmax_ce or model; see docs/FIXTURES.md)",
                self.path.display()
            )
        })
    }

    /// A required metadata value.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.meta.get(key).map(String::as_str).ok_or_else(|| {
            anyhow!(
                "{}: metadata `{key}` is missing (a {} fixture needs it; see docs/FIXTURES.md)",
                self.path.display(),
                self.kind().unwrap_or("?")
            )
        })
    }

    /// A required metadata value parsed as `T`.
    pub fn meta_parse<T: FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.meta(key)?;
        v.trim().parse::<T>().map_err(|e| {
            anyhow!(
                "{}: metadata `{key}` = `{v}` is not valid: {e}",
                self.path.display()
            )
        })
    }

    /// An optional metadata value parsed as `T`, checked against `actual` when present (metadata that
    /// restates a shape must agree with the tensors).
    pub fn check_meta_usize(&self, key: &str, actual: usize) -> Result<()> {
        if self.meta.contains_key(key) {
            let v: usize = self.meta_parse(key)?;
            if v != actual {
                bail!(
                    "{}: metadata `{key}` = {v}, but the tensors say {actual}",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// A required tensor.
    pub fn tensor(&self, name: &str) -> Result<&FixtureTensor> {
        self.tensors.get(name).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{name}` is missing (a {} fixture needs it; see docs/FIXTURES.md)",
                self.path.display(),
                self.kind().unwrap_or("?")
            )
        })
    }

    /// Class labels from a [batch] tensor (any integer dtype, or floats with integral values),
    /// each checked to be in 0..classes.
    pub fn labels(&self, name: &str, batch: usize, classes: usize) -> Result<Vec<usize>> {
        let t = self.tensor(name)?;
        t.expect_shape(&[Some(batch)])
            .with_context(|| format!("{}", self.path.display()))?;
        t.values
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if l.fract() == 0.0 && l >= 0.0 && l < classes as f64 {
                    Ok(l as usize)
                } else {
                    Err(anyhow!(
                        "{}: label {i} of `{name}` is {l}; labels must be class indices in \
                         0..{classes}",
                        self.path.display()
                    ))
                }
            })
            .collect()
    }

    /// The expected outputs: (output name without the `expected.` prefix, tensor).
    pub fn expected(&self) -> Vec<(&str, &FixtureTensor)> {
        self.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(EXPECTED_PREFIX).map(|n| (n, t)))
            .collect()
    }

    /// The `param.*` tensors: (state_dict key, tensor).
    pub fn params(&self) -> Vec<(&str, &FixtureTensor)> {
        self.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(PARAM_PREFIX).map(|n| (n, t)))
            .collect()
    }
}

/// Little-endian tensor bytes → f64.
fn decode(dtype: Dtype, data: &[u8]) -> Result<Vec<f64>> {
    fn le<const N: usize, F: Fn([u8; N]) -> f64>(data: &[u8], f: F) -> Vec<f64> {
        data.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N bytes")))
            .collect()
    }
    Ok(match dtype {
        Dtype::F64 => le(data, f64::from_le_bytes),
        Dtype::F32 => le(data, |b| f32::from_le_bytes(b) as f64),
        Dtype::I64 => le(data, |b| i64::from_le_bytes(b) as f64),
        Dtype::U64 => le(data, |b| u64::from_le_bytes(b) as f64),
        Dtype::I32 => le(data, |b| i32::from_le_bytes(b) as f64),
        Dtype::U32 => le(data, |b| u32::from_le_bytes(b) as f64),
        Dtype::I16 => le(data, |b| i16::from_le_bytes(b) as f64),
        Dtype::U16 => le(data, |b| u16::from_le_bytes(b) as f64),
        Dtype::I8 => le(data, |b: [u8; 1]| b[0] as i8 as f64),
        Dtype::U8 => le(data, |b: [u8; 1]| b[0] as f64),
        Dtype::BOOL => le(data, |b: [u8; 1]| f64::from(u8::from(b[0] != 0))),
        d => bail!("dtype {d:?} is not supported; store floats as F32 or F64 and labels as I64"),
    })
}
