//! podgpu: a training engine for image classifiers with the POD loss (NaC + SC over a frozen PEDCC
//! head), on CUDA (cuDNN, cuBLAS, our own kernels) and on the CPU (rayon), with one autodiff tape.

pub mod autograd;
pub mod bench;
pub mod budget;
pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod fixture;
pub mod fsutil;
pub mod gradcheck;
pub mod loss;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod pedcc;
pub mod rng;
pub mod tensor;
pub mod train;

pub use autograd::{ParamId, ParamKind, ParamStore, Tape, Var};
pub use tensor::{DType, Device, Tensor};
