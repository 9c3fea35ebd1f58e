//! Loader throughput: images/s of the training loader (shuffle + augmentation + normalisation + batching
//! on the prefetch thread) by rayon thread count, as a table and one JSON line.
//!
//! `cargo run --release --bin bench-data -- [--data FILE] [--images N] [--batch-size B]`

use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

use podgpu::data::{default_dataset_path, Dataset, Loader, LoaderConfig};

#[derive(Parser)]
#[command(about = "Measure the data loader's images/s by thread count")]
struct Args {
    /// Dataset file (default: the shipped datasets/cifar10-small.bin)
    #[arg(long)]
    data: Option<PathBuf>,
    /// Split to load
    #[arg(long, default_value = "train")]
    split: String,
    /// Images to load per measurement (whole epochs are repeated as needed)
    #[arg(long, default_value_t = 30000)]
    images: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Thread counts to measure (default: 1, 2 and all cores)
    #[arg(long, value_delimiter = ',')]
    threads: Option<Vec<usize>>,
}

/// Loads at least `images` images; returns (images loaded, seconds).
fn measure(loader: &Loader, images: usize) -> (usize, f64) {
    // One warm-up batch so thread-pool start-up and page faults of the map are not timed.
    drop(loader.epoch(1_000_000).next());
    let start = Instant::now();
    let mut done = 0;
    let mut epoch = 0;
    while done < images {
        let mut it = loader.epoch(epoch);
        while let Some(b) = it.next() {
            done += b.len();
            // Checksum-free use of the data so the work cannot be skipped.
            std::hint::black_box(&b.images);
            it.recycle(b);
            if done >= images {
                break;
            }
        }
        epoch += 1;
    }
    (done, start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    // A table piped into `head` ends quietly, without a panic trace.
    podgpu::cli::end_quietly_when_output_closes();
    let args = Args::parse();
    let path = args.data.unwrap_or_else(default_dataset_path);
    let ds = Dataset::open(&path)?;
    let split = ds.split(&args.split)?;
    let all = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut counts = args.threads.unwrap_or_else(|| vec![1, 2, all]);
    counts.sort();
    counts.dedup();
    let shape = split.image_shape();
    println!(
        "loader on {} '{}': {} images {}x{}x{}, batch {}, augmentation and normalisation",
        path.display(),
        split.name(),
        split.len(),
        shape[0],
        shape[1],
        shape[2],
        args.batch_size
    );
    println!(
        "{:>8} {:>12} {:>10} {:>9}",
        "threads", "images/s", "images", "seconds"
    );
    let mut results = Vec::new();
    for &t in &counts {
        let cfg = LoaderConfig {
            threads: Some(t),
            ..LoaderConfig::train(args.batch_size, 0)
        };
        let loader = Loader::new(split.clone(), cfg)?;
        let (n, secs) = measure(&loader, args.images);
        let rate = n as f64 / secs;
        println!("{t:>8} {rate:>12.0} {n:>10} {secs:>9.3}");
        results.push(serde_json::json!({"threads": t, "images_per_s": rate.round(), "images": n, "seconds": secs}));
    }
    let line = serde_json::json!({
        "bench": "data-loader",
        "dataset": path.display().to_string(),
        "split": split.name(),
        "image_shape": shape,
        "batch_size": args.batch_size,
        "augment": format!("{:?}", Loader::new(split.clone(), LoaderConfig::train(args.batch_size, 0))?.augment()),
        "results": results,
    });
    println!("{line}");
    Ok(())
}
