//! DenseNet121 (Huang et al. 2017) with torchvision's structure and parameter names:
//!
//! ```text
//! features.conv0, features.norm0                          stem conv + BN (+ ReLU, + pool0 by stem)
//! features.denseblockB.denselayerL.{norm1,conv1,norm2,conv2}   BN-ReLU-conv1×1(4g)-BN-ReLU-conv3×3(g)
//! features.transitionT.{norm,conv}                        BN-ReLU-conv1×1(½ channels)-avgpool 2×2
//! features.norm5                                          final BN (+ ReLU), then global average pool
//! ```
//! Blocks of 6, 12, 24, 16 layers, growth rate g = 32, bottleneck 4·g, compression ½, 2·g stem channels.
//! The classifier is replaced by podgpu's `fc` (FC1) and head.
//!
//! Input-size adaptations, chosen by the stem (the usual CIFAR practice, e.g. kuangliu/pytorch-cifar):
//! - CIFAR (≤ 32 px): `conv0` is 3×3 stride 1 and there is no `pool0`, so the four blocks see 32, 16, 8
//!   and 4 px. torchvision's `norm0` + ReLU after the stem conv are kept.
//! - Tiny ImageNet (≤ 64 px): the CIFAR stem followed by `pool0` (3×3 stride-2 max-pool).
//! - ImageNet: torchvision's stem, 7×7 stride-2 `conv0` and `pool0`.
//!
//! The `width` knob scales the network: growth rate g = width/2 and 2·g = width stem channels, so the
//! default width 64 is DenseNet121 exactly; tests use width 8 (g = 4).

use super::layers::{BatchNorm, Conv};
use super::resnet::Stem;
use crate::autograd::{ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::DType;

/// Layers per dense block of DenseNet121.
pub const DENSENET121_BLOCKS: [usize; 4] = [6, 12, 24, 16];
/// Channels of a dense layer's bottleneck, in units of the growth rate.
const BN_SIZE: usize = 4;

/// BN → ReLU → conv, the pre-activation unit every DenseNet layer is made of.
struct NormReluConv {
    norm: BatchNorm,
    conv: Conv,
}

impl NormReluConv {
    fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let y = self.norm.forward(t, ps, x);
        let y = ops::relu(t, &y);
        self.conv.forward(t, ps, &y)
    }
}

/// One dense layer: the concatenation of all earlier outputs in → g new channels out.
struct DenseLayer {
    bottleneck: NormReluConv,
    conv: NormReluConv,
}

struct Transition {
    unit: NormReluConv,
}

pub struct DenseNet {
    conv0: Conv,
    norm0: BatchNorm,
    pool0: bool,
    blocks: Vec<Vec<DenseLayer>>,
    transitions: Vec<Transition>,
    norm5: BatchNorm,
    pub out_dim: usize,
}

impl DenseNet {
    /// DenseNet with the given layers per block; `width` = 2 × growth rate (64 for DenseNet121).
    pub fn new(
        blocks: &[usize],
        width: usize,
        in_channels: usize,
        stem: Stem,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<DenseNet, String> {
        if width < 2 {
            return Err(format!(
                "DenseNet needs a width of at least 2 (growth rate width/2), got {width}"
            ));
        }
        let growth = width / 2;
        let stem_channels = 2 * growth;
        let conv0 = match stem {
            Stem::ImageNet => Conv::new(
                ps,
                "features.conv0",
                in_channels,
                stem_channels,
                7,
                2,
                3,
                1,
                false,
                dtype,
                rng,
            ),
            _ => Conv::new(
                ps,
                "features.conv0",
                in_channels,
                stem_channels,
                3,
                1,
                1,
                1,
                false,
                dtype,
                rng,
            ),
        };
        let norm0 = BatchNorm::new(ps, "features.norm0", stem_channels, dtype);
        let unit = |ps: &mut ParamStore,
                    rng: &mut Rng,
                    prefix: &str,
                    norm: &str,
                    conv: &str,
                    cin,
                    cout,
                    k| {
            let pad = k / 2;
            NormReluConv {
                norm: BatchNorm::new(ps, &format!("{prefix}.{norm}"), cin, dtype),
                conv: Conv::new(
                    ps,
                    &format!("{prefix}.{conv}"),
                    cin,
                    cout,
                    k,
                    1,
                    pad,
                    1,
                    false,
                    dtype,
                    rng,
                ),
            }
        };
        let mut channels = stem_channels;
        let mut dense_blocks = Vec::new();
        let mut transitions = Vec::new();
        for (b, &layers) in blocks.iter().enumerate() {
            let mut block = Vec::new();
            for l in 0..layers {
                let prefix = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                block.push(DenseLayer {
                    bottleneck: unit(
                        ps,
                        rng,
                        &prefix,
                        "norm1",
                        "conv1",
                        channels,
                        BN_SIZE * growth,
                        1,
                    ),
                    conv: unit(
                        ps,
                        rng,
                        &prefix,
                        "norm2",
                        "conv2",
                        BN_SIZE * growth,
                        growth,
                        3,
                    ),
                });
                channels += growth;
            }
            dense_blocks.push(block);
            if b + 1 != blocks.len() {
                let prefix = format!("features.transition{}", b + 1);
                let out = channels / 2;
                transitions.push(Transition {
                    unit: unit(ps, rng, &prefix, "norm", "conv", channels, out, 1),
                });
                channels = out;
            }
        }
        let norm5 = BatchNorm::new(ps, "features.norm5", channels, dtype);
        Ok(DenseNet {
            conv0,
            norm0,
            pool0: stem != Stem::Cifar,
            blocks: dense_blocks,
            transitions,
            norm5,
            out_dim: channels,
        })
    }

    /// Images [N, C, H, W] → pooled features [N, out_dim].
    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let y = self.conv0.forward(t, ps, x);
        let y = self.norm0.forward(t, ps, &y);
        let mut y = ops::relu(t, &y);
        if self.pool0 {
            y = ops::max_pool2d(t, &y, ops::Pool2dSpec::new(3, 2, 1));
        }
        for (b, block) in self.blocks.iter().enumerate() {
            for layer in block {
                let h = layer.bottleneck.forward(t, ps, &y);
                let new = layer.conv.forward(t, ps, &h);
                y = ops::concat_channels(t, &[&y, &new]);
            }
            if let Some(tr) = self.transitions.get(b) {
                let h = tr.unit.forward(t, ps, &y);
                y = ops::avg_pool2d(t, &h, ops::Pool2dSpec::new(2, 2, 0));
            }
        }
        let y = self.norm5.forward(t, ps, &y);
        let y = ops::relu(t, &y);
        ops::global_avg_pool(t, &y)
    }
}
