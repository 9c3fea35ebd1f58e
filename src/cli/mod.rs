//! The `podgpu` command line: one file per subcommand, each with its clap `Args` and a `run`.

pub mod compare;
pub mod data;
pub mod device;
pub mod eval;
pub mod fidelity;
pub mod models;
pub mod pedcc;
pub mod train;
pub mod visualize;
