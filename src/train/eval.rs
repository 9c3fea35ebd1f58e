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
}

/// Latent features and predictions of every sample of a split (inference mode, no augmentation).
pub struct Features {
    /// [N × n] row-major.
    pub features: Vec<f32>,
    pub dim: usize,
    pub predictions: Vec<usize>,
    pub labels: Vec<usize>,
}

/// Runs the network over `split` (the first `limit` images) in inference mode.
pub fn extract(
    net: &Network,
    ps: &mut ParamStore,
    split: &Split,
    batch_size: usize,
    limit: Option<usize>,
    device: Device,
) -> Result<Features> {
    let cfg = LoaderConfig {
        limit,
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
    }
}
