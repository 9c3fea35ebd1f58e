//! Networks: a backbone (ResNet, …) → global average pooling → FC1 (`fc`, to the latent dim n) → head.
//!
//! The head is the frozen PEDCC projection (`out.weight`, stored n×K like the reference code), a
//! trainable linear classifier (softmax, center loss, COT) or a trainable classifier with normalised
//! weights (AM-Softmax, ArcFace, combined margin). `forward` returns both the latent features x (what
//! the POD loss constrains) and the logits (x Pᵀ for PEDCC and cosines for the normalised head, both
//! argmax-equivalent to the cosine; plain scores for the linear head).
//!
//! Backbones: ResNet18–152 (`resnet`), DenseNet121 (`densenet`), MobileNetV2 (`mobilenet`) and the small
//! test network (`smallcnn`).

pub mod densenet;
pub mod flops;
pub mod init;
pub mod layers;
pub mod mobilenet;
pub mod pretrained;
pub mod resnet;
pub mod smallcnn;
pub mod swin;
pub mod transformer;
pub mod vit;

pub use densenet::DenseNet;
pub use layers::{BatchNorm, Conv, Linear};
pub use mobilenet::MobileNetV2;
pub use resnet::{ConvShape, ResNet, Stem};
pub use smallcnn::SmallCnn;
pub use swin::Swin;
pub use transformer::{TransformerConfig, TRANSFORMER_NAMES};
pub use vit::Vit;

use crate::autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Which head sits on top of FC1.
#[derive(Clone, Debug)]
pub enum HeadSpec {
    /// Frozen PEDCC centroids, [K, n] unit rows.
    Pedcc(Tensor),
    /// A trainable linear classifier n → K with bias.
    Linear,
    /// A trainable classifier `out.weight` [K, n] without bias whose rows and the features are
    /// normalised in the forward: logits are the cosines cos θ_bk (AM-Softmax, ArcFace, combined margin).
    Cosine,
}

/// Everything needed to build a network.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// One of `MODEL_NAMES`.
    pub arch: String,
    /// Base channel width (64 in the paper and for the standard networks; smaller for quick tests).
    pub width: usize,
    pub stem: Stem,
    pub in_channels: usize,
    pub classes: usize,
    pub feature_dim: usize,
    pub head: HeadSpec,
    /// Side of the (square) input images the network is built for: the transformers' token grid
    /// and position embeddings depend on it; the CNNs ignore it.
    pub image_size: usize,
    /// Stochastic depth (drop path) rate of the transformers' deepest block (None → timm's default
    /// for the family: ViT 0, Swin 0.1); the CNNs ignore it.
    pub drop_path: Option<f64>,
}

/// The CNNs `podgpu` accepts for `MODEL` (the transformers: `TRANSFORMER_NAMES`, `is_model_name`).
pub const MODEL_NAMES: &[&str] = &[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "mobilenetv2",
    "smallcnn",
];

/// Whether `name` is a network podgpu builds: one of `MODEL_NAMES`, a timm name of
/// `TRANSFORMER_NAMES`, or a `vit(...)` / `swin(...)` configuration.
pub fn is_model_name(name: &str) -> bool {
    MODEL_NAMES.contains(&name) || matches!(TransformerConfig::parse(name), Some(Ok(_)))
}

/// Whether the GPU's bf16 step (`--precision bf16` on a GPU) covers a network: the ResNets, whose
/// ops all have bf16 forms there (cuDNN's bf16 convolutions and batch norms, `cuda::bf16_ops` for
/// ReLU, pooling and residual adds). The other networks run `--precision bf16` on the CPU's
/// emulation only, until their ops (concatenation, depthwise convolutions, ReLU6, the
/// transformers' kernels) have bf16 forms on the GPU.
pub fn gpu_bf16_supported(arch: &str) -> bool {
    arch.starts_with("resnet") && MODEL_NAMES.contains(&arch)
}

/// The error for `--precision bf16` on a GPU with a network the GPU's bf16 step does not cover.
pub fn gpu_bf16_unsupported(arch: &str) -> String {
    format!(
        "--precision bf16 on a GPU covers the ResNets only so far; {arch} has ops without a bf16          GPU form: use --precision tf32 on the GPU, or --device cpu for the bf16 emulation"
    )
}

/// The transformer configuration of a model name (None for the CNNs).
pub fn transformer_config(name: &str) -> Option<TransformerConfig> {
    TransformerConfig::parse(name).and_then(Result::ok)
}

/// The latent dimension a network has without FC1 (the transformers' pooled width), if it is one
/// that uses its pooled features directly.
pub fn native_feature_dim(name: &str) -> Option<usize> {
    transformer_config(name).map(|c| c.out_dim())
}

enum Backbone {
    ResNet(ResNet),
    DenseNet(DenseNet),
    MobileNetV2(MobileNetV2),
    SmallCnn(SmallCnn),
    Vit(Vit),
    Swin(Swin),
}

impl Backbone {
    fn new(
        spec: &ModelSpec,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<Backbone, String> {
        let unknown = |a: &str| format!("unknown model {a:?}; known: {}", MODEL_NAMES.join(", "));
        let (w, c, stem) = (spec.width, spec.in_channels, spec.stem);
        if let Some(cfg) = TransformerConfig::parse(&spec.arch) {
            let cfg = cfg?;
            let dp = spec.drop_path.unwrap_or_else(|| cfg.default_drop_path());
            return Ok(match &cfg {
                TransformerConfig::Vit(v) => {
                    Backbone::Vit(Vit::new(v, c, spec.image_size, dp, ps, dtype, rng)?)
                }
                TransformerConfig::Swin(s) => {
                    Backbone::Swin(Swin::new(s, c, spec.image_size, dp, ps, dtype, rng)?)
                }
            });
        }
        Ok(match spec.arch.as_str() {
            a if a.starts_with("resnet") => {
                let depth: usize = a[6..].parse().map_err(|_| unknown(a))?;
                Backbone::ResNet(ResNet::new(depth, w, c, stem, ps, dtype, rng)?)
            }
            "densenet121" => Backbone::DenseNet(DenseNet::new(
                &densenet::DENSENET121_BLOCKS,
                w,
                c,
                stem,
                ps,
                dtype,
                rng,
            )?),
            "mobilenetv2" => Backbone::MobileNetV2(MobileNetV2::new(w, c, stem, ps, dtype, rng)?),
            "smallcnn" => Backbone::SmallCnn(SmallCnn::new(w, c, ps, dtype, rng)),
            a => return Err(unknown(a)),
        })
    }

    /// Channels after global pooling (FC1's input).
    fn out_dim(&self) -> usize {
        match self {
            Backbone::ResNet(b) => b.out_dim,
            Backbone::DenseNet(b) => b.out_dim,
            Backbone::MobileNetV2(b) => b.out_dim,
            Backbone::SmallCnn(b) => b.out_dim,
            Backbone::Vit(b) => b.out_dim,
            Backbone::Swin(b) => b.out_dim,
        }
    }

    fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        match self {
            Backbone::ResNet(b) => b.forward(t, ps, x),
            Backbone::DenseNet(b) => b.forward(t, ps, x),
            Backbone::MobileNetV2(b) => b.forward(t, ps, x),
            Backbone::SmallCnn(b) => b.forward(t, ps, x),
            Backbone::Vit(b) => b.forward(t, ps, x),
            Backbone::Swin(b) => b.forward(t, ps, x),
        }
    }

    fn is_transformer(&self) -> bool {
        matches!(self, Backbone::Vit(_) | Backbone::Swin(_))
    }

    /// The prefix of the classifier's parameters: the reference code's `out` for the CNNs, timm's
    /// `head` (ViT) and `head.fc` (Swin) for the transformers.
    fn head_prefix(&self) -> &'static str {
        match self {
            Backbone::Vit(_) => "head",
            Backbone::Swin(_) => "head.fc",
            _ => "out",
        }
    }
}

enum Head {
    /// The PEDCC frozen in the store: `out.weight` [n, K] for the CNNs (the reference code's
    /// layout, `transposed`), or for the transformers timm's classifier `head.weight` [K, n] with a
    /// frozen zero `head.bias`, so that the checkpoint loads into timm and timm's logits are x Pᵀ.
    /// `centroids` keeps the [K, n] layout the loss uses.
    Pedcc {
        weight: ParamId,
        centroids: Tensor,
        transposed: bool,
    },
    Linear(Linear),
    /// `out.weight` [K, n], rows normalised in the forward.
    Cosine {
        weight: ParamId,
    },
}

pub struct Network {
    pub spec: ModelSpec,
    backbone: Backbone,
    /// FC1 to the latent dimension: always for the CNNs (the paper's); for the transformers only
    /// when the feature dimension differs from the backbone's width (their pooled features are
    /// the latent features, as the paper's n = 768 for ViT-B/16).
    fc: Option<Linear>,
    head: Head,
}

/// The two outputs of a forward pass.
pub struct Output {
    /// Latent features x [B, n] (FC1's output).
    pub features: Var,
    /// Class scores [B, K].
    pub logits: Var,
}

impl Network {
    /// Builds the network, registering its parameters (reference names) in `ps`.
    pub fn new(
        spec: ModelSpec,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<Network, String> {
        let backbone = Backbone::new(&spec, ps, dtype, rng)?;
        let pooled = backbone.out_dim();
        let fc = (!backbone.is_transformer() || pooled != spec.feature_dim)
            .then(|| Linear::new(ps, "fc", pooled, spec.feature_dim, true, dtype, rng));
        let prefix = backbone.head_prefix();
        let head = match &spec.head {
            HeadSpec::Pedcc(p) => {
                if p.shape() != [spec.classes, spec.feature_dim] {
                    return Err(format!(
                        "the PEDCC has shape {:?} but the model needs [{}, {}] (classes, feature dim)",
                        p.shape(),
                        spec.classes,
                        spec.feature_dim
                    ));
                }
                let centroids = p.to_dtype(dtype);
                let transposed = !backbone.is_transformer();
                let stored = match transposed {
                    true => layers::transpose2d(&centroids),
                    false => centroids.clone(),
                };
                let weight = ps.add(format!("{prefix}.weight"), stored, ParamKind::Frozen);
                if !transposed {
                    let zeros =
                        Tensor::from_f64_as(&[spec.classes], &vec![0.0; spec.classes], dtype);
                    ps.add(format!("{prefix}.bias"), zeros, ParamKind::Frozen);
                }
                Head::Pedcc {
                    weight,
                    centroids,
                    transposed,
                }
            }
            HeadSpec::Linear if backbone.is_transformer() => Head::Linear(transformer::linear(
                ps,
                prefix,
                spec.feature_dim,
                spec.classes,
                true,
                dtype,
                rng,
            )),
            HeadSpec::Linear => Head::Linear(Linear::new(
                ps,
                prefix,
                spec.feature_dim,
                spec.classes,
                true,
                dtype,
                rng,
            )),
            HeadSpec::Cosine => {
                let w = init::default_weight(&[spec.classes, spec.feature_dim], dtype, rng);
                Head::Cosine {
                    weight: ps.add(format!("{prefix}.weight"), w, ParamKind::Trainable),
                }
            }
        };
        Ok(Network {
            spec,
            backbone,
            fc,
            head,
        })
    }

    /// Images [B, C, H, W] → features and logits. BN uses batch statistics when the tape is training.
    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, images: &Var) -> Output {
        let pooled = self.backbone.forward(t, ps, images);
        let features = match &self.fc {
            Some(fc) => fc.forward(t, ps, &pooled),
            None => pooled,
        };
        let (b, n, k) = (
            features.shape()[0],
            self.spec.feature_dim,
            self.spec.classes,
        );
        let logits = match &self.head {
            Head::Pedcc {
                weight, transposed, ..
            } => {
                flops::add(flops::matmul_macs(b, n, k));
                let w = t.param(ps, *weight);
                ops::matmul(t, &features, false, &w, !*transposed)
            }
            Head::Linear(l) => l.forward(t, ps, &features),
            Head::Cosine { weight } => {
                flops::add(flops::matmul_macs(b, n, k));
                let w = t.param(ps, *weight);
                let wn = ops::row_normalize(t, &w);
                let xn = ops::row_normalize(t, &features);
                ops::matmul(t, &xn, false, &wn, true)
            }
        };
        Output { features, logits }
    }

    /// Every convolution of the backbone on images of shape `x` [N, C, H, W], in forward order
    /// (derived for the ResNets, which the benchmarks time; an error for the other backbones).
    pub fn conv_shapes(&self, ps: &ParamStore, x: [usize; 4]) -> Result<Vec<ConvShape>, String> {
        match &self.backbone {
            Backbone::ResNet(r) => Ok(r.conv_shapes(ps, x)),
            _ => Err(format!(
                "convolution shapes are derived for the ResNets only, not {}",
                self.spec.arch
            )),
        }
    }

    /// The frozen PEDCC centroids [K, n] on the store's device, if the head is PEDCC.
    pub fn centroids(&self, ps: &ParamStore) -> Option<Tensor> {
        match &self.head {
            Head::Pedcc {
                centroids, weight, ..
            } => Some(centroids.to_device(ps.value(*weight).device())),
            Head::Linear(_) | Head::Cosine { .. } => None,
        }
    }

    /// The class directions the head compares features with, [K, n] unit rows on the store's device:
    /// the PEDCC, or the normalised weights of a cosine head (None for a plain linear head).
    pub fn class_directions(&self, ps: &ParamStore) -> Option<Tensor> {
        match &self.head {
            Head::Cosine { weight } => Some(ops::row_normalize_fwd(ps.value(*weight))),
            _ => self.centroids(ps),
        }
    }
}
