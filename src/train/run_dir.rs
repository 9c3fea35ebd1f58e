//! Housekeeping of a run folder: one trainer at a time (an advisory lock that the kernel releases
//! when the process dies, however it dies), removal of the temporary files that a process killed
//! in the middle of an atomic write leaves behind, and (issue 14) the rule that a fresh run never
//! clobbers a folder: it needs a new or empty one (or `--overwrite`, which replaces only the files a
//! run writes), and default folder names never collide.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Name of the lock file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// The files a run writes into its folder: what `--overwrite` replaces (nothing else is touched).
/// `config.toml` first: it is written first and removed last.
pub const RUN_FILES: &[&str] = &[
    "config.toml",
    super::identity::RUN_FILE,
    "pedcc.safetensors",
    "last.safetensors",
    "best.safetensors",
    "metrics.jsonl",
    "metrics.csv",
    "loss.png",
    "accuracy.png",
];

/// The entries of `dir` that are not podgpu's own housekeeping (the lock file and temporaries),
/// sorted; empty when `dir` does not exist.
fn user_visible_entries(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("could not list {}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE && !is_temp_file_name(n))
        .collect();
    names.sort();
    Ok(names)
}

/// Refuses a fresh run's `--out` unless it is new or empty, or `overwrite` was given (then only the
/// run files in it will be replaced). Touches nothing.
pub fn check_fresh(dir: &Path, overwrite: bool) -> Result<()> {
    if !dir.is_dir() {
        if dir.exists() {
            bail!(
                "--out {} is a file, not a folder; choose another --out",
                dir.display()
            );
        }
        // Not there (or not reachable): creating it says what is wrong.
        return Ok(());
    }
    let names = user_visible_entries(dir)?;
    if names.is_empty() || overwrite {
        return Ok(());
    }
    let q = crate::fsutil::quoted(dir);
    if names.iter().any(|n| n == "last.safetensors") {
        bail!(
            "{} already holds a run (last.safetensors); continue it with `podgpu train --resume \
             {q}`, choose another --out, or pass --overwrite to replace that run",
            dir.display()
        );
    }
    const SHOWN: usize = 6;
    let mut list = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        list.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    bail!(
        "{} is not empty (it holds {list}); a new run needs a new or empty folder: choose another \
         --out, or pass --overwrite to replace the files a run writes there ({}) and leave the \
         others alone",
        dir.display(),
        RUN_FILES.join(", ")
    )
}

/// Decides, before anything is built, whether a fresh run with the settings `cfg` may use `dir`
/// (`default_name`: a folder `create_fresh` will make new), refusing as `check_fresh` does, and
/// whether it replaces run files there: with `--overwrite`, or when the folder holds the same run
/// killed in its first epoch (`holds_unstarted_run`, said with a note). Touches nothing.
pub fn plan_fresh(
    dir: &Path,
    default_name: bool,
    overwrite: bool,
    cfg: &super::config::TrainConfig,
) -> Result<bool> {
    if default_name {
        return Ok(overwrite);
    }
    let restart = !overwrite && holds_unstarted_run(dir, cfg);
    check_fresh(dir, overwrite || restart)?;
    if restart {
        println!(
            "note: {} holds this run, stopped before its first checkpoint; starting it again",
            dir.display()
        );
    }
    Ok(overwrite || restart)
}

/// Whether `dir` holds only what a run with the settings `cfg` writes before its first checkpoint
/// (`config.toml` with these very settings and the other run files, but no `last.safetensors` or
/// `best.safetensors`): the same run killed in its first epoch, which cannot be resumed. Starting it
/// again there loses nothing.
pub fn holds_unstarted_run(dir: &Path, cfg: &super::config::TrainConfig) -> bool {
    let Ok(names) = user_visible_entries(dir) else {
        return false;
    };
    let checkpoint = |n: &str| n == "last.safetensors" || n == "best.safetensors";
    if names.is_empty()
        || !names
            .iter()
            .all(|n| RUN_FILES.contains(&n.as_str()) && !checkpoint(n))
    {
        return false;
    }
    crate::fsutil::read_regular_to_string(&dir.join("config.toml"))
        .ok()
        .and_then(|t| super::config::TrainConfig::from_toml_str(&t).ok())
        .is_some_and(|saved| &saved == cfg)
}

/// Creates a fresh run's folder and locks it: `dir` as given (its parents created; see
/// `check_fresh`, checked again under the lock), or, for a default name, `base` or the first of
/// `base-2`, `base-3`, … that does not exist yet (created atomically, so two runs started in the
/// same second never share a folder). With `overwrite` the run files of an earlier run in it are
/// removed. Returns the folder and its lock.
pub fn create_fresh(dir: &Path, default_name: bool, overwrite: bool) -> Result<(PathBuf, RunLock)> {
    let cannot = |d: &Path| {
        format!(
            "could not create the run folder {}; choose a writable --out",
            d.display()
        )
    };
    let dir = if default_name {
        create_unique(dir).with_context(|| cannot(dir))?
    } else {
        std::fs::create_dir_all(dir).with_context(|| cannot(dir))?;
        dir.to_path_buf()
    };
    let lock = lock(&dir)?;
    check_fresh(&dir, overwrite)?;
    if overwrite {
        // config.toml last: a run killed in here is still recognised by it (`holds_unstarted_run`).
        for f in RUN_FILES.iter().rev() {
            let p = dir.join(f);
            if p.is_file() {
                std::fs::remove_file(&p)
                    .with_context(|| format!("could not remove {} (--overwrite)", p.display()))?;
            }
        }
    }
    remove_stale_temp_files(&dir)?;
    Ok((dir, lock))
}

/// Creates `base`, or `base-2`, `base-3`, … (the first that does not exist), with its parents.
pub fn create_unique(base: &Path) -> std::io::Result<PathBuf> {
    if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    for i in 1.. {
        let candidate = match i {
            1 => base.to_path_buf(),
            _ => base.with_file_name(format!("{name}-{i}")),
        };
        match std::fs::create_dir(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

/// Holds the run folder's lock until dropped (or the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the run folder's lock, failing at once if another process holds it.
pub fn lock(dir: &Path) -> Result<RunLock> {
    let path = dir.join(LOCK_FILE);
    // A FIFO (or device) in its place would block the open or never be a lock: refused at once.
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        if !md.is_file() {
            bail!(
                "{} is not a regular file; remove it (podgpu keeps an empty lock file there so \
                 that two trainers never share the folder)",
                path.display()
            );
        }
    }
    let mut opts = OpenOptions::new();
    opts.create(true).truncate(false).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW);
    }
    let file = opts.open(&path).with_context(|| {
        format!(
            "could not create {} in the run folder; check that {} is writable",
            path.display(),
            dir.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            bail!(
                "another podgpu is training in {} right now; wait for it to finish or stop it \
                 (Ctrl-C), or choose another --out",
                dir.display()
            );
        }
    }
    Ok(RunLock { _file: file, path })
}

/// Whether `name` is a temporary file that podgpu's atomic writes leave when killed: a name with
/// podgpu's marker (`.NAME.podgpu-tmp-PID[.ext]`, see `fsutil::temp_path_for`), or the older form
/// (`.NAME.tmp-PID[.ext]`, `.NAME.tmpPID`) of a file a run writes (`RUN_FILES`). Anything else is the
/// user's and stays, however it is named.
pub fn is_temp_file_name(name: &str) -> bool {
    if crate::fsutil::is_own_temp_name(name) {
        return true;
    }
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    RUN_FILES.iter().any(|f| {
        let (stem, ext) = f.rsplit_once('.').unwrap_or((f, ""));
        let legacy = |tail: &str| {
            let tail = tail.strip_prefix('-').unwrap_or(tail);
            let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && (tail.len() == digits || tail[digits..] == *format!(".{ext}"))
        };
        rest.strip_prefix(stem)
            .and_then(|r| r.strip_prefix(".tmp"))
            .is_some_and(legacy)
            || rest
                .strip_prefix(*f)
                .and_then(|r| r.strip_prefix(".tmp"))
                .is_some_and(legacy)
    })
}

/// Deletes the temporary files that interrupted atomic writes left in `dir` (call with the run
/// folder locked, so that no writer is active). Returns the names removed.
pub fn remove_stale_temp_files(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("could not list {}", dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temp_file_name(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path()).with_context(|| {
                format!(
                    "could not remove the stale temporary file {name} in {}",
                    dir.display()
                )
            })?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_atomic_write_temporaries() {
        for t in [
            ".last.podgpu-tmp-123.safetensors",
            ".metrics.podgpu-tmp-9.jsonl",
            ".config.podgpu-tmp-42.toml",
            ".cifar.podgpu-tmp-5.bin",
            // The older names of run files' temporaries.
            ".last.tmp-123.safetensors",
            ".metrics.tmp-9.jsonl",
            ".config.tmp-42.toml",
            ".pedcc.safetensors.tmp777",
        ] {
            assert!(is_temp_file_name(t), "{t}");
        }
        for t in [
            "last.safetensors",
            ".lock",
            "tmp-1",
            ".tmp",
            ".notes.tmpx",
            "a.tmp-1",
            // The user's own files, whatever their names look like.
            ".notes.tmp-1",
            ".cifar.bin.tmp-5",
            ".last.tmp-1.bak",
        ] {
            assert!(!is_temp_file_name(t), "{t}");
        }
    }

    #[test]
    fn removes_stale_temporaries_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            ".last.podgpu-tmp-1.safetensors",
            ".last.tmp-2.safetensors",
            "last.safetensors",
            ".lock",
            ".notes.tmp-3",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let removed = remove_stale_temp_files(dir.path()).unwrap();
        assert_eq!(
            removed,
            vec![
                ".last.podgpu-tmp-1.safetensors".to_string(),
                ".last.tmp-2.safetensors".to_string()
            ]
        );
        for kept in ["last.safetensors", ".lock", ".notes.tmp-3"] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
    }

    #[test]
    fn a_fresh_run_needs_a_new_or_empty_folder() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        check_fresh(&out, false).unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join(LOCK_FILE), b"").unwrap();
        check_fresh(&out, false).unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        std::fs::write(out.join("config.toml"), b"lr = 1").unwrap();
        let e = check_fresh(&out, false).unwrap_err().to_string();
        assert!(
            e.contains("is not empty (it holds config.toml, notes.txt)")
                && e.contains("--overwrite"),
            "{e}"
        );
        let (_, lock) = create_fresh(&out, false, true).unwrap();
        drop(lock);
        assert!(!out.join("config.toml").exists());
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
    }

    #[test]
    fn the_same_run_killed_before_its_first_checkpoint_may_start_again() {
        use crate::train::config::TrainConfig;
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            out: Some(dir.path().to_path_buf()),
            ..TrainConfig::default()
        };
        cfg.save(&dir.path().join("config.toml")).unwrap();
        for (f, text) in [
            ("run.json", "{}"),
            ("pedcc.safetensors", "x"),
            ("metrics.jsonl", ""),
            ("metrics.csv", "epoch,train_loss\n"),
            (LOCK_FILE, ""),
        ] {
            std::fs::write(dir.path().join(f), text).unwrap();
        }
        assert!(holds_unstarted_run(dir.path(), &cfg));
        let other = TrainConfig {
            lr: 0.5,
            ..cfg.clone()
        };
        assert!(!holds_unstarted_run(dir.path(), &other), "other settings");
        // Killed after its first epoch's metrics, before the checkpoint: still not resumable.
        std::fs::write(dir.path().join("metrics.jsonl"), "{\"epoch\":1}\n").unwrap();
        std::fs::write(dir.path().join("loss.png"), "png").unwrap();
        assert!(holds_unstarted_run(dir.path(), &cfg));
        std::fs::write(dir.path().join("best.safetensors"), "a checkpoint").unwrap();
        assert!(
            !holds_unstarted_run(dir.path(), &cfg),
            "a checkpoint was written"
        );
        std::fs::remove_file(dir.path().join("best.safetensors")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        assert!(
            !holds_unstarted_run(dir.path(), &cfg),
            "a file of the user's"
        );
    }

    #[test]
    fn default_folders_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("runs/resnet18-pod-20250101-000000");
        let a = create_unique(&base).unwrap();
        let b = create_unique(&base).unwrap();
        let c = create_unique(&base).unwrap();
        assert_eq!(a, base);
        assert_eq!(b, dir.path().join("runs/resnet18-pod-20250101-000000-2"));
        assert_ne!(b, c);
        assert!(a.is_dir() && b.is_dir() && c.is_dir());
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_the_lock_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = std::ffi::CString::new(dir.path().join(LOCK_FILE).to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = lock(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let e = lock(dir.path()).unwrap_err().to_string();
        assert!(e.contains("another podgpu is training"), "{e}");
        drop(first);
        lock(dir.path()).unwrap();
    }
}
