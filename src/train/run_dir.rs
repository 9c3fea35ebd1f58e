//! Housekeeping of a run folder: one trainer at a time (an advisory lock that the kernel releases
//! when the process dies, however it dies), and removal of the temporary files that a process killed
//! in the middle of an atomic write leaves behind.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Name of the lock file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// Holds the run folder's lock until dropped (or the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the run folder's lock, failing at once if another process holds it.
pub fn lock(dir: &Path) -> Result<RunLock> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| {
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

/// Whether `name` is a temporary file of an atomic write (`.NAME.tmp-PID[.ext]` from
/// `checkpoint::write_atomic`, `.NAME.tmpPID` from the PEDCC writer).
pub fn is_temp_file_name(name: &str) -> bool {
    if !name.starts_with('.') {
        return false;
    }
    name.match_indices(".tmp").any(|(i, _)| {
        let rest = &name[i + 4..];
        let rest = rest.strip_prefix('-').unwrap_or(rest);
        rest.starts_with(|c: char| c.is_ascii_digit())
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
            ".last.tmp-123.safetensors",
            ".metrics.tmp-9.jsonl",
            ".config.tmp-42.toml",
            ".pedcc.safetensors.tmp777",
            ".cifar.bin.tmp-5",
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
        ] {
            assert!(!is_temp_file_name(t), "{t}");
        }
    }

    #[test]
    fn removes_stale_temporaries_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        for f in [".last.tmp-1.safetensors", "last.safetensors", ".lock"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let removed = remove_stale_temp_files(dir.path()).unwrap();
        assert_eq!(removed, vec![".last.tmp-1.safetensors".to_string()]);
        assert!(dir.path().join("last.safetensors").exists());
        assert!(dir.path().join(".lock").exists());
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
