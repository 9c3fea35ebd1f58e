//! `--init FILE.safetensors`: start a transformer from a timm state dict (what
//! `safetensors.torch.save_file(timm.create_model(name, pretrained=True).state_dict(), FILE)` writes).
//!
//! Every backbone parameter is read by its timm name. The position embeddings (ViT) are resampled
//! when the patch grid differs (timm's `resample_abs_pos_embed`: bicubic with antialiasing, the class
//! token kept), and the relative-position-bias tables (Swin) when the window differs (timm's
//! `resize_rel_pos_bias_table`: linear interpolation from geometric-progression offsets). Both are
//! checked against timm (`tests/timm_init.rs`). The old classifier (`head.*`) is dropped;
//! the head and FC1 are new. A parameter missing from the file or of another shape is an error
//! naming the key; keys the model does not use are listed.

use crate::autograd::{ParamKind, ParamStore};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// What `load_timm` did, for the run's log.
#[derive(Clone, Debug, Default)]
pub struct InitReport {
    /// Parameters copied as they were.
    pub loaded: Vec<String>,
    /// Parameters resampled to the model's size: (name, file shape, model shape).
    pub resampled: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// The model's parameters the file has no value for (the new head and FC1).
    pub new: Vec<String>,
    /// The file's keys the model does not use (the old classifier, timm's non-persistent buffers).
    pub unused: Vec<String>,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  loaded {} tensors", self.loaded.len())?;
        for (n, a, b) in &self.resampled {
            writeln!(f, "  resampled {n}: {a:?} → {b:?}")?;
        }
        writeln!(f, "  new (trained from scratch): {}", list(&self.new))?;
        write!(
            f,
            "  unused from the file (the old classifier, buffers): {}",
            list(&self.unused)
        )
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// A state dict read as (shape, f64 values) by name.
pub type StateDict = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// Reads every tensor of a safetensors file as f64 values with its shape.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("could not read --init file {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("--init {}: not a safetensors file ({e})", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let d = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => bail!(
                "--init {}: tensor `{name}` has dtype {other:?}, which podgpu does not read",
                path.display()
            ),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), values));
    }
    Ok(out)
}

fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 => {
            if frac == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Whether a parameter belongs to the classifier or FC1 (new in a fine-tuned model).
fn is_head(name: &str) -> bool {
    name.starts_with("head.") || name.starts_with("fc.") || name.starts_with("out.")
}

/// Loads a timm state dict into the backbone parameters of `ps` (host tensors; call before moving
/// the store to a device).
pub fn load_timm(path: &Path, ps: &mut ParamStore) -> Result<InitReport> {
    let mut file = read_state_dict(path)?;
    let shown = path.display();
    let mut report = InitReport::default();
    for id in ps.ids().collect::<Vec<_>>() {
        let p = ps.get(id);
        if p.kind == ParamKind::Buffer {
            continue;
        }
        let (name, shape, dtype) = (p.name.clone(), p.value.shape().to_vec(), p.value.dtype());
        if is_head(&name) {
            report.new.push(name);
            continue;
        }
        let Some((fshape, values)) = file.remove(&name) else {
            bail!(
                "--init {shown} has no `{name}`, which this model needs: is it a timm file of the \
                 same architecture? (its keys start with {})",
                sample_keys(path)
            );
        };
        let values = if fshape == shape {
            report.loaded.push(name.clone());
            values
        } else if name == "pos_embed"
            && fshape.len() == 3
            && fshape[0] == 1
            && fshape[2] == shape[2]
        {
            let v = resample_pos_embed(&values, fshape[1], shape[1], shape[2])
                .map_err(|e| anyhow!("--init {shown}: `{name}`: {e}"))?;
            report.resampled.push((name.clone(), fshape, shape.clone()));
            v
        } else if name.ends_with("relative_position_bias_table")
            && fshape.len() == 2
            && fshape[1] == shape[1]
        {
            let v = resample_rel_table(&values, fshape[0], shape[0], shape[1])
                .map_err(|e| anyhow!("--init {shown}: `{name}`: {e}"))?;
            report.resampled.push((name.clone(), fshape, shape.clone()));
            v
        } else {
            bail!(
                "--init {shown}: `{name}` has shape {fshape:?} in the file but {shape:?} in the model \
                 (another model size?)"
            );
        };
        ps.set_value(id, Tensor::from_f64_as(&shape, &values, dtype));
    }
    if report.loaded.is_empty() && report.resampled.is_empty() {
        bail!("--init {shown}: no tensor of the file fits this model");
    }
    report.unused = file.into_keys().collect();
    Ok(report)
}

fn sample_keys(path: &Path) -> String {
    match read_state_dict(path) {
        Ok(m) => m.keys().take(4).cloned().collect::<Vec<_>>().join(", "),
        Err(_) => "?".into(),
    }
}

/// PyTorch's antialiased bicubic weights (`interpolate(mode='bicubic', antialias=True,
/// align_corners=False)`, PIL's filter with a = −0.5): for each output index, the first input index
/// and the normalised weights.
fn aa_bicubic_weights(input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = input as f64 / output as f64;
    let support = 2.0 * scale.max(1.0);
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let filter = |x: f64| {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C++ truncation
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|j| filter((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                }
            }
            (xmin, w)
        })
        .collect()
}

/// Resamples `channels` planes stored as [h0, w0, channels] (channels fastest) to [h1, w1, channels]:
/// along the width first, then the height, as PyTorch does.
pub fn resample_hwc(
    src: &[f64],
    (h0, w0): (usize, usize),
    (h1, w1): (usize, usize),
    channels: usize,
) -> Vec<f64> {
    let wx = aa_bicubic_weights(w0, w1);
    let wy = aa_bicubic_weights(h0, h1);
    let mut mid = vec![0.0; h0 * w1 * channels];
    for y in 0..h0 {
        for (x, (x0, ws)) in wx.iter().enumerate() {
            for c in 0..channels {
                mid[(y * w1 + x) * channels + c] = ws
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * src[(y * w0 + x0 + k) * channels + c])
                    .sum();
            }
        }
    }
    let mut out = vec![0.0; h1 * w1 * channels];
    for (y, (y0, ws)) in wy.iter().enumerate() {
        for x in 0..w1 {
            for c in 0..channels {
                out[(y * w1 + x) * channels + c] = ws
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * mid[((y0 + k) * w1 + x) * channels + c])
                    .sum();
            }
        }
    }
    out
}

fn square_side(n: usize, what: &str) -> Result<usize, String> {
    let s = (n as f64).sqrt().round() as usize;
    if s * s != n {
        return Err(format!("{n} {what} are not a square grid"));
    }
    Ok(s)
}

/// [1, 1 + g0², D] → [1, 1 + g1², D]: the class token kept, the grid resampled.
pub fn resample_pos_embed(
    v: &[f64],
    tokens0: usize,
    tokens1: usize,
    dim: usize,
) -> Result<Vec<f64>, String> {
    let g0 = square_side(tokens0 - 1, "position embeddings")?;
    let g1 = square_side(tokens1 - 1, "position embeddings")?;
    let mut out = v[..dim].to_vec();
    out.extend(resample_hwc(&v[dim..], (g0, g0), (g1, g1), dim));
    Ok(out)
}

/// [(2w0−1)², H] → [(2w1−1)², H], as timm's `resize_rel_pos_bias_table` (without scipy): the source
/// table sits on geometric-progression offsets (BEiT's scheme, spread to reach the new table's
/// half-width) and each head's table is linearly interpolated at the new integer offsets.
pub fn resample_rel_table(
    v: &[f64],
    rows0: usize,
    rows1: usize,
    heads: usize,
) -> Result<Vec<f64>, String> {
    let s0 = square_side(rows0, "table rows")?;
    let s1 = square_side(rows1, "table rows")?;
    if s0 == s1 {
        return Ok(v.to_vec());
    }
    let src = progression_offsets(s0, s1);
    let half = (s1 / 2) as f64;
    let dst: Vec<f64> = (0..s1).map(|i| -half + i as f64).collect();
    let taps: Vec<(usize, usize, f64, f64)> = dst.iter().map(|&x| linear_taps(&src, x)).collect();
    let mut out = vec![0.0; s1 * s1 * heads];
    for (y, &(y0, y1, wy0, wy1)) in taps.iter().enumerate() {
        for (x, &(x0, x1, wx0, wx1)) in taps.iter().enumerate() {
            for h in 0..heads {
                let at = |r: usize, c: usize| v[(r * s0 + c) * heads + h];
                out[(y * s1 + x) * heads + h] = at(y0, x0) * wy0 * wx0
                    + at(y0, x1) * wy0 * wx1
                    + at(y1, x0) * wy1 * wx0
                    + at(y1, x1) * wy1 * wx1;
            }
        }
    }
    Ok(out)
}

/// timm's `_calc(src, dst)`: the offsets of a src-long table spread by the ratio q whose geometric
/// progression reaches dst/2 (bisection on [1.01, 1.5] to 1e-6; the last midpoint is used).
fn progression_offsets(src: usize, dst: usize) -> Vec<f64> {
    let n = (src / 2) as i32;
    let gp = |q: f64| (1.0 - q.powi(n)) / (1.0 - q);
    let (mut left, mut right, mut q) = (1.01f64, 1.5f64, 1.01f64);
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        if gp(q) > (dst / 2) as f64 {
            right = q;
        } else {
            left = q;
        }
    }
    let mut dis = Vec::with_capacity(n as usize);
    let mut cur = 1.0;
    for i in 0..n {
        dis.push(cur);
        cur += q.powi(i + 1);
    }
    let mut out: Vec<f64> = dis.iter().rev().map(|d| -d).collect();
    out.push(0.0);
    out.extend(dis);
    out
}

/// timm's `RegularGridInterpolator` along one axis: the two neighbours of x in the ascending
/// positions p and their weights (values beyond the ends are the end values).
fn linear_taps(p: &[f64], x: f64) -> (usize, usize, f64, f64) {
    let right = p.iter().position(|&v| v >= x).unwrap_or(p.len() - 1);
    let left = right.saturating_sub(1);
    let mut dl = (x - p[left]).max(0.0);
    let mut dr = (p[right] - x).max(0.0);
    if dl == 0.0 && dr == 0.0 {
        dl = 1.0;
        dr = 1.0;
    }
    // value = (v[left]·dr + v[right]·dl) / (dl + dr)
    (left, right, dr / (dl + dr), dl / (dl + dr))
}
