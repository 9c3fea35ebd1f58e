//! Crash-safe file writes: every file podgpu writes (checkpoints, PEDCC, configs, plots, datasets) goes
//! through a temporary file in the same folder, fsync, rename over the target and an fsync of the
//! folder, so that a crash at any moment leaves either the old file or the new one.

use anyhow::{bail, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes a file so that readers (and a crash at any moment) see either the old content or the new
/// one: a temporary file in the same folder, write, fsync, rename over the target, fsync the folder.
/// A missing folder is reported as such (the caller chose a path that cannot work).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!(
            "could not write {}: folder {} does not exist; create it first or choose another path",
            path.display(),
            dir.display()
        );
    }
    let tmp = temp_path_for(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        bail!(
            "could not write {}: {e}; check that the folder exists, is writable and has free space",
            path.display()
        );
    }
    Ok(())
}

/// A temporary name next to `path` (same folder, so the rename stays on one file system). The
/// extension is kept last so that writers that choose a format by extension still do.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp_name = match name.rsplit_once('.') {
        Some((stem, ext)) => format!(".{stem}.tmp-{}.{ext}", std::process::id()),
        None => format!(".{name}.tmp-{}", std::process::id()),
    };
    path.with_file_name(tmp_name)
}

/// Makes a finished temporary file (see `temp_path_for`) durable and moves it over `path`.
pub fn commit_temp(tmp: &Path, path: &Path) -> Result<()> {
    let result = (|| -> std::io::Result<()> {
        File::open(tmp)?.sync_all()?;
        fs::rename(tmp, path)?;
        sync_parent(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(tmp);
        bail!("could not write {}: {e}", path.display());
    }
    Ok(())
}

/// fsync of the folder holding `path`, so the rename itself survives a power loss.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = parent_dir(path);
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
