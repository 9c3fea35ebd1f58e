//! Finding and loading the CUDA libraries (driver, NVRTC, cuBLAS, cuBLASLt, cuDNN) at run time.
//!
//! cudarc opens each library with `dlopen` by bare soname (`libcublas.so.13`, …) and *panics* when it
//! cannot. Python installs (PyTorch wheels) put the libraries in `site-packages/nvidia/*/lib`, where
//! `dlopen` does not look. So before cudarc touches a library we search the usual places for the file
//! names cudarc will ask for and `dlopen` the first hit by full path with `RTLD_NOW | RTLD_GLOBAL`: a
//! later `dlopen` of the soname then finds the already loaded object instead of searching the disk.
//! Only after `is_culib_present()` says yes is the cudarc API of that library used.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One CUDA library podgpu needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    Driver,
    Nvrtc,
    Cublas,
    CublasLt,
    Cudnn,
}

impl Lib {
    pub const ALL: [Lib; 5] = [
        Lib::Driver,
        Lib::Nvrtc,
        Lib::CublasLt,
        Lib::Cublas,
        Lib::Cudnn,
    ];

    /// The base name cudarc derives its candidate file names from.
    fn cudarc_name(self) -> &'static str {
        match self {
            Lib::Driver => "cuda",
            Lib::Nvrtc => "nvrtc",
            Lib::Cublas => "cublas",
            Lib::CublasLt => "cublasLt",
            Lib::Cudnn => "cudnn",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Lib::Driver => "CUDA driver (libcuda)",
            Lib::Nvrtc => "NVRTC (libnvrtc)",
            Lib::Cublas => "cuBLAS (libcublas)",
            Lib::CublasLt => "cuBLASLt (libcublasLt)",
            Lib::Cudnn => "cuDNN (libcudnn)",
        }
    }

    /// Whether cudarc can open the library now (never panics).
    pub fn present(self) -> bool {
        // SAFETY: these only try `dlopen` on a list of names and close the handle again.
        unsafe {
            match self {
                Lib::Driver => cudarc::driver::sys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
                Lib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                Lib::Cudnn => cudarc::cudnn::sys::is_culib_present(),
            }
        }
    }

    /// The file names cudarc tries, in its order (cudarc 0.19 `get_lib_name_candidates`).
    pub fn candidates(self) -> Vec<String> {
        cudarc::get_lib_name_candidates(self.cudarc_name())
    }

    /// Libraries that the main one opens itself by soname and that therefore must be loadable too:
    /// NVRTC's builtins, cuDNN 9's sub-libraries. Matched by file-name prefix in the same folder.
    fn companions(self) -> &'static [&'static str] {
        match self {
            Lib::Nvrtc => &["libnvrtc-builtins.so"],
            // Dependency order: graph first, then the engines, then ops/cnn/adv on top.
            Lib::Cudnn => &[
                "libcudnn_graph.so",
                "libcudnn_engines_precompiled.so",
                "libcudnn_engines_runtime_compiled.so",
                "libcudnn_heuristic.so",
                "libcudnn_ops.so",
                "libcudnn_cnn.so",
                "libcudnn_adv.so",
            ],
            _ => &[],
        }
    }
}

/// Where a library came from.
#[derive(Clone, Debug)]
pub enum Found {
    /// `dlopen` found it on its own (ld.so cache, `LD_LIBRARY_PATH`).
    System,
    /// Preloaded from this file.
    Path(PathBuf),
}

/// The outcome of searching for all libraries (computed once per process).
#[derive(Clone, Debug)]
pub struct LibReport {
    pub found: Vec<(Lib, Found)>,
    pub missing: Vec<Lib>,
    /// Every folder that was searched, in order.
    pub searched: Vec<PathBuf>,
    /// Libraries found on disk but failing to load (path, dlerror).
    pub load_errors: Vec<(PathBuf, String)>,
}

impl LibReport {
    pub fn has(&self, lib: Lib) -> bool {
        !self.missing.contains(&lib)
    }

    /// One line per missing library, then the folders searched.
    pub fn missing_message(&self, libs: &[Lib]) -> String {
        let missing: Vec<&str> = libs
            .iter()
            .filter(|l| self.missing.contains(l))
            .map(|l| l.label())
            .collect();
        let mut s = format!("missing: {}", missing.join(", "));
        for (p, e) in &self.load_errors {
            let _ = write!(s, "; {} failed to load: {e}", p.display());
        }
        let dirs: Vec<String> = self
            .searched
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let _ = write!(
            s,
            "; searched the dlopen default paths and: {}",
            if dirs.is_empty() {
                "(no existing folders)".to_string()
            } else {
                dirs.join(", ")
            }
        );
        s.push_str(
            "; set PODGPU_CUDA_LIBS to the folders holding them (colon-separated), e.g. \
             <venv>/lib/python3.X/site-packages/nvidia/cu13/lib:<venv>/…/nvidia/cudnn/lib",
        );
        s
    }
}

static REPORT: OnceLock<LibReport> = OnceLock::new();

/// Searches for and preloads every library once; later calls return the same report.
pub fn ensure_loaded() -> &'static LibReport {
    REPORT.get_or_init(discover_and_preload)
}

fn discover_and_preload() -> LibReport {
    let searched = search_dirs();
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut load_errors = Vec::new();
    for lib in Lib::ALL {
        if lib.present() {
            // dlopen finds it already; still make companions loadable if they sit in our folders.
            found.push((lib, Found::System));
            continue;
        }
        let mut loaded = None;
        'dirs: for dir in &searched {
            for name in lib.candidates() {
                let path = dir.join(&name);
                if !path.is_file() {
                    continue;
                }
                preload_companions(lib, dir, &mut load_errors);
                match dlopen_global(&path) {
                    Ok(()) => {
                        loaded = Some(path);
                        break 'dirs;
                    }
                    Err(e) => load_errors.push((path, e)),
                }
            }
        }
        match loaded {
            Some(p) if lib.present() => found.push((lib, Found::Path(p))),
            Some(p) => {
                load_errors.push((p, "loaded by path but its soname is still not found".into()));
                missing.push(lib);
            }
            None => missing.push(lib),
        }
    }
    LibReport {
        found,
        missing,
        searched,
        load_errors,
    }
}

/// Loads a library's companions found in `dir` (NVRTC builtins, cuDNN sub-libraries). Repeats passes
/// so that a library whose dependency comes later in the list still loads.
fn preload_companions(lib: Lib, dir: &Path, errors: &mut Vec<(PathBuf, String)>) {
    let mut todo: Vec<PathBuf> = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for prefix in lib.companions() {
        // Prefer the versioned file (libfoo.so.9) over the bare dev symlink.
        let mut hits: Vec<&String> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        hits.sort_by_key(|n| std::cmp::Reverse(n.len()));
        if let Some(n) = hits.first() {
            todo.push(dir.join(n));
        }
    }
    for pass in 0..3 {
        let mut failed = Vec::new();
        for p in todo.drain(..) {
            if let Err(e) = dlopen_global(&p) {
                failed.push((p, e));
            }
        }
        if failed.is_empty() {
            return;
        }
        if pass == 2 {
            errors.extend(failed);
            return;
        }
        todo = failed.into_iter().map(|(p, _)| p).collect();
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, keeping the handle open for the life of the process.
fn dlopen_global(path: &Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: plain dlopen of a path; loading runs the library's initialisers, which is what
    // cudarc would do with the same file anyway. The handle is never closed on purpose.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown dlopen error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(msg);
    }
    Ok(())
}

/// The folders to search, in priority order, existing ones only, without duplicates.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut push = |p: PathBuf| {
        if p.is_dir() {
            let key = p.canonicalize().unwrap_or_else(|_| p.clone());
            if seen.insert(key) {
                out.push(p);
            }
        }
    };
    for var in ["PODGPU_CUDA_LIBS", "LD_LIBRARY_PATH"] {
        if let Ok(v) = std::env::var(var) {
            v.split(':')
                .filter(|s| !s.is_empty())
                .for_each(|s| push(PathBuf::from(s)));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Ok(v) = std::env::var(var) {
            push(Path::new(&v).join("lib64"));
            push(Path::new(&v).join("lib"));
        }
    }
    push(PathBuf::from("/usr/local/cuda/lib64"));
    for sp in site_packages_dirs() {
        for nv in nvidia_lib_dirs(&sp) {
            push(nv);
        }
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
        "/usr/local/lib",
    ] {
        push(PathBuf::from(d));
    }
    out
}

/// `site-packages/nvidia/<pkg>/lib` folders, `cu13` and `cudnn` first.
fn nvidia_lib_dirs(site_packages: &Path) -> Vec<PathBuf> {
    let nv = site_packages.join("nvidia");
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&nv) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path().join("lib"))
            .filter(|p| p.is_dir())
            .collect(),
        Err(_) => return Vec::new(),
    };
    let rank = |p: &PathBuf| {
        let pkg = p
            .parent()
            .and_then(|q| q.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        match pkg.as_deref() {
            Some("cu13") => 0,
            Some("cudnn") => 1,
            _ => 2,
        }
    };
    dirs.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    dirs
}

/// Python `site-packages` folders of the environments we know about: `$VIRTUAL_ENV`, PyTorch's venv
/// on the GPU machines, virtual environments in the repository (found from the working directory and
/// the executable's folders upwards), the user's and the system's.
fn site_packages_dirs() -> Vec<PathBuf> {
    let mut envs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("VIRTUAL_ENV") {
        envs.push(PathBuf::from(v));
    }
    envs.push(PathBuf::from("/opt/torch/.venv"));
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().take(6).map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(6).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for root in roots {
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".venv") || name == "venv" {
                    envs.push(e.path());
                }
            }
        }
    }
    if let Ok(home) = std::env::var("HOME") {
        envs.push(Path::new(&home).join(".local"));
    }
    envs.push(PathBuf::from("/usr/local"));
    envs.push(PathBuf::from("/usr"));

    let mut out = Vec::new();
    for env in envs {
        let lib = env.join("lib");
        let Ok(rd) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pys.sort();
        for py in pys {
            out.push(py.join("site-packages"));
            out.push(py.join("dist-packages"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_versioned_sonames() {
        let c = Lib::Cublas.candidates();
        assert!(c.iter().any(|n| n == "libcublas.so.13"), "{c:?}");
        assert!(Lib::Cudnn.candidates().iter().any(|n| n == "libcudnn.so.9"));
        assert!(Lib::Nvrtc
            .candidates()
            .iter()
            .any(|n| n == "libnvrtc.so.13"));
    }
}
