//! `podgpu compare --losses softmax,pod,... [--models m1,m2] --data FILE [train flags]`: trains every
//! (network, loss) contestant with the identical recipe and seed, one run folder each
//! (`RUN_ROOT/<model>-<loss>/`, RUN_ROOT = `--out`), then writes `comparison.md`, `comparison.csv` and
//! `comparison.png` (all test-accuracy curves on one plot, the paper's Fig. 4) into RUN_ROOT. The tables
//! are rewritten after every contestant, so an interrupted comparison keeps what finished.

use crate::cli::train as train_cli;
use crate::data::Dataset;
use crate::nn::MODEL_NAMES;
use crate::train::config::{LossKind, TrainConfig};
use crate::train::metrics::{read_jsonl, EpochRecord, JSONL_FILE};
use crate::train::plot::plot_curves;
use crate::train::trainer;
use crate::train::write_atomic;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[group(id = "compare")]
pub struct Args {
    /// Losses to compare, comma-separated: softmax, center, am-softmax, arcface, combined-margin, cot,
    /// pedcc-loss, cosine, nac, pod.
    #[arg(long, value_delimiter = ',', required = true)]
    pub losses: Vec<LossKind>,
    /// Networks to compare, comma-separated (default: MODEL if given, else resnet50).
    #[arg(long, value_delimiter = ',', alias = "model")]
    pub models: Option<Vec<String>>,
    /// The recipe shared by every contestant: any `podgpu train` flag; --out is the folder that gets
    /// one run folder per contestant and the comparison (default runs/compare-TIMESTAMP).
    #[command(flatten)]
    pub train: train_cli::Args,
}

/// The paper's test accuracies (%) for ResNet50 (DESIGN.md §1.8; the paper's Table IV), by dataset
/// key (see `dataset_key`) and loss. Table IV's other losses and Table VII (DenseNet121, MobileNetV2)
/// are not in the design notes, so those contestants get no paper figure.
pub const PAPER_ACCURACY: &[(&str, LossKind, f64)] = &[
    ("cifar10", LossKind::Softmax, 93.25),
    ("cifar10", LossKind::Pod, 94.31),
    ("cifar100", LossKind::Softmax, 76.42),
    ("cifar100", LossKind::Pod, 79.17),
    ("tinyimagenet", LossKind::Softmax, 62.10),
    ("tinyimagenet", LossKind::Pod, 64.58),
    ("facescrub", LossKind::Softmax, 91.04),
    ("facescrub", LossKind::Pod, 95.22),
];

/// The paper's dataset a dataset name refers to (`cifar10-small` → `cifar10`), if any.
pub fn dataset_key(name: &str) -> Option<&'static str> {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    // cifar100 before cifar10: the one is a prefix of the other.
    ["cifar100", "cifar10", "tinyimagenet", "facescrub"]
        .into_iter()
        .find(|k| n.starts_with(k))
}

/// The paper's accuracy (%) for a loss on a dataset, when it has one.
pub fn paper_accuracy(dataset: &str, loss: LossKind) -> Option<f64> {
    let key = dataset_key(dataset)?;
    PAPER_ACCURACY
        .iter()
        .find(|(d, l, _)| *d == key && *l == loss)
        .map(|(_, _, a)| *a)
}

/// One contestant and how it did.
#[derive(Clone, Debug)]
pub struct Contestant {
    pub model: String,
    pub loss: LossKind,
    pub run_dir: PathBuf,
    pub records: Vec<EpochRecord>,
    /// Why the run stopped, when it failed.
    pub error: Option<String>,
}

impl Contestant {
    fn label(&self, several_models: bool) -> String {
        if several_models {
            format!("{} {}", self.model, self.loss)
        } else {
            self.loss.to_string()
        }
    }

    fn final_acc(&self) -> Option<f64> {
        self.records.iter().rev().find_map(|r| r.test_acc)
    }

    /// (best accuracy, its epoch).
    fn best(&self) -> Option<(f64, usize)> {
        self.records
            .iter()
            .filter_map(|r| r.test_acc.filter(|a| a.is_finite()).map(|a| (a, r.epoch)))
            .fold(None, |best, (a, e)| match best {
                Some((b, _)) if b >= a => best,
                _ => Some((a, e)),
            })
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.train.loss.is_some() {
        bail!("compare takes the losses as --losses LIST (e.g. --losses softmax,pod), not --loss");
    }
    if a.train.resume.is_some() {
        bail!("compare cannot --resume; resume a single contestant with `podgpu train --resume RUN_DIR`");
    }
    let mut losses = Vec::new();
    for l in &a.losses {
        if !losses.contains(l) {
            losses.push(*l);
        }
    }
    let base = train_cli::resolve(&a.train)?;
    let models: Vec<String> = match &a.models {
        Some(m) => m.iter().map(|s| s.trim().to_string()).collect(),
        None => vec![base.model.clone()],
    };
    for m in &models {
        if !MODEL_NAMES.contains(&m.as_str()) {
            bail!("unknown model `{m}`; podgpu has {}", MODEL_NAMES.join(", "));
        }
    }
    let root = base.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("runs").join(format!("compare-{}", trainer::timestamp(secs)))
    });
    let data = base
        .data
        .clone()
        .unwrap_or_else(crate::data::default_dataset_path);
    let dataset = Dataset::open(&data).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dataset_name = dataset.name().to_string();
    drop(dataset);

    // Every contestant's config, checked before anything trains.
    let mut plan = Vec::new();
    for m in &models {
        for &l in &losses {
            let cfg = TrainConfig {
                model: m.clone(),
                loss: l,
                data: Some(data.clone()),
                out: Some(root.join(format!("{m}-{l}"))),
                ..base.clone()
            };
            cfg.validate()?;
            let dir = cfg.out.clone().expect("set above");
            if dir.join("last.safetensors").exists() {
                bail!(
                    "{} already holds a run; choose another --out for the comparison (or remove it)",
                    dir.display()
                );
            }
            plan.push(cfg);
        }
    }
    // A default name gets a suffix when another comparison started in the same second.
    let created = if base.out.is_none() {
        crate::train::run_dir::create_unique(&root)
    } else {
        std::fs::create_dir_all(&root).map(|_| root.clone())
    };
    let root = created.with_context(|| {
        format!(
            "could not create {}; choose a writable --out",
            root.display()
        )
    })?;
    for cfg in &mut plan {
        let name = cfg
            .out
            .as_ref()
            .and_then(|o| o.file_name())
            .map(PathBuf::from);
        cfg.out = name.map(|n| root.join(n));
    }
    println!(
        "comparing {} contestants on {} ({}) in {}",
        plan.len(),
        data.display(),
        dataset_name,
        root.display()
    );
    let mut done: Vec<Contestant> = Vec::new();
    for cfg in plan {
        println!("\n=== {} with {} ===", cfg.model, cfg.loss);
        let run_dir = cfg.out.clone().expect("set above");
        let (model, loss) = (cfg.model.clone(), cfg.loss);
        let error = match trainer::train(cfg) {
            Ok(_) => None,
            Err(e) => {
                eprintln!("warning: {model} with {loss} failed: {e:#}");
                Some(format!("{e:#}"))
            }
        };
        let records = read_jsonl(&run_dir.join(JSONL_FILE)).unwrap_or_default();
        done.push(Contestant {
            model,
            loss,
            run_dir,
            records,
            error,
        });
        write_comparison(&root, &dataset_name, &base, &done)?;
    }
    println!(
        "\ncomparison: {}, {} and {}",
        root.join("comparison.md").display(),
        root.join("comparison.csv").display(),
        root.join("comparison.png").display()
    );
    print!(
        "{}",
        std::fs::read_to_string(root.join("comparison.md")).unwrap_or_default()
    );
    let failed: Vec<String> = done
        .iter()
        .filter(|c| c.error.is_some())
        .map(|c| format!("{} {}", c.model, c.loss))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} contestant(s) failed: {} (see the table)",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |a| format!("{:.2}", 100.0 * a))
}

/// Writes comparison.md, comparison.csv and comparison.png into `root`.
pub fn write_comparison(
    root: &Path,
    dataset: &str,
    recipe: &TrainConfig,
    done: &[Contestant],
) -> Result<()> {
    let several_models = done.iter().any(|c| c.model != done[0].model);
    let mut md = String::new();
    let mut csv = String::from(
        "model,loss,final_test_acc,best_test_acc,best_epoch,epochs,final_train_loss,paper_resnet50_acc,status\n",
    );
    let _ = writeln!(md, "# Loss comparison on {dataset}\n");
    let _ = writeln!(
        md,
        "Identical recipe for every contestant: {} epochs, batch {}, lr {} (×{} at {:?}), momentum {}, \
         weight decay {}, seed {}, width {}, feature dim {}{}.\n",
        recipe.epochs,
        recipe.batch_size,
        recipe.lr,
        recipe.gamma,
        recipe.milestones,
        recipe.momentum,
        recipe.weight_decay,
        recipe.seed,
        recipe.width,
        recipe.feature_dim.map_or("by class count".into(), |d| d.to_string()),
        recipe
            .limit_train
            .map_or(String::new(), |n| format!(", first {n} training images")),
    );
    let _ = writeln!(
        md,
        "| model | loss | final test acc % | best test acc % (epoch) | paper, ResNet50 % | run |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for c in done {
        let paper = paper_accuracy(dataset, c.loss);
        let best = c.best();
        let status = match &c.error {
            Some(e) => format!("failed: {}", e.lines().next().unwrap_or("")),
            None => "ok".into(),
        };
        let run = c
            .run_dir
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {} | {} | {} |",
            c.model,
            c.loss.paper_name(),
            pct(c.final_acc()),
            if c.error.is_some() { " (failed)" } else { "" },
            best.map_or("-".into(), |(a, e)| format!("{:.2} ({e})", 100.0 * a)),
            paper.map_or("-".into(), |p| format!("{p:.2}")),
            run
        );
        let last = c.records.last();
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},\"{}\"",
            c.model,
            c.loss,
            c.final_acc().map_or(String::new(), |a| format!("{a:.6}")),
            best.map_or(String::new(), |(a, _)| format!("{a:.6}")),
            best.map_or(String::new(), |(_, e)| e.to_string()),
            last.map_or(0, |r| r.epoch),
            last.map_or(String::new(), |r| format!("{:.6}", r.train_loss)),
            paper.map_or(String::new(), |p| format!("{:.2}", p / 100.0)),
            status.replace('"', "'")
        );
    }
    let _ = writeln!(
        md,
        "\nThe paper's figures are ResNet50 trained 100 epochs on the full dataset (DESIGN.md §1.8, \
         Table IV); on another network, a subset or a shorter run compare the ranking, not the values."
    );
    for c in done.iter().filter(|c| c.error.is_some()) {
        let _ = writeln!(
            md,
            "\n{} with {} failed: {}",
            c.model,
            c.loss,
            c.error.as_deref().unwrap_or("")
        );
    }
    write_atomic(&root.join("comparison.md"), md.as_bytes())?;
    write_atomic(&root.join("comparison.csv"), csv.as_bytes())?;
    let series: Vec<(String, Vec<(f64, f64)>)> = done
        .iter()
        .map(|c| {
            let pts = c
                .records
                .iter()
                .filter_map(|r| r.test_acc.map(|a| (r.epoch as f64, 100.0 * a)))
                .collect();
            (c.label(several_models), pts)
        })
        .collect();
    plot_curves(
        &root.join("comparison.png"),
        &format!("Test accuracy on {dataset}"),
        "epoch",
        "test accuracy (%)",
        &series,
    )
}
