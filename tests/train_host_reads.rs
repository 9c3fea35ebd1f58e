//! No host synchronisation inside a training step (issue 10, item 8), shown on the CPU.
//!
//! A step keeps its loss, accuracy and norm sums and the numerics guard in the step ledger on the
//! training device; the host reads the ledger every N steps (`PODGPU_READ_EVERY`, here
//! `ledger::set_read_every`) and at the end of each epoch. `tensor::host_reads` counts every tensor
//! read to the host on any device — on the CPU they are free, but each one would be a wait on a GPU —
//! so a CPU run shows how often the step loop would wait. The numbers in `metrics.jsonl` and the
//! final weights must not depend on N.
//!
//! One test function: `host_reads` and the cadence override are process-wide.

mod common;

use common::*;
use podgpu::train::ledger::set_read_every;
use podgpu::train::trainer::{self, RunSummary};
use podgpu::train::TrainConfig;
use std::path::Path;

const EPOCHS: usize = 2;
const TRAIN_IMAGES: usize = 96;
const BATCH: usize = 8;
const STEPS_PER_EPOCH: u64 = (TRAIN_IMAGES / BATCH) as u64;

fn config(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: "resnet18".into(),
        width: 2,
        data: Some(data.to_path_buf()),
        device: "cpu".into(),
        seed: 11,
        epochs: EPOCHS,
        batch_size: BATCH,
        lr: 0.05,
        milestones: vec![],
        threads: Some(2),
        deterministic: true,
        out: Some(out.to_path_buf()),
        ..TrainConfig::default()
    }
}

fn train_every(data: &Path, out: &Path, every: usize) -> RunSummary {
    set_read_every(Some(every));
    let s = trainer::train(config(data, out));
    set_read_every(None);
    s.unwrap_or_else(|e| panic!("training with a read every {every} steps: {e:#}"))
}

/// The most ledger reads a run of `steps` steps over `EPOCHS` epochs may make with a read every
/// `every` steps: one per `every` steps of each epoch, and one at each epoch's end.
fn read_bound(every: u64) -> u64 {
    EPOCHS as u64 * (STEPS_PER_EPOCH / every + 1)
}

#[test]
fn steps_read_the_host_once_per_n_steps_and_the_numbers_do_not_depend_on_n() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tiny.bin");
    tiny_dataset(&data, 12, 3, TRAIN_IMAGES, 16);
    let steps = EPOCHS as u64 * STEPS_PER_EPOCH;
    assert!(steps >= 20);

    // N larger than an epoch: the only reads are the epoch ends.
    let big = 1000;
    let sparse = train_every(&data, &tmp.path().join("sparse"), big);
    let c = sparse.step_loop;
    println!(
        "read every {big} steps: {c:?}, {:.3} host reads per step",
        c.host_reads as f64 / c.steps as f64
    );
    assert_eq!(c.steps, steps);
    assert!(
        c.ledger_reads <= read_bound(big as u64),
        "{} ledger reads for {steps} steps with N = {big}: more than {}",
        c.ledger_reads,
        read_bound(big as u64)
    );
    // Every host read of the step loops is a ledger read: a step itself reads nothing.
    assert!(
        c.host_reads <= read_bound(big as u64),
        "{} host reads in {steps} steps ({:.2} per step); at most {} (one per epoch end and one per \
         {big} steps) allowed",
        c.host_reads,
        c.host_reads as f64 / steps as f64,
        read_bound(big as u64)
    );
    assert_eq!(c.host_reads, c.ledger_reads);
    assert_eq!(c.host_waits, 0, "no GPU, no waits");

    // N = 1: one read per step (the epoch's last step already read everything, so no extra read).
    let dense = train_every(&data, &tmp.path().join("dense"), 1);
    let d = dense.step_loop;
    println!("read every step: {d:?}");
    assert_eq!(d.steps, steps);
    assert_eq!(d.ledger_reads, steps);
    assert!(d.host_reads <= read_bound(1), "{d:?}");

    // N = 5 (not a divisor of the epoch length): a read every 5 steps and at each epoch's end.
    let mid = train_every(&data, &tmp.path().join("mid"), 5);
    let m = mid.step_loop;
    println!("read every 5 steps: {m:?}");
    assert_eq!(m.ledger_reads, read_bound(5));
    assert_eq!(m.host_reads, m.ledger_reads);

    // The same numbers and weights whatever N.
    let (a, b, c5) = (
        tmp.path().join("sparse"),
        tmp.path().join("dense"),
        tmp.path().join("mid"),
    );
    let metrics = exact_metrics(&a);
    assert_eq!(metrics.len(), EPOCHS);
    assert_eq!(
        metrics,
        exact_metrics(&b),
        "metrics with N = {big} vs N = 1"
    );
    assert_eq!(
        metrics,
        exact_metrics(&c5),
        "metrics with N = {big} vs N = 5"
    );
    assert_same_checkpoint(&a.join("last.safetensors"), &b.join("last.safetensors"));
    assert_same_checkpoint(&a.join("last.safetensors"), &c5.join("last.safetensors"));
    assert_eq!(
        sparse.final_train_loss.to_bits(),
        dense.final_train_loss.to_bits()
    );
}
