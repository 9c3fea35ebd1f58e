//! Networks: a backbone (ResNet, …) → global average pooling → FC1 (`fc`, to the latent dim n) → head.
//!
//! The head is either the frozen PEDCC projection (`out.weight`, stored n×K like the reference code) or a
//! trainable linear classifier (softmax baselines). `forward` returns both the latent features x (what the
//! POD loss constrains) and the logits (x Pᵀ for PEDCC, used for cosine-argmax accuracy).

pub mod init;
pub mod layers;
pub mod resnet;

pub use layers::{BatchNorm, Conv, Linear};
pub use resnet::{ConvShape, ResNet, Stem};

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
}

/// Everything needed to build a network.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152`.
    pub arch: String,
    /// Base channel width (64 in the paper).
    pub width: usize,
    pub stem: Stem,
    pub in_channels: usize,
    pub classes: usize,
    pub feature_dim: usize,
    pub head: HeadSpec,
}

/// The names `podgpu` accepts for `MODEL`.
pub const MODEL_NAMES: &[&str] = &["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"];

enum Backbone {
    ResNet(ResNet),
}

enum Head {
    /// `out.weight` [n, K] frozen in the store; `centroids` keeps the [K, n] layout the loss uses.
    Pedcc { weight: ParamId, centroids: Tensor },
    Linear(Linear),
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
    pub fn new(spec: ModelSpec, ps: &mut ParamStore, dtype: DType, rng: &mut Rng) -> Result<Network, String> {
        let backbone = match spec.arch.as_str() {
            a if a.starts_with("resnet") => {
                let depth: usize = a[6..]
                    .parse()
                    .map_err(|_| format!("unknown model {a:?}; known: {}", MODEL_NAMES.join(", ")))?;
                Backbone::ResNet(ResNet::new(depth, spec.width, spec.in_channels, spec.stem, ps, dtype, rng)?)
            }
            a => return Err(format!("unknown model {a:?}; known: {}", MODEL_NAMES.join(", "))),
        };
        let pooled = match &backbone {
            Backbone::ResNet(r) => r.out_dim,
        };
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
                let weight = ps.add("out.weight", layers::transpose2d(&centroids), ParamKind::Frozen);
                Head::Pedcc { weight, centroids }
            }
            HeadSpec::Linear => Head::Linear(Linear::new(ps, "out", spec.feature_dim, spec.classes, true, dtype, rng)),
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
        let pooled = match &self.backbone {
            Backbone::ResNet(r) => r.forward(t, ps, images),
        };
        let features = self.fc.forward(t, ps, &pooled);
        let logits = match &self.head {
            Head::Pedcc { weight, .. } => {
                let w = t.param(ps, *weight);
                ops::matmul(t, &features, false, &w, false)
            }
            Head::Linear(l) => l.forward(t, ps, &features),
        };
        Output { features, logits }
    }

    /// Every convolution of the backbone on images of shape `x` [N, C, H, W], in forward order.
    pub fn conv_shapes(&self, ps: &ParamStore, x: [usize; 4]) -> Vec<ConvShape> {
        match &self.backbone {
            Backbone::ResNet(r) => r.conv_shapes(ps, x),
        }
    }

    /// The frozen PEDCC centroids [K, n] on the store's device, if the head is PEDCC.
    pub fn centroids(&self, ps: &ParamStore) -> Option<Tensor> {
        match &self.head {
            Head::Pedcc { centroids, weight } => {
                Some(centroids.to_device(ps.value(*weight).device()))
            }
            Head::Linear(_) => None,
        }
    }
}
