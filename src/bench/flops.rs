//! FLOP counts of a training step, derived from the network definition (`Network::conv_shapes`).
//!
//! Convention: one multiply-add is **2 FLOPs**, and only convolutions and matrix products are
//! counted (batch norm, ReLU, pooling, the loss's elementwise parts and SGD are a few FLOPs per
//! activation or parameter and bandwidth-bound; they are left out, as is usual for "model FLOPs").
//! A training step is forward + backward-data + backward-filter, each about as costly as the forward,
//! so ≈ 3× the forward; the first convolution has no backward-data (the images need no gradient, and
//! the tape skips it).
//!
//! ResNet50-CIFAR (3×3 stem, no max-pool, 32×32 input) does 1.298 G multiply-adds per image in its
//! convolutions: the "≈ 1.3 GFLOP" often quoted for its forward counts multiply-adds (MACs). In
//! FLOPs that is 2.60 GFLOP forward and 7.78 GFLOP per training image (the 7.8 GFLOP).

use crate::autograd::ParamStore;
use crate::nn::{ConvShape, Network};

/// Forward FLOPs of one convolution: 2 · N·Cout·OH·OW · (Cin/groups)·KH·KW. Its backward-data and
/// backward-filter passes cost the same.
pub fn conv_flops(c: &ConvShape) -> f64 {
    let y = c.y();
    2.0 * (y[0] * y[1] * y[2] * y[3]) as f64 * (c.w[1] * c.w[2] * c.w[3]) as f64
}

/// FLOPs of an [m, k]·[k, n] product.
pub fn gemm_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

/// The counted FLOPs of one training step (forward, POD loss, backward) at a batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct StepFlops {
    pub batch: usize,
    pub conv_forward: f64,
    pub conv_backward_data: f64,
    pub conv_backward_filter: f64,
    /// FC1 (pooled → n): forward, backward-data, backward-weight.
    pub fc: [f64; 3],
    /// The PEDCC head's logits x·Pᵀ (forward only: P is frozen and the POD loss does not go
    /// through the logits).
    pub head: f64,
    /// The SC loss's two products (the B×B Gram DDᵀ and G·D when n > B, else DᵀD and D·C).
    pub sc: f64,
}

impl StepFlops {
    /// Counts a step of `net` (parameters in `ps`) on images [batch, C, H, W].
    pub fn of_network(
        net: &Network,
        ps: &ParamStore,
        image: [usize; 3],
        batch: usize,
    ) -> anyhow::Result<StepFlops> {
        let convs = net
            .conv_shapes(ps, [batch, image[0], image[1], image[2]])
            .map_err(anyhow::Error::msg)?;
        let fwd: f64 = convs.iter().map(conv_flops).sum();
        // The first convolution reads the images, which need no gradient.
        let first = convs.first().map_or(0.0, conv_flops);
        let fc_w = ps
            .find("fc.weight")
            .map(|id| ps.value(id).shape().to_vec())
            .expect("a network has FC1 (`fc.weight`)");
        let (n, pooled) = (fc_w[0], fc_w[1]);
        let fc = gemm_flops(batch, pooled, n);
        let classes = net.spec.classes;
        let sc = if n > batch {
            2.0 * gemm_flops(batch, n, batch)
        } else {
            2.0 * gemm_flops(n, batch, n)
        };
        Ok(StepFlops {
            batch,
            conv_forward: fwd,
            conv_backward_data: fwd - first,
            conv_backward_filter: fwd,
            fc: [fc, fc, fc],
            head: gemm_flops(batch, n, classes),
            sc,
        })
    }

    /// Counts a transformer's step from the multiply-adds a one-image forward reports
    /// (`nn::flops`: the patch embedding, every linear layer, the attention's two batched products,
    /// FC1 and the head): its backward is twice its forward but for the patch embedding's
    /// backward-data (the images need no gradient). The `conv_*` fields then hold every matrix
    /// product of the backbone.
    pub fn of_transformer(
        net: &Network,
        ps: &mut ParamStore,
        image: [usize; 3],
        batch: usize,
    ) -> anyhow::Result<StepFlops> {
        use crate::autograd::Tape;
        let [c, h, w] = image;
        let x = crate::tensor::Tensor::from_vec(&[1, c, h, w], vec![0.5f32; c * h * w]);
        let mut tape = Tape::inference();
        let xv = tape.constant(x);
        let (out, macs) = crate::nn::flops::count(|| net.forward(&mut tape, ps, &xv));
        let n = out.features.shape()[1];
        let classes = net.spec.classes;
        let head_macs = (n * classes) as f64;
        let patch = ps
            .find("patch_embed.proj.weight")
            .map(|id| {
                let s = ps.value(id).shape().to_vec();
                let (ph, pw) = (h / s[2], w / s[3]);
                (s[0] * s[1] * s[2] * s[3] * ph * pw) as f64
            })
            .unwrap_or(0.0);
        let b = batch as f64;
        let fwd = 2.0 * (macs as f64 - head_macs) * b;
        let sc = if n > batch {
            2.0 * gemm_flops(batch, n, batch)
        } else {
            2.0 * gemm_flops(n, batch, n)
        };
        Ok(StepFlops {
            batch,
            conv_forward: fwd,
            conv_backward_data: fwd - 2.0 * patch * b,
            conv_backward_filter: fwd,
            fc: [0.0; 3],
            head: 2.0 * head_macs * b,
            sc,
        })
    }

    pub fn forward(&self) -> f64 {
        self.conv_forward + self.fc[0] + self.head
    }

    pub fn backward(&self) -> f64 {
        self.conv_backward_data + self.conv_backward_filter + self.fc[1] + self.fc[2]
    }

    /// Everything counted in one step.
    pub fn total(&self) -> f64 {
        self.forward() + self.backward() + self.sc
    }

    pub fn per_image(&self) -> f64 {
        self.total() / self.batch as f64
    }

    /// A few lines for the report: forward in GMAC and GFLOP, training FLOPs per image, the ratio.
    pub fn explain(&self) -> String {
        let b = self.batch as f64;
        let fwd = self.forward() / b;
        format!(
            "FLOPs per image (multiply-add = 2 FLOPs; convolutions and matrix products only):\n  \
             forward  {:.3} GMAC = {:.3} GFLOP (convolutions / backbone products {:.3} GFLOP, FC1 {:.4}, head {:.5})\n  \
             backward {:.3} GFLOP (data {:.3} — none for the first convolution — filter {:.3}, FC1 {:.4})\n  \
             SC loss  {:.5} GFLOP\n  \
             training {:.3} GFLOP per image = {:.2}× the forward",
            fwd / 2e9,
            fwd / 1e9,
            self.conv_forward / b / 1e9,
            self.fc[0] / b / 1e9,
            self.head / b / 1e9,
            self.backward() / b / 1e9,
            self.conv_backward_data / b / 1e9,
            self.conv_backward_filter / b / 1e9,
            (self.fc[1] + self.fc[2]) / b / 1e9,
            self.sc / b / 1e9,
            self.per_image() / 1e9,
            self.per_image() / fwd
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        let b = self.batch as f64;
        serde_json::json!({
            "convention": "multiply-add = 2 FLOPs; convolutions and matrix products only",
            "batch": self.batch,
            "forward_per_image": self.forward() / b,
            "backward_per_image": self.backward() / b,
            "sc_per_image": self.sc / b,
            "training_per_image": self.per_image(),
            "per_step": self.total(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{HeadSpec, ModelSpec, Stem};
    use crate::rng::Rng;
    use crate::tensor::DType;

    fn net(arch: &str, width: usize) -> (Network, ParamStore) {
        net_with_stem(arch, width, Stem::Cifar)
    }

    fn net_with_stem(arch: &str, width: usize, stem: Stem) -> (Network, ParamStore) {
        let mut ps = ParamStore::new();
        let spec = ModelSpec {
            arch: arch.into(),
            width,
            stem,
            in_channels: 3,
            classes: 10,
            feature_dim: 256,
            head: HeadSpec::Linear,
            image_size: 32,
            drop_path: None,
        };
        let n = Network::new(spec, &mut ps, DType::F32, &mut Rng::new(1)).unwrap();
        (n, ps)
    }

    /// Multiply-adds of ResNet18-CIFAR's convolutions, counted by hand layer by layer: stem
    /// 32²·64·27; layer1 4 × 32²·64·576; layers 2–4 each a strided 3×3 (s²·2c·9c at the halved size
    /// s), three more 3×3 (3·s²·2c·18c) and a 1×1 shortcut (s²·2c·c).
    fn resnet18_macs() -> f64 {
        let mut m = 32.0 * 32.0 * 64.0 * 27.0 + 4.0 * 32.0 * 32.0 * 64.0 * 576.0;
        for (s, c) in [(16.0, 64.0), (8.0, 128.0), (4.0, 256.0)] {
            let (s2, co): (f64, f64) = (s * s, 2.0 * c);
            m += s2 * co * c * 9.0 + 3.0 * s2 * co * co * 9.0 + s2 * co * c;
        }
        m
    }

    #[test]
    fn resnet18_forward_matches_a_hand_count() {
        let (n, ps) = net("resnet18", 64);
        let f = StepFlops::of_network(&n, &ps, [3, 32, 32], 2).unwrap();
        assert_eq!(f.conv_forward, 2.0 * 2.0 * resnet18_macs());
        // Published figure for this network: ≈ 0.56 G multiply-adds per image.
        assert!((resnet18_macs() / 1e9 - 0.556).abs() < 0.005);
    }

    #[test]
    fn resnet50_training_is_about_three_forwards() {
        let (n, ps) = net("resnet50", 64);
        let f = StepFlops::of_network(&n, &ps, [3, 32, 32], 4).unwrap();
        let fwd_macs = f.conv_forward / 4.0 / 2.0;
        // ≈ 1.30 G multiply-adds per image (the commonly quoted ResNet50-CIFAR forward cost).
        assert!((fwd_macs / 1e9 - 1.30).abs() < 0.01, "{fwd_macs}");
        let ratio = f.per_image() / (f.forward() / 4.0);
        assert!(ratio > 2.95 && ratio < 3.0, "{ratio}");
        assert!(
            (f.per_image() / 1e9 - 7.8).abs() < 0.05,
            "{}",
            f.per_image()
        );
        // The stem's backward-data is not counted.
        assert!(f.conv_backward_data < f.conv_backward_filter);
    }

    #[test]
    fn the_pooling_stem_halves_the_input_of_every_later_convolution() {
        // A 64×64 image through the CIFAR stem and the 3×3/2 max-pool meets the same convolutions
        // as a 32×32 image through the CIFAR stem alone.
        let (a, pa) = net_with_stem("resnet50", 4, Stem::TinyImageNet);
        let (b, pb) = net_with_stem("resnet50", 4, Stem::Cifar);
        let big = a.conv_shapes(&pa, [2, 3, 64, 64]).unwrap();
        let small = b.conv_shapes(&pb, [2, 3, 32, 32]).unwrap();
        assert_eq!(big.len(), 53);
        assert_eq!(big[0].y(), [2, 4, 64, 64]);
        assert_eq!(big[1..], small[1..]);
        // Every block's shortcut reads the block's input: layer2's first 1×1 conv and its shortcut
        // see the same [N, 4·4, 32, 32] tensor here.
        let l2: Vec<_> = small
            .iter()
            .filter(|c| c.name.starts_with("layer2.0."))
            .collect();
        assert_eq!(l2.first().unwrap().x, l2.last().unwrap().x);
        assert!(l2.last().unwrap().name.contains("shortcut"));
    }
}
