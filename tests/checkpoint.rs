//! Checkpoints: bit-exact round trip, clear errors for missing, corrupted, truncated, foreign and
//! mismatched files, and the last/best policy.

use podgpu::optim::Sgd;
use podgpu::rng::Rng;
use podgpu::train::checkpoint::{is_new_best, MOMENTUM_PREFIX};
use podgpu::train::{
    load_checkpoint, save_checkpoint, save_epoch_checkpoints, Checkpoint, TrainConfig, TrainState,
};
use podgpu::{ParamKind, ParamStore, Tensor};
use std::path::Path;

/// A small model: conv weight, BN (with its I64 counter), FC, a frozen head. Values are random with a
/// few awkward f32s mixed in (-0, subnormal, huge) to catch any lossy conversion.
fn model(seed: u64) -> ParamStore {
    let mut rng = Rng::new(seed);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let mut conv = rand(4 * 3 * 3 * 3);
    conv[0] = -0.0;
    conv[1] = f32::MIN_POSITIVE / 8.0;
    conv[2] = 3.0e38;
    let mut s = ParamStore::new();
    let mut add = |name: &str, shape: &[usize], v: Vec<f32>, kind| {
        s.add(name, Tensor::from_vec(shape, v), kind);
    };
    add(
        "pre_layers.0.weight",
        &[4, 3, 3, 3],
        conv,
        ParamKind::Trainable,
    );
    add("pre_layers.1.weight", &[4], rand(4), ParamKind::Trainable);
    add("pre_layers.1.bias", &[4], rand(4), ParamKind::Trainable);
    add(
        "pre_layers.1.running_mean",
        &[4],
        rand(4),
        ParamKind::Buffer,
    );
    add("pre_layers.1.running_var", &[4], rand(4), ParamKind::Buffer);
    add(
        "pre_layers.1.num_batches_tracked",
        &[],
        vec![391.0],
        ParamKind::Buffer,
    );
    add("fc.weight", &[6, 4], rand(24), ParamKind::Trainable);
    add("fc.bias", &[6], rand(6), ParamKind::Trainable);
    add("out.weight", &[6, 3], rand(18), ParamKind::Frozen);
    s
}

/// Two SGD steps with random gradients, so that the momentum buffers are not trivial.
fn trained(seed: u64) -> (ParamStore, Sgd) {
    let mut s = model(seed);
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    let mut rng = Rng::new(seed + 100);
    for _ in 0..2 {
        for id in s.ids().collect::<Vec<_>>() {
            let p = s.get_mut(id);
            let g: Vec<f32> = (0..p.value.numel()).map(|_| rng.normal() as f32).collect();
            p.grad = Some(Tensor::from_vec(p.value.shape(), g));
        }
        sgd.step(&mut s, 0.1);
    }
    (s, sgd)
}

fn state() -> TrainState {
    let mut st = TrainState::new(
        "resnet50",
        TrainConfig::default().to_json(),
        Rng::new(42).state(),
    );
    st.epoch = 7;
    st.global_step = 7 * 391;
    st.delta = 0.1 + 0.2; // not a short decimal: catches a lossy JSON float round trip
    st.mean_norm = 1.0 / 3.0;
    st.best_acc = Some(0.8125);
    st.extra.insert("loader_epoch".into(), serde_json::json!(7));
    st
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32().iter().map(|v| v.to_bits()).collect()
}

fn saved(dir: &Path) -> (std::path::PathBuf, ParamStore, Sgd) {
    let (s, sgd) = trained(1);
    let path = dir.join("last.safetensors");
    save_checkpoint(&path, &s, sgd.state(), &state()).unwrap();
    (path, s, sgd)
}

#[test]
fn round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (path, s, sgd) = saved(dir.path());
    let ck = load_checkpoint(&path).unwrap();

    assert_eq!(ck.state, state());
    assert_eq!(ck.state.delta.to_bits(), (0.1f64 + 0.2).to_bits());
    assert_eq!(ck.tensors.len(), s.len());
    for p in s.iter() {
        let t = &ck.tensors[&p.name];
        assert_eq!(t.shape(), p.value.shape(), "{}", p.name);
        assert_eq!(bits(t), bits(&p.value), "{}", p.name);
    }
    assert_eq!(ck.optim.steps, 2);
    assert_eq!(
        ck.optim.momentum.len(),
        5,
        "one buffer per trainable parameter"
    );
    for (name, buf) in &sgd.state().momentum {
        assert_eq!(bits(&ck.optim.momentum[name]), bits(buf), "momentum {name}");
    }
    let cfg = TrainConfig::from_json(&ck.state.config).unwrap();
    assert_eq!(cfg, TrainConfig::default());

    // Restoring into a freshly initialised model of the same layout gives the saved weights back,
    // and the optimizer continues from the saved buffers.
    let mut fresh = model(99);
    ck.restore_into(&mut fresh, "resnet50").unwrap();
    for p in s.iter() {
        assert_eq!(
            bits(&fresh.get(fresh.find(&p.name).unwrap()).value),
            bits(&p.value)
        );
    }
    let mut sgd2 = Sgd::new(0.9, 5e-4, false).unwrap();
    sgd2.load_state(ck.optim.clone(), &fresh).unwrap();
    assert_eq!(sgd2.state().steps, 2);
}

#[test]
fn file_layout_matches_pytorch_state_dict_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let nbt = st.tensor("pre_layers.1.num_batches_tracked").unwrap();
    assert_eq!(nbt.dtype(), safetensors::Dtype::I64);
    assert_eq!(nbt.shape(), &[] as &[usize]);
    assert_eq!(i64::from_le_bytes(nbt.data().try_into().unwrap()), 391);
    assert_eq!(
        st.tensor("fc.weight").unwrap().dtype(),
        safetensors::Dtype::F32
    );
    let momentum_key = format!("{MOMENTUM_PREFIX}fc.weight");
    assert!(st.tensor(&momentum_key).is_ok());
    // Metadata values are JSON.
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["model"], "\"resnet50\"");
    assert_eq!(meta["epoch"], "7");
    let rng: [u64; 4] = serde_json::from_str(&meta["rng_state"]).unwrap();
    assert_eq!(rng, Rng::new(42).state());
    // No temporary file is left next to it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["last.safetensors".to_string()]);
}

fn load_err(path: &Path) -> String {
    format!("{:#}", load_checkpoint(path).unwrap_err())
}

#[test]
fn missing_empty_and_foreign_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    assert!(load_err(&missing).contains("does not exist"));

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(load_err(&empty).contains("corrupted or truncated"));

    let text = dir.path().join("text.safetensors");
    std::fs::write(&text, b"this is not a checkpoint at all, just some text").unwrap();
    assert!(load_err(&text).contains("corrupted or truncated"));

    // A valid safetensors file without podgpu metadata (e.g. a plain PyTorch export).
    let plain = dir.path().join("plain.safetensors");
    let data = [1.0f32, 2.0];
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &bytes).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &plain).unwrap();
    assert!(load_err(&plain).contains("not a podgpu checkpoint"));
}

#[test]
fn truncated_files_are_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut inside the length prefix, inside the header, right after it, mid-data and one byte short.
    for cut in [
        4,
        8 + header_len / 2,
        8 + header_len,
        (bytes.len() + header_len) / 2,
        bytes.len() - 1,
    ] {
        let t = dir.path().join("cut.safetensors");
        std::fs::write(&t, &bytes[..cut]).unwrap();
        let e = load_err(&t);
        assert!(e.contains("corrupted or truncated"), "cut at {cut}: {e}");
        assert!(
            e.contains("cut.safetensors"),
            "the error names the file: {e}"
        );
    }
}

#[test]
fn a_flipped_data_byte_is_caught_by_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10; // inside the last tensor's data: the safetensors structure stays valid
    let bad = dir.path().join("flipped.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let e = load_err(&bad);
    assert!(e.contains("fails its checksum"), "{e}");

    // A damaged header is caught too.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[9] = b'#';
    std::fs::write(&bad, &bytes).unwrap();
    assert!(load_err(&bad).contains("corrupted or truncated"));
}

#[test]
fn checkpoints_of_another_model_or_layout_are_refused_with_the_differences() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let ck: Checkpoint = load_checkpoint(&path).unwrap();

    let mut same = model(5);
    let e = format!("{:#}", ck.restore_into(&mut same, "resnet18").unwrap_err());
    assert!(e.contains("`resnet50`") && e.contains("`resnet18`"), "{e}");

    // Another layout: FC of another width, a missing and an extra parameter.
    let mut other = ParamStore::new();
    for p in model(5).iter() {
        match p.name.as_str() {
            "fc.bias" => continue,
            "fc.weight" => {
                other.add(
                    "fc.weight",
                    Tensor::from_vec(&[8, 4], vec![0.5f32; 32]),
                    p.kind,
                );
            }
            _ => {
                other.add(p.name.clone(), p.value.clone(), p.kind);
            }
        }
    }
    other.add(
        "layer1.0.layers.0.weight",
        Tensor::from_vec(&[2], vec![1.0f32, 2.0]),
        ParamKind::Trainable,
    );
    let before: Vec<u32> = bits(&other.get(other.find("pre_layers.0.weight").unwrap()).value);
    let e = format!("{:#}", ck.restore_into(&mut other, "resnet50").unwrap_err());
    assert!(e.contains("3 differences"), "{e}");
    assert!(
        e.contains("`fc.weight` has shape [6, 4] in the checkpoint but [8, 4] in the model"),
        "{e}"
    );
    assert!(
        e.contains("`fc.bias` is in the checkpoint but not in the model"),
        "{e}"
    );
    assert!(
        e.contains("`layer1.0.layers.0.weight` is in the model but not in the checkpoint"),
        "{e}"
    );
    // Nothing was changed by the refused restore.
    assert_eq!(
        bits(&other.get(other.find("pre_layers.0.weight").unwrap()).value),
        before
    );
}

#[test]
fn last_is_written_every_epoch_and_best_only_on_improvement() {
    let dir = tempfile::tempdir().unwrap();
    let (s, sgd) = trained(3);
    let mut st = state();
    st.best_acc = None;

    st.epoch = 1;
    let w = save_epoch_checkpoints(dir.path(), &s, sgd.state(), &mut st, Some(0.50)).unwrap();
    assert_eq!(
        w.best.as_deref(),
        Some(dir.path().join("best.safetensors").as_path())
    );
    assert_eq!(st.best_acc, Some(0.50));

    st.epoch = 2;
    let w = save_epoch_checkpoints(dir.path(), &s, sgd.state(), &mut st, Some(0.40)).unwrap();
    assert!(w.best.is_none());
    st.epoch = 3;
    let w = save_epoch_checkpoints(dir.path(), &s, sgd.state(), &mut st, None).unwrap();
    assert!(w.best.is_none());
    assert_eq!(st.best_acc, Some(0.50));

    let last = load_checkpoint(&w.last).unwrap();
    let best = load_checkpoint(&dir.path().join("best.safetensors")).unwrap();
    assert_eq!((last.state.epoch, last.state.best_acc), (3, Some(0.50)));
    assert_eq!((best.state.epoch, best.state.best_acc), (1, Some(0.50)));

    assert!(is_new_best(None, Some(0.1)));
    assert!(!is_new_best(Some(0.5), Some(0.5)));
    assert!(!is_new_best(None, Some(f64::NAN)));
    assert!(!is_new_best(Some(0.5), None));
}

#[test]
fn writing_into_a_missing_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (s, sgd) = trained(4);
    let path = dir.path().join("no/such/folder/last.safetensors");
    let e = format!(
        "{:#}",
        save_checkpoint(&path, &s, sgd.state(), &state()).unwrap_err()
    );
    assert!(
        e.contains("could not write") && e.contains("last.safetensors"),
        "{e}"
    );
}

// ---- issue 14: the whole checkpoint is protected, non-finite weights are refused ----

/// The checkpoint's bytes with the first occurrence of `from` in its JSON header replaced by `to`
/// (same length, so that the layout stays valid).
fn edit_header(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let at = header
        .find(from)
        .unwrap_or_else(|| panic!("`{from}` not in {header}"));
    let mut out = bytes.to_vec();
    out[8 + at..8 + at + from.len()].copy_from_slice(to.as_bytes());
    out
}

#[test]
fn one_changed_byte_in_the_header_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("edited.safetensors");
    // The epoch, the best accuracy and a setting: each a valid value that would be loaded silently.
    for (from, to) in [
        (r#""epoch":"7""#, r#""epoch":"8""#),
        (r#""best_acc":"0.8125""#, r#""best_acc":"0.9125""#),
        (r#"\"lr\":0.1"#, r#"\"lr\":0.5"#),
    ] {
        std::fs::write(&bad, edit_header(&bytes, from, to)).unwrap();
        let e = load_err(&bad);
        assert!(
            e.contains("corrupted or truncated") && e.contains("header fails its checksum"),
            "{from} → {to}: {e}"
        );
    }
}

/// The checkpoint at `path` rewritten with `edit` applied to its tensors, the checksum list and the
/// header checksum recomputed as podgpu writes them (a deliberate, consistent edit).
fn rewrite(
    path: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
    keep_list: bool,
) {
    use podgpu::train::checkpoint::{header_checksum, HEADER_CHECKSUM};
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    if !keep_list {
        let sums: std::collections::BTreeMap<&str, String> = tensors
            .iter()
            .map(|(n, _, _, d)| (n.as_str(), format!("{:08x}", crc32fast::hash(d))))
            .collect();
        meta.insert("checksums".into(), serde_json::to_string(&sums).unwrap());
    }
    let shapes = tensors
        .iter()
        .map(|(n, d, s, _)| (n.as_str(), *d, s.as_slice()));
    let sum = header_checksum(&meta, shapes);
    meta.insert(HEADER_CHECKSUM.into(), serde_json::to_string(&sum).unwrap());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn a_missing_tensor_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let original = std::fs::read(&path).unwrap();
    // The tensor and its checksum entry both gone, the header checksum left as written.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut sums: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&meta["checksums"]).unwrap();
    sums.remove("fc.bias");
    meta.insert("checksums".into(), serde_json::to_string(&sums).unwrap());
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .iter()
        .filter(|(n, _)| *n != "fc.bias")
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let e = load_err(&path);
    assert!(e.contains("header fails its checksum"), "{e}");
    // Only in the checksum list: named.
    std::fs::write(&path, &original).unwrap();
    rewrite(&path, |t| t.retain(|(n, _, _, _)| n != "fc.bias"), true);
    let e = load_err(&path);
    assert!(e.contains("tensor `fc.bias` is missing"), "{e}");
}

#[test]
fn non_finite_weights_are_never_saved_nor_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (path, s, sgd) = saved(dir.path());
    let before = std::fs::read(&path).unwrap();
    // Saving NaN weights fails and keeps the last good file.
    let mut bad = ParamStore::new();
    for p in s.iter() {
        let mut v = p.value.to_vec_f32();
        if p.name == "fc.weight" {
            v[3] = f32::NAN;
            v[4] = f32::INFINITY;
        }
        bad.add(p.name.clone(), Tensor::from_vec(p.value.shape(), v), p.kind);
    }
    let e = format!(
        "{:#}",
        save_checkpoint(&path, &bad, sgd.state(), &state()).unwrap_err()
    );
    assert!(
        e.contains("not finite") && e.contains("`fc.weight` holds 1 NaN and 1 infinite"),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // A file that holds them (written by something else, consistently) is refused.
    rewrite(
        &path,
        |t| {
            let (_, _, _, d) = t.iter_mut().find(|(n, _, _, _)| n == "fc.weight").unwrap();
            d[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        },
        false,
    );
    let e = load_err(&path);
    assert!(
        e.contains("holds non-finite values") && e.contains("`fc.weight` holds 1 NaN"),
        "{e}"
    );
}

#[test]
fn best_is_restored_from_last_after_a_crash_between_the_two_writes() {
    use podgpu::train::checkpoint::reconcile_best;
    let dir = tempfile::tempdir().unwrap();
    let (s, sgd) = trained(5);
    let mut st = state();
    st.best_acc = None;
    st.epoch = 1;
    save_epoch_checkpoints(dir.path(), &s, sgd.state(), &mut st, Some(0.5)).unwrap();
    st.epoch = 2;
    save_epoch_checkpoints(dir.path(), &s, sgd.state(), &mut st, Some(0.7)).unwrap();
    assert_eq!((st.best_acc, st.best_epoch), (Some(0.7), Some(2)));
    let last = dir.path().join("last.safetensors");
    let best = dir.path().join("best.safetensors");
    let last_bytes = std::fs::read(&last).unwrap();
    assert_eq!(
        reconcile_best(dir.path(), &st, &last_bytes, false).unwrap(),
        None
    );
    // Killed after last was written, before best: no best (or the previous one).
    std::fs::remove_file(&best).unwrap();
    let note = reconcile_best(dir.path(), &st, &last_bytes, false)
        .unwrap()
        .unwrap();
    assert!(note.contains("restored"), "{note}");
    assert_eq!(std::fs::read(&best).unwrap(), last_bytes);
    // A best of another epoch that cannot be repaired from last (last is mid-epoch) is reported.
    let mut older = st.clone();
    older.epoch = 1;
    older.best_acc = Some(0.5);
    save_checkpoint(&best, &s, sgd.state(), &older).unwrap();
    let note = reconcile_best(dir.path(), &st, &last_bytes, true)
        .unwrap()
        .unwrap();
    assert!(
        note.contains("does not hold the run's best epoch") && note.contains("it holds epoch 1"),
        "{note}"
    );
}
