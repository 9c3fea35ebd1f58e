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
    /// List every network with its parameter count and forward FLOPs per image.
    Models(podgpu::cli::models::Args),
    /// Train several losses (and/or networks) with one recipe and tabulate and plot their accuracies.
    Compare(podgpu::cli::compare::Args),
    /// Train with a 2-D latent space on MNIST 0–4 and draw the latent features (the paper's Fig. 6).
    Visualize(podgpu::cli::visualize::Args),
}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Train(a) => podgpu::cli::train::run(a),
        Command::Eval(a) => podgpu::cli::eval::run(a),
        Command::Pedcc(a) => podgpu::cli::pedcc::run(a),
        Command::Fidelity(a) => podgpu::cli::fidelity::run(a),
        Command::Data(a) => podgpu::cli::data::run(a),
        Command::Models(a) => podgpu::cli::models::run(a),
        Command::Compare(a) => podgpu::cli::compare::run(a),
        Command::Visualize(a) => podgpu::cli::visualize::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
