//! The `podgpu` command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "podgpu", version, about = "Train image classifiers with the POD loss on GPU or CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a network with the POD loss (or a baseline) using the paper's recipe.
    Train(podgpu::cli::train::Args),
    /// Score a checkpoint: accuracy, per-class accuracy, confusion matrix, Table I norm split.
    Eval(podgpu::cli::eval::Args),
    /// Generate PEDCC class centroids (the frozen head) and verify them.
    Pedcc(podgpu::cli::pedcc::Args),
    /// Compare podgpu's loss and gradients with a reference fixture (e.g. from tools/make_fixtures.py).
    Fidelity(podgpu::cli::fidelity::Args),
    /// Convert, verify and describe dataset files
    Data(podgpu::cli::data::Args),
}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Train(a) => podgpu::cli::train::run(a),
        Command::Eval(a) => podgpu::cli::eval::run(a),
        Command::Pedcc(a) => podgpu::cli::pedcc::run(a),
        Command::Fidelity(a) => podgpu::cli::fidelity::run(a),
        Command::Data(a) => podgpu::cli::data::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
