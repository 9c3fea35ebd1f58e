//! Which file of each CUDA library podgpu loads, and whether the dynamic loader would hand cudarc a
//! different copy.
//!
//! cudarc opens each library by bare name, trying `libcublas.so` *before* `libcublas.so.13` (its
//! `get_lib_name_candidates`). A name without a slash matches an already loaded object only through
//! that object's SONAME (`libcublas.so.13`); any other name is searched on disk: `LD_LIBRARY_PATH`
//! (read once, when the process starts), then the ld.so cache, then the default folders. On a CUDA
//! development image `libcublas.so` is in the ld.so cache and points at the system toolkit, while the
//! libraries it needs by SONAME may already be loaded from a pip folder: two versions in one process
//! (`CUBLAS_STATUS_NOT_INITIALIZED`, `CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH`, symbol errors).
//!
//! So the choice is made here, once and deterministically: every library is one file found in our
//! ordered folders (libraries that work together come from one folder), and a *shadow* is a name that
//! cudarc tries first and that the loader would resolve to another file. A shadowed library is not
//! handed to cudarc. A folder of links (`link_folder`) with every name cudarc tries pointing at the
//! chosen files, first on `LD_LIBRARY_PATH` when a process starts, removes every shadow: `podgpu`
//! restarts itself that way (`super::reexec_with_chosen_libraries`), and `podgpu device --env` prints
//! the same setting for other programs (the test executables the GPU check runs).
//!
//! Everything here works on paths and a `Loader` value, so tests can build stand-in library files in a
//! temporary folder and ask which file would be chosen and which names would be shadowed.

use super::Lib;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file a folder of links is recognised by: `search_dirs` skips such folders, so a process
/// restarted with one on its path makes the same choice as its parent did.
pub const LINKS_MARKER: &str = ".podgpu-cuda-links";

/// How the dynamic loader resolves a name without a slash (glibc's order, minus RPATH/RUNPATH, which
/// podgpu's executables do not have).
#[derive(Clone, Debug, Default)]
pub struct Loader {
    /// `LD_LIBRARY_PATH` as the process started with it.
    pub path: Vec<PathBuf>,
    /// The ld.so cache: name → file (from `ldconfig -p`).
    pub cache: BTreeMap<String, PathBuf>,
    /// The trusted default folders.
    pub defaults: Vec<PathBuf>,
}

impl Loader {
    /// This process's loader: its `LD_LIBRARY_PATH`, the ld.so cache and the default folders.
    pub fn current() -> Loader {
        Loader {
            path: split_paths(&std::env::var("LD_LIBRARY_PATH").unwrap_or_default()),
            cache: ld_cache(),
            defaults: [
                "/lib/x86_64-linux-gnu",
                "/usr/lib/x86_64-linux-gnu",
                "/lib/aarch64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu",
                "/lib64",
                "/usr/lib64",
                "/lib",
                "/usr/lib",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
        }
    }

    /// The file `dlopen(name)` would open from disk, if any (before looking at loaded SONAMEs).
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        for d in &self.path {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
        if let Some(p) = self.cache.get(name) {
            if p.is_file() {
                return Some(p.clone());
            }
        }
        self.defaults
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }
}

fn split_paths(v: &str) -> Vec<PathBuf> {
    v.split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The ld.so cache as `ldconfig -p` prints it, entries of this machine's architecture only. Empty
/// when `ldconfig` cannot be run (then only `LD_LIBRARY_PATH` and the default folders are known).
fn ld_cache() -> BTreeMap<String, PathBuf> {
    let arch = if cfg!(target_arch = "x86_64") {
        "x86-64"
    } else if cfg!(target_arch = "aarch64") {
        "AArch64"
    } else {
        ""
    };
    let mut out = BTreeMap::new();
    for exe in ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"] {
        let Ok(o) = std::process::Command::new(exe)
            .arg("-p")
            .stderr(std::process::Stdio::null())
            .output()
        else {
            continue;
        };
        if !o.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // "\tlibcublas.so.13 (libc6,x86-64) => /usr/local/cuda/lib64/libcublas.so.13"
            let Some((left, path)) = line.trim().split_once(" => ") else {
                continue;
            };
            let Some((name, flags)) = left.split_once(' ') else {
                continue;
            };
            if !flags.contains(arch) {
                continue;
            }
            out.entry(name.to_string())
                .or_insert_with(|| PathBuf::from(path));
        }
        break;
    }
    out
}

/// One library's chosen file and the files of its companions (libraries it opens itself by SONAME:
/// NVRTC's builtins, cuDNN's sub-libraries), all from one folder.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub lib: Lib,
    pub file: PathBuf,
    pub companions: Vec<PathBuf>,
}

/// A name cudarc tries before it reaches the chosen file, which the loader would resolve elsewhere.
#[derive(Clone, Debug, PartialEq)]
pub struct Shadow {
    pub lib: Lib,
    /// The name cudarc would `dlopen` (e.g. `libcublas.so`).
    pub name: String,
    /// The file the loader would open for it.
    pub loads: PathBuf,
    /// The file podgpu chose.
    pub chosen: PathBuf,
}

impl std::fmt::Display for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} would load {} instead of the chosen {}",
            self.name,
            self.loads.display(),
            self.chosen.display()
        )
    }
}

/// The outcome of the search: what is chosen, what is missing, and what would be shadowed.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub chosen: Vec<Choice>,
    pub missing: Vec<Lib>,
    pub shadows: Vec<Shadow>,
    /// Every folder searched, in order.
    pub searched: Vec<PathBuf>,
}

impl Plan {
    pub fn choice(&self, lib: Lib) -> Option<&Choice> {
        self.chosen.iter().find(|c| c.lib == lib)
    }
}

/// Chooses every library from `dirs` (in priority order), then the loader's own resolution of the
/// library's SONAME as the last resort (how the driver is usually found), and lists the shadows.
pub fn plan(dirs: &[PathBuf], loader: &Loader) -> Plan {
    let mut plan = Plan {
        searched: dirs.to_vec(),
        ..Plan::default()
    };
    // cuBLAS before cuBLASLt: cuBLASLt comes from cuBLAS's folder, so the two always match.
    for lib in [
        Lib::Driver,
        Lib::Nvrtc,
        Lib::Cublas,
        Lib::CublasLt,
        Lib::Cudnn,
    ] {
        let partner = match lib {
            Lib::CublasLt => plan
                .choice(Lib::Cublas)
                .and_then(|c| c.file.parent().map(Path::to_path_buf)),
            _ => None,
        };
        let file = partner
            .and_then(|d| file_in(lib, &d))
            .or_else(|| dirs.iter().find_map(|d| file_in(lib, d)))
            .or_else(|| loader.resolve(&lib.soname()));
        match file {
            Some(file) => {
                let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
                let choice = Choice {
                    lib,
                    companions: companions_in(lib, &dir),
                    file,
                };
                if let Some(s) = shadow_of(&choice, loader) {
                    plan.shadows.push(s);
                }
                plan.chosen.push(choice);
            }
            None => plan.missing.push(lib),
        }
    }
    plan
}

/// The library's file in `dir`: its SONAME (`libcublas.so.13`), else a fuller version of it
/// (`libcublas.so.13.0.2.14`), else another name cudarc tries (`libcublas.so`).
pub fn file_in(lib: Lib, dir: &Path) -> Option<PathBuf> {
    let soname = lib.soname();
    let exact = dir.join(&soname);
    if exact.is_file() {
        return Some(exact);
    }
    let names = file_names(dir);
    let mut fuller: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with(&format!("{soname}.")))
        .collect();
    fuller.sort();
    if let Some(n) = fuller.first() {
        return Some(dir.join(n));
    }
    lib.candidates()
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// The companions found in `dir`, in dependency order (for each, the longest matching name: the
/// versioned file rather than a development link).
pub fn companions_in(lib: Lib, dir: &Path) -> Vec<PathBuf> {
    let names = file_names(dir);
    let mut out = Vec::new();
    for prefix in lib.companions() {
        let mut hits: Vec<&String> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        hits.sort_by_key(|n| (std::cmp::Reverse(n.len()), (*n).clone()));
        if let Some(n) = hits.first() {
            out.push(dir.join(n));
        }
    }
    out
}

fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The first name cudarc tries that the loader would resolve to a file other than the chosen one.
/// Names are tried in cudarc's order until one reaches the chosen file: the chosen file's SONAME
/// always does (it is loaded by path first, and a loaded object answers to its SONAME).
pub fn shadow_of(choice: &Choice, loader: &Loader) -> Option<Shadow> {
    let soname = choice.lib.soname();
    let chosen = canonical(&choice.file);
    for name in choice.lib.candidates() {
        if name == soname {
            return None;
        }
        match loader.resolve(&name) {
            Some(p) if canonical(&p) == chosen => return None,
            Some(p) => {
                return Some(Shadow {
                    lib: choice.lib,
                    name,
                    loads: p,
                    chosen: choice.file.clone(),
                })
            }
            None => {}
        }
    }
    None
}

pub fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Creates (or reuses) a folder under `root` in which every name cudarc may try for each chosen
/// library, and each companion's name, is a link to the chosen file. First on `LD_LIBRARY_PATH` when
/// a process starts, it makes every bare-name `dlopen` land on the chosen files. The folder's name is
/// a hash of the choice, so different choices never share one; it is built in a temporary folder and
/// renamed into place, so a concurrent process never sees half of it.
pub fn link_folder(plan: &Plan, root: &Path) -> std::io::Result<PathBuf> {
    let mut links: Vec<(String, PathBuf)> = Vec::new();
    for c in &plan.chosen {
        let target = canonical(&c.file);
        let soname = c.lib.soname();
        for name in c.lib.candidates() {
            let last = name == soname;
            links.push((name, target.clone()));
            if last {
                break;
            }
        }
        if !links.iter().any(|(n, _)| *n == soname) {
            links.push((soname, target.clone()));
        }
        for comp in &c.companions {
            if let Some(n) = comp.file_name() {
                links.push((n.to_string_lossy().into_owned(), canonical(comp)));
            }
        }
    }
    let key = {
        let mut s = String::new();
        for (n, t) in &links {
            s.push_str(n);
            s.push('\0');
            s.push_str(&t.to_string_lossy());
            s.push('\n');
        }
        crate::cuda::nvrtc::fnv1a(&[s.as_bytes()])
    };
    let dir = root.join(format!("cuda-links-{key:016x}"));
    if dir.join(LINKS_MARKER).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(root)?;
    let tmp = root.join(format!(".cuda-links-{key:016x}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for (name, target) in &links {
        // cudarc's list names some files twice (e.g. `libcublas64_130_0.so`): the first link wins.
        if tmp.join(name).symlink_metadata().is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(target, tmp.join(name))?;
    }
    std::fs::write(
        tmp.join(LINKS_MARKER),
        "links to the CUDA libraries podgpu chose\n",
    )?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process put the same folder in place first: use theirs.
        Err(_) if dir.join(LINKS_MARKER).is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The folders to search, in priority order, existing ones only, without duplicates or podgpu's own
/// link folders: `PODGPU_CUDA_LIBS`, `LD_LIBRARY_PATH`, `$CUDA_HOME`-style roots and
/// `/usr/local/cuda`, the `nvidia/*/lib` folders of known Python environments, the system folders.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut push = |p: PathBuf| {
        if searchable(&p) {
            let key = canonical(&p);
            if seen.insert(key) {
                out.push(p);
            }
        }
    };
    for var in ["PODGPU_CUDA_LIBS", "LD_LIBRARY_PATH"] {
        if let Ok(v) = std::env::var(var) {
            split_paths(&v).into_iter().for_each(&mut push);
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
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
        "/usr/local/lib",
    ] {
        push(PathBuf::from(d));
    }
    out
}

/// An existing folder that is not one of podgpu's folders of links.
fn searchable(p: &Path) -> bool {
    p.is_dir() && !p.join(LINKS_MARKER).exists()
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
/// on the GPU machines, virtual environments beside the working directory and the executable (and
/// their parents), the user's and the system's. Found at run time only: nothing depends on where the
/// program was built.
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
    for root in roots {
        if let Ok(rd) = std::fs::read_dir(&root) {
            let mut names: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with(".venv") || n == "venv"
                })
                .map(|e| e.path())
                .collect();
            names.sort();
            envs.extend(names);
        }
    }
    if let Ok(home) = std::env::var("HOME") {
        envs.push(Path::new(&home).join(".local"));
    }
    envs.push(PathBuf::from("/usr/local"));
    envs.push(PathBuf::from("/usr"));

    let mut out = Vec::new();
    for env in envs {
        let Ok(rd) = std::fs::read_dir(env.join("lib")) else {
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

    /// Stand-in library files (empty: only names and folders matter to the choice).
    fn touch(dir: &Path, names: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), b"stand-in").unwrap();
        }
    }

    fn loader_with_path(path: &[&Path]) -> Loader {
        Loader {
            path: path.iter().map(|p| p.to_path_buf()).collect(),
            ..Loader::default()
        }
    }

    #[test]
    fn the_first_folder_with_the_soname_wins_and_cublaslt_follows_cublas() {
        let t = tempfile::tempdir().unwrap();
        let (early, pip, cudnn) = (
            t.path().join("early"),
            t.path().join("cu13"),
            t.path().join("cudnn"),
        );
        // An earlier folder with only cuBLASLt: cuBLASLt must still come from cuBLAS's folder.
        touch(&early, &["libcublasLt.so.13"]);
        touch(
            &pip,
            &[
                "libcublas.so.13",
                "libcublasLt.so.13",
                "libnvrtc.so.13",
                "libnvrtc-builtins.so.13.0",
            ],
        );
        touch(
            &cudnn,
            &["libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9"],
        );
        let dirs = vec![early.clone(), pip.clone(), cudnn.clone()];
        let plan = plan(&dirs, &Loader::default());
        let file = |l| plan.choice(l).map(|c| c.file.clone());
        assert_eq!(file(Lib::Cublas), Some(pip.join("libcublas.so.13")));
        assert_eq!(file(Lib::CublasLt), Some(pip.join("libcublasLt.so.13")));
        assert_eq!(file(Lib::Nvrtc), Some(pip.join("libnvrtc.so.13")));
        assert_eq!(file(Lib::Cudnn), Some(cudnn.join("libcudnn.so.9")));
        assert_eq!(
            plan.choice(Lib::Cudnn).unwrap().companions,
            vec![
                cudnn.join("libcudnn_graph.so.9"),
                cudnn.join("libcudnn_ops.so.9")
            ]
        );
        assert_eq!(
            plan.choice(Lib::Nvrtc).unwrap().companions,
            vec![pip.join("libnvrtc-builtins.so.13.0")]
        );
        assert_eq!(plan.missing, vec![Lib::Driver]);
        assert!(plan.shadows.is_empty(), "{:?}", plan.shadows);
    }

    #[test]
    fn a_fuller_version_or_the_bare_name_is_taken_when_the_soname_is_absent() {
        let t = tempfile::tempdir().unwrap();
        let tk = t.path().join("toolkit");
        touch(&tk, &["libcublas.so.13.1.0.3", "libcublas.so"]);
        assert_eq!(
            file_in(Lib::Cublas, &tk),
            Some(tk.join("libcublas.so.13.1.0.3"))
        );
        let dev = t.path().join("dev");
        touch(&dev, &["libnvrtc.so"]);
        assert_eq!(file_in(Lib::Nvrtc, &dev), Some(dev.join("libnvrtc.so")));
        assert_eq!(file_in(Lib::Cudnn, &dev), None);
    }

    #[test]
    fn a_system_bare_name_shadows_the_pip_copy_until_the_links_come_first() {
        let t = tempfile::tempdir().unwrap();
        let (sys, pip) = (t.path().join("usr-local-cuda"), t.path().join("cu13"));
        // The CUDA development image: the toolkit's libcublas.so (a different build) on the loader's
        // path; PyTorch's wheels in a pip folder that podgpu is told to use.
        touch(&sys, &["libcublas.so", "libcublas.so.13", "libcublasLt.so"]);
        touch(&pip, &["libcublas.so.13", "libcublasLt.so.13"]);
        let loader = loader_with_path(&[&sys]);
        let plan = plan(std::slice::from_ref(&pip), &loader);
        assert_eq!(
            plan.choice(Lib::Cublas).unwrap().file,
            pip.join("libcublas.so.13")
        );
        let mut shadows: Vec<(Lib, String, PathBuf)> = plan
            .shadows
            .iter()
            .map(|s| (s.lib, s.name.clone(), s.loads.clone()))
            .collect();
        shadows.sort_by_key(|s| s.1.clone());
        assert_eq!(
            shadows,
            vec![
                (Lib::Cublas, "libcublas.so".into(), sys.join("libcublas.so")),
                (
                    Lib::CublasLt,
                    "libcublasLt.so".into(),
                    sys.join("libcublasLt.so")
                ),
            ]
        );
        assert!(plan.shadows[0]
            .to_string()
            .contains("instead of the chosen"));

        // With the folder of links first on the path, every name lands on the chosen files.
        let links = link_folder(&plan, &t.path().join("cache")).unwrap();
        assert!(links.join(LINKS_MARKER).is_file());
        assert_eq!(
            canonical(&links.join("libcublas.so")),
            canonical(&pip.join("libcublas.so.13"))
        );
        assert_eq!(
            canonical(&links.join("libcublasLt.so")),
            canonical(&pip.join("libcublasLt.so.13"))
        );
        let fixed = plan_with_links(&pip, &links, &sys);
        assert!(fixed.shadows.is_empty(), "{:?}", fixed.shadows);
        // The same choice gives the same folder (reused, not rebuilt).
        assert_eq!(link_folder(&plan, &t.path().join("cache")).unwrap(), links);
    }

    fn plan_with_links(pip: &Path, links: &Path, sys: &Path) -> Plan {
        let loader = loader_with_path(&[links, sys]);
        plan(&[pip.to_path_buf()], &loader)
    }

    #[test]
    fn the_ld_cache_and_a_same_file_link_are_not_shadows() {
        let t = tempfile::tempdir().unwrap();
        let pip = t.path().join("cu13");
        touch(&pip, &["libnvrtc.so.13"]);
        // A bare name in the cache that is a link to the chosen file is the same file.
        let alias = t.path().join("alias");
        std::fs::create_dir_all(&alias).unwrap();
        std::os::unix::fs::symlink(pip.join("libnvrtc.so.13"), alias.join("libnvrtc.so")).unwrap();
        let mut loader = Loader::default();
        loader
            .cache
            .insert("libnvrtc.so".into(), alias.join("libnvrtc.so"));
        let p = plan(std::slice::from_ref(&pip), &loader);
        assert!(p.shadows.is_empty(), "{:?}", p.shadows);
        // A different file behind the cache entry is one.
        std::fs::remove_file(alias.join("libnvrtc.so")).unwrap();
        touch(&alias, &["libnvrtc.so"]);
        let p = plan(std::slice::from_ref(&pip), &loader);
        assert_eq!(p.shadows.len(), 1);
        assert_eq!(p.shadows[0].loads, alias.join("libnvrtc.so"));
    }

    #[test]
    fn the_driver_falls_back_to_the_loader_and_link_folders_are_not_searched() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("nvidia-lib64");
        touch(&sys, &["libcuda.so.1"]);
        let mut loader = Loader::default();
        loader
            .cache
            .insert("libcuda.so.1".into(), sys.join("libcuda.so.1"));
        let p = plan(&[], &loader);
        assert_eq!(
            p.choice(Lib::Driver).unwrap().file,
            sys.join("libcuda.so.1")
        );

        let links = t.path().join("links");
        touch(&links, &[LINKS_MARKER, "libcublas.so.13"]);
        assert!(
            !searchable(&links),
            "a folder of podgpu's links is not searched"
        );
        assert!(searchable(&sys));
        assert!(!searchable(&t.path().join("absent")));
    }
}
