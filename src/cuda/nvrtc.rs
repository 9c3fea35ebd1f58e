//! Our CUDA C kernels (`cuda/*.cu`), compiled with NVRTC for the device's architecture at first use
//! (CUBIN for the exact `sm_XY` when NVRTC supports it, else PTX for `compute_XY`) and cached on disk.
//!
//! The cache key is a hash of the source, the target architecture, the NVRTC version and the compiler
//! options, so editing a kernel, changing GPU or upgrading NVRTC all recompile. The cache folder is
//! `$PODGPU_CACHE_DIR/ptx`, else `$XDG_CACHE_HOME/podgpu/ptx`, else `~/.cache/podgpu/ptx`; a cache that
//! cannot be written only costs a recompilation next time.

use super::libs::{self, Lib};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use std::path::{Path, PathBuf};

/// One `.cu` file: the module name (file stem) and its source, embedded in the binary with
/// `cuda/common.cuh` (shared helpers; NVRTC has no include path of ours) in front.
pub struct KernelSource {
    pub name: &'static str,
    pub src: &'static str,
}

macro_rules! cu {
    ($name:literal) => {
        KernelSource {
            name: $name,
            src: concat!(
                include_str!("../../cuda/common.cuh"),
                "\n",
                include_str!(concat!("../../cuda/", $name, ".cu"))
            ),
        }
    };
}

/// Every kernel source of podgpu. `tests/cuda_nvrtc.rs` compiles all of them.
pub const SOURCES: &[KernelSource] = &[
    cu!("elementwise"),
    cu!("reduce"),
    cu!("pool"),
    cu!("layout"),
    cu!("head"),
    cu!("loss"),
    cu!("optim"),
    cu!("baselines"),
    cu!("guard"),
    cu!("transformer"),
    cu!("adamw"),
    cu!("bf16"),
    cu!("bn_train"),
    cu!("nhwc"),
];

pub fn source(name: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.name == name)
}

/// Options every kernel is compiled with: IEEE division and square root (the CPU reference uses
/// them), no flush-to-zero, and fused multiply-add allowed (as nvcc does by default).
fn options(arch: &str) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(true),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: None,
        ..Default::default()
    }
}

trait BuildStrings {
    fn build_strings(self) -> Vec<String>;
}

impl BuildStrings for CompileOptions {
    /// The option strings cudarc would pass (its `build` is crate-private).
    fn build_strings(self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(b) = self.ftz {
            v.push(format!("--ftz={b}"));
        }
        if let Some(b) = self.prec_sqrt {
            v.push(format!("--prec-sqrt={b}"));
        }
        if let Some(b) = self.prec_div {
            v.push(format!("--prec-div={b}"));
        }
        if let Some(b) = self.fmad {
            v.push(format!("--fmad={b}"));
        }
        v.extend(self.options);
        v
    }
}

/// NVRTC's version (major, minor). Fails with a clear message when NVRTC cannot be loaded.
pub fn version() -> Result<(i32, i32), String> {
    let report = libs::ensure_loaded();
    if !report.has(Lib::Nvrtc) {
        return Err(format!(
            "NVRTC is not available ({})",
            report.missing_message(&[Lib::Nvrtc])
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the call writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    r.result()
        .map_err(|e| format!("nvrtcVersion failed: {e}"))?;
    Ok((major, minor))
}

/// The `compute_XY` architectures this NVRTC can target, ascending (e.g. 75, 80, …, 120).
pub fn supported_archs() -> Result<Vec<i32>, String> {
    version()?;
    let mut n = 0;
    // SAFETY: NVRTC is loaded; the second call fills exactly `n` ints.
    unsafe {
        cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n)
            .result()
            .map_err(|e| format!("nvrtcGetNumSupportedArchs: {e}"))?;
        let mut v = vec![0i32; n.max(0) as usize];
        cudarc::nvrtc::sys::nvrtcGetSupportedArchs(v.as_mut_ptr())
            .result()
            .map_err(|e| format!("nvrtcGetSupportedArchs: {e}"))?;
        v.sort_unstable();
        Ok(v)
    }
}

/// The virtual architecture to compile for on a device of compute capability `major.minor`: the
/// device's own when NVRTC knows it, else the newest NVRTC supports below it (the driver JIT-compiles
/// older PTX for newer GPUs).
pub fn arch_for(major: i32, minor: i32) -> Result<String, String> {
    let want = major * 10 + minor;
    let archs = supported_archs()?;
    let pick = archs
        .iter()
        .rev()
        .find(|&&a| a <= want)
        .copied()
        .ok_or_else(|| {
            format!("NVRTC supports {archs:?}; none is at or below the device's compute_{want}")
        })?;
    Ok(format!("compute_{pick}"))
}

/// Compiles one source to PTX. The error carries NVRTC's log and the options used.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<String, String> {
    version()?;
    let mut opts = options(arch);
    opts.name = Some(format!("{name}.cu"));
    match compile_ptx_with_opts(src, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { nvrtc, options, log }) => Err(format!(
            "NVRTC failed to compile cuda/{name}.cu for {arch} ({nvrtc}); options {options:?}; log:\n{}",
            log.to_string_lossy()
        )),
        Err(e) => Err(format!("NVRTC error on cuda/{name}.cu for {arch}: {e:?}")),
    }
}

/// Compiles one source straight to machine code (CUBIN) for a real architecture such as `sm_90`.
///
/// Loading SASS needs no PTX JIT in the driver, so a CUBIN from a newer NVRTC of the same major
/// version still loads on an older driver (CUDA minor-version compatibility), where its PTX would be
/// rejected with CUDA_ERROR_UNSUPPORTED_PTX_VERSION. `Gpu::func` therefore prefers CUBIN.
pub fn compile_cubin(name: &str, src: &str, sm: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    version()?;
    let csrc = std::ffi::CString::new(src).map_err(|e| e.to_string())?;
    let cname = std::ffi::CString::new(format!("{name}.cu")).map_err(|e| e.to_string())?;
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| format!("nvrtcCreateProgram: {e}"))?;
    let opts = options(sm).build_strings();
    // SAFETY: `prog` is live until destroy_program below; buffers are sized by NVRTC's own queries.
    let out = unsafe {
        match result::compile_program(prog, &opts) {
            Err(e) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                Err(format!(
                    "NVRTC failed to compile cuda/{name}.cu for {sm} ({e}); options {opts:?}; log:\n{}",
                    String::from_utf8_lossy(&log)
                ))
            }
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(format!("nvrtcGetCUBINSize for cuda/{name}.cu: {e}")),
                    Ok(()) => {
                        let mut bin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _)
                            .result()
                            .map(|()| bin)
                            .map_err(|e| format!("nvrtcGetCUBIN for cuda/{name}.cu: {e}"))
                    }
                }
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// 64-bit FNV-1a: a stable hash (unlike `DefaultHasher`) for cache file names.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The folder compiled modules are cached in: `ptx` under `libs::cache_root()`
/// (`$PODGPU_CACHE_DIR`, else `$XDG_CACHE_HOME/podgpu`, else `~/.cache/podgpu`).
pub fn cache_dir() -> PathBuf {
    libs::cache_root().join("ptx")
}

/// Compiled code of one module: PTX text for a virtual architecture, or CUBIN for a real one.
pub enum Image {
    Ptx(String),
    Cubin(Vec<u8>),
}

/// The compiled module for `target` (`compute_XY` → PTX, `sm_XY` → CUBIN), from the disk cache when
/// present, else compiled and cached.
pub fn image_cached(src: &KernelSource, target: &str) -> Result<Image, String> {
    image_cached_in(src, target, &cache_dir())
}

/// `image_cached` with the cache in `dir` (tests use their own folder instead of changing the
/// process environment, which other threads read).
pub fn image_cached_in(src: &KernelSource, target: &str, dir: &Path) -> Result<Image, String> {
    let (maj, min) = version()?;
    let nv = format!("{maj}.{min}");
    let opts = format!("{:?}", options(target).options);
    let key = fnv1a(&[
        src.src.as_bytes(),
        target.as_bytes(),
        nv.as_bytes(),
        opts.as_bytes(),
    ]);
    let cubin = target.starts_with("sm_");
    let ext = if cubin { "cubin" } else { "ptx" };
    let file = Some(dir.join(format!("{}-{target}-{key:016x}.{ext}", src.name)));
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if cubin && bytes.starts_with(b"\x7fELF") {
                return Ok(Image::Cubin(bytes));
            }
            if let Ok(ptx) = String::from_utf8(bytes) {
                if !cubin && ptx.contains(".entry") {
                    return Ok(Image::Ptx(ptx));
                }
            }
        }
    }
    let (image, bytes) = if cubin {
        let b = compile_cubin(src.name, src.src, target)?;
        (Image::Cubin(b.clone()), b)
    } else {
        let p = compile(src.name, src.src, target)?;
        let b = p.clone().into_bytes();
        (Image::Ptx(p), b)
    };
    if let Some(f) = &file {
        // Write to a temporary name and rename, so concurrent processes never read half a file.
        if let Some(dir) = f.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, f);
                }
            }
        }
    }
    Ok(image)
}

/// The targets to try for a device of compute capability `major.minor`, best first: CUBIN for its
/// exact architecture when NVRTC supports it, then PTX for `arch_for`.
pub fn targets_for(major: i32, minor: i32) -> Result<Vec<String>, String> {
    let want = major * 10 + minor;
    let mut t = Vec::new();
    if supported_archs()?.contains(&want) {
        t.push(format!("sm_{want}"));
    }
    t.push(arch_for(major, minor)?);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_order_sensitive() {
        assert_eq!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"a", b"b"]));
        assert_ne!(fnv1a(&[b"ab"]), fnv1a(&[b"a", b"b"]));
        assert_ne!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"b", b"a"]));
    }

    #[test]
    fn every_source_is_embedded_and_has_kernels() {
        for s in SOURCES {
            assert!(
                s.src.contains("extern \"C\" __global__"),
                "cuda/{}.cu has no kernel",
                s.name
            );
        }
    }
}
