//! The zoo's commands end to end: `podgpu models` lists every network, `podgpu compare` writes the table,
//! CSV and plot with the paper's figures, `podgpu visualize` writes the latent-feature picture; and the
//! loss flags reach the configuration.

use podgpu::cli::compare::{dataset_key, paper_accuracy};
use podgpu::cli::train::{resolve, Args as TrainArgs};
use podgpu::nn::MODEL_NAMES;
use podgpu::train::config::{LossKind, TrainConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn podgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podgpu"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("podgpu runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dataset(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(name)
        .display()
        .to_string()
}

/// A PNG of the given size, judged from its header.
fn assert_png(path: &Path, width: u32, height: u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (width, height));
    assert!(
        bytes.len() > 10_000,
        "{} is nearly empty ({} bytes)",
        path.display(),
        bytes.len()
    );
}

#[test]
fn models_lists_every_network_with_its_size() {
    let o = podgpu(&[
        "models",
        "--image-size",
        "8",
        "--width",
        "8",
        "--classes",
        "4",
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for m in MODEL_NAMES {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(m))
            .unwrap_or_else(|| panic!("{m} missing from:\n{out}"));
        assert!(line.contains(" M ") && line.ends_with(" G"), "{line}");
    }
    let o = podgpu(&["models", "--models", "resnet51"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("unknown model `resnet51`"),
        "{}",
        text(&o)
    );
}

#[test]
fn compare_writes_the_table_the_csv_and_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cmp");
    let data = dataset("cifar10-small.bin");
    let o = podgpu(&[
        "compare",
        "--losses",
        "softmax,pod",
        "--models",
        "smallcnn",
        "--data",
        &data,
        "--epochs",
        "1",
        "--limit-train",
        "96",
        "--limit-test",
        "64",
        "--batch-size",
        "32",
        "--width",
        "16",
        "--feature-dim",
        "32",
        "--device",
        "cpu",
        "--out",
        root.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for run in ["smallcnn-softmax", "smallcnn-pod"] {
        assert!(
            root.join(run).join("last.safetensors").is_file(),
            "{run} has no checkpoint"
        );
    }
    let md = std::fs::read_to_string(root.join("comparison.md")).unwrap();
    assert!(
        md.contains("| smallcnn | Softmax Loss |") && md.contains("| smallcnn | POD Loss |"),
        "{md}"
    );
    // The paper's CIFAR-10 ResNet50 figures stand beside the contestants.
    assert!(md.contains("| 93.25 |") && md.contains("| 94.31 |"), "{md}");
    let csv = std::fs::read_to_string(root.join("comparison.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("model,loss,final_test_acc,best_test_acc"));
    for (line, loss) in lines[1..].iter().zip(["softmax", "pod"]) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!((cells[0], cells[1]), ("smallcnn", loss));
        let acc: f64 = cells[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{line}");
        assert!(line.ends_with("\"ok\""), "{line}");
    }
    assert_png(&root.join("comparison.png"), 960, 600);

    // Running again into the same folder is refused before anything trains.
    let o = podgpu(&[
        "compare",
        "--losses",
        "softmax",
        "--models",
        "smallcnn",
        "--data",
        &data,
        "--out",
        root.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("already holds a run"),
        "{}",
        text(&o)
    );
    let o = podgpu(&[
        "compare", "--losses", "softmax", "--loss", "pod", "--data", &data,
    ]);
    assert!(
        !o.status.success() && text(&o).contains("--losses"),
        "{}",
        text(&o)
    );
}

#[test]
fn visualize_draws_the_latent_features() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vis");
    let o = podgpu(&[
        "visualize",
        "--loss",
        "pod",
        "--epochs",
        "1",
        "--limit-train",
        "96",
        "--width",
        "16",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_png(&out.join("latent.png"), 900, 960);
    let ds = podgpu::data::Dataset::open(out.join("mnist-small-0-4.bin")).unwrap();
    assert_eq!(ds.num_classes(), 5);
    let labels = ds.split("test").unwrap().labels();
    assert!(labels.iter().all(|&l| l < 5) && labels.len() > 200);
    // Five classes in two dimensions: the repulsion PEDCC.
    let p = podgpu::pedcc::load(&out.join("run/pedcc.safetensors")).unwrap();
    assert_eq!(p.shape(), &[5, 2]);
    let o = podgpu(&[
        "visualize",
        "--feature-dim",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("2-D"),
        "{}",
        text(&o)
    );
}

#[test]
fn loss_flags_reach_the_configuration() {
    let a = TrainArgs {
        loss: Some(LossKind::CombinedMargin),
        margin_scale: Some(16.0),
        cm_m1: Some(1.0),
        pedcc_root: Some(2.0),
        center_alpha: Some(0.25),
        ..TrainArgs::default()
    };
    let c = resolve(&a).unwrap();
    assert_eq!(
        (c.loss, c.margin_scale, c.cm_m1, c.cm_m2),
        (LossKind::CombinedMargin, 16.0, 1.0, 0.4)
    );
    assert_eq!(
        (c.pedcc_root, c.center_alpha, c.am_margin),
        (2.0, 0.25, 0.35)
    );
    let bad = TrainArgs {
        center_alpha: Some(1.5),
        ..TrainArgs::default()
    };
    assert!(resolve(&bad)
        .unwrap_err()
        .to_string()
        .contains("center_alpha"));
    // Every loss name round-trips through a config file, and the defaults are the paper's values.
    for l in LossKind::ALL {
        let c = TrainConfig::from_toml_str(&format!("loss = \"{l}\"\n")).unwrap();
        assert_eq!(c.loss, l);
        assert_eq!(l.name().parse::<LossKind>().unwrap(), l);
    }
    let d = TrainConfig::default();
    assert_eq!(
        (d.am_margin, d.arc_margin, d.pedcc_margin),
        (0.35, 0.5, 0.5)
    );
    assert_eq!((d.cm_m1, d.cm_m2, d.cm_m3), (0.9, 0.4, 0.15));
    assert_eq!((d.center_lambda, d.center_alpha), (0.003, 0.5));
}

#[test]
fn paper_figures_are_found_by_dataset_name() {
    assert_eq!(dataset_key("cifar10-small"), Some("cifar10"));
    assert_eq!(dataset_key("CIFAR-100"), Some("cifar100"));
    assert_eq!(dataset_key("tiny-imagenet-200"), Some("tinyimagenet"));
    assert_eq!(dataset_key("mnist-small"), None);
    assert_eq!(paper_accuracy("cifar100", LossKind::Pod), Some(79.17));
    assert_eq!(paper_accuracy("facescrub", LossKind::Softmax), Some(91.04));
    assert_eq!(paper_accuracy("cifar10", LossKind::Arcface), None);
}

#[test]
fn eval_reloads_the_heads_and_buffers_of_the_baselines() {
    // The cosine head (ArcFace) and the Center Loss centres come back from a checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let data = dataset("mnist-small.bin");
    for loss in ["arcface", "center"] {
        let run = dir.path().join(loss);
        let o = podgpu(&[
            "train",
            "smallcnn",
            "--data",
            &data,
            "--loss",
            loss,
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--limit-test",
            "32",
            "--batch-size",
            "32",
            "--width",
            "8",
            "--feature-dim",
            "16",
            "--device",
            "cpu",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let ckpt = run.join("last.safetensors");
        let o = podgpu(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let t = text(&o);
        assert!(
            o.status.success() && t.contains("accuracy") && t.contains(loss),
            "{t}"
        );
    }
}
