//! Which CUDA library files this process has actually mapped (`/proc/self/maps`): the proof of what
//! was loaded, whatever was intended, printed by `podgpu device` and the GPU check.

use super::Lib;
use std::path::{Path, PathBuf};

/// One mapped CUDA library file.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// Absolute path of the mapped file (links resolved by the kernel).
    pub path: PathBuf,
    /// The library it is, when it is one of the five podgpu opens (not a companion).
    pub lib: Option<Lib>,
    /// The version its file name carries (`13.1.0.3` of `libcublas.so.13.1.0.3`, `9` of
    /// `libcudnn.so.9`), or "" when the name has none.
    pub version: String,
}

/// The CUDA libraries (driver, NVRTC, cuBLAS/cuBLASLt, cuDNN and their companions, nvJitLink) mapped
/// into this process, in the order they first appear.
pub fn mapped() -> Vec<Mapped> {
    std::fs::read_to_string("/proc/self/maps")
        .map(|s| parse(&s))
        .unwrap_or_default()
}

/// The CUDA libraries in a `/proc/PID/maps` text.
pub fn parse(maps: &str) -> Vec<Mapped> {
    let mut out: Vec<Mapped> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path (the path may contain spaces).
        let mut fields = line.splitn(6, ' ');
        let path = fields.nth(5).map(str::trim).unwrap_or("");
        if !path.starts_with('/') || path.ends_with("(deleted)") {
            continue;
        }
        let path = Path::new(path);
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if !is_cuda_library(&name) || out.iter().any(|m| m.path == path) {
            continue;
        }
        out.push(Mapped {
            path: path.to_path_buf(),
            lib: lib_of(&name),
            version: version_of(&name),
        });
    }
    out
}

fn is_cuda_library(name: &str) -> bool {
    [
        "libcuda.so",
        "libnvrtc",
        "libcublas",
        "libcudnn",
        "libnvJitLink",
        "libcudart",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// The library a file name belongs to (`None` for companions such as `libcudnn_ops.so.9`).
pub fn lib_of(name: &str) -> Option<Lib> {
    let stem = name.split(".so").next().unwrap_or(name);
    match stem {
        "libcuda" => Some(Lib::Driver),
        "libnvrtc" => Some(Lib::Nvrtc),
        "libcublas" => Some(Lib::Cublas),
        "libcublasLt" => Some(Lib::CublasLt),
        "libcudnn" => Some(Lib::Cudnn),
        _ => None,
    }
}

/// What follows `.so.` in a file name.
pub fn version_of(name: &str) -> String {
    name.split_once(".so.")
        .map(|(_, v)| v.to_string())
        .unwrap_or_default()
}

/// Problems with what is mapped: a library mapped from two files, or from a file other than the
/// chosen one (`chosen` gives each library's chosen file).
pub fn conflicts(mapped: &[Mapped], chosen: &[(Lib, PathBuf)]) -> Vec<String> {
    let mut out = Vec::new();
    for lib in Lib::ALL {
        let files: Vec<&Mapped> = mapped.iter().filter(|m| m.lib == Some(lib)).collect();
        if files.len() > 1 {
            let list: Vec<String> = files.iter().map(|m| m.path.display().to_string()).collect();
            out.push(format!(
                "{} is mapped from {} files: {}",
                lib.label(),
                files.len(),
                list.join(", ")
            ));
            continue;
        }
        if let (Some(m), Some((_, want))) = (files.first(), chosen.iter().find(|(l, _)| *l == lib))
        {
            let want = super::search::canonical(want);
            if m.path != want {
                out.push(format!(
                    "{} is mapped from {} but podgpu chose {}",
                    lib.label(),
                    m.path.display(),
                    want.display()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f00-7f10 r--p 00000000 08:01 123 /usr/bin/podgpu
7f10-7f20 r--p 00000000 08:01 456 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13
7f20-7f30 r-xp 00010000 08:01 456 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13
7f30-7f40 r--p 00000000 08:01 789 /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13.0.0.19
7f40-7f50 r--p 00000000 08:01 790 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib/libcudnn_ops.so.9
7f50-7f60 r--p 00000000 08:01 791 /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
7f60-7f70 rw-p 00000000 00:00 0 [heap]
7f70-7f80 r--p 00000000 08:01 792 /tmp/dir with space/libnvrtc.so.13
";

    #[test]
    fn parses_each_file_once_with_its_version() {
        let m = parse(MAPS);
        let names: Vec<String> = m.iter().map(|m| m.path.display().to_string()).collect();
        assert_eq!(m.len(), 5, "{names:?}");
        assert_eq!(m[0].lib, Some(Lib::Cublas));
        assert_eq!(m[0].version, "13");
        assert_eq!(m[1].version, "13.0.0.19");
        assert_eq!(m[2].lib, None, "a cuDNN sub-library is a companion");
        assert_eq!(m[3].lib, Some(Lib::Driver));
        assert_eq!(m[3].version, "580.95.05");
        assert_eq!(m[4].path, Path::new("/tmp/dir with space/libnvrtc.so.13"));
        assert_eq!(lib_of("libcublasLt.so.13"), Some(Lib::CublasLt));
        assert_eq!(lib_of("libnvrtc-builtins.so.13.0"), None);
    }

    #[test]
    fn two_copies_of_one_library_are_a_conflict() {
        let m = parse(MAPS);
        let c = conflicts(&m, &[]);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("cuBLAS") && c[0].contains("2 files"), "{c:?}");
        // One copy, but not the chosen one.
        let only_driver: Vec<Mapped> = m
            .into_iter()
            .filter(|x| x.lib == Some(Lib::Driver))
            .collect();
        let c = conflicts(
            &only_driver,
            &[(
                Lib::Driver,
                PathBuf::from("/usr/local/nvidia/lib64/libcuda.so.1"),
            )],
        );
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("but podgpu chose"), "{c:?}");
        assert!(conflicts(&only_driver, &[]).is_empty());
    }
}
