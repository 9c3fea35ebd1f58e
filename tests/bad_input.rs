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

fn resume(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--threads",
        "2",
    ];
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
        &["only --epochs, --device, --threads and --detect-anomaly"],
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
