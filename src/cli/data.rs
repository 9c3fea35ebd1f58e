//! `podgpu data convert|verify|info`: make, check and describe dataset files.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::data::convert::{self, ConvertOptions, Fit, LabelKind, Norm, SourceFormat};
use crate::data::{write_dataset, Dataset};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand)]
// Parsed once per process: the size of the convert variant does not matter.
#[allow(clippy::large_enum_variant)]
enum DataCommand {
    /// Convert CIFAR, MNIST or an image-folder tree into a podgpu dataset file (.bin)
    Convert(ConvertArgs),
    /// Check every checksum of a dataset file
    Verify {
        /// The dataset file
        file: PathBuf,
    },
    /// Describe a dataset file: classes, splits, image sizes, normalisation
    Info {
        /// The dataset file
        file: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Source files or folders (a folder stands for the files in it; image-folder takes one root folder)
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output dataset file
    #[arg(long, short)]
    out: PathBuf,
    /// Source format; detected from the file names when omitted (see datasets/README.md)
    #[arg(long, value_enum)]
    from: Option<SourceFormat>,
    /// Normalisation: auto (CIFAR presets, else computed), computed (from the train split), or a preset:
    /// cifar10, cifar100, imagenet, mnist
    #[arg(long, default_value = "auto")]
    norm: String,
    /// Per-channel mean on the [0,1] scale, e.g. 0.5,0.5,0.5 (needs --std; overrides --norm)
    #[arg(long, value_delimiter = ',', requires = "std")]
    mean: Option<Vec<f32>>,
    /// Per-channel std on the [0,1] scale (needs --mean)
    #[arg(long, value_delimiter = ',', requires = "mean")]
    std: Option<Vec<f32>>,
    /// Keep only the first N train images
    #[arg(long)]
    max_train: Option<usize>,
    /// Keep only the first N test images
    #[arg(long)]
    max_test: Option<usize>,
    /// Dataset name stored in the file
    #[arg(long)]
    name: Option<String>,
    /// CIFAR-100 labels: fine (100 classes) or coarse (20)
    #[arg(long, value_enum, default_value = "fine")]
    labels: LabelKind,
    /// Image folders: resize every image to HxW (e.g. 64x64)
    #[arg(long, value_parser = parse_size)]
    size: Option<(usize, usize)>,
    /// Image folders: how to reach --size
    #[arg(long, value_enum, default_value = "stretch")]
    fit: Fit,
    /// Image folders: store one grey channel instead of RGB
    #[arg(long)]
    grayscale: bool,
    /// Image folders without train/ and test/ subfolders: fraction of each class put in the test split
    #[arg(long, default_value_t = 0.0)]
    test_fraction: f64,
    /// Seed of the --test-fraction selection
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Image folders: keep only the first N classes in sorted folder order (the paper's
    /// ImageNet(N): ImageNet's first 100, 500 or 1000 classes)
    #[arg(long)]
    classes: Option<usize>,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("size '{s}' must look like HxW, e.g. 64x64"))?;
    let h: usize = h
        .trim()
        .parse()
        .map_err(|_| format!("bad height in '{s}'"))?;
    let w: usize = w
        .trim()
        .parse()
        .map_err(|_| format!("bad width in '{s}'"))?;
    if h == 0 || w == 0 || h > 8192 || w > 8192 {
        return Err(format!("size '{s}' must be between 1x1 and 8192x8192"));
    }
    Ok((h, w))
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        DataCommand::Convert(a) => run_convert(a),
        DataCommand::Verify { file } => run_verify(&file),
        DataCommand::Info { file, json } => run_info(&file, json),
    }
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    let norm = match (&a.mean, &a.std) {
        (Some(mean), Some(std)) => Norm::Fixed {
            mean: mean.clone(),
            std: std.clone(),
        },
        _ => match a.norm.as_str() {
            "auto" => Norm::Auto,
            "computed" => Norm::Computed,
            name if convert::norm_preset(name).is_some() => Norm::Preset(name.to_string()),
            name => bail!(
                "unknown --norm '{name}'; use auto, computed, cifar10, cifar100, imagenet or mnist"
            ),
        },
    };
    if !(0.0..1.0).contains(&a.test_fraction) {
        bail!("--test-fraction must be in [0, 1), got {}", a.test_fraction);
    }
    if let Norm::Fixed { mean, std } = &norm {
        if let Some(problem) = crate::data::format::normalisation_problem(mean, std) {
            bail!("--mean/--std: {problem}");
        }
    }
    check_out_path(&a.out, &a.inputs)?;
    let mut opts = ConvertOptions::new(a.inputs);
    opts.format = a.from;
    opts.label_kind = a.labels;
    opts.norm = norm;
    opts.max_train = a.max_train;
    opts.max_test = a.max_test;
    opts.name = a.name;
    opts.folder.size = a.size;
    opts.folder.fit = a.fit;
    opts.folder.grayscale = a.grayscale;
    opts.folder.test_fraction = a.test_fraction;
    opts.folder.classes = a.classes;
    opts.folder.split_seed = a.split_seed;
    let (format, spec) = convert::convert(&opts)?;
    if !spec.splits.iter().any(|s| s.name == "test") {
        eprintln!(
            "note: the dataset has no 'test' split; for an image folder without train/ and test/, pass --test-fraction"
        );
    }
    write_dataset(&a.out, &spec)?;
    // Re-open what was written: the same checks every reader does, plus the checksums.
    let ds = Dataset::open(&a.out).context("the file just written does not open")?;
    ds.verify_all()?;
    println!("converted {} → {}", format.name(), a.out.display());
    print_info(&ds);
    Ok(())
}

/// Whether two paths name the same file (same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        a.canonicalize()
            .ok()
            .is_some_and(|x| b.canonicalize().ok() == Some(x))
    }
}

/// `--out` must not be one of the inputs (the conversion would replace the source data), nor an
/// existing file that is not a podgpu dataset (it is the user's, not ours to replace).
fn check_out_path(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if out.is_dir() {
        bail!(
            "--out {} is a folder; give the dataset file to write, e.g. {}",
            out.display(),
            out.join("data.bin").display()
        );
    }
    for input in inputs {
        let files: Vec<PathBuf> = if input.is_dir() {
            std::fs::read_dir(input)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        } else {
            vec![input.clone()]
        };
        if let Some(f) = files.iter().find(|f| same_file(f, out)) {
            bail!(
                "--out {} is one of the inputs ({}); the conversion would replace the source \
                 data: choose another --out",
                out.display(),
                f.display()
            );
        }
    }
    let mut head = [0u8; 8];
    let is_dataset = crate::fsutil::open_regular(out)
        .and_then(|mut f| {
            use std::io::Read;
            f.read_exact(&mut head)
        })
        .is_ok()
        && head == crate::data::format::MAGIC;
    if !is_dataset {
        bail!(
            "--out {} exists and is not a podgpu dataset; podgpu replaces only its own dataset \
             files: choose another --out (or remove that file first)",
            out.display()
        );
    }
    Ok(())
}

fn run_verify(file: &PathBuf) -> Result<()> {
    let ds = Dataset::open(file)?;
    let checks = ds.verify();
    for c in &checks {
        println!(
            "{:<8} {:<7} {:>12} bytes  crc32 {:08x}  {}",
            c.split,
            c.section,
            c.len,
            c.actual_crc32,
            if c.ok() { "ok" } else { "MISMATCH" }
        );
    }
    ds.verify_all()?;
    println!(
        "{}: header, metadata and {} sections ok",
        file.display(),
        checks.len()
    );
    Ok(())
}

fn print_info(ds: &Dataset) {
    let m = ds.meta();
    println!("dataset  {} ({})", m.name, ds.path().display());
    println!("source   {}", m.source);
    println!("classes  {}: {}", m.classes.len(), summarize(&m.classes));
    println!("channels {}  layout {}", m.channels, m.layout);
    println!("mean     {:?}", m.mean);
    println!("std      {:?}", m.std);
    for s in &m.splits {
        let split = ds.split(&s.name).expect("listed split exists");
        let mut counts = vec![0usize; m.classes.len()];
        for l in split.labels() {
            counts[l as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        println!(
            "split    {:<6} {:>7} images {}x{}x{}  ({} MB)  per class {lo}..{hi}",
            s.name,
            s.n,
            m.channels,
            s.h,
            s.w,
            format_mb(s.pixels.len),
        );
    }
}

fn summarize(names: &[String]) -> String {
    if names.len() <= 12 {
        names.join(", ")
    } else {
        format!("{}, … {}", names[..8].join(", "), names[names.len() - 1])
    }
}

fn format_mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn run_info(file: &PathBuf, json: bool) -> Result<()> {
    let ds = Dataset::open(file)?;
    if json {
        let mut v = serde_json::to_value(ds.meta())?;
        v["path"] = serde_json::Value::String(file.display().to_string());
        v["file_bytes"] = serde_json::json!(std::fs::metadata(file)?.len());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_info(&ds);
    }
    Ok(())
}
