//! Swin Transformer (Liu et al., v1) in timm's layout: `patch_embed.{proj, norm}`,
//! `layers.s.downsample.{norm, reduction}` (patch merging at the start of stages 1..),
//! `layers.s.blocks.i.{norm1, attn.{relative_position_bias_table, qkv, proj}, norm2, mlp.{fc1, fc2}}`,
//! `norm`. Blocks alternate plain and shifted windows; the pooled feature is the mean of the final
//! tokens after the norm (timm's `global_pool='avg'`).
//!
//! As timm, a stage whose resolution is at most the window size uses one window of that size and no
//! shift. Resolutions that the window does not divide (timm pads them) are refused.

use super::layers::{Conv, Linear};
use super::transformer::{
    linear, linear_tokens, trunc_normal, Attention, LayerNorm, Mlp, RelPos, SwinConfig,
};
use crate::autograd::{ParamKind, ParamStore, Tape, Var};
use crate::ops::{self, RowIndex};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// `nn.LayerNorm` default eps, which timm's Swin uses.
pub const SWIN_LN_EPS: f64 = 1e-5;

/// One stage's geometry: token grid side, window side, shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageGeometry {
    pub res: usize,
    pub window: usize,
    pub shift: usize,
}

/// The geometry of every stage for square images of side `image`, or why it does not work.
pub fn stage_geometry(cfg: &SwinConfig, image: usize) -> Result<Vec<StageGeometry>, String> {
    if !image.is_multiple_of(cfg.patch) || image < cfg.patch {
        return Err(format!(
            "images of {image}×{image} do not split into {p}×{p} patches; use a multiple of {p} \
             (--image-size)",
            p = cfg.patch
        ));
    }
    let mut res = image / cfg.patch;
    let mut out = Vec::new();
    for s in 0..cfg.depths.len() {
        if s > 0 {
            if !res.is_multiple_of(2) {
                return Err(format!(
                    "images of {image}×{image}: stage {s} would merge a {res}×{res} token grid, \
                     which is odd (timm pads it; podgpu does not): use an image size such as {}",
                    cfg.native_image
                ));
            }
            res /= 2;
        }
        let (window, shift) = if res <= cfg.window {
            (res, 0)
        } else {
            (cfg.window, cfg.window / 2)
        };
        if !res.is_multiple_of(window) {
            return Err(format!(
                "images of {image}×{image}: stage {s} has a {res}×{res} token grid that {window}×{window} \
                 windows do not tile (timm pads it; podgpu does not): use an image size such as {}",
                cfg.native_image
            ));
        }
        out.push(StageGeometry { res, window, shift });
    }
    Ok(out)
}

/// timm's `get_relative_position_index` for a square window: the table row of each (query, key).
pub fn relative_position_index(ws: usize) -> Vec<usize> {
    let n = ws * ws;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let (ih, iw) = ((i / ws) as isize, (i % ws) as isize);
            let (jh, jw) = ((j / ws) as isize, (j % ws) as isize);
            let w = ws as isize;
            idx.push(((ih - jh + w - 1) * (2 * w - 1) + (iw - jw + w - 1)) as usize);
        }
    }
    idx
}

/// timm's shifted-window attention mask [windows, N, N]: 0 within a region, −100 across regions.
pub fn shifted_window_mask(res: usize, ws: usize, shift: usize) -> Vec<f64> {
    let mut region = vec![0usize; res * res];
    let bands = |i: usize| -> usize {
        if i < res - ws {
            0
        } else if i < res - shift {
            1
        } else {
            2
        }
    };
    for h in 0..res {
        for w in 0..res {
            region[h * res + w] = bands(h) * 3 + bands(w);
        }
    }
    let nw = res / ws;
    let n = ws * ws;
    let mut mask = Vec::with_capacity(nw * nw * n * n);
    for wh in 0..nw {
        for ww in 0..nw {
            let tok = |k: usize| region[(wh * ws + k / ws) * res + ww * ws + k % ws];
            for i in 0..n {
                for j in 0..n {
                    mask.push(if tok(i) == tok(j) { 0.0 } else { -100.0 });
                }
            }
        }
    }
    mask
}

struct SwinBlock {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    window: usize,
    shift: usize,
    drop_path: f64,
    /// [windows, N, N] host values; moved to the input's device and dtype in the forward.
    mask: Option<(usize, Vec<f64>)>,
    /// The mask on the device and dtype it was last used on (uploaded once, not every step).
    mask_cache: std::sync::Mutex<Option<Tensor>>,
}

struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

struct Stage {
    downsample: Option<PatchMerging>,
    blocks: Vec<SwinBlock>,
}

pub struct Swin {
    pub cfg: SwinConfig,
    patch_embed: Conv,
    patch_norm: LayerNorm,
    stages: Vec<Stage>,
    norm: LayerNorm,
    pub geometry: Vec<StageGeometry>,
    pub out_dim: usize,
}

impl Swin {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &SwinConfig,
        in_channels: usize,
        image: usize,
        drop_path: f64,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<Swin, String> {
        let geometry = stage_geometry(cfg, image)?;
        let d0 = cfg.dim;
        let patch_embed = Conv::new(
            ps,
            "patch_embed.proj",
            in_channels,
            d0,
            cfg.patch,
            cfg.patch,
            0,
            1,
            true,
            dtype,
            rng,
        );
        let patch_norm = LayerNorm::new(ps, "patch_embed.norm", d0, SWIN_LN_EPS, dtype);
        let total: usize = cfg.depths.iter().sum();
        let mut k = 0usize;
        let mut stages = Vec::new();
        for (s, g) in geometry.iter().enumerate() {
            let dim = d0 << s;
            let downsample = (s > 0).then(|| {
                let p = format!("layers.{s}.downsample");
                PatchMerging {
                    norm: LayerNorm::new(ps, &format!("{p}.norm"), 2 * dim, SWIN_LN_EPS, dtype),
                    reduction: linear(
                        ps,
                        &format!("{p}.reduction"),
                        2 * dim,
                        dim,
                        false,
                        dtype,
                        rng,
                    ),
                }
            });
            let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
            let index = Arc::new(RowIndex::new(
                (2 * g.window - 1) * (2 * g.window - 1),
                relative_position_index(g.window),
            ));
            let mut blocks = Vec::new();
            for i in 0..cfg.depths[s] {
                let p = format!("layers.{s}.blocks.{i}");
                let norm1 = LayerNorm::new(ps, &format!("{p}.norm1"), dim, SWIN_LN_EPS, dtype);
                let table = ps.add(
                    format!("{p}.attn.relative_position_bias_table"),
                    trunc_normal(
                        &[(2 * g.window - 1) * (2 * g.window - 1), cfg.heads[s]],
                        0.02,
                        dtype,
                        rng,
                    ),
                    ParamKind::Trainable,
                );
                let mut attn =
                    Attention::new(ps, &format!("{p}.attn"), dim, cfg.heads[s], dtype, rng);
                attn.rel_pos = Some(RelPos {
                    table,
                    index: index.clone(),
                });
                let norm2 = LayerNorm::new(ps, &format!("{p}.norm2"), dim, SWIN_LN_EPS, dtype);
                let mlp = Mlp::new(ps, &format!("{p}.mlp"), dim, hidden, dtype, rng);
                let shift = if i % 2 == 1 { g.shift } else { 0 };
                let mask = (shift > 0).then(|| {
                    let nw = (g.res / g.window) * (g.res / g.window);
                    (nw, shifted_window_mask(g.res, g.window, shift))
                });
                let dp = if total > 1 {
                    drop_path * k as f64 / (total - 1) as f64
                } else {
                    drop_path
                };
                k += 1;
                blocks.push(SwinBlock {
                    norm1,
                    attn,
                    norm2,
                    mlp,
                    window: g.window,
                    shift,
                    drop_path: dp,
                    mask,
                    mask_cache: std::sync::Mutex::new(None),
                });
            }
            stages.push(Stage { downsample, blocks });
        }
        let out_dim = d0 << (cfg.depths.len() - 1);
        let norm = LayerNorm::new(ps, "norm", out_dim, SWIN_LN_EPS, dtype);
        Ok(Swin {
            cfg: cfg.clone(),
            patch_embed,
            patch_norm,
            stages,
            norm,
            geometry,
            out_dim,
        })
    }

    /// Images [B, C, H, W] → the mean of the final tokens after the norm [B, C_last].
    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let b = x.shape()[0];
        let y = self.patch_embed.forward(t, ps, x); // [B, D, r, r]
        let (d, r) = (y.shape()[1], y.shape()[2]);
        assert_eq!(
            r,
            self.geometry[0].res,
            "Swin built for a {}×{} token grid got images of {:?}",
            self.geometry[0].res,
            self.geometry[0].res,
            x.shape()
        );
        let y = ops::permute(t, &y, &[0, 2, 3, 1]); // [B, r, r, D]
        let mut y = self.patch_norm.forward(t, ps, &y);
        for stage in &self.stages {
            if let Some(m) = &stage.downsample {
                let (r, c) = (y.shape()[1], y.shape()[3]);
                let z = ops::reshape(t, &y, &[b, r / 2, 2, r / 2, 2, c]);
                let z = ops::permute(t, &z, &[0, 1, 3, 4, 2, 5]);
                let z = ops::reshape(t, &z, &[b, r / 2, r / 2, 4 * c]);
                let z = m.norm.forward(t, ps, &z);
                y = linear_tokens(t, ps, &m.reduction, &z);
            }
            for blk in &stage.blocks {
                y = blk.forward(t, ps, &y);
            }
        }
        let y = self.norm.forward(t, ps, &y);
        let (r, c) = (y.shape()[1], y.shape()[3]);
        let _ = d;
        let y = ops::reshape(t, &y, &[b, r * r, c]);
        let y = ops::permute(t, &y, &[0, 2, 1]);
        let y = ops::reshape(t, &y, &[b, c, r * r, 1]);
        ops::global_avg_pool(t, &y)
    }
}

impl SwinBlock {
    fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let (b, r, c) = (x.shape()[0], x.shape()[1], x.shape()[3]);
        let (ws, s) = (self.window, self.shift as isize);
        let h = self.norm1.forward(t, ps, x);
        let h = if s > 0 { ops::roll2d(t, &h, -s, -s) } else { h };
        let nw = r / ws;
        let h = ops::reshape(t, &h, &[b, nw, ws, nw, ws, c]);
        let h = ops::permute(t, &h, &[0, 1, 3, 2, 4, 5]);
        let h = ops::reshape(t, &h, &[b * nw * nw, ws * ws, c]);
        let mask = self.mask.as_ref().map(|(windows, m)| {
            let v = x.value();
            let mut cache = self.mask_cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.as_ref() {
                Some(t) if t.device() == v.device() && t.dtype() == v.dtype() => t.clone(),
                _ => {
                    let n = ws * ws;
                    let t =
                        Tensor::from_f64_as(&[*windows, n, n], m, v.dtype()).to_device(v.device());
                    *cache = Some(t.clone());
                    t
                }
            }
        });
        let h = self.attn.forward(t, ps, &h, mask.as_ref());
        let h = ops::reshape(t, &h, &[b, nw, nw, ws, ws, c]);
        let h = ops::permute(t, &h, &[0, 1, 3, 2, 4, 5]);
        let h = ops::reshape(t, &h, &[b, r, r, c]);
        let h = if s > 0 { ops::roll2d(t, &h, s, s) } else { h };
        let h = ops::drop_path(t, &h, self.drop_path);
        let y = ops::add(t, x, &h);
        let h = self.norm2.forward(t, ps, &y);
        let h = self.mlp.forward(t, ps, &h);
        let h = ops::drop_path(t, &h, self.drop_path);
        ops::add(t, &y, &h)
    }
}
