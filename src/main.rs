//! The `podgpu` command line.

use clap::{Parser, Subcommand};

/// Counts allocations while `budget::measure` asks (a network's activations are measured on a
/// small build before a large one is allocated); otherwise the system allocator.
#[global_allocator]
static ALLOC: podgpu::budget::CountingAlloc = podgpu::budget::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "podgpu",
    version,
    about = "Train image classifiers with the POD loss on GPU or CPU"
)]
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
    /// Describe the GPU and the CUDA libraries in use (exit status 3 when no GPU is usable).
    Device(podgpu::cli::device::Args),
    /// List every network with its parameter count and forward FLOPs per image.
    Models(podgpu::cli::models::Args),
    /// Train several losses (and/or networks) with one recipe and tabulate and plot their accuracies.
    Compare(podgpu::cli::compare::Args),
    /// Train with a 2-D latent space on MNIST 0–4 and draw the latent features (the paper's Fig. 6).
    Visualize(podgpu::cli::visualize::Args),
}

/// A panic is a bug in podgpu, not a user error: say so briefly and how to report it, and keep the
/// raw message and backtrace for when RUST_BACKTRACE asks for them.
fn install_panic_hook() {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        return; // the default hook prints the full trace
    }
    std::panic::set_hook(Box::new(|info| {
        // Running out of GPU memory is not a bug: `cuda::catch_oom` reports it with advice where
        // it is caught; uncaught, say what happened and what to change.
        if let Some(oom) = info.payload().downcast_ref::<podgpu::cuda::OutOfMemory>() {
            if !podgpu::cuda::catching_oom() {
                eprintln!("error: {}", oom.advice(None));
            }
            return;
        }
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "internal error: podgpu hit a bug ({what}{place}).\n\
             This is not caused by your input. Please report it with the command you ran and this \
             message; run again with RUST_BACKTRACE=1 to include a backtrace.\n\
             The run folder's last checkpoint, if any, is intact: `podgpu train --resume DIR` \
             continues from it."
        );
    }));
}

fn main() {
    // Before anything else (threads, output): restart with the chosen CUDA libraries first on the
    // library path if a second copy would otherwise be loaded (src/cuda/libs).
    podgpu::cuda::libs::reexec_with_chosen_libraries();
    install_panic_hook();
    if std::env::var_os("PODGPU_TEST_INTERNAL_PANIC").is_some() {
        // Lets the test suite check what a user sees on a bug; never set otherwise.
        panic!("test panic requested by PODGPU_TEST_INTERNAL_PANIC");
    }
    let cli = Cli::parse();
    // This thread lives as long as the process: a training run may make it one of the CPU
    // backend's pool threads (cpu::size_pool_with_caller).
    podgpu::cpu::let_main_thread_join_pool();
    if !matches!(
        cli.command,
        Command::Train(_) | Command::Compare(_) | Command::Visualize(_)
    ) {
        // A report piped into `head` ends quietly when the reader stops. (Training keeps Rust's
        // default: a closed output must not kill a run between two checkpoints.)
        podgpu::cli::end_quietly_when_output_closes();
    }
    let result: anyhow::Result<()> = match cli.command {
        Command::Train(a) => podgpu::cli::train::run(a),
        Command::Eval(a) => podgpu::cli::eval::run(a),
        Command::Pedcc(a) => podgpu::cli::pedcc::run(a),
        Command::Fidelity(a) => podgpu::cli::fidelity::run(a),
        Command::Data(a) => podgpu::cli::data::run(a),
        Command::Device(a) => podgpu::cli::device::run(a),
        Command::Models(a) => podgpu::cli::models::run(a),
        Command::Compare(a) => podgpu::cli::compare::run(a),
        Command::Visualize(a) => podgpu::cli::visualize::run(a),
    };
    if let Err(e) = result {
        if let Some(stop) = e.downcast_ref::<podgpu::train::Interrupted>() {
            eprintln!("{stop}");
            std::process::exit(podgpu::train::signal::INTERRUPTED_EXIT_CODE);
        }
        eprintln!("error: {}", podgpu::cli::error_text(&e));
        std::process::exit(1);
    }
}
