//! Our CUDA C kernels (`cuda/*.cu`), compiled with NVRTC for the device's architecture at first use
//! and cached on disk as PTX.
//!
//! The cache key is a hash of the source, the target architecture, the NVRTC version and the compiler
//! options, so editing a kernel, changing GPU or upgrading NVRTC all recompile. The cache folder is
//! `$PODGPU_CACHE_DIR/ptx`, else `$XDG_CACHE_HOME/podgpu/ptx`, else `~/.cache/podgpu/ptx`; a cache that
//! cannot be written only costs a recompilation next time.

use super::libs::{self, Lib};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use std::path::PathBuf;

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

/// 64-bit FNV-1a: a stable hash (unlike `DefaultHasher`) for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
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

pub fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PODGPU_CACHE_DIR") {
        return Some(PathBuf::from(d).join("ptx"));
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("podgpu").join("ptx"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache").join("podgpu").join("ptx"))
}

/// PTX of a source for `arch`, from the disk cache when present, else compiled and cached.
pub fn ptx_cached(src: &KernelSource, arch: &str) -> Result<String, String> {
    let (maj, min) = version()?;
    let nv = format!("{maj}.{min}");
    let opts = format!("{:?}", options(arch).options);
    let key = fnv1a(&[
        src.src.as_bytes(),
        arch.as_bytes(),
        nv.as_bytes(),
        opts.as_bytes(),
    ]);
    let file = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.ptx", src.name)));
    if let Some(f) = &file {
        if let Ok(ptx) = std::fs::read_to_string(f) {
            if ptx.contains(".entry") {
                return Ok(ptx);
            }
        }
    }
    let ptx = compile(src.name, src.src, arch)?;
    if let Some(f) = &file {
        // Write to a temporary name and rename, so concurrent processes never read half a file.
        if let Some(dir) = f.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &ptx).is_ok() {
                    let _ = std::fs::rename(&tmp, f);
                }
            }
        }
    }
    Ok(ptx)
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
