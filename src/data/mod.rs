//! Datasets: the `.bin` file format (`format`), opening and validating it (`dataset`), converters from
//! the formats datasets arrive in (`convert`), augmentation (`augment`) and the batching loader with a
//! background prefetch thread (`loader`).

pub mod augment;
pub mod convert;
pub mod dataset;
pub mod format;
pub mod loader;
pub mod mapguard;

pub use augment::Augment;
pub use dataset::{Dataset, SectionCheck, Split};
pub use format::{write_dataset, DatasetSpec, SplitData};
pub use loader::{Batch, EpochIter, Loader, LoaderConfig};

use std::path::PathBuf;

/// Everything that can be wrong with a dataset file. Each message says what was found and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset file {path} does not exist; convert one with `podgpu data convert` (see datasets/README.md)")]
    Missing { path: String },
    #[error("cannot read dataset file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dataset file {path} is empty (0 bytes); it was probably not written completely — convert it again")]
    Empty { path: String },
    #[error("dataset file {path} is truncated: {what} needs {need} bytes but the file has {have}; convert it again")]
    Truncated {
        path: String,
        what: String,
        need: u64,
        have: u64,
    },
    #[error("{path} is not a podgpu dataset (wrong magic bytes; expected \"PODGPUDS\"); convert the raw data with `podgpu data convert`")]
    BadMagic { path: String },
    #[error("dataset file {path} has format version {found}, this podgpu reads version {supported}; convert it again with this podgpu")]
    Version {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("dataset file {path} is corrupt: {what}; convert it again")]
    Corrupt { path: String, what: String },
    #[error("dataset file {path} is corrupt: sizes disagree: {what}; convert it again")]
    SizeMismatch { path: String, what: String },
    #[error("split '{split}': image {index} has label {label}, but the dataset has only {classes} classes")]
    LabelOutOfRange {
        split: String,
        index: usize,
        label: u32,
        classes: usize,
    },
    #[error("split '{split}' has no images; a dataset split needs at least one")]
    EmptySplit { split: String },
    #[error("dataset file {path} has no split '{split}' (it has: {available})")]
    NoSuchSplit {
        path: String,
        split: String,
        available: String,
    },
    #[error("dataset file {path} failed its checksum: {what} has CRC-32 {actual:08x}, expected {expected:08x}; the file is damaged — convert or copy it again")]
    Checksum {
        path: String,
        what: String,
        expected: u32,
        actual: u32,
    },
    #[error("invalid dataset: {0}")]
    Invalid(String),
    #[error("dataset file {path} changed while podgpu was reading it (it was truncated or rewritten in place); put the complete file back and run again")]
    Changed { path: String },
}

/// The folder of real public datasets used by the tests and by `datasets/README.md`'s examples:
/// `$PODGPU_SHARED_DATA` if set, else `../shared/data` relative to the repository root. `None` when it
/// does not exist (tests then skip with a message).
pub fn shared_data_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("PODGPU_SHARED_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    dir.is_dir().then_some(dir)
}

/// The small CIFAR-10 subset shipped in `datasets/` — the default `--data` of `podgpu train`. Looked up
/// relative to the working directory first, then to the repository the binary was built from.
pub fn default_dataset_path() -> PathBuf {
    const REL: &str = "datasets/cifar10-small.bin";
    let here = PathBuf::from(REL);
    if here.is_file() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(REL)
}
