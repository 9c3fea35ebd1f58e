//! The loader: identical batches for any rayon thread count, epochs that shuffle differently and cover
//! every sample once, test images untouched except normalisation, limits, drop_last, prefetch thread.

use podgpu::data::augment::Normalizer;
use podgpu::data::{
    write_dataset, Augment, Batch, Dataset, DatasetSpec, Loader, LoaderConfig, Split, SplitData,
};
use podgpu::rng::Rng;

const TRAIN_N: usize = 53;

fn dataset() -> (tempfile::TempDir, Dataset) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(42);
    let mut split = |name: &str, n: usize| SplitData {
        name: name.into(),
        n,
        h: 12,
        w: 10,
        pixels: (0..n * 3 * 12 * 10).map(|_| rng.below(256) as u8).collect(),
        labels: (0..n).map(|i| (i % 4) as u32).collect(),
    };
    let spec = DatasetSpec {
        name: "loader-test".into(),
        classes: vec!["a".into(), "b".into(), "c".into(), "d".into()],
        channels: 3,
        mean: vec![0.5, 0.4, 0.3],
        std: vec![0.2, 0.25, 0.3],
        source: String::new(),
        splits: vec![split("train", TRAIN_N), split("test", 17)],
    };
    let path = dir.path().join("ds.bin");
    write_dataset(&path, &spec).unwrap();
    let ds = Dataset::open(&path).unwrap();
    (dir, ds)
}

fn train_cfg(seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch_size: 8,
        ..LoaderConfig::train(8, seed)
    }
}

fn all_batches(loader: &Loader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).collect()
}

#[test]
fn batches_are_identical_for_any_thread_count() {
    let (_d, ds) = dataset();
    let split = ds.split("train").unwrap();
    let runs: Vec<Vec<Batch>> = [Some(1), Some(2), Some(3), None]
        .into_iter()
        .map(|threads| {
            let loader = Loader::new(
                split.clone(),
                LoaderConfig {
                    threads,
                    ..train_cfg(7)
                },
            )
            .unwrap();
            (0..2).flat_map(|e| all_batches(&loader, e)).collect()
        })
        .collect();
    for r in &runs[1..] {
        assert_eq!(r, &runs[0]);
    }
    // Also under caller-built local pools, through the synchronous assembly path.
    let loader = Loader::new(split, train_cfg(7)).unwrap();
    let indices = loader.batch_indices(1);
    for k in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(k)
            .build()
            .unwrap();
        let b = pool.install(|| loader.assemble(1, 3, &indices[3]));
        assert_eq!(b, runs[0][loader.batches_per_epoch() + 3], "pool of {k}");
    }
}

#[test]
fn each_epoch_is_a_new_permutation_covering_every_sample_once() {
    let (_d, ds) = dataset();
    let split = ds.split("train").unwrap();
    let loader = Loader::new(split.clone(), train_cfg(1)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 7);
    let mut orders = Vec::new();
    for e in 0..3 {
        let batches = all_batches(&loader, e);
        assert_eq!(batches.len(), 7);
        assert_eq!(
            batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [8, 8, 8, 8, 8, 8, 5]
        );
        let order: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..TRAIN_N).collect::<Vec<_>>(),
            "epoch {e} is not a permutation"
        );
        for (j, b) in batches.iter().enumerate() {
            assert_eq!((b.epoch, b.index), (e, j));
            assert_eq!(b.shape, [b.len(), 3, 12, 10]);
            assert_eq!(b.images.len(), b.len() * 360);
            assert_eq!(
                b.labels,
                b.indices
                    .iter()
                    .map(|&i| split.label(i))
                    .collect::<Vec<_>>()
            );
        }
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1]);
    assert_ne!(orders[1], orders[2]);
    assert_ne!(orders[0], (0..TRAIN_N).collect::<Vec<_>>());
    // Same seed, same epoch: the same batches again; another seed: another order.
    assert_eq!(all_batches(&loader, 1), all_batches(&loader, 1));
    let other = Loader::new(split, train_cfg(2)).unwrap();
    assert_ne!(other.order(0), orders[0]);
}

fn normalised(split: &Split, i: usize) -> Vec<f32> {
    let mut out = vec![0f32; split.image_len()];
    Normalizer::new(split.mean(), split.std()).apply(split.pixels(i), &mut out);
    out
}

#[test]
fn test_images_are_only_normalised_and_in_order() {
    let (_d, ds) = dataset();
    let split = ds.split("test").unwrap();
    let loader = Loader::new(split.clone(), LoaderConfig::eval(5)).unwrap();
    let batches = all_batches(&loader, 0);
    assert_eq!(batches.len(), 4);
    let mut i = 0;
    for b in &batches {
        for img in b.images.chunks_exact(360) {
            assert_eq!(img, &normalised(&split, i)[..], "test image {i}");
            // (v/255 − mean)/std for the first pixel of each plane, written out.
            for c in 0..3 {
                let v = split.pixels(i)[c * 120] as f32;
                let want = (v / 255.0 - [0.5, 0.4, 0.3][c]) / [0.2, 0.25, 0.3][c];
                assert!((img[c * 120] - want).abs() < 1e-5);
            }
            i += 1;
        }
    }
    assert_eq!(i, 17);
    // Evaluation is the same in every epoch.
    let later = all_batches(&loader, 5);
    assert!(later
        .iter()
        .zip(&batches)
        .all(|(a, b)| a.images == b.images && a.indices == b.indices));
}

#[test]
fn training_augmentation_moves_pixels_but_keeps_the_image() {
    let (_d, ds) = dataset();
    let split = ds.split("train").unwrap();
    let loader = Loader::new(split.clone(), train_cfg(3)).unwrap();
    assert_eq!(
        loader.augment(),
        Augment::PadCropFlip { pad: 4, flip: true }
    );
    let norm = Normalizer::new(split.mean(), split.std());
    let pad_value: Vec<f32> = (0..3).map(|c| norm.value(c, 0)).collect();
    let mut changed = 0;
    let mut seen_twice = std::collections::HashMap::new();
    for e in 0..2 {
        for b in all_batches(&loader, e) {
            for (img, &i) in b.images.chunks_exact(360).zip(&b.indices) {
                let plain = normalised(&split, i);
                if img != &plain[..] {
                    changed += 1;
                }
                // Every output value is either padding or a value of the same channel of the image.
                for c in 0..3 {
                    let own: std::collections::HashSet<u32> = plain[c * 120..(c + 1) * 120]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert!(img[c * 120..(c + 1) * 120]
                        .iter()
                        .all(|v| own.contains(&v.to_bits()) || *v == pad_value[c]));
                }
                seen_twice
                    .entry(i)
                    .or_insert_with(Vec::new)
                    .push(img.to_vec());
            }
        }
    }
    assert!(
        changed > TRAIN_N,
        "only {changed} of {} augmented images differ from the original",
        2 * TRAIN_N
    );
    let differs = seen_twice.values().filter(|v| v[0] != v[1]).count();
    assert!(
        differs > TRAIN_N / 2,
        "a sample is augmented the same way in both epochs too often ({differs})"
    );
}

#[test]
fn limit_drop_last_and_no_shuffle() {
    let (_d, ds) = dataset();
    let split = ds.split("train").unwrap();
    let cfg = LoaderConfig {
        limit: Some(20),
        drop_last: true,
        ..train_cfg(4)
    };
    let loader = Loader::new(split.clone(), cfg).unwrap();
    assert_eq!(
        (
            loader.len(),
            loader.batches_per_epoch(),
            loader.images_per_epoch()
        ),
        (20, 2, 16)
    );
    let it = loader.epoch(0);
    assert_eq!(it.len(), 2);
    let batches: Vec<Batch> = it.collect();
    assert!(batches
        .iter()
        .all(|b| b.len() == 8 && b.indices.iter().all(|&i| i < 20)));
    let plain = Loader::new(
        split.clone(),
        LoaderConfig {
            shuffle: false,
            augment: Augment::None,
            ..train_cfg(4)
        },
    )
    .unwrap();
    let order: Vec<usize> = all_batches(&plain, 3)
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_eq!(order, (0..TRAIN_N).collect::<Vec<_>>());
    // Bad configurations are errors, not panics.
    assert!(Loader::new(
        split.clone(),
        LoaderConfig {
            batch_size: 0,
            ..train_cfg(0)
        }
    )
    .is_err());
    assert!(Loader::new(
        split.clone(),
        LoaderConfig {
            limit: Some(0),
            ..train_cfg(0)
        }
    )
    .is_err());
    assert!(Loader::new(
        split.clone(),
        LoaderConfig {
            threads: Some(0),
            ..train_cfg(0)
        }
    )
    .is_err());
    let err = Loader::new(
        split,
        LoaderConfig {
            batch_size: 100,
            drop_last: true,
            ..train_cfg(0)
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("fewer than one batch"), "{err}");
}

#[test]
fn dropping_early_recycling_and_tensors() {
    let (_d, ds) = dataset();
    let split = ds.split("train").unwrap();
    let loader = Loader::new(
        split,
        LoaderConfig {
            prefetch: 1,
            ..train_cfg(9)
        },
    )
    .unwrap();
    // Taking one batch and dropping the iterator stops the producer (the test would hang otherwise).
    for _ in 0..5 {
        let mut it = loader.epoch(0);
        assert!(it.next().is_some());
    }
    // Recycled buffers give the same batches as fresh ones.
    let reference = all_batches(&loader, 2);
    let mut it = loader.epoch(2);
    let mut got = Vec::new();
    while let Some(b) = it.next() {
        got.push(b.clone());
        it.recycle(b);
    }
    assert_eq!(got, reference);
    let (t, labels) = reference[0].clone().into_parts();
    assert_eq!(t.shape(), &[8, 3, 12, 10]);
    assert_eq!(t.host::<f32>(), &reference[0].images[..]);
    assert_eq!(labels, reference[0].labels);
}
