//! Training infrastructure around the trainer loop: configuration, checkpoints, per-epoch metrics,
//! plots and the progress display.

pub mod anomaly;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod gda;
pub mod graphed;
pub mod identity;
pub mod ledger;
pub mod metrics;
pub mod objective;
pub mod plot;
pub mod progress;
pub mod recipe;
pub mod run_dir;
pub mod signal;
pub mod tally;
pub mod trainer;

pub use checkpoint::{
    load_checkpoint, save_checkpoint, save_epoch_checkpoints, write_atomic, Checkpoint,
    EpochCheckpoints, TrainState,
};
pub use config::{HeadKind, LossKind, Precision, TrainConfig, Variant};
pub use metrics::{read_csv, read_jsonl, EpochRecord, MetricsLog};
pub use plot::{plot_curves, plot_metrics};
pub use progress::{Progress, ProgressMode};
pub use signal::Interrupted;
