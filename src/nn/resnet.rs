//! ResNet18/34/50/101/152 with the reference code's structure and parameter names (DESIGN.md §1.7):
//! `pre_layers.{0,1}` stem conv + BN, `layerL.I.layers.{0,1,3,4[,6,7]}` the block's convs and BNs,
//! `layerL.0.shortcut.{0,1}` the projection, then global average pooling → `fc` (FC1, to the latent dim).

use super::layers::{BatchNorm, Conv};
use crate::autograd::{ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::DType;

/// The stem: how the first layers treat the input resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// 3×3 stride-1 conv, no max-pool (CIFAR, 32×32).
    Cifar,
    /// The CIFAR stem followed by a 3×3 stride-2 max-pool (Tiny ImageNet, FaceScrub, 64×64).
    TinyImageNet,
    /// 7×7 stride-2 conv and a 3×3 stride-2 max-pool (ImageNet, 224×224).
    ImageNet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// One residual block: `layers` (conv, BN, ReLU, …) plus an optional projection shortcut.
struct Block {
    convs: Vec<(Conv, BatchNorm)>,
    shortcut: Option<(Conv, BatchNorm)>,
}

impl Block {
    fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let residual = match &self.shortcut {
            Some((conv, bn)) => {
                let s = conv.forward(t, ps, x);
                bn.forward(t, ps, &s)
            }
            None => x.clone(),
        };
        // conv → BN → ReLU, the last BN with the residual added before its ReLU (fused ops).
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = conv.forward(t, ps, &y);
            let r = (i == last).then_some(&residual);
            y = bn.forward_relu(t, ps, &y, r);
        }
        y
    }
}

/// The max-pool after the stem for non-CIFAR inputs: 3×3, stride 2, padding 1.
const STEM_POOL: ops::Pool2dSpec = ops::Pool2dSpec {
    kernel: (3, 3),
    stride: (2, 2),
    padding: (1, 1),
};

/// One convolution of a network as it runs on an input of a given size (FLOP counts, benchmarks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// The weight's parameter name, e.g. `layer2.0.layers.3.weight`.
    pub name: String,
    /// Input [N, C, H, W].
    pub x: [usize; 4],
    /// Weight [Cout, Cin/groups, KH, KW].
    pub w: [usize; 4],
    pub spec: ops::Conv2dSpec,
}

impl ConvShape {
    fn of(conv: &Conv, ps: &ParamStore, x: [usize; 4]) -> ConvShape {
        let p = ps.get(conv.weight);
        let s = p.value.shape();
        ConvShape {
            name: p.name.clone(),
            x,
            w: [s[0], s[1], s[2], s[3]],
            spec: conv.spec,
        }
    }

    /// The output shape [N, Cout, OH, OW].
    pub fn y(&self) -> [usize; 4] {
        ops::ConvGeom::new(&self.x, &self.w, self.spec).y_shape()
    }
}

/// The ResNet backbone up to global average pooling: images [N, C, H, W] → pooled features [N, out_dim].
pub struct ResNet {
    stem_conv: Conv,
    stem_bn: BatchNorm,
    stem: Stem,
    layers: Vec<Vec<Block>>,
    pub out_dim: usize,
}

impl ResNet {
    /// `depth` ∈ {18, 34, 50, 101, 152}; `width` is the stem's channel count (64 in the paper; smaller
    /// widths keep the topology for fast tests and fixtures).
    pub fn new(
        depth: usize,
        width: usize,
        in_channels: usize,
        stem: Stem,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> Result<ResNet, String> {
        let (kind, blocks) = match depth {
            18 => (BlockKind::Basic, [2, 2, 2, 2]),
            34 => (BlockKind::Basic, [3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
            _ => {
                return Err(format!(
                    "no ResNet of depth {depth} (choose 18, 34, 50, 101 or 152)"
                ))
            }
        };
        let stem_conv = match stem {
            Stem::ImageNet => Conv::new(
                ps,
                "pre_layers.0",
                in_channels,
                width,
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
                "pre_layers.0",
                in_channels,
                width,
                3,
                1,
                1,
                1,
                false,
                dtype,
                rng,
            ),
        };
        let stem_bn = BatchNorm::new(ps, "pre_layers.1", width, dtype);
        let mut in_planes = width;
        let mut layers = Vec::new();
        for (l, &n) in blocks.iter().enumerate() {
            let planes = width << l;
            let stride = if l == 0 { 1 } else { 2 };
            let mut layer = Vec::new();
            for i in 0..n {
                let p = format!("layer{}.{i}", l + 1);
                let s = if i == 0 { stride } else { 1 };
                let out = planes * kind.expansion();
                let shortcut = (i == 0 && (s != 1 || in_planes != out)).then(|| {
                    (
                        Conv::new(
                            ps,
                            &format!("{p}.shortcut.0"),
                            in_planes,
                            out,
                            1,
                            s,
                            0,
                            1,
                            false,
                            dtype,
                            rng,
                        ),
                        BatchNorm::new(ps, &format!("{p}.shortcut.1"), out, dtype),
                    )
                });
                let conv =
                    |ps: &mut ParamStore, rng: &mut Rng, idx: usize, cin, cout, k, s, pad| {
                        (
                            Conv::new(
                                ps,
                                &format!("{p}.layers.{idx}"),
                                cin,
                                cout,
                                k,
                                s,
                                pad,
                                1,
                                false,
                                dtype,
                                rng,
                            ),
                            BatchNorm::new(ps, &format!("{p}.layers.{}", idx + 1), cout, dtype),
                        )
                    };
                let convs = match kind {
                    BlockKind::Basic => vec![
                        conv(ps, rng, 0, in_planes, planes, 3, s, 1),
                        conv(ps, rng, 3, planes, planes, 3, 1, 1),
                    ],
                    // The reference puts the stride on the 3×3 conv (ResNet v1.5).
                    BlockKind::Bottleneck => vec![
                        conv(ps, rng, 0, in_planes, planes, 1, 1, 0),
                        conv(ps, rng, 3, planes, planes, 3, s, 1),
                        conv(ps, rng, 6, planes, out, 1, 1, 0),
                    ],
                };
                layer.push(Block { convs, shortcut });
                in_planes = out;
            }
            layers.push(layer);
        }
        Ok(ResNet {
            stem_conv,
            stem_bn,
            stem,
            layers,
            out_dim: in_planes,
        })
    }

    /// Every convolution `forward` runs on an input of shape `x` [N, C, H, W], in order: the same walk
    /// as `forward`, on shapes only.
    pub fn conv_shapes(&self, ps: &ParamStore, x: [usize; 4]) -> Vec<ConvShape> {
        let mut out = vec![ConvShape::of(&self.stem_conv, ps, x)];
        let mut y = out[0].y();
        if self.stem != Stem::Cifar {
            y = STEM_POOL.out_shape(&y, "max_pool2d");
        }
        for block in self.layers.iter().flatten() {
            let input = y;
            for (conv, _) in &block.convs {
                let c = ConvShape::of(conv, ps, y);
                y = c.y();
                out.push(c);
            }
            if let Some((conv, _)) = &block.shortcut {
                out.push(ConvShape::of(conv, ps, input));
            }
        }
        out
    }

    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        // Channels-last on a GPU when `ops::gpu_nhwc()` asks for it: the image is reordered once
        // here, every op after keeps NHWC, and the global pool's features have no layout.
        let x = &ops::gpu_input_layout(t, x);
        let y = self.stem_conv.forward(t, ps, x);
        let mut y = self.stem_bn.forward_relu(t, ps, &y, None);
        if self.stem != Stem::Cifar {
            y = ops::max_pool2d(t, &y, STEM_POOL);
        }
        for layer in &self.layers {
            for block in layer {
                y = block.forward(t, ps, &y);
            }
        }
        ops::global_avg_pool(t, &y)
    }
}
