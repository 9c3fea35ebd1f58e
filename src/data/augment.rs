//! Per-image augmentation and normalisation, CHW u8 in, CHW f32 out.
//!
//! The geometry works on u8 pixels (like torchvision on PIL images) and normalisation comes last:
//! x = (pixel/255 − mean[c]) / std[c]. So padding is black *before* normalisation, as with
//! `RandomCrop(32, padding=4)` followed by `Normalize`.
//!
//! Every random choice for one image is drawn from that image's own `Rng` in a fixed order, which is what
//! makes a batch independent of how rayon splits the work.

use crate::rng::Rng;

/// What the loader does to each image of a split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augment {
    /// Normalisation only (test images, or training without augmentation).
    None,
    /// The paper's recipe by image size: `PadCropFlip { pad: 4 }` for images under 64 px on their
    /// shorter side (CIFAR, MNIST), `RandomResizedCrop` with torchvision's defaults (and flip) from 64 px
    /// up (Tiny ImageNet, FaceScrub, ImageNet subsets).
    Auto,
    /// Zero-pad by `pad` on each side, crop back to H×W at a uniformly random offset, then flip
    /// horizontally with probability 0.5 when `flip`.
    PadCropFlip { pad: usize, flip: bool },
    /// Crop a random box of area fraction in `scale` and aspect ratio (w/h) in `ratio` (log-uniform),
    /// resize it bilinearly back to H×W, then flip with probability 0.5 when `flip`.
    RandomResizedCrop {
        scale: (f32, f32),
        ratio: (f32, f32),
        flip: bool,
    },
    /// `RandomResizedCrop` to `size`×`size` whatever the stored size (the transformers' 224-pixel
    /// inputs from 32-pixel files), then flip with probability 0.5 when `flip`.
    RandomResizedCropTo {
        size: usize,
        scale: (f32, f32),
        ratio: (f32, f32),
        flip: bool,
    },
    /// Test images at another size: bilinear resize to `resize`×`resize` (torchvision's `Resize`
    /// for square images), then the centre `size`×`size` crop (`resize == size`: a plain resize).
    ResizeCenterCrop { resize: usize, size: usize },
}

/// Images with a shorter side of at least this many pixels get random-resized-crop under `Augment::Auto`.
pub const LARGE_IMAGE: usize = 64;

impl Augment {
    /// torchvision's `RandomResizedCrop` defaults plus `RandomHorizontalFlip`.
    pub const RRC_DEFAULT: Augment = Augment::RandomResizedCrop {
        scale: (0.08, 1.0),
        ratio: (3.0 / 4.0, 4.0 / 3.0),
        flip: true,
    };
    /// The CIFAR recipe (DESIGN.md §1.7).
    pub const PAD4_FLIP: Augment = Augment::PadCropFlip { pad: 4, flip: true };

    /// (H, W) of the images this policy makes from stored images of h×w.
    pub fn out_hw(self, h: usize, w: usize) -> (usize, usize) {
        match self {
            Augment::RandomResizedCropTo { size, .. } | Augment::ResizeCenterCrop { size, .. } => {
                (size, size)
            }
            _ => (h, w),
        }
    }

    /// The transformers' recipe for `size`-pixel inputs: random-resized-crop (torchvision's
    /// defaults) + flip for training.
    pub fn train_at(size: usize) -> Augment {
        Augment::RandomResizedCropTo {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
        }
    }

    /// Replaces `Auto` by the concrete policy for images of size h×w.
    pub fn resolve(self, h: usize, w: usize) -> Augment {
        match self {
            Augment::Auto if h.min(w) >= LARGE_IMAGE => Augment::RRC_DEFAULT,
            Augment::Auto => Augment::PAD4_FLIP,
            other => other,
        }
    }
}

/// A box inside an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

/// Per-channel lookup table pixel → normalised f32.
#[derive(Clone, Debug)]
pub struct Normalizer {
    lut: Vec<[f32; 256]>,
}

impl Normalizer {
    pub fn new(mean: &[f32], std: &[f32]) -> Normalizer {
        assert_eq!(
            mean.len(),
            std.len(),
            "mean and std need one value per channel"
        );
        let lut = mean
            .iter()
            .zip(std)
            .map(|(&m, &s)| {
                let mut t = [0f32; 256];
                for (v, x) in t.iter_mut().enumerate() {
                    *x = ((v as f64 / 255.0 - m as f64) / s as f64) as f32;
                }
                t
            })
            .collect();
        Normalizer { lut }
    }

    pub fn channels(&self) -> usize {
        self.lut.len()
    }

    /// The normalised value of pixel `v` in channel `c`.
    pub fn value(&self, c: usize, v: u8) -> f32 {
        self.lut[c][v as usize]
    }

    /// Normalises a CHW u8 image into `out` (same length).
    pub fn apply(&self, src: &[u8], out: &mut [f32]) {
        assert_eq!(src.len(), out.len());
        let plane = src.len() / self.lut.len();
        for (c, (s, o)) in src
            .chunks_exact(plane)
            .zip(out.chunks_exact_mut(plane))
            .enumerate()
        {
            let lut = &self.lut[c];
            for (x, &v) in o.iter_mut().zip(s) {
                *x = lut[v as usize];
            }
        }
    }
}

/// Crops H×W out of the image zero-padded by `pad` on each side, at offset (dy, dx) into the padded image
/// (each in 0..=2·pad). Equivalent to shifting the image by (pad−dy, pad−dx) and filling with zeros.
pub fn pad_crop<T: Copy + Default>(
    src: &[T],
    shape: [usize; 3],
    pad: usize,
    dy: usize,
    dx: usize,
    out: &mut [T],
) {
    let [c, h, w] = shape;
    assert!(
        dy <= 2 * pad && dx <= 2 * pad,
        "crop offset ({dy}, {dx}) outside the padded image (pad {pad})"
    );
    assert_eq!(src.len(), c * h * w);
    assert_eq!(out.len(), c * h * w);
    for ch in 0..c {
        let s = &src[ch * h * w..(ch + 1) * h * w];
        let o = &mut out[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let orow = &mut o[y * w..(y + 1) * w];
            // Source row in the unpadded image: y + dy − pad.
            let sy = (y + dy).checked_sub(pad).filter(|&sy| sy < h);
            let Some(sy) = sy else {
                orow.fill(T::default());
                continue;
            };
            let srow = &s[sy * w..(sy + 1) * w];
            // Output columns x with 0 ≤ x + dx − pad < w are copied, the rest are padding.
            let x0 = pad.saturating_sub(dx);
            let x1 = (w + pad).saturating_sub(dx).min(w);
            orow[..x0.min(w)].fill(T::default());
            if x0 < x1 {
                let sx0 = x0 + dx - pad;
                orow[x0..x1].copy_from_slice(&srow[sx0..sx0 + (x1 - x0)]);
            }
            orow[x1.max(x0).min(w)..].fill(T::default());
        }
    }
}

/// Mirrors a CHW image left-right in place.
pub fn hflip<T>(img: &mut [T], shape: [usize; 3]) {
    let [_, _, w] = shape;
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// Bilinear resize of the `crop` box of a CHW u8 image to out_h×out_w (half-pixel centres, as
/// `align_corners=False`; samples are clamped to the box), rounding to u8 like PIL does.
pub fn resized_crop(
    src: &[u8],
    shape: [usize; 3],
    crop: CropBox,
    out_h: usize,
    out_w: usize,
    out: &mut [u8],
) {
    let [c, h, w] = shape;
    assert!(
        crop.h > 0 && crop.w > 0 && crop.top + crop.h <= h && crop.left + crop.w <= w,
        "crop {crop:?} outside {h}x{w}"
    );
    assert_eq!(out.len(), c * out_h * out_w);
    // Precompute, per output row/column, the two source indices and the weight of the second.
    let taps = |n_out: usize, start: usize, len: usize| -> Vec<(usize, usize, f32)> {
        let scale = len as f64 / n_out as f64;
        (0..n_out)
            .map(|o| {
                let s = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, (len - 1) as f64);
                let i0 = s.floor() as usize;
                let i1 = (i0 + 1).min(len - 1);
                (start + i0, start + i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let ys = taps(out_h, crop.top, crop.h);
    let xs = taps(out_w, crop.left, crop.w);
    for ch in 0..c {
        let s = &src[ch * h * w..(ch + 1) * h * w];
        let o = &mut out[ch * out_h * out_w..(ch + 1) * out_h * out_w];
        for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
            for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
                let p = |y: usize, x: usize| s[y * w + x] as f32;
                let top = p(y0, x0) + (p(y0, x1) - p(y0, x0)) * fx;
                let bot = p(y1, x0) + (p(y1, x1) - p(y1, x0)) * fx;
                let v = top + (bot - top) * fy;
                o[oy * out_w + ox] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Draws a random-resized-crop box the way torchvision does: up to 10 tries of (area fraction uniform in
/// `scale`, log-aspect uniform in `ratio`), else a centre crop with the aspect clamped into `ratio`.
pub fn sample_crop_box(
    rng: &mut Rng,
    h: usize,
    w: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> CropBox {
    let area = (h * w) as f64;
    let (lr0, lr1) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * (scale.0 as f64 + (scale.1 - scale.0) as f64 * rng.uniform());
        let aspect = (lr0 + (lr1 - lr0) * rng.uniform()).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let top = rng.below(h - ch + 1);
            let left = rng.below(w - cw + 1);
            return CropBox {
                top,
                left,
                h: ch,
                w: cw,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0 as f64 {
        (((w as f64) / ratio.0 as f64).round() as usize, w)
    } else if in_ratio > ratio.1 as f64 {
        (h, ((h as f64) * ratio.1 as f64).round() as usize)
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
    CropBox {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        h: ch,
        w: cw,
    }
}

/// The random parameters of a pad-crop-flip, drawn in a fixed order: dy, dx, flip.
pub fn sample_pad_crop(rng: &mut Rng, pad: usize, flip: bool) -> (usize, usize, bool) {
    let dy = rng.below(2 * pad + 1);
    let dx = rng.below(2 * pad + 1);
    let f = flip && rng.uniform() < 0.5;
    (dy, dx, f)
}

/// Applies a resolved `aug` (not `Auto`) to one CHW u8 image, writing the normalised f32 image to `out`.
/// `scratch` is reused between calls to avoid an allocation per image.
pub fn augment_image(
    aug: Augment,
    src: &[u8],
    shape: [usize; 3],
    rng: &mut Rng,
    norm: &Normalizer,
    scratch: &mut Vec<u8>,
    out: &mut [f32],
) {
    let [c, h, w] = shape;
    let (oh, ow) = aug.out_hw(h, w);
    scratch.resize(c * oh * ow, 0);
    match aug {
        Augment::None => {
            norm.apply(src, out);
            return;
        }
        Augment::Auto => {
            panic!("augment_image needs a resolved policy; call Augment::resolve first")
        }
        Augment::PadCropFlip { pad, flip } => {
            let (dy, dx, f) = sample_pad_crop(rng, pad, flip);
            pad_crop(src, shape, pad, dy, dx, scratch);
            if f {
                hflip(scratch, shape);
            }
        }
        Augment::RandomResizedCrop { scale, ratio, flip } => {
            let b = sample_crop_box(rng, h, w, scale, ratio);
            let f = flip && rng.uniform() < 0.5;
            resized_crop(src, shape, b, h, w, scratch);
            if f {
                hflip(scratch, shape);
            }
        }
        Augment::RandomResizedCropTo {
            size,
            scale,
            ratio,
            flip,
        } => {
            let b = sample_crop_box(rng, h, w, scale, ratio);
            let f = flip && rng.uniform() < 0.5;
            resized_crop(src, shape, b, size, size, scratch);
            if f {
                hflip(scratch, [c, size, size]);
            }
        }
        Augment::ResizeCenterCrop { resize, size } => {
            let full = CropBox {
                top: 0,
                left: 0,
                h,
                w,
            };
            if resize == size {
                resized_crop(src, shape, full, size, size, scratch);
            } else {
                let mut big = vec![0u8; c * resize * resize];
                resized_crop(src, shape, full, resize, resize, &mut big);
                let off = (resize - size) / 2;
                for ch in 0..c {
                    for y in 0..size {
                        let s0 = (ch * resize + off + y) * resize + off;
                        let d0 = (ch * size + y) * size;
                        scratch[d0..d0 + size].copy_from_slice(&big[s0..s0 + size]);
                    }
                }
            }
        }
    }
    norm.apply(scratch, out);
}
