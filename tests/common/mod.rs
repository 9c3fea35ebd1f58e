//! Helpers shared by the training tests: running the `podgpu` binary, small datasets written on the
//! fly, and bit-exact comparison of checkpoints.
#![allow(dead_code)]

use podgpu::data::format::{header_bytes, Meta, FORMAT_VERSION, HEADER_LEN};
use podgpu::data::{write_dataset, DatasetSpec, SplitData};
use podgpu::rng::Rng;
use podgpu::train::load_checkpoint;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The repository root (for `datasets/...`).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `podgpu` command with a clean environment for output checks (no backtraces, plain progress).
pub fn podgpu() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_podgpu"));
    c.env_remove("RUST_BACKTRACE")
        .env_remove("PODGPU_TEST_INTERNAL_PANIC")
        .current_dir(repo());
    c
}

/// Spawns `cmd` (a training run, possibly under `mpirun`) with its stdout piped and returns the
/// child once training has started — its "run folder" header line, printed after the signal
/// handler is installed — with a thread draining stdout to the end; panics after `wait` without
/// it. Its stderr is the caller's.
pub fn spawn_until_training(
    cmd: &mut Command,
    wait: std::time::Duration,
) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start the run");
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut text = String::new();
        for line in std::io::BufReader::new(out).lines() {
            let line = line.unwrap();
            if line.starts_with("run folder") {
                let _ = started_tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    started_rx
        .recv_timeout(wait)
        .expect("the run did not start training");
    (child, drain)
}

/// Runs `podgpu` with `args`; returns the output.
pub fn run(args: &[&str]) -> Output {
    podgpu().args(args).output().expect("cannot run podgpu")
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts that a run succeeded, printing its output otherwise.
pub fn assert_ok(o: &Output) {
    let (out, err) = text(o);
    assert!(
        o.status.success(),
        "podgpu failed ({:?})\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
}

/// Learnable synthetic images: class k is a bright bar at row/column position k on noise, so a small
/// network can tell classes apart within a few steps.
fn bar_split(
    name: &str,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    classes: usize,
    seed: u64,
) -> SplitData {
    let mut rng = Rng::new(seed);
    let mut pixels = Vec::with_capacity(n * c * h * w);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let k = i % classes;
        labels.push(k as u32);
        for _ in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let on = if k.is_multiple_of(2) {
                        y == k / 2 + 1
                    } else {
                        x == k / 2 + 1
                    };
                    let base = if on { 200 } else { 30 };
                    pixels.push((base + rng.below(40)) as u8);
                }
            }
        }
    }
    SplitData {
        name: name.into(),
        n,
        h,
        w,
        pixels,
        labels,
    }
}

/// A tiny dataset (1×h×w, `classes` classes, `n_train`/`n_test` images) written to `path`.
pub fn tiny_dataset(path: &Path, h: usize, classes: usize, n_train: usize, n_test: usize) {
    let spec = DatasetSpec {
        name: "tiny".into(),
        classes: (0..classes).map(|k| format!("c{k}")).collect(),
        channels: 1,
        mean: vec![0.3],
        std: vec![0.25],
        source: "synthetic bars for podgpu tests".into(),
        splits: vec![
            bar_split("train", n_train, 1, h, h, classes, 1),
            bar_split("test", n_test, 1, h, h, classes, 2),
        ],
    };
    write_dataset(path, &spec).unwrap();
}

pub fn read_meta(bytes: &[u8]) -> Meta {
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[HEADER_LEN..HEADER_LEN + len]).unwrap()
}

/// Rewrites the metadata of a dataset file (with a consistent header), keeping the data where it is.
pub fn with_meta(bytes: &[u8], edit: impl FnOnce(&mut Meta)) -> Vec<u8> {
    with_meta_version(bytes, FORMAT_VERSION, edit)
}

pub fn with_meta_version(bytes: &[u8], version: u32, edit: impl FnOnce(&mut Meta)) -> Vec<u8> {
    let mut meta = read_meta(bytes);
    edit(&mut meta);
    let json = serde_json::to_vec(&meta).unwrap();
    let first_section = read_meta(bytes).splits[0].pixels.offset as usize;
    assert!(
        HEADER_LEN + json.len() <= first_section,
        "edited metadata no longer fits"
    );
    let mut out = bytes.to_vec();
    out[..HEADER_LEN].copy_from_slice(&header_bytes(version, &json));
    out[HEADER_LEN..first_section].fill(0);
    out[HEADER_LEN..HEADER_LEN + json.len()].copy_from_slice(&json);
    out
}

/// Every tensor of a checkpoint (weights, buffers, momentum) as raw f32 bits, by name.
pub fn checkpoint_bits(path: &Path) -> BTreeMap<String, Vec<u32>> {
    let ck = load_checkpoint(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let mut out = BTreeMap::new();
    for (name, t) in &ck.tensors {
        out.insert(
            name.clone(),
            t.to_vec_f32().iter().map(|x| x.to_bits()).collect(),
        );
    }
    for (name, t) in &ck.optim.momentum {
        out.insert(
            format!("optim.momentum.{name}"),
            t.to_vec_f32().iter().map(|x| x.to_bits()).collect(),
        );
    }
    out
}

/// Asserts two checkpoints hold bit-identical tensors and the same training state.
pub fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (ta, tb) = (checkpoint_bits(a), checkpoint_bits(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    assert!(ta.len() > 10, "suspiciously few tensors: {}", ta.len());
    let differing: Vec<&String> = ta.keys().filter(|k| ta[*k] != tb[*k]).collect();
    assert!(
        differing.is_empty(),
        "{} of {} tensors differ between {} and {}, e.g. {:?}",
        differing.len(),
        ta.len(),
        a.display(),
        b.display(),
        &differing[..differing.len().min(5)]
    );
    let (ca, cb) = (load_checkpoint(a).unwrap(), load_checkpoint(b).unwrap());
    assert_eq!(ca.state.epoch, cb.state.epoch);
    assert_eq!(ca.state.global_step, cb.state.global_step);
    assert_eq!(ca.state.delta.to_bits(), cb.state.delta.to_bits());
    assert_eq!(ca.state.mean_norm.to_bits(), cb.state.mean_norm.to_bits());
    assert_eq!(ca.state.best_acc, cb.state.best_acc);
    assert_eq!(ca.optim.steps, cb.optim.steps);
}

/// One epoch's numbers that do not depend on timing, as bits: epoch, train loss, train accuracy,
/// test accuracy, lr, δ, M.
pub type ExactRecord = (usize, u64, u64, Option<u64>, u64, u64, u64);

/// The per-epoch numbers that do not depend on timing, from `metrics.jsonl`.
pub fn exact_metrics(run_dir: &Path) -> Vec<ExactRecord> {
    podgpu::train::read_jsonl(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.epoch,
                r.train_loss.to_bits(),
                r.train_acc.to_bits(),
                r.test_acc.map(f64::to_bits),
                r.lr.to_bits(),
                r.delta.to_bits(),
                r.mean_norm.to_bits(),
            )
        })
        .collect()
}
