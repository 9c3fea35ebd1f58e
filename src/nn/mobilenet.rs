//! MobileNetV2 (Sandler et al. 2018) with torchvision's structure and parameter names:
//!
//! ```text
//! features.0.{0,1}          stem: conv 3×3 + BN + ReLU6 (32 channels)
//! features.1.conv.{0.0,0.1,1,2}            expansion 1: depthwise conv+BN+ReLU6, project conv, BN
//! features.N.conv.{0.0,0.1,1.0,1.1,2,3}    expand 1×1 conv+BN+ReLU6, depthwise 3×3 conv+BN+ReLU6,
//!                                          project 1×1 conv, BN; + input when stride 1 and same width
//! features.18.{0,1}         conv 1×1 to 1280 + BN + ReLU6, then global average pooling
//! ```
//! Inverted-residual settings (t, c, n, s): (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
//! (6,160,3,2) (6,320,1,1). The classifier is replaced by podgpu's `fc` (FC1) and head.
//!
//! Input-size adaptations, chosen by the stem (as kuangliu/pytorch-cifar's CIFAR MobileNetV2):
//! - CIFAR (≤ 32 px): stride 1 in the stem conv and in the first stride-2 stage (c = 24), so the
//!   network downsamples 8× (32 → 4 px) instead of 32×.
//! - Tiny ImageNet (≤ 64 px): stride 1 in the stem only (64 → 4 px).
//! - ImageNet: torchvision's strides.
//!
//! The `width` knob is the width multiplier α = width/64 (64 → the standard network), applied with
//! torchvision's rounding to multiples of 8; like torchvision the last conv keeps 1280 channels when
//! α ≤ 1.

use super::layers::{BatchNorm, Conv};
use super::resnet::Stem;
use crate::autograd::{ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::DType;

/// (expansion t, output channels c, repeats n, first stride s) of torchvision's MobileNetV2.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
const STEM_CHANNELS: usize = 32;
const LAST_CHANNELS: usize = 1280;

/// torchvision's `_make_divisible(v, 8)`: round to the nearest multiple of 8, at least 8, and never
/// more than 10% below v.
pub fn make_divisible(v: f64) -> usize {
    let d = 8.0f64;
    let mut new_v = d.max(((v + d / 2.0) / d).floor() * d);
    if new_v < 0.9 * v {
        new_v += d;
    }
    new_v as usize
}

/// conv + BN (+ ReLU6): torchvision's `Conv2dNormActivation`, or a projection conv and its BN.
struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
    relu6: bool,
}

impl ConvBn {
    fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let y = self.conv.forward(t, ps, x);
        let y = self.bn.forward(t, ps, &y);
        if self.relu6 {
            ops::relu6(t, &y)
        } else {
            y
        }
    }
}

struct InvertedResidual {
    layers: Vec<ConvBn>,
    residual: bool,
}

pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    last: ConvBn,
    pub out_dim: usize,
}

impl MobileNetV2 {
    pub fn new(
        width: usize,
        in_channels: usize,
        stem: Stem,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<MobileNetV2, String> {
        if width == 0 {
            return Err("MobileNetV2 needs a width of at least 1".into());
        }
        let alpha = width as f64 / 64.0;
        #[allow(clippy::too_many_arguments)]
        let conv_bn = |ps: &mut ParamStore,
                       rng: &mut Rng,
                       conv: String,
                       bn: String,
                       cin: usize,
                       cout: usize,
                       k: usize,
                       stride: usize,
                       groups: usize,
                       relu6: bool| ConvBn {
            conv: Conv::new(
                ps,
                &conv,
                cin,
                cout,
                k,
                stride,
                k / 2,
                groups,
                false,
                dtype,
                rng,
            ),
            bn: BatchNorm::new(ps, &bn, cout, dtype),
            relu6,
        };
        let (stem_stride, stage2_stride) = match stem {
            Stem::Cifar => (1, 1),
            Stem::TinyImageNet => (1, 2),
            Stem::ImageNet => (2, 2),
        };
        let mut cin = make_divisible(STEM_CHANNELS as f64 * alpha);
        let stem_layer = conv_bn(
            ps,
            rng,
            "features.0.0".into(),
            "features.0.1".into(),
            in_channels,
            cin,
            3,
            stem_stride,
            1,
            true,
        );
        let mut blocks = Vec::new();
        let mut index = 1;
        for (stage, &(t, c, n, s)) in SETTINGS.iter().enumerate() {
            let cout = make_divisible(c as f64 * alpha);
            for i in 0..n {
                let stride = match (i, stage) {
                    (0, 1) => stage2_stride,
                    (0, _) => s,
                    _ => 1,
                };
                let p = format!("features.{index}.conv");
                let hidden = cin * t;
                let mut layers = Vec::new();
                let mut k = 0;
                if t != 1 {
                    layers.push(conv_bn(
                        ps,
                        rng,
                        format!("{p}.0.0"),
                        format!("{p}.0.1"),
                        cin,
                        hidden,
                        1,
                        1,
                        1,
                        true,
                    ));
                    k = 1;
                }
                layers.push(conv_bn(
                    ps,
                    rng,
                    format!("{p}.{k}.0"),
                    format!("{p}.{k}.1"),
                    hidden,
                    hidden,
                    3,
                    stride,
                    hidden,
                    true,
                ));
                layers.push(conv_bn(
                    ps,
                    rng,
                    format!("{p}.{}", k + 1),
                    format!("{p}.{}", k + 2),
                    hidden,
                    cout,
                    1,
                    1,
                    1,
                    false,
                ));
                blocks.push(InvertedResidual {
                    layers,
                    residual: stride == 1 && cin == cout,
                });
                cin = cout;
                index += 1;
            }
        }
        let last_channels = make_divisible(LAST_CHANNELS as f64 * alpha.max(1.0));
        let last = conv_bn(
            ps,
            rng,
            format!("features.{index}.0"),
            format!("features.{index}.1"),
            cin,
            last_channels,
            1,
            1,
            1,
            true,
        );
        Ok(MobileNetV2 {
            stem: stem_layer,
            blocks,
            last,
            out_dim: last_channels,
        })
    }

    /// Images [N, C, H, W] → pooled features [N, out_dim].
    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let mut y = self.stem.forward(t, ps, x);
        for block in &self.blocks {
            let mut h = y.clone();
            for layer in &block.layers {
                h = layer.forward(t, ps, &h);
            }
            y = if block.residual {
                ops::add(t, &y, &h)
            } else {
                h
            };
        }
        let y = self.last.forward(t, ps, &y);
        ops::global_avg_pool(t, &y)
    }
}

#[cfg(test)]
mod tests {
    use super::make_divisible;

    #[test]
    fn channel_rounding_matches_torchvision() {
        assert_eq!(make_divisible(32.0), 32);
        assert_eq!(make_divisible(16.0 * 0.5), 8);
        assert_eq!(make_divisible(24.0 * 0.75), 24); // 18 → 16 is > 10% below, so 24
        assert_eq!(make_divisible(1.0), 8);
        assert_eq!(make_divisible(1280.0), 1280);
    }
}
