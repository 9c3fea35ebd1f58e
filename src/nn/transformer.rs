//! What the two transformer families share: their configurations (timm's named models and a
//! `vit(...)`/`swin(...)` form for any size), layer norm, the MLP, the multi-head self-attention
//! module and timm's initialisation.
//!
//! Parameter names are timm's `state_dict` keys, so timm files load (`nn::pretrained`) and our
//! checkpoints load back into timm.

use super::layers::Linear;
use crate::autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
use crate::ops::{self, AttnSpec};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// A ViT (timm's `VisionTransformer` with a class token, learned position embeddings, pre-norm
/// blocks, GELU MLP and `global_pool='token'`).
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// MLP hidden width = dim · mlp_ratio (rounded down, as timm's `int(dim * mlp_ratio)`).
    pub mlp_ratio: f64,
    /// The image side the named model was trained at (its position embeddings' grid).
    pub native_image: usize,
}

/// A Swin Transformer (v1, timm's layout: patch merging at the start of stages 1.., `head.fc`).
#[derive(Clone, Debug, PartialEq)]
pub struct SwinConfig {
    pub patch: usize,
    pub window: usize,
    pub dim: usize,
    pub depths: Vec<usize>,
    pub heads: Vec<usize>,
    pub mlp_ratio: f64,
    pub native_image: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TransformerConfig {
    Vit(VitConfig),
    Swin(SwinConfig),
}

/// The transformer names `podgpu` accepts besides `vit(...)` / `swin(...)`: (name, timm's name).
pub const TRANSFORMER_NAMES: &[(&str, &str)] = &[
    ("vit_b16", "vit_base_patch16_224"),
    ("vit_base_patch16_224", "vit_base_patch16_224"),
    ("vit_small_patch16_224", "vit_small_patch16_224"),
    ("vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("test_vit", "test_vit"),
    ("swin_b", "swin_base_patch4_window7_224"),
    (
        "swin_base_patch4_window7_224",
        "swin_base_patch4_window7_224",
    ),
    (
        "swin_tiny_patch4_window7_224",
        "swin_tiny_patch4_window7_224",
    ),
];

fn vit(patch: usize, dim: usize, depth: usize, heads: usize, mlp_ratio: f64) -> TransformerConfig {
    TransformerConfig::Vit(VitConfig {
        patch,
        dim,
        depth,
        heads,
        mlp_ratio,
        native_image: 224,
    })
}

fn swin(
    patch: usize,
    window: usize,
    dim: usize,
    depths: &[usize],
    heads: &[usize],
) -> TransformerConfig {
    TransformerConfig::Swin(SwinConfig {
        patch,
        window,
        dim,
        depths: depths.to_vec(),
        heads: heads.to_vec(),
        mlp_ratio: 4.0,
        native_image: 224,
    })
}

impl TransformerConfig {
    /// The configuration of a model name: one of `TRANSFORMER_NAMES`, or
    /// `vit(patch=P,dim=D,depth=L,heads=H[,mlp_ratio=R][,image=S])` /
    /// `swin(patch=P,window=W,dim=D,depths=2-2-6-2,heads=3-6-12-24[,mlp_ratio=R][,image=S])`.
    /// None when the name is not a transformer; an error when a `vit(`/`swin(` form is malformed.
    pub fn parse(name: &str) -> Option<Result<TransformerConfig, String>> {
        let known = match name {
            "vit_b16" | "vit_base_patch16_224" => Some(vit(16, 768, 12, 12, 4.0)),
            "vit_small_patch16_224" => Some(vit(16, 384, 12, 6, 4.0)),
            "vit_tiny_patch16_224" => Some(vit(16, 192, 12, 3, 4.0)),
            // timm's test model: trained (and its position embeddings sized) at 160 px.
            "test_vit" => Some(TransformerConfig::Vit(VitConfig {
                native_image: 160,
                ..match vit(16, 64, 6, 2, 3.0) {
                    TransformerConfig::Vit(v) => v,
                    _ => unreachable!(),
                }
            })),
            "swin_b" | "swin_base_patch4_window7_224" => {
                Some(swin(4, 7, 128, &[2, 2, 18, 2], &[4, 8, 16, 32]))
            }
            "swin_tiny_patch4_window7_224" => Some(swin(4, 7, 96, &[2, 2, 6, 2], &[3, 6, 12, 24])),
            _ => None,
        };
        if let Some(k) = known {
            return Some(Ok(k));
        }
        let (family, rest) = name.split_once('(')?;
        if family != "vit" && family != "swin" {
            return None;
        }
        Some(parse_custom(family, rest))
    }

    /// The width of the pooled features (the latent dimension n without FC1).
    pub fn out_dim(&self) -> usize {
        match self {
            TransformerConfig::Vit(v) => v.dim,
            TransformerConfig::Swin(s) => s.dim << (s.depths.len() - 1),
        }
    }

    /// timm's default stochastic-depth rate for the family (ViT 0, Swin 0.1).
    pub fn default_drop_path(&self) -> f64 {
        match self {
            TransformerConfig::Vit(_) => 0.0,
            TransformerConfig::Swin(_) => 0.1,
        }
    }

    pub fn native_image(&self) -> usize {
        match self {
            TransformerConfig::Vit(v) => v.native_image,
            TransformerConfig::Swin(s) => s.native_image,
        }
    }

    /// Why `image` (a square side) cannot be used, if it cannot.
    pub fn check_image(&self, image: usize) -> Result<(), String> {
        match self {
            TransformerConfig::Vit(v) => {
                if image < v.patch || !image.is_multiple_of(v.patch) {
                    return Err(format!(
                        "images of {image}×{image} do not split into {p}×{p} patches; use an \
                         image size that is a multiple of {p} (--image-size)",
                        p = v.patch
                    ));
                }
            }
            TransformerConfig::Swin(s) => {
                super::swin::stage_geometry(s, image)?;
            }
        }
        Ok(())
    }
}

fn parse_custom(family: &str, rest: &str) -> Result<TransformerConfig, String> {
    let body = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("model `{family}({rest}`: missing `)`"))?;
    let mut kv = std::collections::BTreeMap::new();
    for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("model `{family}(...)`: `{part}` is not key=value"))?;
        kv.insert(k.trim().to_string(), v.trim().to_string());
    }
    let num = |k: &str| -> Result<usize, String> {
        let v = kv
            .get(k)
            .ok_or_else(|| format!("model `{family}(...)` needs `{k}=`"))?;
        v.parse::<usize>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("model `{family}(...)`: `{k}={v}` is not a whole number ≥ 1"))
    };
    let list = |k: &str| -> Result<Vec<usize>, String> {
        let v = kv
            .get(k)
            .ok_or_else(|| format!("model `{family}(...)` needs `{k}=` (e.g. 2-2-6-2)"))?;
        v.split('-')
            .map(|s| s.parse::<usize>().ok().filter(|&n| n >= 1))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("model `{family}(...)`: `{k}={v}` is not a list like 2-2-6-2"))
    };
    let ratio = match kv.get("mlp_ratio") {
        None => 4.0,
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
            .ok_or_else(|| format!("model `{family}(...)`: mlp_ratio={v} is not a number > 0"))?,
    };
    let image = match kv.get("image") {
        None => 224,
        Some(_) => num("image")?,
    };
    let allowed: &[&str] = match family {
        "vit" => &["patch", "dim", "depth", "heads", "mlp_ratio", "image"],
        _ => &[
            "patch",
            "window",
            "dim",
            "depths",
            "heads",
            "mlp_ratio",
            "image",
        ],
    };
    if let Some(k) = kv.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "model `{family}(...)`: unknown key `{k}` (known: {})",
            allowed.join(", ")
        ));
    }
    if family == "vit" {
        let (dim, heads) = (num("dim")?, num("heads")?);
        if dim % heads != 0 {
            return Err(format!(
                "model `vit(...)`: dim {dim} is not a multiple of heads {heads}"
            ));
        }
        return Ok(TransformerConfig::Vit(VitConfig {
            patch: num("patch")?,
            dim,
            depth: num("depth")?,
            heads,
            mlp_ratio: ratio,
            native_image: image,
        }));
    }
    let (depths, heads) = (list("depths")?, list("heads")?);
    if depths.len() != heads.len() {
        return Err("model `swin(...)`: depths and heads must list one value per stage".into());
    }
    let dim = num("dim")?;
    for (i, &h) in heads.iter().enumerate() {
        if (dim << i) % h != 0 {
            return Err(format!(
                "model `swin(...)`: stage {i} has width {} which is not a multiple of its {h} heads",
                dim << i
            ));
        }
    }
    Ok(TransformerConfig::Swin(SwinConfig {
        patch: num("patch")?,
        window: num("window")?,
        dim,
        depths,
        heads,
        mlp_ratio: ratio,
        native_image: image,
    }))
}

// ---- initialisation (timm's `trunc_normal_(std=.02)` for linear weights, zero biases) ----

/// N(0, std²) values cut to [−2, 2] (timm's `trunc_normal_` bounds are absolute, so with std 0.02
/// nothing is ever cut in practice).
pub fn trunc_normal(shape: &[usize], std: f64, dtype: DType, rng: &mut Rng) -> Tensor {
    let v: Vec<f64> = (0..crate::tensor::numel(shape))
        .map(|_| (rng.normal() * std).clamp(-2.0, 2.0))
        .collect();
    Tensor::from_f64_as(shape, &v, dtype)
}

/// A linear layer with timm's init: weight trunc-normal(0.02), bias zero.
pub fn linear(
    ps: &mut ParamStore,
    prefix: &str,
    cin: usize,
    cout: usize,
    bias: bool,
    dtype: DType,
    rng: &mut Rng,
) -> Linear {
    let weight = ps.add(
        format!("{prefix}.weight"),
        trunc_normal(&[cout, cin], 0.02, dtype, rng),
        ParamKind::Trainable,
    );
    let bias = bias.then(|| {
        ps.add(
            format!("{prefix}.bias"),
            Tensor::from_f64_as(&[cout], &vec![0.0; cout], dtype),
            ParamKind::Trainable,
        )
    });
    Linear { weight, bias }
}

/// A linear layer over the last axis of a tensor of any rank.
pub fn linear_tokens(t: &mut Tape, ps: &ParamStore, l: &Linear, x: &Var) -> Var {
    let shape = x.shape().to_vec();
    let c = *shape.last().expect("rank ≥ 1");
    let rows = x.value().numel() / c;
    let x2 = ops::reshape(t, x, &[rows, c]);
    let y = l.forward(t, ps, &x2);
    let mut out = shape;
    *out.last_mut().unwrap() = y.shape()[1];
    ops::reshape(t, &y, &out)
}

/// `nn.LayerNorm(dim, eps)`: `{prefix}.weight` (ones) and `{prefix}.bias` (zeros).
pub struct LayerNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(ps: &mut ParamStore, prefix: &str, dim: usize, eps: f64, dtype: DType) -> LayerNorm {
        LayerNorm {
            weight: ps.add(
                format!("{prefix}.weight"),
                Tensor::from_f64_as(&[dim], &vec![1.0; dim], dtype),
                ParamKind::Trainable,
            ),
            bias: ps.add(
                format!("{prefix}.bias"),
                Tensor::from_f64_as(&[dim], &vec![0.0; dim], dtype),
                ParamKind::Trainable,
            ),
            eps,
        }
    }

    pub fn forward(&self, t: &mut Tape, ps: &ParamStore, x: &Var) -> Var {
        let (g, b) = (t.param(ps, self.weight), t.param(ps, self.bias));
        ops::layer_norm(t, x, &g, &b, self.eps)
    }
}

/// timm's `Mlp`: fc1 → GELU → fc2.
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        dim: usize,
        hidden: usize,
        dtype: DType,
        rng: &mut Rng,
    ) -> Mlp {
        Mlp {
            fc1: linear(ps, &format!("{prefix}.fc1"), dim, hidden, true, dtype, rng),
            fc2: linear(ps, &format!("{prefix}.fc2"), hidden, dim, true, dtype, rng),
        }
    }

    pub fn forward(&self, t: &mut Tape, ps: &ParamStore, x: &Var) -> Var {
        let h = linear_tokens(t, ps, &self.fc1, x);
        let h = ops::gelu(t, &h);
        linear_tokens(t, ps, &self.fc2, &h)
    }
}

/// The additive terms of a window attention: the relative-position-bias table and its index, and
/// the shifted-window mask.
pub struct RelPos {
    /// `relative_position_bias_table` [(2w−1)², heads].
    pub table: ParamId,
    /// For each (query, key) pair of a window, its table row.
    pub index: Arc<ops::RowIndex>,
}

/// timm's `Attention` / `WindowAttention`: `qkv` (with bias), scaled dot-product attention over
/// `heads` heads, `proj`.
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
    pub rel_pos: Option<RelPos>,
}

impl Attention {
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        dim: usize,
        heads: usize,
        dtype: DType,
        rng: &mut Rng,
    ) -> Attention {
        Attention {
            qkv: linear(ps, &format!("{prefix}.qkv"), dim, 3 * dim, true, dtype, rng),
            proj: linear(ps, &format!("{prefix}.proj"), dim, dim, true, dtype, rng),
            heads,
            rel_pos: None,
        }
    }

    /// x [G0, N, C] → [G0, N, C], with G0 = batch (ViT) or batch·windows with the window index
    /// fastest, as timm's `window_partition` orders them (Swin); `mask` is [windows, N, N].
    pub fn forward(&self, t: &mut Tape, ps: &ParamStore, x: &Var, mask: Option<&Tensor>) -> Var {
        let (g0, n, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let (h, d) = (self.heads, c / self.heads);
        let qkv = linear_tokens(t, ps, &self.qkv, x); // [G0, N, 3C]
        let qkv = ops::reshape(t, &qkv, &[g0, n, 3, h, d]);
        let qkv = ops::permute(t, &qkv, &[2, 0, 3, 1, 4]); // [3, G0, H, N, d]
        let qkv = ops::reshape(t, &qkv, &[3, g0 * h, n, d]);
        let bias = self.rel_pos.as_ref().map(|rp| {
            let table = t.param(ps, rp.table);
            let b = ops::gather_rows(t, &table, &rp.index); // [N·N, H]
            let b = ops::reshape(t, &b, &[n, n, h]);
            ops::permute(t, &b, &[2, 0, 1]) // [H, N, N]
        });
        let spec = AttnSpec {
            heads: h,
            windows: mask.map_or(1, |m| m.shape()[0]),
            scale: (d as f64).powf(-0.5),
        };
        super::flops::add(2 * (g0 * h * n * n * d) as u64);
        let o = ops::attention(t, &qkv, bias.as_ref(), mask, spec); // [G0·H, N, d]
        let o = ops::reshape(t, &o, &[g0, h, n, d]);
        let o = ops::permute(t, &o, &[0, 2, 1, 3]);
        let o = ops::reshape(t, &o, &[g0, n, c]);
        linear_tokens(t, ps, &self.proj, &o)
    }
}
