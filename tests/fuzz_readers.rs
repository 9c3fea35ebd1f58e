//! Bounded fuzzing of the two readers that take untrusted files — the dataset reader and the
//! checkpoint reader — runnable in every `cargo test` (the open-ended coverage-guided runs are the
//! cargo-fuzz targets in `fuzz/`, see fuzz/README.md). A seeded mutation loop over small valid
//! files: random byte flips, truncations, edits of the length fields, and structure-aware edits of the
//! JSON headers with the checksums and length prefixes fixed up so that the deeper validation is
//! reached. The property: every input is either accepted — and then every image, label and tensor
//! can be read — or refused with an error; nothing panics.

mod common;

use common::{read_meta, with_meta};
use podgpu::data::Dataset;
use podgpu::rng::Rng;
use podgpu::train::checkpoint::{parse_checkpoint, serialize_checkpoint};
use podgpu::train::TrainState;
use podgpu::{ParamKind, ParamStore, Tensor};
use serde_json::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Mutations per reader; `PODGPU_FUZZ_ITERATIONS` raises it for a longer hunt.
fn iterations() -> usize {
    std::env::var("PODGPU_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500)
}

/// A small valid dataset file (two splits, 3 classes, 1×5×4 images).
pub fn seed_dataset() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("seed.bin");
    common::tiny_dataset(&p, 5, 3, 6, 3);
    std::fs::read(p).unwrap()
}

/// A small valid checkpoint (a conv, a BN with its counter, a linear layer, momentum).
pub fn seed_checkpoint() -> Vec<u8> {
    let mut rng = Rng::new(3);
    let mut s = ParamStore::new();
    let mut add = |name: &str, shape: &[usize], kind| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        s.add(name, Tensor::from_vec(shape, v), kind);
    };
    add("pre_layers.0.weight", &[2, 1, 3, 3], ParamKind::Trainable);
    add("pre_layers.1.weight", &[2], ParamKind::Trainable);
    add("pre_layers.1.running_var", &[2], ParamKind::Buffer);
    add("fc.weight", &[3, 2], ParamKind::Trainable);
    s.add(
        "pre_layers.1.num_batches_tracked",
        Tensor::from_vec(&[], vec![7.0f32]),
        ParamKind::Buffer,
    );
    let mut optim = podgpu::optim::SgdState::default();
    optim.momentum.insert(
        "fc.weight".into(),
        Tensor::from_vec(&[3, 2], vec![0.5f32; 6]),
    );
    optim.steps = 4;
    let state = TrainState::new(
        "resnet18",
        serde_json::json!({"model": "resnet18"}),
        [1, 2, 3, 4],
    );
    serialize_checkpoint(&s, &optim, &state).unwrap()
}

/// Reads everything an accepted dataset offers (what the loader and `data verify` touch).
fn exercise_dataset(bytes: &[u8]) {
    let Ok(ds) = Dataset::from_bytes(bytes, "fuzz.bin") else {
        return;
    };
    let _ = ds.verify();
    let _ = ds.verify_all();
    for name in ds.split_names() {
        let s = ds.split(name).unwrap();
        let n = s.len();
        assert!(n > 0);
        for i in [0, n / 2, n - 1] {
            assert_eq!(s.pixels(i).len(), s.image_len());
            assert!((s.label(i) as usize) < ds.num_classes());
        }
        assert_eq!(s.labels().len(), n);
    }
}

fn exercise_checkpoint(bytes: &[u8]) {
    if let Ok(ck) = parse_checkpoint(Path::new("fuzz.safetensors"), bytes) {
        for t in ck.tensors.values().chain(ck.optim.momentum.values()) {
            let _ = t.to_vec_f64();
        }
    }
}

/// One random mutation of `seed`; `structured` edits the format's JSON header consistently.
fn mutate(seed: &[u8], rng: &mut Rng, structured: &dyn Fn(&[u8], &mut Rng) -> Vec<u8>) -> Vec<u8> {
    let mut b = seed.to_vec();
    if b.len() < 16 {
        b.extend_from_slice(&[0u8; 16]);
    }
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        2 => {
            // A length or offset field near the start set to a boundary value.
            let at = 4 * rng.below(8.min(b.len() / 4));
            let v: u32 = [
                0,
                1,
                0x7fff_ffff,
                u32::MAX,
                b.len() as u32,
                rng.below(1 << 16) as u32,
            ][rng.below(6)];
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        3 => {
            // Bytes appended or a chunk duplicated in the middle.
            let i = rng.below(b.len());
            let chunk: Vec<u8> = b[i..(i + rng.below(64)).min(b.len())].to_vec();
            let j = rng.below(b.len() + 1);
            b.splice(j..j, chunk);
        }
        _ => b = structured(&b, rng),
    }
    b
}

/// A replacement for a JSON number (`choice` < 9): boundary values that break size arithmetic.
fn wild_number(choice: usize, old: &serde_json::Number) -> Value {
    let old = old.as_u64().unwrap_or(1);
    let choices = [
        0u64,
        1,
        old.wrapping_add(1),
        old.saturating_sub(1),
        old.wrapping_mul(2),
        u32::MAX as u64,
        u64::MAX,
        1 << 40,
        old / 3,
    ];
    Value::from(choices[choice])
}

/// The leaves (numbers, strings, booleans, nulls) of a JSON value, counted.
fn leaves(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.iter().map(leaves).sum(),
        Value::Object(o) => o.values().map(leaves).sum(),
        _ => 1,
    }
}

/// The `k`-th leaf of a JSON value (in `leaves` order).
fn leaf_mut<'a>(v: &'a mut Value, k: &mut usize) -> Option<&'a mut Value> {
    match v {
        Value::Array(a) => a.iter_mut().find_map(|x| leaf_mut(x, k)),
        Value::Object(o) => o.values_mut().find_map(|x| leaf_mut(x, k)),
        leaf if *k == 0 => Some(leaf),
        _ => {
            *k -= 1;
            None
        }
    }
}

/// Replaces one random leaf (number, string, ...) somewhere in a JSON value.
fn edit_json(v: &mut Value, rng: &mut Rng) {
    let n = leaves(v);
    if n == 0 {
        return;
    }
    let mut k = rng.below(n);
    let choice = rng.below(9);
    let Some(slot) = leaf_mut(v, &mut k) else {
        return;
    };
    *slot = match slot {
        Value::Number(num) => wild_number(choice, num),
        Value::String(_) => Value::from(["", "F16", "I64", "x", "train"][choice % 5]),
        Value::Bool(b) => Value::from(!*b),
        _ => Value::from(choice as u64),
    };
}

/// The metadata of a dataset file that still has a readable one.
fn try_read_meta(b: &[u8]) -> Option<podgpu::data::format::Meta> {
    let h = podgpu::data::format::HEADER_LEN;
    let len = u32::from_le_bytes(b.get(12..16)?.try_into().ok()?) as usize;
    let meta: podgpu::data::format::Meta = serde_json::from_slice(b.get(h..h + len)?).ok()?;
    let first = meta.splits.first()?.pixels.offset as usize;
    (first <= b.len() && first >= h).then(|| read_meta(b))
}

fn structured_dataset(b: &[u8], rng: &mut Rng) -> Vec<u8> {
    let Some(meta) = try_read_meta(b) else {
        return b.to_vec();
    };
    let mut v = serde_json::to_value(&meta).unwrap();
    edit_json(&mut v, rng);
    match serde_json::from_value(v) {
        Ok(m) => {
            let edited: podgpu::data::format::Meta = m;
            let json = serde_json::to_vec(&edited).unwrap();
            if json.len() + podgpu::data::format::HEADER_LEN > meta.splits[0].pixels.offset as usize
            {
                return b.to_vec();
            }
            with_meta(b, |m| *m = edited)
        }
        Err(_) => b.to_vec(),
    }
}

fn structured_checkpoint(b: &[u8], rng: &mut Rng) -> Vec<u8> {
    let parsed = b.get(..8).and_then(|len| {
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(b.get(8..8usize.checked_add(n)?)?).ok()?;
        Some((n, header))
    });
    let Some((n, mut header)) = parsed else {
        return b.to_vec();
    };
    // The metadata values are JSON text inside strings: edit them as JSON too, sometimes.
    if rng.below(2) == 0 {
        if let Some(meta) = header
            .get_mut("__metadata__")
            .and_then(Value::as_object_mut)
        {
            let keys: Vec<String> = meta.keys().cloned().collect();
            if keys.is_empty() {
                return b.to_vec();
            }
            let k = &keys[rng.below(keys.len())];
            if let Some(Ok(mut inner)) = meta[k].as_str().map(serde_json::from_str::<Value>) {
                edit_json(&mut inner, rng);
                meta[k] = Value::from(inner.to_string());
            }
        }
    } else {
        edit_json(&mut header, rng);
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&b[8 + n..]);
    out
}

fn fuzz(
    what: &str,
    seed: &[u8],
    structured: &dyn Fn(&[u8], &mut Rng) -> Vec<u8>,
    exercise: &dyn Fn(&[u8]),
) {
    exercise(seed);
    let mut rng = Rng::new(0xF022);
    let mut current = seed.to_vec();
    for i in 0..iterations() {
        // Mostly one mutation of the seed; sometimes stack mutations to reach odder inputs.
        let base = if rng.below(4) == 0 {
            current.clone()
        } else {
            seed.to_vec()
        };
        let input = mutate(&base, &mut rng, structured);
        if catch_unwind(AssertUnwindSafe(|| exercise(&input))).is_err() {
            let keep = std::env::temp_dir().join(format!("podgpu-fuzz-{what}-{i}.bin"));
            std::fs::write(&keep, &input).unwrap();
            panic!(
                "the {what} reader panicked on mutation {i}; input kept in {}",
                keep.display()
            );
        }
        if !input.is_empty() {
            current = input;
        }
    }
}

#[test]
fn dataset_reader_survives_mutated_files() {
    fuzz(
        "dataset",
        &seed_dataset(),
        &structured_dataset,
        &exercise_dataset,
    );
}

#[test]
fn checkpoint_reader_survives_mutated_files() {
    fuzz(
        "checkpoint",
        &seed_checkpoint(),
        &structured_checkpoint,
        &exercise_checkpoint,
    );
}

/// The seeds are valid and mutations are mostly refused (so the loop explores errors, not only
/// accepted files).
#[test]
fn seeds_are_valid_and_mutations_are_mostly_refused() {
    let ds = seed_dataset();
    assert!(Dataset::from_bytes(&ds, "seed").is_ok());
    let ck = seed_checkpoint();
    assert!(parse_checkpoint(Path::new("seed"), &ck).is_ok());
    let mut rng = Rng::new(1);
    let refused = (0..200)
        .filter(|_| {
            let b = mutate(&ds, &mut rng, &structured_dataset);
            Dataset::from_bytes(&b, "m").is_err()
        })
        .count();
    assert!(
        refused > 100,
        "only {refused} of 200 mutated datasets refused"
    );
}

/// Writes the seed corpus of the cargo-fuzz targets (`cargo test --test fuzz_readers -- --ignored`).
#[test]
#[ignore]
fn write_fuzz_seed_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, name, bytes) in [
        ("dataset_reader", "tiny.bin", seed_dataset()),
        ("checkpoint_reader", "small.safetensors", seed_checkpoint()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
