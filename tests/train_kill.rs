//! Crash safety (issue 7): `podgpu train` is killed at random points — SIGKILL (no chance to clean
//! up) and SIGINT (Ctrl-C: stop after the step, checkpoint that exact point) — and resumed with
//! `--resume` each time. Every resume must find a valid checkpoint, and the run must end with the
//! same weights, training state and metrics as a run that was never interrupted (deterministic mode).

mod common;

use common::*;
use podgpu::rng::Rng;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn fresh_args(data: &Path, out: &Path) -> Vec<String> {
    fresh_args_epochs(data, out, 5)
}

fn fresh_args_epochs(data: &Path, out: &Path, epochs: usize) -> Vec<String> {
    let epochs = epochs.to_string();
    [
        "train",
        "resnet18",
        "--width",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        &epochs,
        "--threads",
        "2",
        "--device",
        "cpu",
        "--seed",
        "21",
        "--deterministic",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(args: &[String], stderr_to: &Path) -> Child {
    podgpu()
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr_to).unwrap())
        .spawn()
        .expect("cannot start podgpu")
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: sends a signal to our own child process, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| podgpu::train::run_dir::is_temp_file_name(n))
        .collect()
}

#[test]
fn killed_and_resumed_runs_end_with_the_weights_of_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tiny.bin");
    tiny_dataset(&data, 12, 3, 320, 30);
    let log = tmp.path().join("stderr.txt");

    // A one-epoch probe sizes the run to about two seconds whatever the build profile and machine
    // (the kill points need a run that lasts); then the uninterrupted reference, timed to choose kill
    // points across the whole run.
    let t0 = Instant::now();
    let probe = podgpu()
        .args(fresh_args_epochs(&data, &tmp.path().join("probe"), 1))
        .output()
        .unwrap();
    assert_ok(&probe);
    let epochs = (2.0 / t0.elapsed().as_secs_f64()).ceil().clamp(4.0, 40.0) as usize;
    let fresh_args = |data: &Path, out: &Path| fresh_args_epochs(data, out, epochs);
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    let o = podgpu()
        .args(fresh_args(&data, &reference))
        .output()
        .unwrap();
    assert_ok(&o);
    let full = t0.elapsed();

    let dir = tmp.path().join("killed");
    let mut rng = Rng::new(7);
    let (mut kills, mut interrupts, mut resumes) = (0, 0, 0);
    let mut finished = false;
    for attempt in 0..40 {
        let resuming = dir.join("last.safetensors").exists();
        let args = if resuming {
            resumes += 1;
            ["train", "--resume", dir.to_str().unwrap()]
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            fresh_args(&data, &dir)
        };
        let mut child = start(&args, &log);
        // Up to 12 interruptions at random moments within the first sixth of a full run's time (each
        // attempt has less left to do), then let it finish.
        if attempt < 12 {
            let wait = full.mul_f64(0.02 + 0.15 * rng.uniform());
            std::thread::sleep(wait);
            if child.try_wait().unwrap().is_none() {
                let sigint = attempt % 3 == 2;
                signal(&child, if sigint { libc::SIGINT } else { libc::SIGKILL });
                let status = child.wait().unwrap();
                let err = std::fs::read_to_string(&log).unwrap();
                if sigint {
                    interrupts += 1;
                    // Before the handler is installed SIGINT just ends the process; after, podgpu
                    // saves and says how to resume, with status 130.
                    if status.code() == Some(130) {
                        assert!(
                            err.contains("interrupted") && err.contains("podgpu train --resume"),
                            "{err}"
                        );
                    } else if status.code().is_some() {
                        assert!(status.success(), "status {status:?} after SIGINT:\n{err}");
                    }
                } else {
                    kills += 1;
                }
                assert!(
                    !err.contains("panicked") && !err.contains("internal error"),
                    "{err}"
                );
                if status.success() {
                    finished = true;
                    break;
                }
                continue;
            }
        }
        let status = child.wait().unwrap();
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(
            status.success(),
            "attempt {attempt} failed ({status:?}):\n{err}"
        );
        finished = true;
        break;
    }
    assert!(finished, "the run never finished");
    assert!(
        kills + interrupts >= 3,
        "only {kills} kills and {interrupts} interrupts landed (a full run takes {full:?})"
    );
    assert!(resumes >= 1, "no resume happened");
    assert_same_checkpoint(
        &reference.join("last.safetensors"),
        &dir.join("last.safetensors"),
    );
    assert_eq!(exact_metrics(&reference), exact_metrics(&dir));
    assert!(temp_files(&dir).is_empty(), "{:?}", temp_files(&dir));
    eprintln!(
        "{kills} SIGKILLs, {interrupts} SIGINTs, {resumes} resumes; {epochs} epochs in {full:?}"
    );
}

/// Ctrl-C in the middle of an epoch: status 130, a message naming the resume command, a checkpoint of
/// that exact step, and resuming from it gives the uninterrupted result.
#[test]
fn sigint_mid_epoch_checkpoints_the_exact_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tiny.bin");
    tiny_dataset(&data, 12, 3, 480, 30);
    let reference = tmp.path().join("reference");
    let dir = tmp.path().join("stopped");
    let mut args = fresh_args(&data, &reference);
    let epochs = args.iter().position(|a| a == "--epochs").unwrap();
    args[epochs + 1] = "1".into();
    assert_ok(&podgpu().args(&args).output().unwrap());

    let mut args = fresh_args(&data, &dir);
    args[epochs + 1] = "1".into();
    let log = tmp.path().join("stderr.txt");
    // The run waits after its third step until the signal lands, so that a fast (or a loaded)
    // machine cannot let it finish the epoch before the signal is sent. Signalled as soon as
    // training has started; the output is drained to the end (`start_training`).
    let hold = [(podgpu::train::trainer::TEST_HOLD_AT_STEP_ENV, "3")];
    let (mut child, drain) = start_training(&args, &log, &hold);
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    let out = drain.join().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{out}\n{err}");
    assert!(out.contains("stopped after batch"), "{out}");
    assert!(err.contains("in epoch 1 after batch"), "{err}");
    assert!(
        err.contains(&format!("podgpu train --resume {}", dir.display())),
        "{err}"
    );
    let ck = podgpu::train::load_checkpoint(&dir.join("last.safetensors")).unwrap();
    assert_eq!(ck.state.epoch, 0);
    let tally = podgpu::train::tally::EpochTally::from_extra(&ck.state.extra)
        .unwrap()
        .expect("a mid-epoch checkpoint records the epoch's sums");
    // Stopped at the first step boundary after the signal: at the latest the held third.
    assert!((1..=3).contains(&tally.next_batch), "{tally:?}");
    assert_eq!(ck.state.global_step as usize, tally.next_batch);

    let o = podgpu()
        .args(["train", "--resume", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(text(&o).0.contains("after batch"), "{}", text(&o).0);
    assert_same_checkpoint(
        &reference.join("last.safetensors"),
        &dir.join("last.safetensors"),
    );
    assert_eq!(exact_metrics(&reference), exact_metrics(&dir));
}

/// Starts `args` with its stderr into `log` and returns the child once training has started, with
/// a thread draining its output (`common::spawn_until_training`).
fn start_training(
    args: &[String],
    log: &Path,
    env: &[(&str, &str)],
) -> (Child, std::thread::JoinHandle<String>) {
    let mut cmd = podgpu();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).stderr(std::fs::File::create(log).unwrap());
    spawn_until_training(&mut cmd, Duration::from_secs(60))
}

/// SIGHUP (the terminal closed) stops a run like Ctrl-C: status 130, a checkpoint of that step.
#[test]
fn sighup_stops_like_sigterm_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tiny.bin");
    tiny_dataset(&data, 12, 3, 480, 30);
    let dir = tmp.path().join("hung-up");
    let log = tmp.path().join("stderr.txt");
    let mut args = fresh_args(&data, &dir);
    let epochs = args.iter().position(|a| a == "--epochs").unwrap();
    args[epochs + 1] = "1".into();
    let hold = [(podgpu::train::trainer::TEST_HOLD_AT_STEP_ENV, "3")];
    let (child, drain) = start_training(&args, &log, &hold);
    signal(&child, libc::SIGHUP);
    let out = child.wait_with_output().unwrap();
    let stdout = drain.join().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{err}");
    assert!(err.contains("interrupted: stopped in epoch 1"), "{err}");
    let ck = podgpu::train::load_checkpoint(&dir.join("last.safetensors")).unwrap();
    assert!(
        podgpu::train::tally::EpochTally::from_extra(&ck.state.extra)
            .unwrap()
            .is_some()
    );
    assert_ok(
        &podgpu()
            .args(["train", "--resume", dir.to_str().unwrap()])
            .output()
            .unwrap(),
    );

    // Under `nohup` (SIGHUP ignored when podgpu starts) a hang-up does not stop the run.
    let dir = tmp.path().join("nohup");
    let mut args = fresh_args(&data, &dir);
    args[epochs + 1] = "1".into();
    let mut cmd = podgpu();
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: signal() in the child before exec, as nohup does.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            if line.unwrap().starts_with("run folder") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    signal(&child, libc::SIGHUP);
    let status = child.wait().unwrap();
    drain.join().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

/// A memory-mapped dataset truncated while a run reads it: the run stops with a message and a
/// checkpoint of the last step that trained on good data (no SIGBUS); with the file put back, the
/// resumed run ends with the weights of an uninterrupted one. A small file is read into memory when
/// opened, so truncating it does not touch the run at all.
#[test]
fn a_dataset_truncated_under_a_run_stops_it_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tiny.bin");
    tiny_dataset(&data, 12, 3, 480, 30);
    let bytes = std::fs::read(&data).unwrap();
    let with_epochs = |out: &Path, epochs: &str| {
        let mut a = fresh_args(&data, out);
        let i = a.iter().position(|a| a == "--epochs").unwrap();
        a[i + 1] = epochs.into();
        a
    };
    let reference = tmp.path().join("reference");
    assert_ok(
        &podgpu()
            .args(with_epochs(&reference, "2"))
            .output()
            .unwrap(),
    );

    let dir = tmp.path().join("truncated");
    let log = tmp.path().join("stderr.txt");
    let env = [(podgpu::data::dataset::IN_MEMORY_ENV, "0")];
    let (child, drain) = start_training(&with_epochs(&dir, "2"), &log, &env);
    // Cut the file inside the first split's pixels, as `> tiny.bin` or a failing copy would.
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    let out = child.wait_with_output().unwrap();
    let stdout = drain.join().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{err}");
    assert!(
        err.contains("changed while training")
            && err.contains("without training on the changed data"),
        "{err}"
    );
    assert!(err.contains("podgpu train --resume"), "{err}");
    assert!(dir.join("last.safetensors").is_file());
    // Resuming with the file still cut is refused; with it put back, the run ends as if never cut.
    let o = podgpu()
        .args(["train", "--resume", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    std::fs::write(&data, &bytes).unwrap();
    assert_ok(
        &podgpu()
            .args(["train", "--resume", dir.to_str().unwrap()])
            .env(podgpu::data::dataset::IN_MEMORY_ENV, "0")
            .output()
            .unwrap(),
    );
    assert_same_checkpoint(
        &reference.join("last.safetensors"),
        &dir.join("last.safetensors"),
    );
    assert_eq!(exact_metrics(&reference), exact_metrics(&dir));

    // Read into memory (the default for a small file): the run does not notice.
    let dir = tmp.path().join("in-memory");
    let (child, drain) = start_training(&with_epochs(&dir, "1"), &log, &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    drain.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    std::fs::write(&data, &bytes).unwrap();
}
