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
pub mod resnet;
pub mod smallcnn;

pub use densenet::DenseNet;
pub use layers::{BatchNorm, Conv, Linear};
pub use mobilenet::MobileNetV2;
pub use resnet::{ConvShape, ResNet, Stem};
pub use smallcnn::SmallCnn;

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
}

/// The names `podgpu` accepts for `MODEL`.
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

enum Backbone {
    ResNet(ResNet),
    DenseNet(DenseNet),
    MobileNetV2(MobileNetV2),
    SmallCnn(SmallCnn),
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
        }
    }

    fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        match self {
            Backbone::ResNet(b) => b.forward(t, ps, x),
            Backbone::DenseNet(b) => b.forward(t, ps, x),
            Backbone::MobileNetV2(b) => b.forward(t, ps, x),
            Backbone::SmallCnn(b) => b.forward(t, ps, x),
        }
    }
}

enum Head {
    /// `out.weight` [n, K] frozen in the store; `centroids` keeps the [K, n] layout the loss uses.
    Pedcc {
        weight: ParamId,
        centroids: Tensor,
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
    fc: Linear,
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
        let fc = Linear::new(ps, "fc", pooled, spec.feature_dim, true, dtype, rng);
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
                let weight = ps.add(
                    "out.weight",
                    layers::transpose2d(&centroids),
                    ParamKind::Frozen,
                );
                Head::Pedcc { weight, centroids }
            }
            HeadSpec::Linear => Head::Linear(Linear::new(
                ps,
                "out",
                spec.feature_dim,
                spec.classes,
                true,
                dtype,
                rng,
            )),
            HeadSpec::Cosine => {
                let w = init::default_weight(&[spec.classes, spec.feature_dim], dtype, rng);
                Head::Cosine {
                    weight: ps.add("out.weight", w, ParamKind::Trainable),
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
        let features = self.fc.forward(t, ps, &pooled);
        let (b, n, k) = (
            features.shape()[0],
            self.spec.feature_dim,
            self.spec.classes,
        );
        let logits = match &self.head {
            Head::Pedcc { weight, .. } => {
                flops::add(flops::matmul_macs(b, n, k));
                let w = t.param(ps, *weight);
                ops::matmul(t, &features, false, &w, false)
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
            Head::Pedcc { centroids, weight } => {
                Some(centroids.to_device(ps.value(*weight).device()))
            }
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
