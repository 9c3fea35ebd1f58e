//! Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed, a session ended) during training: the
//! handler only sets a flag; the training loop
//! checks it after every step, writes a checkpoint of where it stopped and exits with a message
//! saying how to resume. A second signal while the checkpoint is being written ends the process at
//! once (the handler is reset to the default after the first one), which still leaves the previous
//! checkpoint intact because checkpoints are written atomically.
//!
//! After SIGHUP the terminal may be gone, and printing to it would fail (a panic in `println!`)
//! before the checkpoint is written: the first `stop_requested` after a hang-up points standard
//! output and error that are terminals at /dev/null (output to files and pipes stays).

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
/// Set by SIGHUP; cleared once the output was detached from the terminal.
static HANGUP: AtomicBool = AtomicBool::new(false);

/// Exit status of a run stopped by a signal: 128 + SIGINT, as shells report Ctrl-C.
pub const INTERRUPTED_EXIT_CODE: i32 = 130;

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic stores: the one thing a signal handler may safely do here.
    #[cfg(unix)]
    if sig == libc::SIGHUP {
        HANGUP.store(true, Ordering::SeqCst);
    }
    let _ = sig;
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM/SIGHUP handler (idempotent); a signal ignored when the process started
/// (`nohup`) stays ignored. Errors only if the OS refuses.
#[cfg(unix)]
pub fn install() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // touches an atomic; SA_RESETHAND makes a second signal take the default action (exit).
        unsafe {
            // A signal the process was started with ignored stays ignored (`nohup` ignores
            // SIGHUP so that a closed terminal does not stop the run).
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn install() -> std::io::Result<()> {
    Ok(())
}

/// Whether a stop was requested (by a signal or `request_stop`).
pub fn stop_requested() -> bool {
    if HANGUP.swap(false, Ordering::SeqCst) {
        detach_from_terminal();
    }
    STOP.load(Ordering::SeqCst)
}

/// Points standard output and error at /dev/null where they are a terminal (after a hang-up the
/// terminal is gone and writing to it fails).
fn detach_from_terminal() {
    #[cfg(unix)]
    // SAFETY: open/isatty/dup2/close on descriptors this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null < 0 {
            return;
        }
        for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            if libc::isatty(fd) == 1 {
                libc::dup2(null, fd);
            }
        }
        libc::close(null);
    }
}

/// Asks the training loop to stop after its current step, as Ctrl-C does (tests, embedding code).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Clears a stop request (a library caller that wants to train again in the same process).
pub fn clear_stop() {
    STOP.store(false, Ordering::SeqCst);
}

/// The error a run returns when it stopped on request. Its message says what was saved and how to
/// continue; `podgpu` prints it without the `error:` prefix and exits with `INTERRUPTED_EXIT_CODE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Interrupted {
    pub run_dir: PathBuf,
    /// Completed epochs.
    pub epoch: usize,
    /// Steps taken in the unfinished epoch (0 when it stopped between epochs).
    pub batches_done: usize,
    pub batches_per_epoch: usize,
    /// Ranks of the run: with several, the batches above are global batches (one step each).
    pub ranks: usize,
    pub global_step: u64,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.run_dir.join("last.safetensors");
        let at = if self.batches_done == 0 {
            format!("after epoch {}", self.epoch)
        } else {
            format!(
                "in epoch {} after {}batch {} of {}",
                self.epoch + 1,
                if self.ranks > 1 { "global " } else { "" },
                self.batches_done,
                self.batches_per_epoch
            )
        };
        write!(
            f,
            "interrupted: stopped {at} (step {}); the checkpoint {} holds this point exactly. \
             Continue with `podgpu train --resume {}`",
            self.global_step,
            last.display(),
            crate::fsutil::quoted(&self.run_dir)
        )
    }
}

impl std::error::Error for Interrupted {}
