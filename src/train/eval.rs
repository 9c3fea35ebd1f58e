//! Evaluation of a network on a split: accuracy by the head's argmax (cosine argmax for the PEDCC head,
//! DESIGN.md §1.2), per-class accuracy, the confusion matrix, and the paper's Table I split (accuracy of
//! samples whose latent norm ‖x‖ is below vs above the mean).

use crate::autograd::{ParamStore, Tape};
use crate::data::{Loader, LoaderConfig, Split};
use crate::loss;
use crate::nn::Network;
use crate::tensor::Device;
use anyhow::Result;

/// Everything `podgpu eval` reports, computed in one inference pass.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    pub samples: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
    /// Mean ‖x‖ of the latent features over the split.
    pub mean_norm: f64,
    /// Table I: accuracy of the samples with ‖x‖ below the mean, and at or above it.
    pub below_mean_norm_accuracy: f64,
    pub above_mean_norm_accuracy: f64,
    pub below_mean_norm_samples: usize,
    /// Table V: mean over samples of ‖x̃ − μ̃_y‖², x̃ = x/‖x‖ and μ̃_y the mean x̃ of the sample's class
    /// (how tightly each class clusters in direction).
    pub normalized_feature_variance: f64,
    /// Accuracy of a GDA classifier fitted on the train split (`podgpu eval --gda`; Table IX).
    pub gda_accuracy: Option<f64>,
}

/// Latent features and predictions of every sample of a split (inference mode, no augmentation).
pub struct Features {
    /// [N × n] row-major.
    pub features: Vec<f32>,
    pub dim: usize,
    pub predictions: Vec<usize>,
    pub labels: Vec<usize>,
}

/// Runs the network over `split` (the first `limit` images) in inference mode. Images of another
/// size than the network's (a transformer built for `--image-size`) are resized to it.
pub fn extract(
    net: &Network,
    ps: &mut ParamStore,
    split: &Split,
    batch_size: usize,
    limit: Option<usize>,
    device: Device,
) -> Result<Features> {
    let size = net.spec.image_size;
    let augment = match split.height() == size && split.width() == size {
        true => crate::data::Augment::None,
        false => crate::data::Augment::ResizeCenterCrop { resize: size, size },
    };
    extract_with(net, ps, split, batch_size, limit, device, augment)
}

/// `extract` with the test images' preprocessing given (e.g. resize 256 + centre crop 224).
pub fn extract_with(
    net: &Network,
    ps: &mut ParamStore,
    split: &Split,
    batch_size: usize,
    limit: Option<usize>,
    device: Device,
    augment: crate::data::Augment,
) -> Result<Features> {
    let cfg = LoaderConfig {
        limit,
        augment,
        ..LoaderConfig::eval(batch_size)
    };
    let loader = Loader::new(split.clone(), cfg)?;
    let dim = net.spec.feature_dim;
    let mut out = Features {
        features: Vec::with_capacity(loader.images_per_epoch() * dim),
        dim,
        predictions: Vec::new(),
        labels: Vec::new(),
    };
    for batch in loader.epoch(0) {
        let (images, labels) = batch.into_parts();
        let mut tape = Tape::inference();
        let x = tape.constant(images.to_device(device));
        let o = net.forward(&mut tape, ps, &x);
        out.predictions.extend(loss::predictions(o.logits.value()));
        out.features.extend(o.features.value().to_vec_f32());
        out.labels.extend(labels.iter().map(|&l| l as usize));
    }
    Ok(out)
}

/// Accuracy, per-class accuracy, confusion matrix and the Table I norm split.
pub fn summarize(f: &Features, classes: usize) -> EvalResult {
    let n = f.labels.len();
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&y, &p) in f.labels.iter().zip(&f.predictions) {
        confusion[y][p.min(classes - 1)] += 1;
    }
    let correct = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: usize = row.iter().sum();
            if total == 0 {
                f64::NAN
            } else {
                row[c] as f64 / total as f64
            }
        })
        .collect();
    let norms: Vec<f64> = f
        .features
        .chunks(f.dim.max(1))
        .map(|r| {
            r.iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mean_norm = norms.iter().sum::<f64>() / n.max(1) as f64;
    let (mut below, mut below_ok, mut above, mut above_ok) = (0, 0, 0, 0);
    for ((&norm, &y), &p) in norms.iter().zip(&f.labels).zip(&f.predictions) {
        if norm < mean_norm {
            below += 1;
            below_ok += (y == p) as usize;
        } else {
            above += 1;
            above_ok += (y == p) as usize;
        }
    }
    let normalized_feature_variance = normalized_variance(f, &norms, classes);
    let ratio = |a: usize, b: usize| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    EvalResult {
        samples: n,
        correct,
        accuracy: ratio(correct, n),
        per_class_accuracy,
        confusion,
        mean_norm,
        below_mean_norm_accuracy: ratio(below_ok, below),
        above_mean_norm_accuracy: ratio(above_ok, above),
        below_mean_norm_samples: below,
        normalized_feature_variance,
        gda_accuracy: None,
    }
}

/// Σ_i ‖x̃_i − μ̃_{y_i}‖² / N with x̃ the unit-normalised features (Table V).
fn normalized_variance(f: &Features, norms: &[f64], classes: usize) -> f64 {
    let d = f.dim.max(1);
    let unit = |i: usize| {
        let n = norms[i].max(1e-12);
        f.features[i * d..(i + 1) * d]
            .iter()
            .map(move |&v| v as f64 / n)
    };
    let mut means = vec![vec![0.0; d]; classes];
    let mut counts = vec![0usize; classes];
    for (i, &y) in f.labels.iter().enumerate() {
        counts[y] += 1;
        for (m, v) in means[y].iter_mut().zip(unit(i)) {
            *m += v;
        }
    }
    for (m, &c) in means.iter_mut().zip(&counts) {
        m.iter_mut().for_each(|v| *v /= c.max(1) as f64);
    }
    let total: f64 = f
        .labels
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            unit(i)
                .zip(&means[y])
                .map(|(v, m)| (v - m) * (v - m))
                .sum::<f64>()
        })
        .sum();
    total / f.labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(rows: &[[f32; 2]], labels: &[usize], predictions: &[usize]) -> Features {
        Features {
            features: rows.iter().flatten().copied().collect(),
            dim: 2,
            predictions: predictions.to_vec(),
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn table_one_split_and_table_five_variance() {
        // Class 0 along +x, class 1 along +y; norms differ but directions are exact, so the
        // normalised variance is 0. The two long vectors are right, one short one wrong.
        let f = features(
            &[[1.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 4.0]],
            &[0, 0, 1, 1],
            &[1, 0, 1, 1],
        );
        let r = summarize(&f, 2);
        assert_eq!((r.correct, r.samples), (3, 4));
        assert_eq!(r.confusion, vec![vec![1, 1], vec![0, 2]]);
        assert!((r.mean_norm - 2.5).abs() < 1e-12);
        assert_eq!(r.below_mean_norm_samples, 2);
        assert!((r.below_mean_norm_accuracy - 0.5).abs() < 1e-12);
        assert!((r.above_mean_norm_accuracy - 1.0).abs() < 1e-12);
        assert!(r.normalized_feature_variance.abs() < 1e-12);

        // Directions ±45° around +x: unit vectors (c, ±s), class mean (c, 0), variance s² = 0.5.
        let f = features(&[[1.0, 1.0], [2.0, -2.0]], &[0, 0], &[0, 0]);
        let r = summarize(&f, 2);
        assert!((r.normalized_feature_variance - 0.5).abs() < 1e-6);
    }
}
