//! Crash-safe file writes: every file podgpu writes (checkpoints, PEDCC, configs, plots, datasets) goes
//! through a temporary file in the same folder, fsync, rename over the target and an fsync of the
//! folder, so that a crash at any moment leaves either the old file or the new one.
//!
//! Temporary files carry a marker no user file has (`.NAME.podgpu-tmp-PID[.ext]`), so that clean-up
//! after a crash removes only what podgpu wrote (`is_own_temp_name`).
//!
//! Reading (issue 14): every file podgpu reads is opened with `open_regular`, which refuses named
//! pipes, devices, sockets and folders at once (a FIFO would block forever, `/dev/zero` never ends)
//! and never blocks while it looks; `read_regular` also refuses a file larger than the machine's
//! memory before allocating for it.

use anyhow::{bail, Result};
use std::borrow::Cow;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The marker in the name of every temporary file podgpu writes.
pub const TEMP_MARKER: &str = ".podgpu-tmp-";

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
    let pid = std::process::id();
    let tmp_name = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!(".{stem}{TEMP_MARKER}{pid}.{ext}"),
        _ => format!(".{name}{TEMP_MARKER}{pid}"),
    };
    path.with_file_name(tmp_name)
}

/// Whether `name` is a temporary file of `temp_path_for` (a name only podgpu writes:
/// `.NAME.podgpu-tmp-PID[.ext]`).
pub fn is_own_temp_name(name: &str) -> bool {
    if !name.starts_with('.') {
        return false;
    }
    name.match_indices(TEMP_MARKER).any(|(i, _)| {
        let rest = &name[i + TEMP_MARKER.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && (digits == rest.len() || rest[digits..].starts_with('.'))
    })
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

/// What kind of thing `md` describes, for "… is a named pipe (FIFO), not a regular file".
fn kind_of(md: &fs::Metadata) -> &'static str {
    let t = md.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        return "a folder";
    }
    "not a regular file"
}

fn not_regular(md: &fs::Metadata) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "it is {}, not a regular file; podgpu reads only regular files (save the data to a \
             file and give that)",
            kind_of(md)
        ),
    )
}

/// Opens `path` for reading if it is a regular file (after symbolic links). Named pipes, devices,
/// sockets and folders are refused at once, without blocking (a FIFO is opened non-blocking and
/// checked before anything is read).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let md = fs::metadata(path)?;
    if !md.is_file() {
        return Err(not_regular(&md));
    }
    let mut opts = fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path)?;
    // The path may have been replaced between the two looks: what counts is what was opened.
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(not_regular(&md));
    }
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fcntl on a descriptor we own; only the O_NONBLOCK flag changes.
        unsafe {
            let fd = f.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(f)
}

/// Reads a whole regular file (see `open_regular`); a file larger than the machine's memory is
/// refused before anything is allocated for it.
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let len = f.metadata()?.len();
    if let Some(mem) = crate::budget::machine_memory() {
        if len as u128 > mem as u128 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!(
                    "it is {}, more than this machine's memory ({})",
                    crate::budget::fmt_bytes(len as u128),
                    crate::budget::fmt_bytes(mem as u128)
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(len as usize);
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// `read_regular` as UTF-8 text.
pub fn read_regular_to_string(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is not UTF-8 text".to_string(),
        )
    })
}

/// `s` as a shell word: unchanged when it needs no quoting, else in single quotes, so that a command
/// podgpu suggests can be pasted as it is whatever the path holds (spaces, quotes, `$`).
pub fn shell_quote(s: &str) -> Cow<'_, str> {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:@%+=,-".contains(&b));
    if plain {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', "'\\''")))
    }
}

/// A path as a shell word (see `shell_quote`).
pub fn quoted(path: &Path) -> String {
    shell_quote(&path.display().to_string()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_carry_a_marker_only_podgpu_uses() {
        let t = temp_path_for(Path::new("/x/last.safetensors"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".last.podgpu-tmp-") && name.ends_with(".safetensors"));
        assert!(is_own_temp_name(name), "{name}");
        let t = temp_path_for(Path::new("cifar"));
        assert!(is_own_temp_name(t.file_name().unwrap().to_str().unwrap()));
        for user in [
            ".notes.tmp-1",
            ".last.tmp-123.safetensors",
            "a.podgpu-tmp-1",
            ".x.podgpu-tmp-",
            ".x.podgpu-tmp-12abc",
            "last.safetensors",
        ] {
            assert!(!is_own_temp_name(user), "{user}");
        }
    }

    #[test]
    fn non_regular_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_regular(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a folder, not a regular file"), "{e}");
        let e = read_regular(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a character device"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo on a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_regular(&fifo).unwrap_err().to_string();
            assert!(e.contains("a named pipe (FIFO)"), "{e}");
        }
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(read_regular(&f).unwrap(), b"abc");
    }

    #[test]
    fn suggested_commands_quote_paths_that_need_it() {
        assert_eq!(shell_quote("runs/resnet18-pod"), "runs/resnet18-pod");
        assert_eq!(shell_quote("my runs/a"), "'my runs/a'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote(""), "''");
    }
}
