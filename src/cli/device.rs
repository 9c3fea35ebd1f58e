//! `podgpu device`: what podgpu sees of the GPU and the CUDA libraries, and the environment that
//! makes other programs load the same library files.

use anyhow::{anyhow, Result};

/// Exit status of `podgpu device` when no GPU is usable (tools/gpu-check.sh relies on it).
pub const NO_GPU_EXIT_CODE: i32 = 3;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print `export VAR='…'` lines (LD_LIBRARY_PATH with a folder of links to the chosen CUDA
    /// libraries first, PODGPU_CUDA_LIBS) and nothing else: `eval "$(podgpu device --env)"` makes
    /// programs started afterwards (test executables, other tools) load the files podgpu chose.
    #[arg(long)]
    pub env: bool,
    /// The GPU to describe.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
}

/// Prints the report; exits with `NO_GPU_EXIT_CODE` (after the report and a one-line reason) when
/// the GPU is not usable.
pub fn run(args: Args) -> Result<()> {
    if args.env {
        print!(
            "{}",
            crate::cuda::libs::env_exports().map_err(|e| anyhow!(e))?
        );
        return Ok(());
    }
    let ordinal = match crate::device::parse(&args.device)? {
        Some(crate::Device::Cuda(i)) => i,
        _ => anyhow::bail!(
            "podgpu device describes a GPU: give --device cuda or cuda:N, not {:?}",
            args.device
        ),
    };
    print!("{}", crate::device::describe());
    match crate::device::usable_gpu(ordinal) {
        Ok(()) => {
            println!("cuda:{ordinal} is usable");
            Ok(())
        }
        Err(why) => {
            println!("no usable GPU: {why}");
            std::process::exit(NO_GPU_EXIT_CODE);
        }
    }
}
