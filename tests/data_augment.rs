//! Augmentation properties: the crop of a padded image is the image shifted with zeros, crop offsets stay
//! in bounds, flip is its own inverse, normalisation gives (v/255 − mean)/std, resized crops are exact
//! where they should be.

use podgpu::data::augment::{
    augment_image, hflip, pad_crop, resized_crop, sample_crop_box, sample_pad_crop, Augment,
    CropBox, Normalizer,
};
use podgpu::rng::Rng;

fn random_image(shape: [usize; 3], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    // 1..=255 so that a zero in an output can only come from padding.
    (0..shape.iter().product::<usize>())
        .map(|_| 1 + rng.below(255) as u8)
        .collect()
}

/// The textbook version: build the zero-padded image, cut the window out.
fn naive_pad_crop(src: &[u8], [c, h, w]: [usize; 3], pad: usize, dy: usize, dx: usize) -> Vec<u8> {
    let (ph, pw) = (h + 2 * pad, w + 2 * pad);
    let mut padded = vec![0u8; c * ph * pw];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                padded[ch * ph * pw + (y + pad) * pw + x + pad] = src[ch * h * w + y * w + x];
            }
        }
    }
    let mut out = vec![0u8; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                out[ch * h * w + y * w + x] = padded[ch * ph * pw + (y + dy) * pw + x + dx];
            }
        }
    }
    out
}

#[test]
fn pad_crop_is_the_crop_of_the_padded_image() {
    for (shape, pad) in [
        ([3, 7, 9], 4),
        ([1, 32, 32], 4),
        ([2, 3, 2], 5),
        ([3, 5, 6], 0),
    ] {
        let src = random_image(shape, 11);
        let mut out = vec![0u8; src.len()];
        for dy in 0..=2 * pad {
            for dx in 0..=2 * pad {
                pad_crop(&src, shape, pad, dy, dx, &mut out);
                assert_eq!(
                    out,
                    naive_pad_crop(&src, shape, pad, dy, dx),
                    "shape {shape:?} pad {pad} dy {dy} dx {dx}"
                );
            }
        }
    }
    // The centre offset is the identity; a shift moves content and brings in exactly one band of zeros.
    let shape = [3, 8, 8];
    let src = random_image(shape, 12);
    let mut out = vec![0u8; src.len()];
    pad_crop(&src, shape, 4, 4, 4, &mut out);
    assert_eq!(out, src);
    pad_crop(&src, shape, 4, 4, 6, &mut out); // content moves 2 px left
    for ch in 0..3 {
        for y in 0..8 {
            let row = &out[ch * 64 + y * 8..ch * 64 + y * 8 + 8];
            assert_eq!(row[..6], src[ch * 64 + y * 8 + 2..ch * 64 + y * 8 + 8]);
            assert_eq!(row[6..], [0, 0]);
        }
    }
}

#[test]
fn crop_offsets_stay_in_bounds_and_cover_every_position() {
    let pad = 4;
    let mut seen = vec![[0usize; 9]; 2];
    let mut flips = 0;
    let draws = 4000;
    for i in 0..draws {
        let mut rng = Rng::derive(99, i);
        let (dy, dx, f) = sample_pad_crop(&mut rng, pad, true);
        assert!(
            dy <= 2 * pad && dx <= 2 * pad,
            "offset ({dy}, {dx}) out of bounds"
        );
        seen[0][dy] += 1;
        seen[1][dx] += 1;
        flips += f as usize;
    }
    assert!(
        seen.iter().flatten().all(|&k| k > draws as usize / 9 / 2),
        "offsets not uniform: {seen:?}"
    );
    let p = flips as f64 / draws as f64;
    assert!((p - 0.5).abs() < 0.04, "flip rate {p}");
    let mut rng = Rng::new(1);
    assert!(
        (0..100).all(|_| !sample_pad_crop(&mut rng, pad, false).2),
        "flip disabled"
    );
}

#[test]
fn flip_mirrors_and_is_its_own_inverse() {
    let shape = [3, 5, 7];
    let src = random_image(shape, 13);
    let mut img = src.clone();
    hflip(&mut img, shape);
    assert_ne!(img, src);
    for ch in 0..3 {
        for y in 0..5 {
            for x in 0..7 {
                assert_eq!(img[ch * 35 + y * 7 + x], src[ch * 35 + y * 7 + 6 - x]);
            }
        }
    }
    hflip(&mut img, shape);
    assert_eq!(img, src);
}

#[test]
fn normalisation_values() {
    let mean = [0.4914f32, 0.4822, 0.4465];
    let std = [0.2023f32, 0.1994, 0.2010];
    let norm = Normalizer::new(&mean, &std);
    for c in 0..3 {
        for v in [0u8, 1, 77, 128, 254, 255] {
            let want = (v as f64 / 255.0 - mean[c] as f64) / std[c] as f64;
            assert!((norm.value(c, v) as f64 - want).abs() < 1e-6, "c {c} v {v}");
        }
    }
    // Exact values for a convenient normalisation: mean 0.5, std 0.25 maps 0 → −2, 255 → 2.
    let simple = Normalizer::new(&[0.5, 0.5], &[0.25, 0.25]);
    let mut out = vec![0f32; 4];
    simple.apply(&[0, 255, 255, 0], &mut out);
    assert_eq!(out, [-2.0, 2.0, 2.0, -2.0]);
    // Planes use their own channel's statistics.
    let two = Normalizer::new(&[0.0, 1.0], &[1.0, 1.0]);
    two.apply(&[255, 255, 255, 255], &mut out);
    assert_eq!(out, [1.0, 1.0, 0.0, 0.0]);
}

#[test]
fn resized_crop_identity_and_exact_subimage() {
    let shape = [3, 12, 10];
    let src = random_image(shape, 14);
    let mut out = vec![0u8; src.len()];
    resized_crop(
        &src,
        shape,
        CropBox {
            top: 0,
            left: 0,
            h: 12,
            w: 10,
        },
        12,
        10,
        &mut out,
    );
    assert_eq!(out, src);
    // A box resized to its own size is the box.
    let b = CropBox {
        top: 3,
        left: 2,
        h: 5,
        w: 6,
    };
    let mut sub = vec![0u8; 3 * 5 * 6];
    resized_crop(&src, shape, b, 5, 6, &mut sub);
    for ch in 0..3 {
        for y in 0..5 {
            for x in 0..6 {
                assert_eq!(
                    sub[ch * 30 + y * 6 + x],
                    src[ch * 120 + (y + 3) * 10 + x + 2]
                );
            }
        }
    }
    // Upsampling a horizontal ramp stays a monotone ramp between the box's end values.
    let ramp: Vec<u8> = (0..4 * 8).map(|i| (10 + 20 * (i % 8)) as u8).collect();
    let mut up = vec![0u8; 4 * 16];
    resized_crop(
        &ramp,
        [1, 4, 8],
        CropBox {
            top: 0,
            left: 0,
            h: 4,
            w: 8,
        },
        4,
        16,
        &mut up,
    );
    for row in up.chunks(16) {
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        assert_eq!((row[0], row[15]), (10, 150));
    }
}

#[test]
fn random_resized_crop_boxes_are_inside_and_follow_scale() {
    let (h, w) = (64, 80);
    let (scale, ratio) = ((0.08f32, 1.0f32), (0.75f32, 4.0 / 3.0));
    let mut areas = Vec::new();
    for i in 0..2000 {
        let b = sample_crop_box(&mut Rng::derive(5, i), h, w, scale, ratio);
        assert!(
            b.h >= 1 && b.w >= 1 && b.top + b.h <= h && b.left + b.w <= w,
            "{b:?}"
        );
        areas.push((b.h * b.w) as f64 / (h * w) as f64);
    }
    let mean = areas.iter().sum::<f64>() / areas.len() as f64;
    assert!(
        areas.iter().all(|&a| a > 0.06),
        "an area below the scale range"
    );
    assert!(mean > 0.4 && mean < 0.65, "mean area fraction {mean}"); // uniform(0.08, 1) has mean 0.54
                                                                     // An impossible ratio falls back to torchvision's centre crop with the aspect clamped into range.
    let b = sample_crop_box(&mut Rng::new(1), 10, 100, (0.99, 1.0), (0.5, 0.5));
    assert_eq!(
        b,
        CropBox {
            top: 0,
            left: 47,
            h: 10,
            w: 5
        }
    );
}

#[test]
fn augment_image_composes_the_pieces_with_the_images_own_draws() {
    let shape = [3, 32, 32];
    let src = random_image(shape, 15);
    let norm = Normalizer::new(&[0.4914, 0.4822, 0.4465], &[0.2023, 0.1994, 0.2010]);
    let mut scratch = Vec::new();
    let mut out = vec![0f32; src.len()];

    augment_image(
        Augment::None,
        &src,
        shape,
        &mut Rng::new(1),
        &norm,
        &mut scratch,
        &mut out,
    );
    let mut plain = vec![0f32; src.len()];
    norm.apply(&src, &mut plain);
    assert_eq!(out, plain);

    let aug = Augment::Auto.resolve(32, 32);
    assert_eq!(aug, Augment::PadCropFlip { pad: 4, flip: true });
    for seed in 0..20 {
        augment_image(
            aug,
            &src,
            shape,
            &mut Rng::new(seed),
            &norm,
            &mut scratch,
            &mut out,
        );
        let (dy, dx, f) = sample_pad_crop(&mut Rng::new(seed), 4, true);
        let mut want = naive_pad_crop(&src, shape, 4, dy, dx);
        if f {
            hflip(&mut want, shape);
        }
        let mut want_f = vec![0f32; src.len()];
        norm.apply(&want, &mut want_f);
        assert_eq!(out, want_f, "seed {seed}");
    }
    assert_eq!(Augment::Auto.resolve(64, 96), Augment::RRC_DEFAULT);
    assert_eq!(Augment::Auto.resolve(63, 200), Augment::PAD4_FLIP);
    // Random-resized-crop keeps the stored size and draws box then flip from the image's stream.
    let big = [3, 64, 64];
    let src = random_image(big, 16);
    let mut out = vec![0f32; src.len()];
    augment_image(
        Augment::RRC_DEFAULT,
        &src,
        big,
        &mut Rng::new(3),
        &norm,
        &mut scratch,
        &mut out,
    );
    let mut rng = Rng::new(3);
    let b = sample_crop_box(&mut rng, 64, 64, (0.08, 1.0), (0.75, 4.0 / 3.0));
    let f = rng.uniform() < 0.5;
    let mut want = vec![0u8; src.len()];
    resized_crop(&src, big, b, 64, 64, &mut want);
    if f {
        hflip(&mut want, big);
    }
    let mut want_f = vec![0f32; src.len()];
    norm.apply(&want, &mut want_f);
    assert_eq!(out, want_f);
}
