//! A memory-mapped dataset file that is truncated (or rewritten in place) while podgpu reads it makes
//! the kernel send SIGBUS on the next access to a page past the new end, which would kill the run and
//! lose its epoch (issue 14). This guard catches that: a SIGBUS whose address lies in a registered
//! mapping is answered by mapping a page of zeros over the faulting page (so the read completes) and
//! counting the fault for that mapping; the trainer checks the count before every batch and stops
//! with a checkpoint of the last step that trained on good data. A SIGBUS anywhere else goes to the
//! handler that was installed before (Rust's stack-overflow handler, or the default action).
//!
//! Small files are read into memory instead (see `dataset`), so they cannot change under a run.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

const SLOTS: usize = 64;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action before ours (for faults that are not ours).
#[cfg(unix)]
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

/// A registered mapping; unregistered when dropped.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Pages of the mapping that faulted (read as zeros) since it was registered.
    pub fn faults(&self) -> u64 {
        self.slot
            .map_or(0, |i| TABLE[i].faults.load(Ordering::SeqCst))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            TABLE[i].start.store(0, Ordering::SeqCst);
            TABLE[i].len.store(0, Ordering::SeqCst);
        }
    }
}

/// Registers the mapping `[start, start + len)`; its faults are then survived and counted. Without a
/// free slot (or where the handler cannot be installed) the mapping is unguarded, as before.
pub fn register(start: *const u8, len: usize) -> Guard {
    if len == 0 || !install() {
        return Guard { slot: None };
    }
    for (i, s) in TABLE.iter().enumerate() {
        if s.start
            .compare_exchange(0, usize::MAX, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            s.faults.store(0, Ordering::SeqCst);
            s.len.store(len, Ordering::SeqCst);
            s.start.store(start as usize, Ordering::SeqCst);
            return Guard { slot: Some(i) };
        }
    }
    Guard { slot: None }
}

#[cfg(unix)]
fn install() -> bool {
    PREVIOUS
        .get_or_init(|| {
            // SAFETY: sysconf and sigaction with valid, zero-initialised arguments; the handler only
            // reads atomics and calls mmap (a system call) on memory it owns by registration.
            unsafe {
                let page = libc::sysconf(libc::_SC_PAGESIZE);
                if page > 0 {
                    PAGE.store(page as usize, Ordering::SeqCst);
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut old) != 0 {
                    return None;
                }
                Some(old)
            }
        })
        .is_some()
}

#[cfg(not(unix))]
fn install() -> bool {
    false
}

#[cfg(unix)]
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &TABLE {
        let start = s.start.load(Ordering::SeqCst);
        let len = s.len.load(Ordering::SeqCst);
        if start != 0 && start != usize::MAX && addr >= start && addr - start < len {
            let page = PAGE.load(Ordering::SeqCst);
            let at = addr & !(page - 1);
            // SAFETY: replaces one page of a read-only mapping that this process owns (registered
            // above) with zeros; MAP_FIXED over our own mapping is what makes the faulting read
            // complete.
            let r = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                s.faults.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
    // Not ours: hand it to the handler before ours, or die of it as without a handler.
    // SAFETY: calls the previous handler as it was installed (with the signature its flags
    // declare), or restores the default action so that the faulting access kills the process.
    unsafe {
        match PREVIOUS.get().copied().flatten() {
            Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
                if old.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(old.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }
}
