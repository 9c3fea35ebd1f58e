//! ViT (Dosovitskiy et al.) in timm's layout: `patch_embed.proj` (a p×p stride-p convolution),
//! `cls_token`, `pos_embed`, `blocks.i.{norm1, attn.{qkv, proj}, norm2, mlp.{fc1, fc2}}`, `norm`.
//! The pooled feature is the class token after the final norm (timm's `global_pool='token'`).

use super::layers::Conv;
use super::transformer::{trunc_normal, Attention, LayerNorm, Mlp, VitConfig};
use crate::autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::{DType, Device, Tensor};

/// timm's ViT layer norms use eps 1e-6.
pub const VIT_LN_EPS: f64 = 1e-6;

pub struct VitBlock {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: f64,
}

pub struct Vit {
    pub cfg: VitConfig,
    patch_embed: Conv,
    cls_token: ParamId,
    pos_embed: ParamId,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    /// Patch grid (rows, columns) of the input size the model was built for.
    pub grid: (usize, usize),
    pub out_dim: usize,
}

impl Vit {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &VitConfig,
        in_channels: usize,
        image: usize,
        drop_path: f64,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<Vit, String> {
        super::transformer::TransformerConfig::Vit(cfg.clone()).check_image(image)?;
        let d = cfg.dim;
        let g = image / cfg.patch;
        let patch_embed = Conv::new(
            ps,
            "patch_embed.proj",
            in_channels,
            d,
            cfg.patch,
            cfg.patch,
            0,
            1,
            true,
            dtype,
            rng,
        );
        let cls_token = ps.add(
            "cls_token",
            trunc_normal(&[1, 1, d], 1e-6, dtype, rng),
            ParamKind::Trainable,
        );
        let pos_embed = ps.add(
            "pos_embed",
            trunc_normal(&[1, g * g + 1, d], 0.02, dtype, rng),
            ParamKind::Trainable,
        );
        let hidden = (d as f64 * cfg.mlp_ratio) as usize;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let p = format!("blocks.{i}");
                VitBlock {
                    norm1: LayerNorm::new(ps, &format!("{p}.norm1"), d, VIT_LN_EPS, dtype),
                    attn: Attention::new(ps, &format!("{p}.attn"), d, cfg.heads, dtype, rng),
                    norm2: LayerNorm::new(ps, &format!("{p}.norm2"), d, VIT_LN_EPS, dtype),
                    mlp: Mlp::new(ps, &format!("{p}.mlp"), d, hidden, dtype, rng),
                    // timm: a linear ramp of drop-path rates over the blocks.
                    drop_path: if cfg.depth > 1 {
                        drop_path * i as f64 / (cfg.depth - 1) as f64
                    } else {
                        drop_path
                    },
                }
            })
            .collect();
        let norm = LayerNorm::new(ps, "norm", d, VIT_LN_EPS, dtype);
        Ok(Vit {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            grid: (g, g),
            out_dim: d,
        })
    }

    /// Images [B, C, H, W] → the class token after the final norm [B, dim].
    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let b = x.shape()[0];
        let d = self.cfg.dim;
        let y = self.patch_embed.forward(t, ps, x); // [B, D, gh, gw]
        let n = y.shape()[2] * y.shape()[3];
        assert_eq!(
            (y.shape()[2], y.shape()[3]),
            self.grid,
            "ViT built for a {:?} patch grid got images of {:?}",
            self.grid,
            x.shape()
        );
        let y = ops::reshape(t, &y, &[b, d, n]);
        let y = ops::permute(t, &y, &[0, 2, 1]); // [B, N, D]
                                                 // The class token for every sample: zeros [B, D] plus the token as a bias row.
        let cls = t.param(ps, self.cls_token);
        let cls = ops::reshape(t, &cls, &[d]);
        let zeros = t.constant(zeros_like(x.value(), &[b, d]));
        let cls = ops::bias_add(t, &zeros, &cls);
        let cls = ops::reshape(t, &cls, &[b, 1, d]);
        let y = ops::concat_channels(t, &[&cls, &y]); // [B, N+1, D]
        let pos = t.param(ps, self.pos_embed);
        let pos = ops::reshape(t, &pos, &[(n + 1) * d]);
        let y = ops::reshape(t, &y, &[b, (n + 1) * d]);
        let y = ops::bias_add(t, &y, &pos);
        let mut y = ops::reshape(t, &y, &[b, n + 1, d]);
        for blk in &self.blocks {
            let h = blk.norm1.forward(t, ps, &y);
            let h = blk.attn.forward(t, ps, &h, None);
            let h = ops::drop_path(t, &h, blk.drop_path);
            y = ops::add(t, &y, &h);
            let h = blk.norm2.forward(t, ps, &y);
            let h = blk.mlp.forward(t, ps, &h);
            let h = ops::drop_path(t, &h, blk.drop_path);
            y = ops::add(t, &y, &h);
        }
        let y = self.norm.forward(t, ps, &y);
        let cls = ops::narrow(t, &y, 1, 0, 1);
        ops::reshape(t, &cls, &[b, d])
    }
}

/// Zeros of `shape` on `like`'s device and dtype.
pub fn zeros_like(like: &Tensor, shape: &[usize]) -> Tensor {
    match like.device() {
        Device::Cpu => Tensor::zeros(shape, like.dtype(), Device::Cpu),
        d => Tensor::zeros(shape, DType::F32, d),
    }
}
