//! Every `cuda/*.cu` compiles with NVRTC for compute_90 (H100/H200), without a GPU.
//!
//! NVRTC is found like at run time (PODGPU_CUDA_LIBS, LD_LIBRARY_PATH, Python venvs with
//! `nvidia/cu13/lib`, …); `.ci/run` installs it into `.venv-cuda`. With CI=true a missing NVRTC fails
//! the test; elsewhere the test prints why it skipped. When `ptxas` is found (the optional
//! `nvidia-cuda-nvcc` wheel), the PTX is also assembled for sm_90 and register/spill counts printed.

use podgpu::cuda::nvrtc;
use std::collections::BTreeSet;
use std::path::PathBuf;

const ARCH: &str = "compute_90";

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// `NAME` of every `extern "C" __global__ void NAME(` in a source.
fn kernel_names(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__ void ") {
        rest = &rest[i + "extern \"C\" __global__ void ".len()..];
        let end = rest.find('(').expect("kernel name followed by (");
        out.push(rest[..end].trim().to_string());
    }
    out
}

#[test]
fn every_kernel_source_compiles_for_compute_90() {
    let (ma, mi) = match nvrtc::version() {
        Ok(v) => v,
        Err(e) => {
            if in_ci() {
                panic!("CI=true but NVRTC cannot be loaded, so the CUDA kernels were not compiled: {e}");
            }
            println!("SKIPPED: NVRTC not found, CUDA kernels not compiled ({e})");
            return;
        }
    };
    println!("NVRTC {ma}.{mi}");
    let archs = nvrtc::supported_archs().expect("NVRTC lists its architectures");
    assert!(
        archs.contains(&90),
        "NVRTC {ma}.{mi} cannot target compute_90: {archs:?}"
    );

    let ptxas = find_ptxas();
    let mut failures = Vec::new();
    for s in nvrtc::SOURCES {
        match nvrtc::compile(s.name, s.src, ARCH) {
            Ok(ptx) => {
                for k in kernel_names(s.src) {
                    assert!(
                        ptx.contains(&format!(".entry {k}(")),
                        "cuda/{}.cu: no .entry {k} in the PTX",
                        s.name
                    );
                }
                // Machine code for sm_90 straight from NVRTC (what the GPU loads first).
                match nvrtc::compile_cubin(s.name, s.src, "sm_90") {
                    Ok(bin) => assert!(
                        bin.starts_with(b"\x7fELF"),
                        "cuda/{}.cu: CUBIN is not ELF",
                        s.name
                    ),
                    Err(e) => failures.push(e),
                }
                if let Some(p) = &ptxas {
                    if let Err(e) = assemble(p, s.name, &ptx) {
                        failures.push(e);
                    }
                }
            }
            Err(log) => failures.push(log),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    if ptxas.is_none() {
        println!(
            "ptxas not found: PTX not assembled (install nvidia-cuda-nvcc==13.0.88 for that check)"
        );
    }
}

/// The launcher sources, embedded when the test is compiled, so the test reads no file at run time
/// (it runs from a copy of the repository in another folder on the GPU machine).
const LAUNCHERS: &[(&str, &str)] = &[
    ("adamw.rs", include_str!("../src/cuda/adamw.rs")),
    (
        "baseline_kernels.rs",
        include_str!("../src/cuda/baseline_kernels.rs"),
    ),
    ("bf16.rs", include_str!("../src/cuda/bf16.rs")),
    ("bf16_ops.rs", include_str!("../src/cuda/bf16_ops.rs")),
    ("blas.rs", include_str!("../src/cuda/blas.rs")),
    ("blaslt.rs", include_str!("../src/cuda/blaslt.rs")),
    ("bn_train.rs", include_str!("../src/cuda/bn_train.rs")),
    (
        "dnn/algo_cache.rs",
        include_str!("../src/cuda/dnn/algo_cache.rs"),
    ),
    ("dnn/bn.rs", include_str!("../src/cuda/dnn/bn.rs")),
    ("dnn/bn_ex.rs", include_str!("../src/cuda/dnn/bn_ex.rs")),
    ("dnn/conv.rs", include_str!("../src/cuda/dnn/conv.rs")),
    ("dnn/mod.rs", include_str!("../src/cuda/dnn/mod.rs")),
    ("graph.rs", include_str!("../src/cuda/graph.rs")),
    ("guard.rs", include_str!("../src/cuda/guard.rs")),
    ("kernels.rs", include_str!("../src/cuda/kernels.rs")),
    ("launch.rs", include_str!("../src/cuda/launch.rs")),
    ("libs/maps.rs", include_str!("../src/cuda/libs/maps.rs")),
    ("libs/mod.rs", include_str!("../src/cuda/libs/mod.rs")),
    ("libs/search.rs", include_str!("../src/cuda/libs/search.rs")),
    (
        "loss_kernels.rs",
        include_str!("../src/cuda/loss_kernels.rs"),
    ),
    ("mod.rs", include_str!("../src/cuda/mod.rs")),
    ("nhwc.rs", include_str!("../src/cuda/nhwc.rs")),
    ("nn_kernels.rs", include_str!("../src/cuda/nn_kernels.rs")),
    ("nvrtc.rs", include_str!("../src/cuda/nvrtc.rs")),
    ("optim.rs", include_str!("../src/cuda/optim.rs")),
    ("pinned.rs", include_str!("../src/cuda/pinned.rs")),
    ("pod_head.rs", include_str!("../src/cuda/pod_head.rs")),
    ("stager.rs", include_str!("../src/cuda/stager.rs")),
    ("pool.rs", include_str!("../src/cuda/pool.rs")),
    ("transformer.rs", include_str!("../src/cuda/transformer.rs")),
];

/// Every kernel name the launchers ask for (`"…_f32"` / `"…_i32"` / `"…_bf16"` literals in src/cuda/*.rs)
/// exists in some .cu source, so a typo fails here rather than on the first GPU run.
#[test]
fn launchers_only_name_existing_kernels() {
    let defined: BTreeSet<String> = nvrtc::SOURCES
        .iter()
        .flat_map(|s| kernel_names(s.src))
        .collect();
    let mut asked = BTreeSet::new();
    for (_, text) in LAUNCHERS {
        for piece in text.split('"').skip(1).step_by(2) {
            let ident = piece.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let typed = ["_f32", "_i32", "_bf16"].iter().any(|t| piece.ends_with(t));
            if ident && typed {
                asked.insert(piece.to_string());
            }
        }
    }
    assert!(
        asked.len() > 20,
        "found only {} kernel names in the launchers",
        asked.len()
    );
    let missing: Vec<_> = asked.difference(&defined).collect();
    assert!(
        missing.is_empty(),
        "launchers name kernels that no cuda/*.cu defines: {missing:?}"
    );
}

/// Where a launcher names its module and kernel together (`func(&gpu, "pool", "maxpool2d_fwd_f32")`,
/// `elementwise("bf16", "add_bf16", …)`), the kernel is defined in that module's source: a kernel moved to another .cu file without its
/// launcher fails here, not on the first GPU run.
#[test]
fn launchers_ask_each_module_for_its_own_kernels() {
    let mut checked = 0;
    for (file, text) in LAUNCHERS {
        for call in ["func(", "elementwise("] {
            let mut rest = *text;
            while let Some(i) = rest.find(call) {
                rest = &rest[i + call.len()..];
                let args = &rest[..rest.find(')').unwrap_or(rest.len())];
                let lits: Vec<&str> = args.split('"').skip(1).step_by(2).collect();
                let [module, kernel] = lits[..] else { continue };
                let src = nvrtc::source(module)
                    .unwrap_or_else(|| panic!("{file}: {call}…{module:?}…) names no cuda/*.cu"));
                assert!(
                    kernel_names(src.src).iter().any(|k| k == kernel),
                    "{file}: kernel {kernel:?} is not in cuda/{module}.cu"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} func(…) calls with literal names found"
    );
}

/// LAUNCHERS lists every file of src/cuda (and its folders). Checked where the sources are (the build machine); a
/// packed test executable elsewhere has no sources to compare with and says so.
#[test]
fn the_launcher_list_covers_src_cuda() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cuda");
    if !dir.is_dir() {
        println!(
            "SKIPPED: {} is not here (a packed test executable); LAUNCHERS was checked where it \
             was built",
            dir.display()
        );
        return;
    }
    let mut on_disk = BTreeSet::new();
    let mut todo = vec![dir.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned();
                on_disk.insert(rel);
            }
        }
    }
    let listed: BTreeSet<String> = LAUNCHERS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        listed, on_disk,
        "tests/cuda_nvrtc.rs LAUNCHERS must list every src/cuda/*.rs"
    );
}

/// The body of kernel `name` in a PTX text (from its `.entry` to the next one).
fn ptx_body<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no .entry {name} in the PTX"));
    let rest = &ptx[start + 1..];
    &ptx[start..start + 1 + rest.find(".entry").unwrap_or(rest.len())]
}

/// The SC value subtracts two nearly equal sums; like the CPU reference, the kernel must accumulate
/// and subtract them in double (a float accumulator would leave mostly rounding error). Checked on
/// the compiled PTX: double-precision adds or FMAs, and the scale passed as a double.
#[test]
fn the_sc_value_kernel_accumulates_in_double() {
    if nvrtc::version().is_err() {
        assert!(!in_ci(), "CI=true but NVRTC cannot be loaded");
        println!("SKIPPED: NVRTC not found (see every_kernel_source_compiles_for_compute_90)");
        return;
    }
    let src = nvrtc::source("loss").unwrap();
    let ptx = nvrtc::compile(src.name, src.src, ARCH).expect("loss.cu compiles");
    let body = ptx_body(&ptx, "sc_loss_f32");
    assert!(
        body.contains("add.f64") || body.contains("fma.rn.f64"),
        "sc_loss_f32 has no double-precision accumulation:\n{body}"
    );
    assert!(
        body.contains("sub.f64") || body.contains("add.f64"),
        "{body}"
    );
    assert!(
        body.contains(".param .f64"),
        "sc_loss_f32 must take its scale as a double:\n{body}"
    );
    // A plain float kernel of the same file has no double arithmetic: the check can tell them apart.
    assert!(!ptx_body(&ptx, "sc_grad_f32").contains(".f64"));
}

fn find_ptxas() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(PathBuf::from)
        .collect();
    // The optional nvcc wheel in the repository's .venv-cuda (found from the working directory).
    if let Ok(rd) = std::fs::read_dir(".venv-cuda/lib") {
        for py in rd.flatten() {
            dirs.push(py.path().join("site-packages/nvidia/cu13/bin"));
        }
    }
    dirs.into_iter()
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

fn assemble(ptxas: &PathBuf, name: &str, ptx: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("podgpu-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join(format!("{name}.ptx"));
    std::fs::write(&src, ptx).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(ptxas)
        .args(["-arch=sm_90", "-v", "-o"])
        .arg(dir.join(format!("{name}.cubin")))
        .arg(&src)
        .output()
        .map_err(|e| format!("running {}: {e}", ptxas.display()))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "ptxas -arch=sm_90 failed on cuda/{name}.cu:\n{log}"
        ));
    }
    // Report registers and spills per kernel (printed with --nocapture).
    for line in log
        .lines()
        .filter(|l| l.contains("registers") || l.contains("spill"))
    {
        println!("{name}: {}", line.trim());
    }
    Ok(())
}

/// Compiled modules are cached on disk and read back instead of recompiling.
#[test]
fn compiled_modules_are_cached_on_disk() {
    if nvrtc::version().is_err() {
        println!("SKIPPED: NVRTC not found (see every_kernel_source_compiles_for_compute_90)");
        return;
    }
    // Its own folder, passed in: no environment variable is changed while other threads run.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ptx");
    let src = nvrtc::source("elementwise").unwrap();
    for target in ["compute_90", "sm_90"] {
        let first = nvrtc::image_cached_in(src, target, &dir).expect("compiles");
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains(target))
            .unwrap_or_else(|| panic!("no cache file for {target} in {}", dir.display()));
        // Mark the cached copy: the second call must return the marked bytes, not recompile.
        let mut marked = std::fs::read(&file).unwrap();
        marked.extend_from_slice(b"\n// read back from the cache\n");
        std::fs::write(&file, &marked).unwrap();
        let again = nvrtc::image_cached_in(src, target, &dir).expect("cached");
        match (first, again) {
            (nvrtc::Image::Ptx(a), nvrtc::Image::Ptx(b)) => {
                assert_eq!(b.as_bytes(), &marked[..]);
                assert!(b.starts_with(&a));
            }
            (nvrtc::Image::Cubin(a), nvrtc::Image::Cubin(b)) => {
                assert_eq!(b, marked);
                assert!(b.starts_with(&a));
            }
            _ => panic!("{target}: cached image of another kind"),
        }
    }
}
