//! Every bad input of docs/ERRORS.md, one test per row: `podgpu` exits with status 1 (2 for command
//! line syntax, which clap reports) and a message that says what is wrong and what to do — never a
//! panic trace — and a refused fresh run leaves no run folder behind.

mod common;

use common::*;
use podgpu::train::{load_checkpoint, save_checkpoint};
use podgpu::{ParamKind, ParamStore};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// A temporary folder with a small valid dataset `tiny.bin` (3 classes, 12×12 grey).
struct Setup {
    tmp: TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        tiny_dataset(&tmp.path().join("tiny.bin"), 12, 3, 64, 16);
        Setup { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn data(&self) -> PathBuf {
        self.path("tiny.bin")
    }

    /// The dataset's bytes, edited by `f`, written as `name`.
    fn damaged(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = std::fs::read(self.data()).unwrap();
        f(&mut bytes);
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// `podgpu train` on a tiny model with `args` added (replacing the defaults they name).
    fn train(&self, data: &Path, out: &Path, args: &[&str]) -> std::process::Output {
        let defaults = [
            ("--width", "2"),
            ("--epochs", "1"),
            ("--batch-size", "16"),
            ("--device", "cpu"),
            ("--threads", "2"),
        ];
        let mut v: Vec<String> = vec!["train".into(), "resnet18".into()];
        for (flag, value) in defaults {
            if !args.contains(&flag) {
                v.extend([flag.to_string(), value.to_string()]);
            }
        }
        v.extend(["--data".into(), data.display().to_string()]);
        v.extend(["--out".into(), out.display().to_string()]);
        v.extend(args.iter().map(|s| s.to_string()));
        podgpu().args(&v).output().unwrap()
    }

    /// A finished one-epoch run in `name`.
    fn trained_run(&self, name: &str) -> PathBuf {
        let out = self.path(name);
        assert_ok(&self.train(&self.data(), &out, &[]));
        out
    }
}

/// Asserts a clean refusal: exit status `code`, every needle in stderr, no panic or backtrace.
fn assert_refused(o: &std::process::Output, code: i32, needles: &[&str]) -> String {
    let (out, err) = text(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected status {code}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "`{n}` not in stderr:\n{err}");
    }
    for bad in [
        "panicked",
        "stack backtrace",
        "RUST_BACKTRACE=1 for",
        "internal error",
    ] {
        assert!(!err.contains(bad), "`{bad}` in stderr:\n{err}");
    }
    err
}

/// A refused fresh run: as `assert_refused`, and the run folder was not created.
fn assert_fresh_refused(s: &Setup, data: &Path, args: &[&str], needles: &[&str]) -> String {
    let out = s.path("run");
    let o = s.train(data, &out, args);
    let err = assert_refused(&o, 1, needles);
    assert!(!out.exists(), "a refused run left {} behind", out.display());
    err
}

// ---- CUDA graphs (PODGPU_CUDA_GRAPH) ----

#[test]
fn cuda_graph_or_copy_stream_without_a_gpu_or_with_a_bad_value() {
    let s = Setup::new();
    let out = s.path("run");
    let run = |value: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["train", "resnet18", "--width", "2", "--epochs", "1"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["--batch-size", "16", "--device", "cpu", "--threads", "2"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--data".into(), s.data().display().to_string()]);
        args.extend(["--out".into(), out.display().to_string()]);
        podgpu()
            .env("PODGPU_CUDA_GRAPH", value)
            .args(&args)
            .output()
            .unwrap()
    };
    assert_refused(&run("1", &[]), 1, &["PODGPU_CUDA_GRAPH=1 needs a GPU"]);
    assert!(!out.exists(), "a refused run left its folder");
    assert_refused(
        &run("yes", &[]),
        1,
        &["PODGPU_CUDA_GRAPH=\"yes\"", "expected 1"],
    );
    assert!(!out.exists(), "a refused run left its folder");
    // 0 means off: the run trains on the CPU as usual.
    assert_ok(&run("0", &[]));
    // The copy stream likewise needs a GPU.
    let out = s.path("run-staged");
    let o = podgpu()
        .env("PODGPU_COPY_STREAM", "1")
        .args([
            "train", "resnet18", "--width", "2", "--epochs", "1", "--device", "cpu",
        ])
        .arg("--data")
        .arg(s.data())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_refused(&o, 1, &["PODGPU_COPY_STREAM=1 needs a GPU"]);
    assert!(!out.exists(), "a refused run left its folder");
}

// ---- dataset file ----

#[test]
fn dataset_missing() {
    let s = Setup::new();
    assert_fresh_refused(
        &s,
        &s.path("nope.bin"),
        &[],
        &["nope.bin does not exist", "podgpu data convert"],
    );
}

#[test]
fn dataset_empty() {
    let s = Setup::new();
    let p = s.damaged("empty.bin", |b| b.clear());
    assert_fresh_refused(&s, &p, &[], &["is empty (0 bytes)", "convert it again"]);
}

#[test]
fn dataset_truncated() {
    let s = Setup::new();
    let p = s.damaged("cut.bin", |b| b.truncate(b.len() - 100));
    assert_fresh_refused(&s, &p, &[], &["is truncated", "convert it again"]);
    let p = s.damaged("cut_header.bin", |b| b.truncate(30));
    assert_fresh_refused(&s, &p, &[], &["is truncated"]);
}

#[test]
fn dataset_wrong_magic() {
    let s = Setup::new();
    let p = s.damaged("png.bin", |b| b[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n"));
    assert_fresh_refused(
        &s,
        &p,
        &[],
        &["is not a podgpu dataset", "podgpu data convert"],
    );
}

#[test]
fn dataset_wrong_version() {
    let s = Setup::new();
    let p = s.damaged("v9.bin", |b| *b = with_meta_version(b, 9, |_| {}));
    assert_fresh_refused(&s, &p, &[], &["has format version 9", "convert it again"]);
}

#[test]
fn dataset_checksum_mismatch() {
    let s = Setup::new();
    let p = s.damaged("flipped.bin", |b| {
        let at = read_meta(b).splits[0].pixels.offset as usize + 100;
        b[at] ^= 0x40;
    });
    assert_fresh_refused(
        &s,
        &p,
        &[],
        &["failed its checksum", "split 'train' pixels"],
    );
}

#[test]
fn dataset_header_sizes_disagree() {
    let s = Setup::new();
    let p = s.damaged("sizes.bin", |b| *b = with_meta(b, |m| m.splits[0].n += 1));
    assert_fresh_refused(&s, &p, &[], &["sizes disagree", "split 'train' pixels"]);
    let p = s.damaged("beyond.bin", |b| {
        *b = with_meta(b, |m| m.splits[1].labels.offset += 1 << 20)
    });
    assert_fresh_refused(&s, &p, &[], &["is truncated", "split 'test' labels"]);
}

#[test]
fn dataset_label_out_of_range() {
    let s = Setup::new();
    let p = s.damaged("label.bin", |b| {
        let at = read_meta(b).splits[0].labels.offset as usize + 4 * 5;
        b[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
    });
    assert_fresh_refused(
        &s,
        &p,
        &[],
        &[
            "label.bin: split 'train': image 5 has label 7",
            "only 3 classes",
            "convert it again",
        ],
    );
}

#[test]
fn dataset_split_without_images() {
    let s = Setup::new();
    let p = s.damaged("nosplit.bin", |b| {
        *b = with_meta(b, |m| {
            let t = &mut m.splits[1];
            t.n = 0;
            t.pixels.len = 0;
            t.labels.len = 0;
        })
    });
    assert_fresh_refused(&s, &p, &[], &["nosplit.bin: split 'test' has no images"]);
}

#[test]
fn dataset_without_train_split() {
    let s = Setup::new();
    let p = s.damaged("notrain.bin", |b| {
        *b = with_meta(b, |m| m.splits[0].name = "val".into())
    });
    assert_fresh_refused(&s, &p, &[], &["has no split 'train'", "val, test"]);
}

#[test]
fn images_too_small_for_the_model() {
    let s = Setup::new();
    let p = s.path("small.bin");
    tiny_dataset(&p, 6, 3, 32, 8);
    assert_fresh_refused(
        &s,
        &p,
        &[],
        &["images of 6×6 are too small", "at least 8×8"],
    );
}

#[test]
fn splits_with_different_image_sizes() {
    let s = Setup::new();
    let p = s.damaged("mixed.bin", |b| {
        *b = with_meta(b, |m| {
            // Same byte count, other shape: 16 images of 12×12 read as 16 of 8×18.
            m.splits[1].h = 8;
            m.splits[1].w = 18;
        })
    });
    assert_fresh_refused(
        &s,
        &p,
        &[],
        &["test images are 1×8×18", "training images 1×12×12"],
    );
}

// ---- PEDCC ----

#[test]
fn pedcc_with_fewer_than_two_classes() {
    let s = Setup::new();
    let p = s.path("one.bin");
    tiny_dataset(&p, 12, 1, 32, 8);
    assert_fresh_refused(&s, &p, &[], &["has 1 class", "at least 2 classes"]);
    let o = run(&[
        "pedcc",
        "--classes",
        "1",
        "--dim",
        "4",
        "--out",
        s.path("p.st").to_str().unwrap(),
    ]);
    assert_refused(&o, 1, &["PEDCC needs at least 2 classes"]);
}

#[test]
fn pedcc_more_classes_than_dimensions_without_repulsion() {
    let s = Setup::new();
    let five = s.path("five.bin");
    tiny_dataset(&five, 12, 5, 40, 10);
    assert_fresh_refused(
        &s,
        &five,
        &["--feature-dim", "3"],
        &[
            "5 classes do not fit evenly in 3 dimensions",
            "--feature-dim to at least 4",
            "--pedcc-repulsion",
        ],
    );
    // With the flag the run goes ahead.
    let o = s.train(
        &five,
        &s.path("rep"),
        &["--feature-dim", "3", "--pedcc-repulsion"],
    );
    assert_ok(&o);
}

#[test]
fn pedcc_file_of_the_wrong_shape() {
    let s = Setup::new();
    let f = s.path("k4.safetensors");
    assert_ok(&run(&[
        "pedcc",
        "--classes",
        "4",
        "--dim",
        "8",
        "--out",
        f.to_str().unwrap(),
    ]));
    let f = f.to_str().unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--pedcc", f, "--feature-dim", "8"],
        &["has shape [4, 8]", "needs [3, 8]"],
    );
}

#[test]
fn pedcc_file_that_is_not_one() {
    let s = Setup::new();
    let f = s.path("junk.safetensors");
    std::fs::write(&f, b"not a safetensors file at all").unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--pedcc", f.to_str().unwrap()],
        &["is not a safetensors file", "podgpu pedcc"],
    );
}

// ---- names ----

#[test]
fn unknown_model() {
    let s = Setup::new();
    let o = podgpu()
        .args([
            "train",
            "resnet7",
            "--data",
            s.data().to_str().unwrap(),
            "--out",
            s.path("run").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_refused(&o, 1, &["unknown model `resnet7`", "resnet18, resnet34"]);
    assert!(!s.path("run").exists());
}

#[test]
fn unknown_loss() {
    let s = Setup::new();
    let o = s.train(&s.data(), &s.path("run"), &["--loss", "triplet"]);
    assert_refused(
        &o,
        2,
        &["invalid value 'triplet'", "possible values: pod, softmax"],
    );
    assert!(!s.path("run").exists());
}

// ---- batch size and hyper-parameters ----

#[test]
fn batch_size_zero() {
    let s = Setup::new();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--batch-size", "0"],
        &["batch_size must be at least 1"],
    );
}

#[test]
fn batch_size_larger_than_the_split() {
    let s = Setup::new();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--batch-size", "65"],
        &[
            "--batch-size 65 is larger than the 64 training images",
            "at most 64",
        ],
    );
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--batch-size", "32", "--limit-train", "20"],
        &["larger than the 20 training images"],
    );
}

#[test]
fn pod_batch_of_one() {
    let s = Setup::new();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--batch-size", "1"],
        &["at least 2 images", "--batch-size"],
    );
}

#[test]
fn negative_or_nan_hyper_parameters() {
    let s = Setup::new();
    for (args, needle) in [
        (
            vec!["--lr", "-0.1"],
            "lr must be a finite number > 0, got -0.1",
        ),
        (
            vec!["--lr", "NaN"],
            "lr must be a finite number > 0, got NaN",
        ),
        (
            vec!["--lr", "inf"],
            "lr must be a finite number > 0, got inf",
        ),
        (
            vec!["--momentum", "-0.5"],
            "momentum must be in [0, 1], got -0.5",
        ),
        (
            vec!["--weight-decay", "nan"],
            "weight_decay must be a finite number >= 0, got NaN",
        ),
        (
            vec!["--gamma", "0"],
            "gamma must be a finite number > 0, got 0",
        ),
        (
            vec!["--alpha", "-1"],
            "alpha must be a finite number >= 0, got -1",
        ),
        (
            vec!["--lambda", "NaN"],
            "lambda must be a finite number >= 0, got NaN",
        ),
        (vec!["--epochs", "0"], "epochs must be at least 1"),
        (
            vec!["--milestones", "5,3"],
            "milestones must be strictly increasing",
        ),
    ] {
        assert_fresh_refused(
            &s,
            &s.data(),
            &args,
            &["invalid training configuration", needle],
        );
    }
    // Unparseable numbers are command line errors.
    let o = s.train(&s.data(), &s.path("run"), &["--batch-size", "-3"]);
    assert_refused(&o, 2, &["invalid value '-3'"]);
}

#[test]
fn bad_config_file() {
    let s = Setup::new();
    let cfg = s.path("c.toml");
    std::fs::write(&cfg, "lr = -1.0\n").unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--config", cfg.to_str().unwrap()],
        &["c.toml", "lr must be"],
    );
    std::fs::write(&cfg, "learning_rate = 0.1\n").unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--config", cfg.to_str().unwrap()],
        &["c.toml", "learning_rate"],
    );
    // A queue of 10^11 batches would be allocated up front.
    std::fs::write(&cfg, "prefetch = 100000000000\n").unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--config", cfg.to_str().unwrap()],
        &["prefetch must be between 1 and 1024 batches"],
    );
}

#[test]
fn dataset_normalisation_that_makes_inputs_non_finite() {
    let s = Setup::new();
    let p = s.damaged("tiny-std.bin", |b| {
        *b = with_meta(b, |m| m.std = vec![1e-45])
    });
    assert_fresh_refused(
        &s,
        &p,
        &[],
        &["normalisation", "is not usable", "would not be finite"],
    );
}

// ---- output folder ----

#[test]
fn output_folder_unwritable() {
    let s = Setup::new();
    let file = s.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    // A folder inside a regular file cannot be created (whoever runs the test, root included).
    let o = s.train(&s.data(), &file.join("run"), &[]);
    assert_refused(
        &o,
        1,
        &["could not create the run folder", "choose a writable --out"],
    );
    let o = s.train(&s.data(), &file, &[]);
    assert_refused(&o, 1, &["is a file, not a folder"]);
}

#[cfg(unix)]
#[test]
fn output_folder_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let ro = s.path("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_ok() {
        eprintln!("skipped: running as a user that can write anywhere (root)");
        return;
    }
    let o = s.train(&s.data(), &ro.join("run"), &[]);
    assert_refused(&o, 1, &["could not create the run folder"]);
    let o = s.train(&s.data(), &ro, &[]);
    assert_refused(&o, 1, &["writable"]);
}

#[test]
fn output_folder_holding_a_run() {
    let s = Setup::new();
    let run = s.trained_run("done");
    let before = std::fs::read(run.join("last.safetensors")).unwrap();
    let o = s.train(&s.data(), &run, &[]);
    assert_refused(&o, 1, &["already holds a run", "podgpu train --resume"]);
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), before);
}

// ---- checkpoints and --resume ----

/// `podgpu train --resume DIR --epochs 2 --threads 2` with `extra` (its own `--epochs` replaces the 2).
fn resume(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--resume", dir.to_str().unwrap(), "--threads", "2"];
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs", "2"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn resume_of_a_folder_without_checkpoint() {
    let s = Setup::new();
    std::fs::create_dir(s.path("empty")).unwrap();
    assert_refused(
        &resume(&s.path("empty"), &[]),
        1,
        &["has no checkpoint (last.safetensors)", "start a new run"],
    );
    assert_refused(&resume(&s.path("missing"), &[]), 1, &["no such run folder"]);
}

#[test]
fn resume_of_a_corrupted_checkpoint() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let ck = run.join("last.safetensors");
    let mut bytes = std::fs::read(&ck).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01; // inside the last tensor's data
    std::fs::write(&ck, &bytes).unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &["is corrupted or truncated", "fails its checksum"],
    );
    std::fs::write(&ck, &bytes[..n / 2]).unwrap();
    assert_refused(&resume(&run, &[]), 1, &["is corrupted or truncated"]);
    std::fs::write(&ck, b"").unwrap();
    assert_refused(&resume(&run, &[]), 1, &["is corrupted or truncated"]);
}

#[test]
fn resume_of_a_checkpoint_from_another_model() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let ck_path = run.join("last.safetensors");
    // The resnet18 tensors under a checkpoint that claims to be a resnet34.
    let ck = load_checkpoint(&ck_path).unwrap();
    let mut store = ParamStore::new();
    for (name, t) in &ck.tensors {
        store.add(name.clone(), t.clone(), ParamKind::Buffer);
    }
    let mut state = ck.state.clone();
    state.model = "resnet34".into();
    state.config["model"] = "resnet34".into();
    save_checkpoint(&ck_path, &store, &ck.optim, &state).unwrap();
    // The folder's settings say so too (otherwise they and the checkpoint disagree, see
    // `resume_after_hand_edits_of_config_toml`).
    podgpu::train::TrainConfig::from_json(&state.config)
        .unwrap()
        .save(&run.join("config.toml"))
        .unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &[
            "does not fit this `resnet34`",
            "is in the model but not in the checkpoint",
        ],
    );
}

#[test]
fn resume_with_a_damaged_pedcc() {
    let s = Setup::new();
    let run = s.trained_run("r");
    std::fs::write(run.join("pedcc.safetensors"), b"garbage").unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &[
            "the run folder's PEDCC cannot be used",
            "pedcc.safetensors is not a safetensors file",
        ],
    );
}

#[test]
fn resume_with_settings_that_change_the_run() {
    let s = Setup::new();
    let run = s.trained_run("r");
    assert_refused(
        &resume(&run, &["--lr", "0.5"]),
        1,
        &["only --epochs, --device, --threads, --detect-anomaly and --data"],
    );
}

#[test]
fn resume_when_the_dataset_is_gone() {
    let s = Setup::new();
    let run = s.trained_run("r");
    std::fs::remove_file(s.data()).unwrap();
    assert_refused(&resume(&run, &[]), 1, &["tiny.bin does not exist"]);
}

// ---- device ----

#[test]
fn cuda_requested_but_unavailable() {
    if podgpu::device::usable_gpu(0).is_ok() {
        eprintln!("skipped: a GPU is usable here");
        return;
    }
    let s = Setup::new();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--device", "cuda"],
        &["--device cuda:0 is not usable"],
    );
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--device", "gpu7"],
        &["device must be auto, cpu, cuda or cuda:N"],
    );
}

// ---- bugs ----

#[test]
fn a_panic_is_reported_as_an_internal_error_without_a_trace() {
    let o = podgpu()
        .env("PODGPU_TEST_INTERNAL_PANIC", "1")
        .args(["--help"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(101), "{err}");
    assert!(err.contains("internal error: podgpu hit a bug"), "{err}");
    assert!(err.contains("Please report it"), "{err}");
    assert!(
        !err.contains("panicked at") && !err.contains("stack backtrace"),
        "{err}"
    );
    // RUST_BACKTRACE asks for the raw report.
    let o = podgpu()
        .env("PODGPU_TEST_INTERNAL_PANIC", "1")
        .env("RUST_BACKTRACE", "1")
        .args(["--help"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(err.contains("panicked at"), "{err}");
}

// ---- issue 14: never continue from the wrong state, never overwrite what the user has ----

/// `podgpu` with `args`, killed (and the test failed) if it has not ended after `secs` seconds: a
/// FIFO or device read by mistake would block forever.
fn run_within(secs: u64, args: &[&str]) -> std::process::Output {
    let mut child = podgpu()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > secs {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("podgpu {args:?} still ran after {secs} s: {:?}", text(&o));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Every file under `dir` (not recursive) with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn output_folder_that_holds_files() {
    let s = Setup::new();
    let out = s.path("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"my notes").unwrap();
    std::fs::write(out.join("config.toml"), b"# my own settings\n").unwrap();
    std::fs::write(out.join("best.safetensors"), b"my best model").unwrap();
    let before = snapshot(&out);
    let o = s.train(&s.data(), &out, &[]);
    assert_refused(
        &o,
        1,
        &[
            "is not empty (it holds best.safetensors, config.toml, notes.txt)",
            "--overwrite",
        ],
    );
    assert_eq!(snapshot(&out), before, "a refused run changed the folder");
    // --overwrite replaces the run files and leaves the others.
    assert_ok(&s.train(&s.data(), &out, &["--overwrite"]));
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"my notes");
    assert!(load_checkpoint(&out.join("best.safetensors")).is_ok());
}

#[test]
fn stale_temp_clean_up_keeps_the_users_files() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let mine = [".notes.tmp-1", ".cifar.bin.tmp-5", ".last.tmp-1.bak"];
    for f in mine {
        std::fs::write(run.join(f), b"mine").unwrap();
    }
    std::fs::write(
        run.join(".last.podgpu-tmp-999.safetensors"),
        b"half a checkpoint",
    )
    .unwrap();
    let o = resume(&run, &["--epochs", "1"]);
    assert_ok(&o);
    assert!(
        text(&o).0.contains("removed 1 temporary file"),
        "{}",
        text(&o).0
    );
    for f in mine {
        assert_eq!(std::fs::read(run.join(f)).unwrap(), b"mine", "{f}");
    }
    assert!(!run.join(".last.podgpu-tmp-999.safetensors").exists());
}

#[test]
fn default_run_folders_of_runs_started_together_differ() {
    let s = Setup::new();
    let data = s.data();
    let start = || {
        podgpu()
            .current_dir(s.tmp.path())
            .args([
                "train",
                "resnet18",
                "--width",
                "2",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--limit-test",
                "8",
            ])
            .arg("--data")
            .arg(&data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert_ok(&o);
    }
    let runs: Vec<_> = std::fs::read_dir(s.path("runs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for r in runs {
        assert!(
            r.path().join("last.safetensors").is_file(),
            "{:?}",
            r.path()
        );
    }
}

#[test]
fn resume_with_another_dataset_at_the_recorded_path() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let original = std::fs::read(s.data()).unwrap();
    // Same name and classes, other images.
    tiny_dataset(&s.data(), 12, 3, 48, 16);
    assert_refused(
        &resume(&run, &[]),
        1,
        &[
            "is not the one this run trained on",
            "it is another dataset",
            "train 48 of 1×12×12",
        ],
    );
    // The same images, re-normalised.
    let renormalised = with_meta(&original, |m| m.mean = vec![0.5]);
    std::fs::write(s.data(), renormalised).unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &["it was re-normalised", "mean [0.5]"],
    );
    // Other labels.
    let mut relabelled = original.clone();
    let at = read_meta(&original).splits[0].labels.offset as usize;
    relabelled[at] = (relabelled[at] + 1) % 3;
    let relabelled = with_meta(&relabelled, |m| {
        m.splits[0].labels.crc32 = crc32fast::hash(&relabelled[at..at + 4 * 64])
    });
    std::fs::write(s.data(), relabelled).unwrap();
    assert_refused(&resume(&run, &[]), 1, &["it holds other labels"]);
    std::fs::write(s.data(), &original).unwrap();
    assert_ok(&resume(&run, &[]));
}

#[test]
fn resume_of_a_run_whose_dataset_moved() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let moved = s.path("moved.bin");
    std::fs::rename(s.data(), &moved).unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &["tiny.bin does not exist", "--data NEW_PATH", "same dataset"],
    );
    // Another dataset given as the moved one is refused.
    let other = s.path("other.bin");
    tiny_dataset(&other, 12, 3, 32, 16);
    assert_refused(
        &resume(&run, &["--data", other.to_str().unwrap()]),
        1,
        &["given with --data is not the one this run trained on"],
    );
    let o = resume(&run, &["--data", moved.to_str().unwrap()]);
    assert_ok(&o);
    assert!(
        text(&o).0.contains("the run's dataset moved"),
        "{}",
        text(&o).0
    );
    let cfg = podgpu::train::TrainConfig::load(&run.join("config.toml")).unwrap();
    assert_eq!(cfg.data.unwrap(), moved.canonicalize().unwrap());
    // From now on the new place is the run's.
    assert_ok(&resume(&run, &["--epochs", "3"]));
}

#[test]
fn a_relative_data_path_is_recorded_absolute() {
    let s = Setup::new();
    let here = s.path("here");
    let elsewhere = s.path("elsewhere");
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(s.data(), here.join("d.bin")).unwrap();
    // Another dataset under the same relative name in the other folder.
    tiny_dataset(&elsewhere.join("d.bin"), 12, 3, 48, 16);
    let common = [
        "--width",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--threads",
        "2",
    ];
    let o = podgpu()
        .current_dir(&here)
        .args([
            "train", "resnet18", "--epochs", "1", "--data", "d.bin", "--out", "run",
        ])
        .args(common)
        .output()
        .unwrap();
    assert_ok(&o);
    let run = here.join("run");
    let o = podgpu()
        .current_dir(&elsewhere)
        .args([
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--epochs",
            "2",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert_ok(&o);
    let ck = load_checkpoint(&run.join("last.safetensors")).unwrap();
    assert_eq!(
        ck.state.run.unwrap().dataset.path,
        here.join("d.bin").canonicalize().unwrap()
    );
    // A relative path edited into config.toml that resolves to another dataset is refused.
    let cfg_path = run.join("config.toml");
    let text_before = std::fs::read_to_string(&cfg_path).unwrap();
    let edited: String = text_before
        .lines()
        .map(|l| {
            if l.starts_with("data = ") {
                "data = \"d.bin\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&cfg_path, &edited).unwrap();
    let o = podgpu()
        .current_dir(&elsewhere)
        .args([
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--epochs",
            "3",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert_refused(
        &o,
        1,
        &[
            "the relative path d.bin resolves to",
            "named in config.toml",
        ],
    );
}

#[test]
fn resume_with_a_checkpoint_of_another_run() {
    let s = Setup::new();
    let a = s.trained_run("a");
    let b = s.trained_run("b");
    std::fs::copy(b.join("last.safetensors"), a.join("last.safetensors")).unwrap();
    assert_refused(
        &resume(&a, &[]),
        1,
        &["last.safetensors belongs to another run", "its own folder"],
    );
}

#[test]
fn resume_with_the_pedcc_of_another_run() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let pedcc = run.join("pedcc.safetensors");
    let dim = podgpu::pedcc::load(&pedcc).unwrap().dim(1).to_string();
    let o = run_within(
        60,
        &[
            "pedcc",
            "--classes",
            "3",
            "--dim",
            &dim,
            "--seed",
            "99",
            "--out",
            pedcc.to_str().unwrap(),
        ],
    );
    assert_ok(&o);
    assert_refused(
        &resume(&run, &[]),
        1,
        &[
            "pedcc.safetensors is not this run's PEDCC",
            "restore the run's own",
        ],
    );
}

#[test]
fn resume_after_hand_edits_of_config_toml() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let cfg_path = run.join("config.toml");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let edit = |from: &str, to: &str| {
        let t = original.replace(from, to);
        assert_ne!(t, original, "`{from}` not in config.toml");
        std::fs::write(&cfg_path, &t).unwrap();
        t
    };
    let edited = edit("\nlr = 0.1\n", "\nlr = 0.5\n");
    assert_refused(
        &run_within(120, &["train", "--resume", run.to_str().unwrap()]),
        1,
        &[
            "config.toml and the run's checkpoint disagree",
            "lr = 0.5 in config.toml, 0.1 in the checkpoint",
            "podgpu train --config",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&cfg_path).unwrap(),
        edited,
        "the edit was overwritten"
    );
    // epochs is one of the settings a resume may change: honoured.
    let edited = edit("\nepochs = 1\n", "\nepochs = 2\n");
    let o = run_within(
        120,
        &["train", "--resume", run.to_str().unwrap(), "--threads", "2"],
    );
    assert_ok(&o);
    assert!(text(&o).0.contains("training to epoch 2"), "{}", text(&o).0);
    assert_eq!(
        load_checkpoint(&run.join("last.safetensors"))
            .unwrap()
            .state
            .epoch,
        2
    );
    // Nothing changed on the command line: the user's file stays as written.
    assert_eq!(std::fs::read_to_string(&cfg_path).unwrap(), edited);
}

#[test]
fn resume_of_a_checkpoint_with_a_changed_header() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let ck = run.join("last.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let at = 8 + header.find(r#""epoch":"1""#).unwrap() + r#""epoch":""#.len();
    let mut edited = bytes.clone();
    edited[at] = b'0';
    std::fs::write(&ck, &edited).unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &["is corrupted or truncated", "header fails its checksum"],
    );
}

#[test]
fn resume_repairs_a_best_checkpoint_lost_in_a_crash() {
    let s = Setup::new();
    let run = s.trained_run("r");
    // A run killed after writing last.safetensors and before best.safetensors.
    std::fs::remove_file(run.join("best.safetensors")).unwrap();
    let o = resume(&run, &["--epochs", "1"]);
    assert_ok(&o);
    assert!(text(&o).0.contains("restored"), "{}", text(&o).0);
    assert_eq!(
        std::fs::read(run.join("best.safetensors")).unwrap(),
        std::fs::read(run.join("last.safetensors")).unwrap()
    );
}

#[test]
fn a_plot_that_cannot_be_written() {
    let s = Setup::new();
    let run = s.trained_run("r");
    // loss.png cannot be replaced (a folder with a file in it, as a full disk would refuse it).
    std::fs::remove_file(run.join("loss.png")).unwrap();
    std::fs::create_dir(run.join("loss.png")).unwrap();
    std::fs::write(run.join("loss.png/x"), b"x").unwrap();
    let o = resume(&run, &[]);
    assert_ok(&o);
    let (_, err) = text(&o);
    assert!(
        err.contains("warning:") && err.contains("loss.png"),
        "{err}"
    );
    assert!(
        !err.contains("Os {") && !err.contains("kind:"),
        "a debug structure: {err}"
    );
    assert_eq!(
        load_checkpoint(&run.join("last.safetensors"))
            .unwrap()
            .state
            .epoch,
        2
    );
}

#[test]
fn data_convert_never_destroys_what_the_user_has() {
    let s = Setup::new();
    let dir = s.path("idx");
    std::fs::create_dir(&dir).unwrap();
    let idx = |dims: &[u32], data: &[u8]| {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    };
    let images = dir.join("train-images-idx3-ubyte");
    let labels = dir.join("train-labels-idx1-ubyte");
    std::fs::write(&images, idx(&[4, 8, 8], &[7u8; 256])).unwrap();
    std::fs::write(&labels, idx(&[4], &[0, 1, 0, 1])).unwrap();
    let images_bytes = std::fs::read(&images).unwrap();
    let (i, l) = (images.to_str().unwrap(), labels.to_str().unwrap());
    // --out is an input.
    let o = run_within(60, &["data", "convert", i, l, "--out", i]);
    assert_refused(&o, 1, &["is one of the inputs", "choose another --out"]);
    assert_eq!(std::fs::read(&images).unwrap(), images_bytes);
    // A good dataset at --out is not replaced by one that cannot be used.
    let out = s.path("out.bin");
    assert_ok(&run_within(
        60,
        &["data", "convert", i, l, "--out", out.to_str().unwrap()],
    ));
    let good = std::fs::read(&out).unwrap();
    for (mean, std, needle) in [
        ("NaN", "0.5", "mean values must be finite"),
        ("0.5", "1e-45", "would not be finite"),
        ("0.5", "0", "std values must be finite and > 0"),
    ] {
        let o = run_within(
            60,
            &[
                "data",
                "convert",
                i,
                l,
                "--out",
                out.to_str().unwrap(),
                "--mean",
                mean,
                "--std",
                std,
            ],
        );
        assert_refused(&o, 1, &[needle]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            good,
            "--mean {mean} --std {std}"
        );
    }
    // An existing file that is not a dataset is the user's.
    let notes = s.path("notes.txt");
    std::fs::write(&notes, b"mine").unwrap();
    let o = run_within(
        60,
        &["data", "convert", i, l, "--out", notes.to_str().unwrap()],
    );
    assert_refused(&o, 1, &["exists and is not a podgpu dataset"]);
    assert_eq!(std::fs::read(&notes).unwrap(), b"mine");
}

#[test]
fn hostile_sizes_are_refused_before_allocation() {
    let s = Setup::new();
    let p = s.path("p.st");
    let p = p.to_str().unwrap();
    for (args, needles) in [
        (
            vec!["models", "--models", "resnet18", "--width", "100000000"],
            vec!["needs about", "more than this machine has", "--width"],
        ),
        (
            vec!["models", "--models", "resnet18", "--image-size", "1000000"],
            vec!["needs about", "--image-size"],
        ),
        (
            vec![
                "models",
                "--models",
                "resnet18",
                "--feature-dim",
                "100000000000",
            ],
            vec!["needs about", "--feature-dim"],
        ),
        (
            vec!["pedcc", "--classes", "100000000", "--dim", "2", "--out", p],
            vec!["a PEDCC of 100000000 classes in 2 dimensions needs about"],
        ),
        (
            vec![
                "pedcc",
                "--classes",
                "3",
                "--dim",
                "18446744073709551615",
                "--out",
                p,
            ],
            vec!["needs about", "--dim"],
        ),
    ] {
        let o = run_within(60, &args);
        assert_refused(&o, 1, &needles);
        // A refused size prints its error alone, not under a table header.
        if args[0] == "models" {
            assert!(o.stdout.is_empty(), "{args:?} printed {:?}", text(&o).0);
        }
    }
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--width", "100000000"],
        &["needs about", "--width"],
    );
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--feature-dim", "100000000000"],
        &["needs about", "--feature-dim"],
    );
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--width", "100000000", "--loss", "softmax"],
        &["needs about"],
    );
    // A PEDCC file of 2 million classes (16 MB) would need its 2M × 2M inner products.
    let big = s.path("big.safetensors");
    let k = 2_000_000usize;
    let data: Vec<u8> = (0..k)
        .flat_map(|i| {
            let a = i as f32 * 1e-6;
            [a.cos(), a.sin()]
        })
        .flat_map(f32::to_le_bytes)
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![k, 2], &data).unwrap();
    safetensors::serialize_to_file([("pedcc", view)], None, &big).unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--pedcc", big.to_str().unwrap(), "--feature-dim", "2"],
        &["a PEDCC of 2000000 classes in 2 dimensions needs about"],
    );
}

#[cfg(unix)]
#[test]
fn decompression_is_bounded_by_the_size_the_header_announces() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let s = Setup::new();
    let dir = s.path("bomb");
    std::fs::create_dir(&dir).unwrap();
    // A header announcing 4 images of 8×8, followed by 4 GB of zeros: gzip members of 64 MiB of
    // zeros each (about 64 KB compressed), concatenated.
    let mut head = vec![0u8, 0, 8, 3];
    for d in [4u32, 8, 8] {
        head.extend_from_slice(&d.to_be_bytes());
    }
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let zeros = gz(&vec![0u8; 64 << 20]);
    let mut f = std::fs::File::create(dir.join("train-images-idx3-ubyte.gz")).unwrap();
    f.write_all(&gz(&head)).unwrap();
    for _ in 0..64 {
        f.write_all(&zeros).unwrap();
    }
    drop(f);
    let mut labels = vec![0u8, 0, 8, 1, 0, 0, 0, 4];
    labels.extend_from_slice(&[0, 1, 0, 1]);
    // Not gzipped, whatever the name says (gzip is told by its magic bytes).
    std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), labels).unwrap();
    let mut cmd = podgpu();
    cmd.args([
        "data",
        "convert",
        dir.to_str().unwrap(),
        "--out",
        s.path("o.bin").to_str().unwrap(),
    ]);
    // SAFETY: setrlimit in the child before exec: 2 GiB of address space, half of the bomb.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_refused(&o, 1, &["holds more data", "[4, 8, 8]"]);
}

#[test]
fn an_image_that_announces_a_huge_size() {
    let s = Setup::new();
    let root = s.path("imgs");
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        image::GrayImage::from_pixel(4, 4, image::Luma([9]))
            .save(root.join(class).join("ok.png"))
            .unwrap();
    }
    // A valid PNG header that announces 60000×60000 pixels, in a few hundred bytes.
    let mut png = std::fs::read(root.join("a/ok.png")).unwrap();
    png[16..20].copy_from_slice(&60000u32.to_be_bytes());
    png[20..24].copy_from_slice(&60000u32.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(root.join("b/bomb.png"), png).unwrap();
    let o = run_within(
        60,
        &[
            "data",
            "convert",
            root.to_str().unwrap(),
            "--out",
            s.path("o.bin").to_str().unwrap(),
        ],
    );
    assert_refused(
        &o,
        1,
        &["bomb.png is 60000×60000 pixels", "more than podgpu decodes"],
    );
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_at_once() {
    let s = Setup::new();
    let fifo = s.path("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let o = run_within(
        60,
        &[
            "train",
            "resnet18",
            "--device",
            "cpu",
            "--data",
            f,
            "--out",
            s.path("run").to_str().unwrap(),
        ],
    );
    assert_refused(&o, 1, &["a named pipe (FIFO), not a regular file"]);
    assert!(!s.path("run").exists());
    for args in [
        vec!["eval", "--checkpoint", f, "--device", "cpu"],
        vec!["eval", "--checkpoint", "/dev/zero", "--device", "cpu"],
        vec!["data", "verify", f],
        vec!["data", "verify", "/dev/zero"],
        vec!["train", "--config", f, "--device", "cpu"],
    ] {
        let o = run_within(60, &args);
        assert_refused(&o, 1, &["not a regular file"]);
    }
    // The run folder's lock file replaced by a FIFO.
    let run = s.trained_run("r");
    std::fs::remove_file(run.join(".lock")).unwrap();
    mkfifo(&run.join(".lock"));
    let o = run_within(60, &["train", "--resume", run.to_str().unwrap()]);
    assert_refused(&o, 1, &[".lock is not a regular file"]);
}

#[test]
fn non_finite_weights_in_a_checkpoint() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let ck = run.join("last.safetensors");
    // NaN in fc.weight, with every checksum consistent (as a diverged run's file would be).
    {
        use podgpu::train::checkpoint::{header_checksum, HEADER_CHECKSUM};
        let bytes = std::fs::read(&ck).unwrap();
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
        let fc = tensors.iter_mut().find(|t| t.0 == "fc.weight").unwrap();
        fc.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let sums: std::collections::BTreeMap<&str, String> = tensors
            .iter()
            .map(|(n, _, _, d)| (n.as_str(), format!("{:08x}", crc32fast::hash(d))))
            .collect();
        meta.insert("checksums".into(), serde_json::to_string(&sums).unwrap());
        let sum = header_checksum(
            &meta,
            tensors
                .iter()
                .map(|(n, d, s, _)| (n.as_str(), *d, s.as_slice())),
        );
        meta.insert(HEADER_CHECKSUM.into(), serde_json::to_string(&sum).unwrap());
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, sh, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(&ck, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    }
    let needles = ["holds non-finite values", "`fc.weight` holds 1 NaN"];
    assert_refused(&resume(&run, &[]), 1, &needles);
    let o = run_within(
        120,
        &[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    assert_refused(&o, 1, &needles);
}

#[test]
fn eval_of_a_damaged_dataset() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let p = s.damaged("flipped.bin", |b| {
        let at = read_meta(b).splits[1].pixels.offset as usize + 10;
        b[at] ^= 0x40;
    });
    let o = run_within(
        120,
        &[
            "eval",
            "--checkpoint",
            run.join("last.safetensors").to_str().unwrap(),
            "--data",
            p.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    assert_refused(&o, 1, &["failed its checksum", "split 'test' pixels"]);
}

#[test]
fn degenerate_pedccs() {
    let s = Setup::new();
    let o = run_within(
        60,
        &[
            "pedcc",
            "--classes",
            "3",
            "--dim",
            "1",
            "--out",
            s.path("p.st").to_str().unwrap(),
        ],
    );
    assert_refused(
        &o,
        1,
        &["is degenerate", "coincide", "could not be told apart"],
    );
    assert!(!s.path("p.st").exists());
    // A file with two identical rows.
    let f = s.path("twins.safetensors");
    let rows: [[f32; 2]; 3] = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]];
    let data: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 2], &data).unwrap();
    safetensors::serialize_to_file([("pedcc", view)], None, &f).unwrap();
    assert_fresh_refused(
        &s,
        &s.data(),
        &["--pedcc", f.to_str().unwrap(), "--feature-dim", "2"],
        &["is degenerate: centroids 1 and 2 coincide"],
    );
}

#[test]
fn threads_beyond_the_cores_are_capped() {
    let s = Setup::new();
    let o = s.train(&s.data(), &s.path("run"), &["--threads", "4096"]);
    assert_ok(&o);
    assert!(
        text(&o).0.contains("note: --threads 4096 is more than the"),
        "{}",
        text(&o).0
    );
}

#[test]
fn decoder_errors_are_said_once() {
    let s = Setup::new();
    let root = s.path("imgs");
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        image::GrayImage::from_pixel(4, 4, image::Luma([9]))
            .save(root.join(class).join("ok.png"))
            .unwrap();
    }
    // A PNG of 4×4 RGB pixels whose compressed data holds one row only.
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc32fast::hash(&c[4..]).to_be_bytes());
        c
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&4u32.to_be_bytes());
    ihdr.extend_from_slice(&4u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &[0u8; 13]).unwrap();
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &z.finish().unwrap()));
    png.extend(chunk(b"IEND", &[]));
    std::fs::write(root.join("b/cut.png"), png).unwrap();
    let o = run_within(
        60,
        &[
            "data",
            "convert",
            root.to_str().unwrap(),
            "--out",
            s.path("o.bin").to_str().unwrap(),
        ],
    );
    let err = assert_refused(&o, 1, &["cannot decode image", "cut.png"]);
    let line = err.lines().next().unwrap();
    let tail = line.rsplit(": ").next().unwrap();
    assert_eq!(line.matches(tail).count(), 1, "said twice: {line}");
    assert!(
        !err.contains("{ ") && !err.contains("Os {"),
        "a debug structure: {err}"
    );
}

#[test]
fn suggested_commands_quote_paths() {
    let s = Setup::new();
    let run = s.trained_run("my run");
    let o = s.train(&s.data(), &run, &[]);
    let quoted = format!("podgpu train --resume '{}'", run.display());
    assert_refused(&o, 1, &["already holds a run", &quoted]);
}

#[test]
fn following_the_advice_for_a_damaged_checkpoint() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let ck = run.join("last.safetensors");
    let mut bytes = std::fs::read(&ck).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    std::fs::write(&ck, &bytes).unwrap();
    let err = assert_refused(&resume(&run, &[]), 1, &["is corrupted or truncated", "cp "]);
    // The advice is two commands in backquotes: run them as they are.
    let cmds: Vec<&str> = err.split('`').skip(1).step_by(2).collect();
    let cp = cmds
        .iter()
        .find(|c| c.starts_with("cp "))
        .expect("a cp command");
    let resume_cmd = cmds
        .iter()
        .find(|c| c.starts_with("podgpu train --resume"))
        .unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cp)
        .status()
        .unwrap();
    assert!(status.success(), "{cp}");
    let args: Vec<String> = shell_words(resume_cmd);
    let mut all: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    all.extend(["--threads", "2", "--epochs", "2"]);
    assert_ok(&run_within(120, &all));
}

/// Splits a simple command line (words, single quotes) as a shell would.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn resume_with_a_damaged_metrics_line() {
    let s = Setup::new();
    let run = s.trained_run("r");
    let m = run.join("metrics.jsonl");
    let text_before = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, format!("{{\"epoch\": oops\n{text_before}")).unwrap();
    assert_refused(
        &resume(&run, &[]),
        1,
        &[
            "metrics.jsonl line 1 is not a valid record",
            "fix or delete that line",
            "podgpu train --resume",
        ],
    );
}

#[test]
fn a_fixture_with_a_huge_base_width() {
    let s = Setup::new();
    let f = s.path("model.safetensors");
    let image = vec![0u8; 4 * 3 * 8 * 8];
    let label = 0f32.to_le_bytes();
    let meta: std::collections::HashMap<String, String> = [
        ("format", "podgpu-fixture"),
        ("kind", "model"),
        ("model", "resnet18"),
        ("base_width", "100000000"),
        ("classes", "2"),
        ("feature_dim", "2"),
        ("loss", "softmax"),
        ("batch", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let views = vec![
        (
            "input.image",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 3, 8, 8], &image)
                .unwrap(),
        ),
        (
            "input.labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &label).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, Some(meta), &f).unwrap();
    let o = run_within(60, &["fidelity", f.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        (out.clone() + &err).contains("needs about") && (out.clone() + &err).contains("base_width"),
        "{out}{err}"
    );
    for bad in ["panicked", "memory allocation", "internal error"] {
        assert!(!err.contains(bad), "{err}");
    }
}
