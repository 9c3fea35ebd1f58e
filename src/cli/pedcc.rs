//! `podgpu pedcc`: generate the frozen class centroids and print how good they are.

use crate::pedcc::{self, Method};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of classes K (at least 2).
    #[arg(long)]
    pub classes: usize,
    /// Latent dimension n. Default: the paper's recommendation for K (256 up to 30 classes, 512 up
    /// to 200, else the next power of two ≥ 2K).
    #[arg(long)]
    pub dim: Option<usize>,
    /// Seed of the random rotation (or of the repulsion's start).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use the approximate repulsion method (chosen automatically, with a warning, when K > n+1,
    /// where no exact simplex exists).
    #[arg(long)]
    pub repulsion: bool,
    /// Output file (safetensors with tensor `pedcc` [K, n] f32).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let dim = args
        .dim
        .unwrap_or_else(|| pedcc::recommended_dim(args.classes));
    // K > n+1 has no exact simplex: the CLI falls back to the repulsion method with a warning (the
    // trainer, where a silent approximation would change an experiment, asks for the flag instead).
    let method = if args.repulsion || args.classes > dim.saturating_add(1) {
        Method::Repulsion
    } else {
        Method::Simplex
    };
    pedcc::check_args(args.classes, dim, method)?;
    if args.dim.is_none() {
        println!(
            "latent dimension n = {dim} (recommended for {} classes)",
            args.classes
        );
    }
    if method == Method::Repulsion {
        if args.classes > dim.saturating_add(1) {
            eprintln!(
                "warning: {} classes in {dim} dimensions have no exact even distribution \
                 (that needs K ≤ n+1); using the approximate repulsion method",
                args.classes
            );
        } else {
            eprintln!(
                "warning: --repulsion gives approximate points; the exact simplex exists for \
                 K = {} ≤ n+1 = {} (drop --repulsion to use it)",
                args.classes,
                dim.saturating_add(1)
            );
        }
    }
    let p = pedcc::generate(args.classes, dim, args.seed, method)?;
    pedcc::save(&args.out, &p)?;
    // Verify what was stored (f32), not the f64 construction.
    let v = pedcc::verify_tensor(&pedcc::load(&args.out)?);
    let target = -1.0 / (args.classes as f64 - 1.0);
    println!(
        "PEDCC: {} classes in {dim} dimensions ({}, seed {}) → {}",
        args.classes,
        method.name(),
        args.seed,
        args.out.display()
    );
    println!(
        "  max |‖p_i‖ − 1|                  {:.3e}",
        v.max_norm_error
    );
    println!(
        "  max |⟨p_i,p_j⟩ + 1/(K−1)|         {:.3e}   (ideal inner product {target:.6})",
        v.max_simplex_error
    );
    println!(
        "  pairwise cosine: max {:.6}  min {:.6}",
        v.max_cosine, v.min_cosine
    );
    Ok(())
}
