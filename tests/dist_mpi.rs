//! Data-parallel training's arithmetic across real MPI processes (cargo feature `distributed`):
//! `mpirun -np N dist-check` with 2 and 3 CPU ranks — every image of an epoch seen once across
//! ranks, the combined gradient equal to one process's over the global batch, the same bits on every
//! rank; and `mpirun -np N podgpu train` itself: 2 ranks × 32 train like one process × 64, a NaN on
//! one rank stops both with one message and the last checkpoint intact, and the run resumes with 3
//! ranks. `.ci/run` installs OpenMPI and runs this file.
#![cfg(feature = "distributed")]

mod common;

use podgpu::train::{load_checkpoint, read_jsonl};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn mpirun(ranks: usize) -> (bool, String) {
    launch(ranks, env!("CARGO_BIN_EXE_dist-check"), &[], &[])
}

/// `mpirun -np RANKS PROGRAM ARGS` with `env` passed to every rank; success and the output.
fn launch(ranks: usize, program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string(), "--oversubscribe"]);
    // Waiting ranks yield the CPU (the tests oversubscribe small machines).
    c.args(["--mca", "mpi_yield_when_idle", "1"]);
    for (k, v) in env {
        c.env(k, v).args(["-x", k]);
    }
    let out = c
        .arg(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // CI runs as root; Open MPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (OpenMPI: apt-get install openmpi-bin libopenmpi-dev)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("--- {ranks} ranks:\n{text}");
    (out.status.success(), text)
}

#[test]
fn two_and_three_cpu_ranks_train_on_every_image_once_with_the_global_batch_gradient() {
    for ranks in [2, 3] {
        let (ok, text) = mpirun(ranks);
        assert!(ok, "{ranks} ranks failed:\n{text}");
        assert!(
            text.contains(&format!("dist-check with {ranks} ranks: ok")),
            "{text}"
        );
        for r in 0..ranks {
            assert!(text.contains(&format!("rank {r} of {ranks}:")), "{text}");
        }
    }
}

/// A small run on the shipped MNIST subset: a one-block ViT (no batch norm) with the NaC loss.
fn train_args<'a>(out: &'a str, batch: &'a str, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "vit(patch=7,dim=16,depth=1,heads=2)",
        "--data",
        "datasets/mnist-small.bin",
        "--loss",
        "nac",
        "--device",
        "cpu",
        "--limit-train",
        "256",
        "--limit-test",
        "64",
        "--batch-size",
        batch,
        "--epochs",
        epochs,
        "--threads",
        "1",
        "--lr",
        "0.05",
        "--seed",
        "5",
        "--deterministic",
        "--out",
        out,
    ]
}

fn weights(path: &Path) -> Vec<(String, Vec<f64>)> {
    load_checkpoint(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_vec_f64()))
        .collect()
}

#[test]
fn mpirun_two_ranks_of_32_train_like_one_process_of_64() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let podgpu = env!("CARGO_BIN_EXE_podgpu");
    let out = Command::new(podgpu)
        .args(train_args(one.to_str().unwrap(), "64", "2"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = launch(
        2,
        podgpu,
        &train_args(two.to_str().unwrap(), "32", "2"),
        &[],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("data parallel: 2 ranks × batch 32 = global batch 64"),
        "{text}"
    );
    // Rank 0 alone reports: one header, one line per epoch.
    assert_eq!(text.matches("run folder:").count(), 1, "{text}");
    assert_eq!(text.matches("epoch   2/2").count(), 1, "{text}");
    // As in tests/dist_train.rs: steps × images × ε bounds the rounding differences.
    let tol = 8.0 * 64.0 * f64::from(f32::EPSILON);
    for ((name, x), (_, y)) in weights(&one.join("last.safetensors"))
        .iter()
        .zip(&weights(&two.join("last.safetensors")))
    {
        let e = podgpu::tensor::rel_error(y, x);
        assert!(
            e < tol,
            "{name}: relative difference {e:.2e} over {tol:.2e}"
        );
    }
}

#[test]
fn mpirun_a_nan_on_one_rank_stops_both_and_the_run_resumes_with_three_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let dir = run.to_str().unwrap();
    let podgpu = env!("CARGO_BIN_EXE_podgpu");
    // 8 steps an epoch with 2 ranks × 16: step 11 is in epoch 2.
    let (ok, text) = launch(
        2,
        podgpu,
        &train_args(dir, "16", "3"),
        &[("PODGPU_TEST_NAN_GRADIENT_AT", "11@1")],
    );
    assert!(!ok, "{text}");
    let msg =
        "non-finite loss or gradient on rank 1 of 2 at epoch 2, global batch 3 of 8 (step 11)";
    assert_eq!(text.matches(msg).count(), 1, "one message:\n{text}");
    let st = load_checkpoint(&run.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (1, 8));
    // Resumed with 3 ranks: global batches of 48, 6 steps an epoch.
    let (ok, text) = launch(3, podgpu, &["train", "--resume", dir], &[]);
    assert!(ok, "{text}");
    let st = load_checkpoint(&run.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (3, 8 + 12));
    let m = read_jsonl(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(m.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2, 3]);
}

/// A rank that dies without a word (SIGKILL after a backward pass in epoch 2): mpirun stops the
/// other rank and names the dead one; the checkpoint of epoch 1 is intact and the run resumes.
#[test]
fn mpirun_a_killed_rank_stops_the_job_and_the_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let dir = run.to_str().unwrap();
    let podgpu = env!("CARGO_BIN_EXE_podgpu");
    let kill = podgpu::train::trainer::ranked::TEST_KILL_ENV;
    let (ok, text) = launch(2, podgpu, &train_args(dir, "16", "3"), &[(kill, "11@1")]);
    assert!(!ok, "{text}");
    // Open MPI's own message names the rank and the signal.
    assert!(
        text.contains("rank 1") && (text.contains("signal 9") || text.contains("Killed")),
        "{text}"
    );
    let st = load_checkpoint(&run.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (1, 8));
    let stray: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(stray.is_empty(), "half-written files left: {stray:?}");
    let (ok, text) = launch(2, podgpu, &["train", "--resume", dir], &[]);
    assert!(ok, "{text}");
    let st = load_checkpoint(&run.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (3, 24));
}

/// SIGTERM to the launcher (what Ctrl-C, a scheduler's time limit or `kill` send): mpirun passes it
/// to every rank, the ranks agree in their next vote to stop after that step, rank 0 writes a
/// checkpoint of the exact point, and the run resumes from it to the end. Both ranks wait after
/// their third step until the signal lands, so a fast or a loaded machine cannot finish first.
#[test]
fn mpirun_sigterm_stops_every_rank_after_the_step_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let dir = run.to_str().unwrap();
    let podgpu = env!("CARGO_BIN_EXE_podgpu");
    let hold = podgpu::train::trainer::TEST_HOLD_AT_STEP_ENV;
    let log = tmp.path().join("stderr.txt");
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        "2",
        "--oversubscribe",
        "--mca",
        "mpi_yield_when_idle",
        "1",
    ])
    .env(hold, "3")
    .args(["-x", hold])
    .arg(podgpu)
    .args(train_args(dir, "16", "2"))
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .stderr(std::fs::File::create(&log).unwrap());
    let (mut child, drain) = common::spawn_until_training(&mut c, Duration::from_secs(120));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = drain.join().unwrap() + &std::fs::read_to_string(&log).unwrap();
    println!("--- SIGTERM to mpirun ({status}):\n{text}");
    assert!(text.contains("stopped after global batch"), "{text}");
    let ck = load_checkpoint(&run.join("last.safetensors")).unwrap();
    assert_eq!(ck.state.epoch, 0, "a mid-epoch checkpoint");
    let tally = podgpu::train::tally::EpochTally::from_extra(&ck.state.extra)
        .unwrap()
        .expect("a mid-epoch checkpoint records the epoch's sums");
    // Held after step 3: stopped after step 3 or 4 (8 global batches an epoch). The tally counts
    // batches of one rank's size, two per global step.
    assert!((3..=4).contains(&ck.state.global_step), "{:?}", ck.state);
    assert_eq!(tally.next_batch as u64, 2 * ck.state.global_step);
    // Rank 0's message, in the progress line's units, reaches the user before the job ends.
    let at = format!("after global batch {} of 8", ck.state.global_step);
    assert_eq!(
        text.matches(&at).count(),
        2,
        "progress line and message:\n{text}"
    );
    assert!(
        text.contains(&format!("podgpu train --resume {dir}")),
        "{text}"
    );
    let (ok, text) = launch(2, podgpu, &["train", "--resume", dir], &[]);
    assert!(ok, "{text}");
    let st = load_checkpoint(&run.join("last.safetensors"))
        .unwrap()
        .state;
    assert_eq!((st.epoch, st.global_step), (2, 16));
}

/// Rank 0 alone speaks: with `--device auto` on a machine without a GPU every rank falls back to
/// the CPU, and the note saying so is printed once, as the header is (with a GPU, auto picks it
/// and no rank prints a note).
#[test]
fn mpirun_prints_the_device_note_once() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = train_args(run.to_str().unwrap(), "16", "1");
    let device = args.iter().position(|a| *a == "--device").unwrap();
    args[device + 1] = "auto";
    let limit = args.iter().position(|a| *a == "--limit-train").unwrap();
    args[limit + 1] = "64";
    let (ok, text) = launch(2, env!("CARGO_BIN_EXE_podgpu"), &args, &[]);
    assert!(ok, "{text}");
    let expected = match podgpu::device::select("auto") {
        Ok((_, Some(_))) => 1,
        _ => 0,
    };
    assert_eq!(text.matches("using the CPU").count(), expected, "{text}");
    assert_eq!(text.matches("run folder:").count(), 1, "{text}");
}
