//! Finding and loading the CUDA libraries (driver, NVRTC, cuBLAS, cuBLASLt, cuDNN) at run time.
//!
//! cudarc opens each library with `dlopen` by bare name and *panics* when it cannot; PyTorch's wheels
//! put the libraries in `site-packages/nvidia/*/lib`, where `dlopen` does not look; and on a CUDA
//! development image a bare name such as `libcublas.so` reaches the system toolkit's copy while its
//! dependencies come from elsewhere. So, before cudarc touches a library:
//!
//! 1. `search` chooses one file per library from an ordered list of folders (cuBLASLt from cuBLAS's
//!    folder; companions from their library's folder) and finds every name cudarc would try that the
//!    loader resolves to another file (a shadow);
//! 2. `ensure_loaded` `dlopen`s the chosen files by absolute path (`RTLD_NOW | RTLD_GLOBAL`), so that
//!    cudarc's later `dlopen` by SONAME finds them already loaded, and refuses a shadowed library
//!    (`LibReport::has` is false, the message says why and what to do);
//! 3. `reexec_with_chosen_libraries` (called first thing by podgpu's executables) restarts the
//!    process with a folder of links to the chosen files first on `LD_LIBRARY_PATH` when there is a
//!    shadow, and `env_exports` prints that setting for other programs;
//! 4. `maps` reads back from `/proc/self/maps` what was really mapped, for the reports.

pub mod maps;
pub mod search;

use search::{Loader, Plan};
use std::ffi::CString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The CUDA major version cudarc is built for (the `cuda-13000` feature): the SONAMEs it asks for.
pub const CUDA_MAJOR: u32 = 13;
/// cuDNN's major version podgpu is written against.
pub const CUDNN_MAJOR: u32 = 9;

/// Set in the environment of a process that `reexec_with_chosen_libraries` restarted (the folder of
/// links): it never restarts twice.
pub const REEXEC_VAR: &str = "PODGPU_CUDA_LINKS";

/// One CUDA library podgpu needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lib {
    Driver,
    Nvrtc,
    Cublas,
    CublasLt,
    Cudnn,
}

impl Lib {
    /// Every library, in the order they are loaded (a library after what it depends on).
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

    /// The SONAME of the version podgpu is built for: `libcuda.so.1`, `libcublas.so.13`,
    /// `libcudnn.so.9`, …
    pub fn soname(self) -> String {
        let major = match self {
            Lib::Driver => 1,
            Lib::Cudnn => CUDNN_MAJOR,
            _ => CUDA_MAJOR,
        };
        format!("lib{}.so.{major}", self.cudarc_name())
    }

    /// Whether cudarc can open the library now (never panics). Opens (and closes) whatever its
    /// names resolve to: only call it for a library without shadows.
    fn present(self) -> bool {
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

    /// Libraries that the main one opens itself by SONAME and that therefore must be loadable too:
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

/// The outcome of choosing and loading every library (computed once per process).
#[derive(Clone, Debug)]
pub struct LibReport {
    /// What was chosen, what is missing, what would be shadowed, where it searched.
    pub plan: Plan,
    /// Libraries loaded from their chosen file and safe to hand to cudarc.
    pub loaded: Vec<(Lib, PathBuf)>,
    /// Files that failed to load (path, reason).
    pub load_errors: Vec<(PathBuf, String)>,
}

impl LibReport {
    /// Whether cudarc may use the library: loaded from the chosen file, nothing shadowing it.
    pub fn has(&self, lib: Lib) -> bool {
        self.loaded.iter().any(|(l, _)| *l == lib)
    }

    /// The chosen file of each library.
    pub fn chosen_files(&self) -> Vec<(Lib, PathBuf)> {
        self.plan
            .chosen
            .iter()
            .map(|c| (c.lib, c.file.clone()))
            .collect()
    }

    /// Why each of `libs` is not usable (not found, failed to load, shadowed), the folders
    /// searched, and what to do.
    pub fn missing_message(&self, libs: &[Lib]) -> String {
        let mut parts: Vec<String> = Vec::new();
        let not_found: Vec<&str> = libs
            .iter()
            .filter(|l| self.plan.missing.contains(l))
            .map(|l| l.label())
            .collect();
        if !not_found.is_empty() {
            parts.push(format!("missing: {}", not_found.join(", ")));
        }
        let shadowed: Vec<String> = self
            .plan
            .shadows
            .iter()
            .filter(|s| libs.contains(&s.lib))
            .map(|s| format!("{}: {s}", s.lib.label()))
            .collect();
        if !shadowed.is_empty() {
            parts.push(format!(
                "two copies would be loaded ({}); podgpu restarts itself with the right library \
                 path, other programs need `eval \"$(podgpu device --env)\"` first",
                shadowed.join("; ")
            ));
        }
        for (p, e) in &self.load_errors {
            parts.push(format!("{} failed to load: {e}", p.display()));
        }
        if parts.is_empty() {
            parts.push("all found".into());
        }
        let dirs: Vec<String> = self
            .plan
            .searched
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut s = parts.join("; ");
        let _ = write!(
            s,
            "; searched the loader's paths and: {}",
            if dirs.is_empty() {
                "(no existing folders)".to_string()
            } else {
                dirs.join(", ")
            }
        );
        if libs.iter().all(|l| *l == Lib::Driver) {
            s.push_str(
                "; libcuda.so.1 comes with the NVIDIA driver: install it, or set PODGPU_CUDA_LIBS \
                 to the folder holding it",
            );
        } else {
            s.push_str(
                "; set PODGPU_CUDA_LIBS to the folders holding them (colon-separated), e.g. \
                 <venv>/lib/python3.X/site-packages/nvidia/cu13/lib:<venv>/…/nvidia/cudnn/lib",
            );
        }
        s
    }
}

static REPORT: OnceLock<LibReport> = OnceLock::new();

/// Chooses and preloads every library once; later calls return the same report.
pub fn ensure_loaded() -> &'static LibReport {
    REPORT.get_or_init(|| load(search::plan(&search::search_dirs(), &Loader::current())))
}

fn load(plan: Plan) -> LibReport {
    let mut loaded = Vec::new();
    let mut load_errors = Vec::new();
    for lib in Lib::ALL {
        let Some(choice) = plan.choice(lib) else {
            continue;
        };
        if plan.shadows.iter().any(|s| s.lib == lib) {
            continue; // handing it to cudarc would load the other copy
        }
        preload_companions(&choice.companions, &mut load_errors);
        match dlopen_global(&choice.file) {
            Ok(()) if lib.present() => loaded.push((lib, choice.file.clone())),
            Ok(()) => load_errors.push((
                choice.file.clone(),
                format!(
                    "loaded by path, but none of the names cudarc asks for ({}) reaches it",
                    lib.soname()
                ),
            )),
            Err(e) => load_errors.push((choice.file.clone(), e)),
        }
    }
    LibReport {
        plan,
        loaded,
        load_errors,
    }
}

/// Loads companions (NVRTC builtins, cuDNN sub-libraries). Repeats passes so that a library whose
/// dependency comes later in the list still loads.
fn preload_companions(files: &[PathBuf], errors: &mut Vec<(PathBuf, String)>) {
    let mut todo: Vec<PathBuf> = files.to_vec();
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

/// Where podgpu keeps files it can recreate: `$PODGPU_CACHE_DIR`, else `$XDG_CACHE_HOME/podgpu`,
/// else `~/.cache/podgpu`, else the temporary folder.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("PODGPU_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("podgpu");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("podgpu"),
        None => std::env::temp_dir().join("podgpu-cache"),
    }
}

/// Called first thing by podgpu's executables: when a name cudarc tries would load a second copy
/// of a library, restarts this program with a folder of links to the chosen files first on
/// `LD_LIBRARY_PATH` (the loader reads it only when a process starts). Does nothing when there is
/// no CUDA library at all, no shadow, or the process was already restarted; if the restart itself
/// fails, the run goes on and the device checks report the shadow.
pub fn reexec_with_chosen_libraries() {
    if std::env::var_os(REEXEC_VAR).is_some() {
        return;
    }
    let dirs = search::search_dirs();
    // Cheap first look (no ld.so cache): no CUDA library in any folder, nothing to do.
    if search::plan(&dirs, &Loader::default()).chosen.is_empty() {
        return;
    }
    let plan = search::plan(&dirs, &Loader::current());
    let nccl = nccl_links_needed();
    if plan.shadows.is_empty() && nccl.is_none() {
        return;
    }
    let mut first: Vec<PathBuf> = Vec::new();
    if !plan.shadows.is_empty() {
        match search::link_folder(&plan, &cache_root()) {
            Ok(l) => first.push(l),
            Err(e) => eprintln!(
                "warning: cannot create the folder of CUDA library links under {} ({e}; set \
                 PODGPU_CACHE_DIR to a writable folder); the GPU will be refused while another \
                 copy of a library would be loaded",
                cache_root().display()
            ),
        }
    }
    first.extend(nccl);
    let (Some(links), Ok(exe)) = (first.first().cloned(), std::env::current_exe()) else {
        return;
    };
    let mut path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    for dir in first.iter().rev() {
        path = path_with_first_of(dir, &path);
    }
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(REEXEC_VAR, &links)
        .exec();
    eprintln!(
        "warning: could not restart with the chosen CUDA libraries first on the library path \
         ({err}); the GPU will be refused while another copy would be loaded"
    );
}

/// NCCL's folder of links, when this build uses NCCL (cargo feature `nccl`), NCCL is installed,
/// and none of the names cudarc asks for (`libnccl.so`, …; never NCCL's SONAME `libnccl.so.2`)
/// reaches it: the restart puts it on `LD_LIBRARY_PATH`.
fn nccl_links_needed() -> Option<PathBuf> {
    #[cfg(feature = "nccl")]
    {
        use crate::dist::nccl;
        if nccl::library_present() {
            return None;
        }
        let file = nccl::find_library()?;
        match nccl_link_folder(&file) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!(
                    "warning: cannot create the link libnccl.so → {} under {} ({e}); GPU ranks \
                     will be refused NCCL",
                    file.display(),
                    cache_root().display()
                );
                None
            }
        }
    }
    #[cfg(not(feature = "nccl"))]
    None
}

/// A folder under the cache root holding `libnccl.so`, a link to `file` (NCCL's own file, named by
/// its SONAME `libnccl.so.2`), which cudarc's bare-name `dlopen` finds once the folder is on
/// `LD_LIBRARY_PATH`. Named by a hash of the target; built aside and renamed into place.
pub fn nccl_link_folder(file: &Path) -> std::io::Result<PathBuf> {
    nccl_link_folder_in(&cache_root(), file)
}

/// `nccl_link_folder` under `root`.
pub fn nccl_link_folder_in(root: &Path, file: &Path) -> std::io::Result<PathBuf> {
    let target = search::canonical(file);
    let key = crate::cuda::nvrtc::fnv1a(&[target.as_os_str().as_encoded_bytes()]);
    let dir = root.join(format!("nccl-links-{key:016x}"));
    if dir.join("libnccl.so").exists() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".nccl-links-{key:016x}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::os::unix::fs::symlink(&target, tmp.join("libnccl.so"))?;
    // Marked as podgpu's links, so that the library search never takes the folder for a source.
    std::fs::write(
        tmp.join(search::LINKS_MARKER),
        "a link to NCCL for cudarc\n",
    )?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("libnccl.so").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// `old` (a `:`-separated path) with `first` in front (once).
fn path_with_first_of(first: &Path, old: &str) -> String {
    let first = first.display().to_string();
    let rest: Vec<&str> = old
        .split(':')
        .filter(|s| !s.is_empty() && *s != first)
        .collect();
    std::iter::once(first.as_str())
        .chain(rest)
        .collect::<Vec<_>>()
        .join(":")
}

/// Shell lines (`export VAR='…'`) that make every program started afterwards load the chosen
/// libraries: a folder of links first on `LD_LIBRARY_PATH`, and `PODGPU_CUDA_LIBS` naming the
/// chosen folders. For `eval "$(podgpu device --env)"`.
pub fn env_exports() -> Result<String, String> {
    let plan = search::plan(&search::search_dirs(), &Loader::current());
    if plan.chosen.is_empty() {
        return Ok("# podgpu found no CUDA library: nothing to set\n".into());
    }
    let links = search::link_folder(&plan, &cache_root()).map_err(|e| {
        format!(
            "cannot create the folder of library links under {}: {e} (set PODGPU_CACHE_DIR to a \
             writable folder)",
            cache_root().display()
        )
    })?;
    let mut dirs: Vec<String> = Vec::new();
    for c in &plan.chosen {
        if let Some(d) = c.file.parent() {
            let d = d.display().to_string();
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    // NCCL (feature `nccl`): its `libnccl.so` link after the others, whether or not this process
    // (perhaps restarted with it) can already open it.
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    #[cfg(feature = "nccl")]
    let path = match crate::dist::nccl::find_library().and_then(|f| nccl_link_folder(&f).ok()) {
        Some(n) => path_with_first_of(&n, &path),
        None => path,
    };
    Ok(format!(
        "export LD_LIBRARY_PATH={}\nexport PODGPU_CUDA_LIBS={}\n",
        shell_quote(&path_with_first_of(&links, &path)),
        shell_quote(&dirs.join(":"))
    ))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The library part of `podgpu device`: each library's chosen file (or why it is unusable), then
/// every CUDA library file mapped into this process with its version, then any conflict.
pub fn describe_libraries() -> String {
    let r = ensure_loaded();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "CUDA libraries (chosen file; cudarc builds for CUDA {CUDA_MAJOR}, cuDNN {CUDNN_MAJOR}):"
    );
    for lib in Lib::ALL {
        let state = match r.plan.choice(lib) {
            None => "MISSING".to_string(),
            Some(c) if r.has(lib) => c.file.display().to_string(),
            Some(c) => match r.plan.shadows.iter().find(|s| s.lib == lib) {
                Some(sh) => format!("{} (REFUSED: {sh})", c.file.display()),
                None => format!("{} (FAILED TO LOAD)", c.file.display()),
            },
        };
        let _ = writeln!(s, "  {:<24} {state}", lib.label());
    }
    for (p, e) in &r.load_errors {
        let _ = writeln!(s, "  load error: {}: {e}", p.display());
    }
    let mapped = maps::mapped();
    let _ = writeln!(s, "mapped into this process (/proc/self/maps):");
    if mapped.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for m in &mapped {
        let v = if m.version.is_empty() {
            "-".to_string()
        } else {
            m.version.clone()
        };
        let _ = writeln!(s, "  {:<12} {}", v, m.path.display());
    }
    for c in maps::conflicts(&mapped, &r.chosen_files()) {
        let _ = writeln!(s, "  CONFLICT: {c}");
    }
    let links = std::env::var_os(REEXEC_VAR).map(PathBuf::from);
    if let Some(links) = links.filter(|l| l.join(search::LINKS_MARKER).is_file()) {
        let _ = writeln!(
            s,
            "  (restarted with {} first on LD_LIBRARY_PATH)",
            links.display()
        );
    }
    s
}

/// Opens every usable library by the names cudarc uses, keeping the handles (as cudarc's own
/// loader does), so that `maps::mapped()` shows the files cudarc works with. Only libraries
/// `LibReport::has` allows: a refused one is never opened by name.
pub fn open_as_cudarc_does() {
    let r = ensure_loaded();
    for (lib, _) in &r.loaded {
        for name in lib.candidates() {
            let Ok(c) = CString::new(name) else { continue };
            // SAFETY: dlopen by name, as cudarc's loader does; the handle is kept for the life of
            // the process (cudarc keeps its own too).
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
            if !h.is_null() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_the_sonames_podgpu_chooses() {
        for lib in Lib::ALL {
            let c = lib.candidates();
            assert!(
                c.contains(&lib.soname()),
                "{lib:?}: {} not in {c:?}",
                lib.soname()
            );
        }
        assert_eq!(Lib::Cublas.soname(), "libcublas.so.13");
        assert_eq!(Lib::Cudnn.soname(), "libcudnn.so.9");
        assert_eq!(Lib::Driver.soname(), "libcuda.so.1");
    }

    #[test]
    fn nccl_s_soname_file_gets_the_bare_name_cudarc_asks_for() {
        let root = std::env::temp_dir().join(format!("podgpu-nccl-links-{}", std::process::id()));
        let lib = root.join("site/nvidia/nccl/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libnccl.so.2"), b"not really a library").unwrap();
        let cache = root.join("cache");
        let dir = nccl_link_folder_in(&cache, &lib.join("libnccl.so.2")).unwrap();
        let link = dir.join("libnccl.so");
        assert!(cudarc::get_lib_name_candidates("nccl").contains(&"libnccl.so".to_string()));
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            search::canonical(&lib.join("libnccl.so.2"))
        );
        // Marked as podgpu's links (never searched as a source of libraries); reused as is.
        assert!(dir.join(search::LINKS_MARKER).is_file());
        assert_eq!(
            nccl_link_folder_in(&cache, &lib.join("libnccl.so.2")).unwrap(),
            dir
        );
        // Another NCCL file, another folder.
        std::fs::write(lib.join("libnccl.so"), b"another").unwrap();
        assert_ne!(
            nccl_link_folder_in(&cache, &lib.join("libnccl.so")).unwrap(),
            dir
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn exports_quote_for_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
