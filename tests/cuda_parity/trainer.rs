//! No host synchronisation inside a training step on the GPU (issue 10, item 8): the step ledger's
//! kernels (cuda/guard.cu) against their host versions, the SGD kernel's skip flag, and a training
//! run whose host waits are the ledger reads alone (`Gpu::host_waits`), with the same numbers
//! whatever the read cadence.

use super::{gpu, GPU_LOCK};
use podgpu::data::{write_dataset, DatasetSpec, SplitData};
use podgpu::optim::Sgd;
use podgpu::rng::Rng;
use podgpu::train::ledger::{set_read_every, Reading, StepLedger};
use podgpu::train::tally::EpochTally;
use podgpu::train::{read_jsonl, trainer, TrainConfig};
use podgpu::{Device, ParamKind, ParamStore, Tensor};
use std::path::Path;

const GPU: Device = Device::Cuda(0);

/// `steps` guarded SGD steps on `device` (the trainer's order: guard, then the update that skips
/// while the flag is set, then the step's statistics), a NaN in `b`'s gradient at step `poison`.
fn ledger_steps(device: Device, steps: u64, poison: Option<u64>) -> (ParamStore, Reading) {
    let mut ps = ParamStore::new();
    ps.add(
        "a",
        Tensor::from_vec(&[3000], (0..3000).map(|i| (i as f32).cos()).collect()),
        ParamKind::Trainable,
    );
    ps.add(
        "b",
        Tensor::from_vec(&[2], vec![1.5f32, 0.25]),
        ParamKind::Trainable,
    );
    ps.add(
        "frozen",
        Tensor::from_vec(&[2], vec![1.0f32, 1.0]),
        ParamKind::Frozen,
    );
    ps.to_device(device);
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    let mut ledger = StepLedger::new(device, &EpochTally::default(), &ps);
    for step in 1..=steps {
        for p in ps.iter_mut() {
            let n = p.value.numel();
            let mut g: Vec<f32> = (0..n).map(|i| (step as f32 + i as f32).sin()).collect();
            if p.name == "b" && poison == Some(step) {
                g[1] = f32::NAN;
            }
            p.grad = Some(Tensor::from_vec(&[n], g).to_device(device));
        }
        let loss = Tensor::from_vec(&[1], vec![0.5f32 + step as f32 / 7.0]).to_device(device);
        ledger.guard(step, &ps, &loss);
        sgd.step_unless(&mut ps, 0.1, Some(ledger.skip_flag()));
        ps.zero_grad();
        // Logits whose argmax is the label in rows 0 and 2; integer norms (exact in f32 sums).
        let logits =
            Tensor::from_vec(&[3, 2], vec![2.0f32, 1.0, 0.0, 1.0, 3.0, -1.0]).to_device(device);
        let labels = [0usize, 0, 0];
        let labels_t = podgpu::loss::labels_tensor(&labels, &logits);
        let norms = Tensor::from_vec(&[3], vec![1.0f32, 2.0, step as f32]).to_device(device);
        ledger.add_step(&loss, &logits, &labels_t, &labels, &norms, 3);
    }
    (ps, ledger.read())
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn the_step_ledger_matches_its_host_version_and_stops_updates() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let (gps, g) = ledger_steps(GPU, 6, Some(3));
    let (hps, h) = ledger_steps(Device::Cpu, 6, Some(3));
    assert_eq!(g.loss_sum.to_bits(), h.loss_sum.to_bits(), "{g:?} vs {h:?}");
    assert_eq!(g.norm_sum.to_bits(), h.norm_sum.to_bits(), "{g:?} vs {h:?}");
    assert_eq!(g.correct, h.correct);
    assert_eq!(g.correct, 12);
    assert_eq!(g.last_loss, h.last_loss);
    assert_eq!(g.bad, h.bad);
    let bad = g.bad.expect("the guard recorded step 3");
    assert_eq!(bad.step, 3);
    assert_eq!(bad.counts, vec![(0, 0), (1, 0), (0, 0)]);
    // The weights stay those after step 2 (on the GPU: within the parity tolerance of the CPU's).
    let (before, _) = ledger_steps(GPU, 2, None);
    for (p, q) in gps.iter().zip(before.iter()) {
        assert_eq!(p.value.to_vec_f32(), q.value.to_vec_f32(), "{}", p.name);
    }
    for (p, q) in gps.iter().zip(hps.iter()) {
        let err = podgpu::tensor::rel_error(&p.value.to_vec_f64(), &q.value.to_vec_f64());
        assert!(err < 1e-6, "{}: {err}", p.name);
    }
}

/// A learnable synthetic dataset: class k is a bright bar at row/column k/2 + 1.
fn bars(path: &Path, n_train: usize, n_test: usize) {
    let split = |name: &str, n: usize, seed: u64| {
        let mut rng = Rng::new(seed);
        let (h, classes) = (12usize, 3usize);
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let k = i % classes;
            labels.push(k as u32);
            for y in 0..h {
                for x in 0..h {
                    let on = if k % 2 == 0 {
                        y == k / 2 + 1
                    } else {
                        x == k / 2 + 1
                    };
                    pixels.push((if on { 200 } else { 30 } + rng.below(40)) as u8);
                }
            }
        }
        SplitData {
            name: name.into(),
            n,
            h,
            w: h,
            pixels,
            labels,
        }
    };
    let spec = DatasetSpec {
        name: "bars".into(),
        classes: (0..3).map(|k| format!("c{k}")).collect(),
        channels: 1,
        mean: vec![0.3],
        std: vec![0.25],
        source: "synthetic bars for podgpu tests".into(),
        splits: vec![split("train", n_train, 1), split("test", n_test, 2)],
    };
    write_dataset(path, &spec).unwrap();
}

/// Each epoch's train loss, accuracy and mean norm of the run in `dir`, as bits.
fn epoch_bits(dir: &Path) -> Vec<(u64, u64, u64)> {
    read_jsonl(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.train_loss.to_bits(),
                r.train_acc.to_bits(),
                r.mean_norm.to_bits(),
            )
        })
        .collect()
}

/// A deterministic resnet18 (width 4) run on the bars dataset at `data`, constant lr, into `out`.
fn bars_run(data: &Path, out: &Path, seed: u64, epochs: usize, batch: usize) -> TrainConfig {
    TrainConfig {
        model: "resnet18".into(),
        width: 4,
        data: Some(data.to_path_buf()),
        device: "cuda:0".into(),
        seed,
        epochs,
        batch_size: batch,
        lr: 0.05,
        milestones: vec![],
        deterministic: true,
        out: Some(out.to_path_buf()),
        ..TrainConfig::default()
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn training_steps_wait_for_the_gpu_only_when_the_ledger_is_read() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bars.bin");
    let (epochs, images, batch) = (2usize, 96usize, 8usize);
    bars(&data, images, 16);
    let steps_per_epoch = (images / batch) as u64;
    let run = |name: &str, every: usize| {
        let cfg = bars_run(&data, &tmp.path().join(name), 11, epochs, batch);
        set_read_every(Some(every));
        let s = trainer::train(cfg);
        set_read_every(None);
        s.unwrap_or_else(|e| panic!("{name}: {e:#}"))
    };
    let big = 1000usize;
    let sparse = run("sparse", big);
    let c = sparse.step_loop;
    let bound = epochs as u64 * (steps_per_epoch / big as u64 + 1);
    println!(
        "GPU, read every {big} steps: {c:?}: {:.3} host waits per step",
        c.host_waits as f64 / c.steps as f64
    );
    assert_eq!(c.steps, epochs as u64 * steps_per_epoch);
    assert!(
        c.host_waits <= bound,
        "{} host waits in {} steps; at most {bound} (one per epoch end and per {big} steps)",
        c.host_waits,
        c.steps
    );
    assert!(c.host_reads <= bound, "{c:?}");
    let dense = run("dense", 1);
    println!("GPU, read every step: {:?}", dense.step_loop);
    assert!(dense.step_loop.host_waits <= epochs as u64 * (steps_per_epoch + 1));
    // The cadence changes when the host looks, not what is computed.
    let bits = |name: &str| epoch_bits(&tmp.path().join(name));
    assert_eq!(bits("sparse"), bits("dense"));
}

/// `PODGPU_CUDA_GRAPH=1`: after one eager step per epoch the trainer replays one captured step
/// (`train::graphed`); `PODGPU_COPY_STREAM=1`: batches go up on a copy stream (`cuda::stager`).
/// In deterministic mode the epochs' numbers and the final weights are those of the eager run bit
/// for bit, and the replays wait for the host no more than eager steps do.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn runs_that_replay_cuda_graphs_or_stage_batches_train_exactly_as_an_eager_run() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bars.bin");
    let (epochs, images, batch) = (2usize, 100usize, 8usize); // a last batch of 4 runs eagerly
    bars(&data, images, 16);
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            for var in ["PODGPU_CUDA_GRAPH", "PODGPU_COPY_STREAM"] {
                // SAFETY: GPU tests run one at a time (GPU_LOCK); nothing else reads the variables.
                unsafe { std::env::remove_var(var) };
            }
        }
    }
    let run = |name: &str, vars: &[&str]| {
        let _unset = Unset;
        for var in vars {
            // SAFETY: as above.
            unsafe { std::env::set_var(var, "1") };
        }
        let cfg = bars_run(&data, &tmp.path().join(name), 12, epochs, batch);
        trainer::train(cfg).unwrap_or_else(|e| panic!("{name}: {e:#}"))
    };
    let eager = run("eager", &[]);
    let graph = run("graph", &["PODGPU_CUDA_GRAPH"]);
    // The copy stream changes how batches reach the GPU, not what is computed; with the graphs too.
    run("staged", &["PODGPU_COPY_STREAM"]);
    run("staged-graph", &["PODGPU_COPY_STREAM", "PODGPU_CUDA_GRAPH"]);
    println!("eager {:?}\ngraph {:?}", eager.step_loop, graph.step_loop);
    assert_eq!(eager.step_loop.steps, graph.step_loop.steps);
    assert!(graph.step_loop.host_waits <= eager.step_loop.host_waits);
    let records = |name: &str| epoch_bits(&tmp.path().join(name));
    for other in ["graph", "staged", "staged-graph"] {
        assert_eq!(
            records("eager"),
            records(other),
            "epoch records of {other} differ"
        );
    }
    let weights = |name: &str| {
        let c = podgpu::train::load_checkpoint(&tmp.path().join(name).join("last.safetensors"))
            .unwrap();
        let mut all: Vec<(String, Vec<f32>)> = c
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_vec_f32()))
            .collect();
        all.extend(
            c.optim
                .momentum
                .iter()
                .map(|(k, t)| (k.clone(), t.to_vec_f32())),
        );
        (all, c.optim.steps)
    };
    for other in ["graph", "staged", "staged-graph"] {
        assert!(
            weights("eager") == weights(other),
            "final weights, momentum or SGD step count of {other} differ"
        );
    }
}

/// The input stager delivers every batch intact while the compute stream is busy: uploads of
/// different sizes, each followed by kernels, read back only at the end (so slots are reused while
/// earlier copies may still be in flight); a batch over its capacity is refused.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn the_input_stager_delivers_every_batch_intact() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut stager = podgpu::cuda::stager::InputStager::new(&gpu, 4096).unwrap();
    let busy = Tensor::from_vec(&[1 << 22], vec![0.5f32; 1 << 22]).to_device(GPU);
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for (k, n) in [4096usize, 17, 4000, 1, 4096, 333].into_iter().enumerate() {
        let v: Vec<f32> = (0..n).map(|i| (k * 10_000 + i) as f32).collect();
        got.push(stager.upload(&[n], &v).unwrap());
        sent.push(v);
        // Work on the compute stream between uploads.
        let _ = podgpu::ops::relu_fwd(&busy);
    }
    for (k, (t, v)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(&t.to_vec_f32(), v, "upload {k}");
    }
    let e = stager.upload(&[5000], &[0.0; 5000]).expect_err("too big");
    assert!(e.contains("do not fit"), "{e}");
}
