//! The batching loader: per-epoch seeded shuffle, per-image augmentation in parallel (rayon), batches
//! assembled on a background thread and handed over through a bounded prefetch queue.
//!
//! Determinism: the order of epoch `e` is `Rng::derive(seed ^ SHUFFLE_SALT, e).permutation(n)`, and
//! sample `i` (its index in the split) of epoch `e` is augmented with its own stream
//! `Rng::derive(seed, e·N + i)` (N = split size). Nothing depends on which thread handles an image, so the
//! batches are bit-identical for any rayon thread count.
//!
//! Buffers: a batch owns plain `Vec<f32>`/`Vec<u32>`; `Loader::fill` writes into any caller-provided
//! `&mut [f32]`, which is the seam where pinned host buffers of the CUDA backend plug in. Consumers may
//! hand buffers back with `EpochIter::recycle` so the producer stops allocating.

use rayon::prelude::*;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::augment::{augment_image, Augment, Normalizer};
use super::dataset::Split;
use crate::rng::Rng;

/// Mixed into the seed of the shuffle stream so it never coincides with a per-sample stream.
const SHUFFLE_SALT: u64 = 0x5EED_5A1F_u64 << 32;

/// How a `Loader` walks a split.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch (≥ 1).
    pub batch_size: usize,
    /// Reshuffle the order every epoch (training); otherwise the split's own order.
    pub shuffle: bool,
    /// What to do to each image before normalisation (`Augment::None` for test images).
    pub augment: Augment,
    /// Seed of the shuffle and of every augmentation draw.
    pub seed: u64,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Use only the first `limit` images of the split (e.g. `--limit-train`); `None` for all.
    pub limit: Option<usize>,
    /// Batches assembled ahead of the consumer (queue bound, ≥ 1).
    pub prefetch: usize,
    /// Worker threads for augmentation: `None` uses rayon's global pool, `Some(k)` a private pool of k.
    pub threads: Option<usize>,
}

impl LoaderConfig {
    /// Training defaults: shuffled, augmented by image size (`Augment::Auto`), last partial batch kept
    /// (as PyTorch's DataLoader), 4 batches prefetched.
    pub fn train(batch_size: usize, seed: u64) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: true,
            augment: Augment::Auto,
            seed,
            drop_last: false,
            limit: None,
            prefetch: 4,
            threads: None,
        }
    }

    /// Evaluation defaults: split order, normalisation only, every image.
    pub fn eval(batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: false,
            augment: Augment::None,
            seed: 0,
            drop_last: false,
            limit: None,
            prefetch: 4,
            threads: None,
        }
    }
}

/// One batch: images normalised to f32, N×C×H×W row-major, and their labels.
#[derive(Clone, PartialEq)]
pub struct Batch {
    /// N×C×H×W values.
    pub images: Vec<f32>,
    /// N labels, each < number of classes.
    pub labels: Vec<u32>,
    /// [N, C, H, W].
    pub shape: [usize; 4],
    /// Index in the split of each image.
    pub indices: Vec<usize>,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Position of this batch within its epoch (0-based).
    pub index: usize,
}

/// Short form: a failing `assert_eq!` on batches should not print a million floats.
impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sum: f64 = self.images.iter().map(|&x| x as f64).sum();
        let head = &self.labels[..self.labels.len().min(8)];
        write!(
            f,
            "Batch {{ epoch {}, index {}, shape {:?}, labels {:?}…, indices {:?}…, image sum {sum:.6} }}",
            self.epoch,
            self.index,
            self.shape,
            head,
            &self.indices[..self.indices.len().min(8)]
        )
    }
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// The images as a host tensor [N, C, H, W] (moves the buffer) and the labels.
    pub fn into_parts(self) -> (crate::Tensor, Vec<u32>) {
        (
            crate::Tensor::from_vec(&self.shape, self.images),
            self.labels,
        )
    }
}

/// Walks one split in batches. Cheap to clone; each `epoch` call starts its own producer thread.
#[derive(Clone)]
pub struct Loader {
    split: Split,
    cfg: LoaderConfig,
    augment: Augment,
    norm: Arc<Normalizer>,
    pool: Option<Arc<rayon::ThreadPool>>,
    n: usize,
}

impl Loader {
    /// Checks the configuration against the split (batch size, limit, thread count).
    pub fn new(split: Split, cfg: LoaderConfig) -> anyhow::Result<Loader> {
        anyhow::ensure!(cfg.batch_size >= 1, "batch size must be at least 1");
        anyhow::ensure!(cfg.prefetch >= 1, "prefetch must be at least 1 batch");
        let n = match cfg.limit {
            Some(0) => anyhow::bail!("limit must be at least 1 image (or no limit)"),
            Some(l) => l.min(split.len()),
            None => split.len(),
        };
        if cfg.drop_last && n < cfg.batch_size {
            anyhow::bail!(
                "split '{}' has {n} images, fewer than one batch of {} with drop_last: nothing to iterate; \
                 lower the batch size or turn drop_last off",
                split.name(),
                cfg.batch_size
            );
        }
        let pool = match cfg.threads {
            // The global pool's workers include a thread that may wait for this loader's batches
            // outside rayon (`cpu::size_pool_with_caller`): augment on a private pool of the same
            // size, or that wait could hold up the work it waits for.
            None if crate::cpu::caller_joined_pool() => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(rayon::current_num_threads())
                    .build()?,
            )),
            None => None,
            Some(0) => anyhow::bail!("thread count must be at least 1"),
            Some(k) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new().num_threads(k).build()?,
            )),
        };
        let augment = cfg.augment.resolve(split.height(), split.width());
        if let Augment::PadCropFlip { pad, .. } = augment {
            anyhow::ensure!(pad <= 1 << 16, "padding {pad} is unreasonably large");
        }
        let norm = Arc::new(Normalizer::new(split.mean(), split.std()));
        Ok(Loader {
            split,
            cfg,
            augment,
            norm,
            pool,
            n,
        })
    }

    pub fn split(&self) -> &Split {
        &self.split
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The augmentation actually applied (`Auto` resolved for this split's image size).
    pub fn augment(&self) -> Augment {
        self.augment
    }

    /// Images used per epoch (the split size, or the limit).
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Images actually delivered per epoch (fewer than `len` when drop_last drops a partial batch).
    pub fn images_per_epoch(&self) -> usize {
        if self.cfg.drop_last {
            self.n / self.cfg.batch_size * self.cfg.batch_size
        } else {
            self.n
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        if self.cfg.drop_last {
            self.n / self.cfg.batch_size
        } else {
            self.n.div_ceil(self.cfg.batch_size)
        }
    }

    /// (C, H, W) of every image delivered (the stored size unless the augmentation resizes).
    pub fn image_shape(&self) -> [usize; 3] {
        let [c, h, w] = self.split.image_shape();
        let (oh, ow) = self.augment.out_hw(h, w);
        [c, oh, ow]
    }

    /// Split indices in the order epoch `epoch` visits them.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        if self.cfg.shuffle {
            Rng::derive(self.cfg.seed ^ SHUFFLE_SALT, epoch).permutation(self.n)
        } else {
            (0..self.n).collect()
        }
    }

    /// The split indices of every batch of `epoch`, in order.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.order(epoch);
        order
            .chunks(self.cfg.batch_size)
            .take(self.batches_per_epoch())
            .map(|c| c.to_vec())
            .collect()
    }

    /// Augments and normalises the images `indices` of epoch `epoch` into `images` (len·C·H·W values)
    /// and their labels into `labels`, in parallel over images. This is the whole per-batch work; the
    /// output buffers may be any host memory (e.g. pinned).
    pub fn fill(&self, epoch: u64, indices: &[usize], images: &mut [f32], labels: &mut [u32]) {
        let shape = self.split.image_shape();
        let [c, oh, ow] = self.image_shape();
        let per = c * oh * ow;
        assert_eq!(
            images.len(),
            indices.len() * per,
            "image buffer size does not match the batch"
        );
        assert_eq!(
            labels.len(),
            indices.len(),
            "label buffer size does not match the batch"
        );
        let n_split = self.split.len() as u64;
        let mut work = || {
            images
                .par_chunks_mut(per)
                .zip(indices.par_iter())
                .for_each_init(Vec::new, |scratch, (out, &i)| {
                    let stream = epoch.wrapping_mul(n_split).wrapping_add(i as u64);
                    let mut rng = Rng::derive(self.cfg.seed, stream);
                    augment_image(
                        self.augment,
                        self.split.pixels(i),
                        shape,
                        &mut rng,
                        &self.norm,
                        scratch,
                        out,
                    );
                });
        };
        match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
        for (l, &i) in labels.iter_mut().zip(indices) {
            *l = self.split.label(i);
        }
    }

    /// One batch, assembled on the calling thread (with rayon for the images).
    pub fn assemble(&self, epoch: u64, index: usize, indices: &[usize]) -> Batch {
        self.assemble_into(epoch, index, indices, Vec::new())
    }

    fn assemble_into(
        &self,
        epoch: u64,
        index: usize,
        indices: &[usize],
        mut images: Vec<f32>,
    ) -> Batch {
        let [c, h, w] = self.image_shape();
        images.clear();
        images.resize(indices.len() * c * h * w, 0.0);
        let mut labels = vec![0u32; indices.len()];
        self.fill(epoch, indices, &mut images, &mut labels);
        Batch {
            images,
            labels,
            shape: [indices.len(), c, h, w],
            indices: indices.to_vec(),
            epoch,
            index,
        }
    }

    /// The batches of `epoch`, assembled ahead on a background thread (at most `prefetch` waiting).
    /// Dropping the iterator early stops the thread.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (each keeps its index within the epoch), as if the
    /// earlier ones had been taken: a run resumed in the middle of an epoch sees the same batches.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let mut batches = self.batch_indices(epoch);
        let first = first.min(batches.len());
        batches.drain(..first);
        let total = batches.len();
        let (tx, rx) = sync_channel::<Batch>(self.cfg.prefetch);
        let (recycle_tx, recycle_rx) = channel::<Vec<f32>>();
        let loader = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("podgpu-loader-{}", self.split.name()))
            .spawn(move || {
                for (k, indices) in batches.iter().enumerate() {
                    let index = first + k;
                    let buf = recycle_rx.try_recv().unwrap_or_default();
                    let batch = loader.assemble_into(epoch, index, indices, buf);
                    if tx.send(batch).is_err() {
                        return; // the consumer went away
                    }
                }
            })
            .expect("cannot spawn the loader thread");
        EpochIter {
            rx: Some(rx),
            handle: Some(handle),
            recycle: recycle_tx,
            remaining: total,
        }
    }
}

/// Iterator over the batches of one epoch, fed by a background thread.
pub struct EpochIter {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
    recycle: Sender<Vec<f32>>,
    remaining: usize,
}

impl EpochIter {
    /// Gives a finished batch's image buffer back to the producer for reuse.
    pub fn recycle(&self, batch: Batch) {
        let _ = self.recycle.send(batch.images);
    }

    fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(panic) = h.join() {
                // A panic in the producer is a bug; surface it in the consumer instead of ending the
                // epoch early without a word.
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Iterator for EpochIter {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(b) => {
                self.remaining -= 1;
                Some(b)
            }
            Err(_) => {
                self.rx = None;
                self.join();
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, so it stops after the batch in hand.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
