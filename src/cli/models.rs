//! `podgpu models`: every network podgpu can train, with its parameter count and forward FLOPs per image
//! at a given input size, class count and latent dimension.
//!
//! FLOPs are counted while a one-image forward pass runs on the CPU (`nn::flops`: multiply-accumulates of
//! the convolutions, FC1 and the head, the convention of the paper's tables), so they are exact for the
//! stem and strides the input size selects (`trainer::stem_for`).

use crate::autograd::{ParamKind, ParamStore, Tape};
use crate::nn::{flops, HeadSpec, ModelSpec, Network, Stem, MODEL_NAMES};

/// The transformers `podgpu models` lists by default.
pub const TRANSFORMER_LISTED: &[&str] = &[
    "vit_b16",
    "vit_small_patch16_224",
    "vit_tiny_patch16_224",
    "swin_b",
    "swin_tiny_patch4_window7_224",
];
use crate::pedcc::{self, Method};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use crate::train::trainer::stem_for;
use anyhow::{anyhow, bail, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Input height and width in pixels; the stem follows it as in training (CIFAR stem up to 32,
    /// Tiny ImageNet stem up to 64, ImageNet stem above).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Input channels (3 colour, 1 grey).
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Latent dimension n (default: the paper's recommendation for the class count).
    #[arg(long)]
    pub feature_dim: Option<usize>,
    /// Network width (64 = the standard networks).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Only these networks, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Input size of the transformers (default: the size each was trained at, 224 for ViT-B/16
    /// and Swin-B); --image-size applies to the CNNs.
    #[arg(long)]
    pub transformer_size: Option<usize>,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            image_size: 32,
            channels: 3,
            classes: 10,
            feature_dim: None,
            width: 64,
            models: None,
            transformer_size: None,
        }
    }
}

/// One network's size.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub stem: Stem,
    /// Trainable parameters (backbone, FC1; the PEDCC head is frozen and not counted).
    pub params: usize,
    /// Channels after global pooling (FC1's input).
    pub pooled_dim: usize,
    /// Forward multiply-accumulates per image.
    pub flops: u64,
    /// The input side it was measured at.
    pub image_size: usize,
}

/// Builds `model` with a PEDCC head and measures it.
pub fn describe(model: &str, a: &Args) -> Result<ModelInfo> {
    if a.image_size < 8 {
        bail!(
            "--image-size {} is too small: the networks need at least 8×8 pixels",
            a.image_size
        );
    }
    if a.classes < 2 || a.channels == 0 || a.width == 0 {
        bail!("--classes must be at least 2, --channels and --width at least 1");
    }
    // Nothing is allocated for the requested sizes before they are checked against the machine.
    let image = crate::budget::product(&[
        a.channels as u128,
        a.image_size as u128,
        a.image_size as u128,
        4,
    ]);
    crate::budget::ensure_fits(
        image,
        || {
            format!(
                "a {}×{}×{} input image",
                a.channels, a.image_size, a.image_size
            )
        },
        "lower --image-size or --channels",
    )?;
    let tcfg = crate::nn::transformer_config(model);
    let dim = a
        .feature_dim
        .or(tcfg.as_ref().map(|t| t.out_dim()))
        .unwrap_or_else(|| pedcc::recommended_dim(a.classes));
    let size = match &tcfg {
        Some(t) => a.transformer_size.unwrap_or(t.native_image()),
        None => a.image_size,
    };
    if dim < 2 {
        bail!("--feature-dim must be at least 2");
    }
    let method = if a.classes <= dim.saturating_add(1) {
        Method::Simplex
    } else {
        Method::Repulsion
    };
    let p = pedcc::generate(a.classes, dim, 0, method)?.to_tensor();
    let stem = stem_for(size);
    let spec = ModelSpec {
        arch: model.to_string(),
        width: a.width,
        stem,
        in_channels: a.channels,
        classes: a.classes,
        feature_dim: dim,
        head: HeadSpec::Pedcc(p),
        image_size: size,
        drop_path: None,
    };
    let mut ps = ParamStore::new();
    let mut rng = Rng::new(0);
    crate::budget::check_network(
        &spec,
        [a.channels, a.image_size, a.image_size],
        1,
        false,
        crate::budget::NetworkFlags {
            size: "lower --width (64 is the standard network) or --feature-dim",
            inputs: "lower --image-size or --channels",
        },
    )?;
    let net = Network::new(spec, &mut ps, DType::F32, &mut rng).map_err(|e| anyhow!(e))?;
    let s = size;
    let pixels: Vec<f32> = (0..a.channels * s * s)
        .map(|_| rng.normal() as f32)
        .collect();
    let image = Tensor::from_vec(&[1, a.channels, s, s], pixels);
    let mut tape = Tape::inference();
    let x = tape.constant(image);
    let (out, macs) = flops::count(|| net.forward(&mut tape, &mut ps, &x));
    let fc_in = ps
        .find("fc.weight")
        .map(|id| ps.value(id).dim(1))
        .or(tcfg.as_ref().map(|t| t.out_dim()))
        .unwrap_or(0);
    debug_assert_eq!(out.features.shape(), &[1, dim]);
    Ok(ModelInfo {
        name: model.to_string(),
        stem,
        params: ps.count(ParamKind::Trainable),
        pooled_dim: fc_in,
        flops: macs,
        image_size: size,
    })
}

pub fn run(a: Args) -> Result<()> {
    let names: Vec<String> = match &a.models {
        Some(m) => m.clone(),
        None => MODEL_NAMES
            .iter()
            .chain(TRANSFORMER_LISTED)
            .map(|s| s.to_string())
            .collect(),
    };
    for n in &names {
        if let Some(Err(e)) = crate::nn::TransformerConfig::parse(n) {
            bail!(e);
        }
        if !crate::nn::is_model_name(n) {
            bail!(
                "unknown model `{n}`; podgpu has {}, {}, vit(...) and swin(...)",
                MODEL_NAMES.join(", "),
                TRANSFORMER_LISTED.join(", ")
            );
        }
    }
    let dim = a
        .feature_dim
        .unwrap_or_else(|| pedcc::recommended_dim(a.classes));
    // Every model is described (and its sizes checked) before the table starts, so that a refused
    // size prints its error alone rather than under a table header.
    let infos = names
        .iter()
        .map(|n| describe(n, &a))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "{}×{}×{} input, {} classes, feature dim {dim}, width {}",
        a.channels, a.image_size, a.image_size, a.classes, a.width
    );
    println!(
        "{:<30} {:<13} {:>12} {:>8} {:>14}",
        "model", "stem / input", "params", "pooled", "FLOPs/image"
    );
    for (n, m) in names.iter().zip(infos) {
        let stem = match crate::nn::transformer_config(n) {
            Some(_) => format!("{0}×{0}", m.image_size),
            None => format!("{:?}", m.stem),
        };
        println!(
            "{:<30} {:<13} {:>10.2} M {:>8} {:>12.3} G",
            m.name,
            stem,
            m.params as f64 / 1e6,
            m.pooled_dim,
            m.flops as f64 / 1e9
        );
    }
    println!(
        "params: trainable (backbone and FC1; the PEDCC head is frozen). FLOPs: forward multiply-accumulates \
         of convolutions and matrix products (1 MAC = 1 FLOP, as in the paper's tables; ×3 for a training \
         step). The transformers use their pooled width as n (no FC1) unless --feature-dim is given; \
         published: ViT-B/16 17.6 G, Swin-B 15.4 G at 224."
    );
    Ok(())
}
