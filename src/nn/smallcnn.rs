//! `smallcnn`: three conv-BN-ReLU layers with two 2×2 max-pools, for quick tests, CPU runs and the 2-D
//! latent-feature plot (`podgpu visualize`). Laid out like a PyTorch `nn.Sequential` called `features`:
//!
//! ```text
//! features.0  conv 3×3, C_in → w/4     features.1  BN   (2 ReLU, 3 max-pool 2×2)
//! features.4  conv 3×3, w/4 → w/2      features.5  BN   (6 ReLU, 7 max-pool 2×2)
//! features.8  conv 3×3, w/2 → w        features.9  BN   (10 ReLU)
//! ```
//! then global average pooling → `fc`. `w` is the `width` knob (64 by default: 16, 32, 64 channels).

use super::layers::{BatchNorm, Conv};
use crate::autograd::{ParamStore, Tape, Var};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::DType;

pub struct SmallCnn {
    layers: Vec<(Conv, BatchNorm)>,
    pub out_dim: usize,
}

impl SmallCnn {
    pub fn new(
        width: usize,
        in_channels: usize,
        ps: &mut ParamStore,
        dtype: DType,
        rng: &mut Rng,
    ) -> SmallCnn {
        let chans = [(width / 4).max(1), (width / 2).max(1), width.max(1)];
        let mut cin = in_channels;
        let mut layers = Vec::new();
        for (i, &c) in chans.iter().enumerate() {
            let conv = Conv::new(
                ps,
                &format!("features.{}", 4 * i),
                cin,
                c,
                3,
                1,
                1,
                1,
                false,
                dtype,
                rng,
            );
            let bn = BatchNorm::new(ps, &format!("features.{}", 4 * i + 1), c, dtype);
            layers.push((conv, bn));
            cin = c;
        }
        SmallCnn {
            layers,
            out_dim: cin,
        }
    }

    /// Images [N, C, H, W] → pooled features [N, out_dim].
    pub fn forward(&self, t: &mut Tape, ps: &mut ParamStore, x: &Var) -> Var {
        let mut y = x.clone();
        let last = self.layers.len() - 1;
        for (i, (conv, bn)) in self.layers.iter().enumerate() {
            y = conv.forward(t, ps, &y);
            y = bn.forward(t, ps, &y);
            y = ops::relu(t, &y);
            if i != last {
                y = ops::max_pool2d(t, &y, ops::Pool2dSpec::new(2, 2, 0));
            }
        }
        ops::global_avg_pool(t, &y)
    }
}
