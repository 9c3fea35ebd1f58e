//! Device selection never panics: `auto` falls back to the CPU with a reason when no GPU is usable,
//! `cuda` fails with an error naming what is missing; on a GPU machine both pick the GPU.

use podgpu::cuda::libs::{self, Lib};
use podgpu::device::{select, usable_gpu};
use podgpu::Device;
use std::path::Path;
use std::process::Command;

#[test]
fn auto_falls_back_to_cpu_with_a_reason_or_takes_the_gpu() {
    let (dev, note) = select("auto").expect("auto never errors");
    match usable_gpu(0) {
        Ok(()) => {
            assert_eq!(dev, Device::Cuda(0));
            assert!(note.is_none());
        }
        Err(why) => {
            assert_eq!(dev, Device::Cpu);
            let note = note.expect("a CPU fallback says why");
            println!("auto -> {note}");
            assert!(note.starts_with("using the CPU: no usable GPU ("), "{note}");
            assert!(
                note.contains(&why),
                "note {note:?} lacks the reason {why:?}"
            );
            assert!(!note.contains('\n'), "the note is one line: {note:?}");
        }
    }
}

#[test]
fn cuda_errors_name_what_is_missing() {
    let report = libs::ensure_loaded();
    match usable_gpu(0) {
        Ok(()) => assert_eq!(select("cuda").unwrap().0, Device::Cuda(0)),
        Err(_) => {
            let e = select("cuda").unwrap_err().to_string();
            println!("cuda -> {e}");
            assert!(e.starts_with("--device cuda:0 is not usable: "), "{e}");
            if !report.has(Lib::Driver) {
                assert!(
                    e.contains("libcuda"),
                    "the error names the driver library: {e}"
                );
                assert!(
                    e.contains("PODGPU_CUDA_LIBS"),
                    "the error says how to point at the libraries: {e}"
                );
            }
            let e1 = select("cuda:1").unwrap_err().to_string();
            assert!(e1.contains("cuda:1"), "{e1}");
        }
    }
}

/// tools/gpu-check.sh sets PODGPU_REQUIRE_GPU=1: there, no usable GPU is a failure, not a fallback.
#[test]
fn gpu_is_usable_when_required() {
    if std::env::var("PODGPU_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        if let Err(why) = usable_gpu(0) {
            panic!("PODGPU_REQUIRE_GPU=1 but no CUDA device is usable: {why}");
        }
    }
}

#[test]
fn library_report_lists_every_library_once() {
    let r = libs::ensure_loaded();
    for lib in Lib::ALL {
        let chosen = r.plan.chosen.iter().filter(|c| c.lib == lib).count();
        let missing = r.plan.missing.iter().filter(|l| **l == lib).count();
        assert_eq!(
            chosen + missing,
            1,
            "{lib:?} chosen {chosen}x, missing {missing}x"
        );
        // Usable means chosen, loaded and not shadowed.
        if r.has(lib) {
            assert!(chosen == 1 && !r.plan.shadows.iter().any(|s| s.lib == lib));
        }
    }
    let msg = r.missing_message(&Lib::ALL);
    assert!(msg.contains("searched"), "{msg}");
    let text = podgpu::device::describe();
    println!("{text}");
    for lib in Lib::ALL {
        assert!(
            text.contains(lib.label()),
            "describe() lacks {lib:?}:\n{text}"
        );
    }
    assert!(text.contains("/proc/self/maps"), "{text}");
}

/// The CUDA development image's trap, with stand-in libraries built here: the loader would resolve
/// the name cudarc tries first (`libcublas.so`) to a system copy while podgpu chose the pip copy.
/// podgpu must refuse that library rather than load both, restart itself with its folder of links
/// first on the library path, and then map the chosen file only; `podgpu device --env` must give
/// other programs the same result.
#[test]
fn a_shadowed_library_is_refused_and_podgpu_restarts_with_the_chosen_copy() {
    if libs::ensure_loaded().has(Lib::Driver) {
        println!(
            "SKIPPED: a CUDA driver is present here; this test swaps in stand-in cuBLAS files and \
             needs a machine without a driver (the library unit tests in src/cuda/libs cover the \
             choice everywhere)"
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (sys, pip, cache) = (
        t.path().join("sys"),
        t.path().join("pip"),
        t.path().join("cache"),
    );
    for d in [&sys, &pip] {
        std::fs::create_dir_all(d).unwrap();
    }
    let stub = |dir: &Path, file: &str, soname: &str| -> bool {
        let c = t.path().join(format!("{file}.c"));
        std::fs::write(&c, format!("int podgpu_stand_in_{} = 1;\n", file.len())).unwrap();
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join(file))
            .arg(format!("-Wl,-soname,{soname}"))
            .arg(&c)
            .status()
            .is_ok_and(|s| s.success())
    };
    let built = stub(&pip, "libcublas.so.13", "libcublas.so.13")
        && stub(&pip, "libcublasLt.so.13", "libcublasLt.so.13")
        && stub(&sys, "libcublas.so", "libcublas.so.13");
    if !built {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have a C compiler (cc) for this test"
        );
        println!("SKIPPED: no C compiler (cc) to build stand-in libraries");
        return;
    }
    let podgpu = |extra_env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_podgpu"));
        cmd.args(args)
            .env("LD_LIBRARY_PATH", &sys)
            .env("PODGPU_CUDA_LIBS", &pip)
            .env("PODGPU_CACHE_DIR", &cache)
            .env_remove(libs::REEXEC_VAR);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        println!(
            "--- podgpu {args:?} {extra_env:?}: {:?}\n{text}",
            out.status.code()
        );
        (out.status.code(), text)
    };
    let chosen = pip.join("libcublas.so.13").canonicalize().unwrap();
    let other = sys.join("libcublas.so").canonicalize().unwrap();
    // A file listed in the report's "mapped into this process" section.
    let mapped = |text: &str, file: &Path| {
        let section = text.split("mapped into this process").nth(1).unwrap_or("");
        section
            .lines()
            .any(|l| l.trim_end().ends_with(&*file.to_string_lossy()))
    };

    // 1. Without the restart (as a program that cannot restart itself runs): refused, with why.
    let (code, text) = podgpu(&[(libs::REEXEC_VAR, "disabled-by-test")], &["device"]);
    assert_eq!(code, Some(3), "no GPU here: exit status 3");
    assert!(
        text.contains("REFUSED: libcublas.so would load") && text.contains("instead of the chosen"),
        "{text}"
    );
    assert!(
        !mapped(&text, &other),
        "the system copy must never be opened:\n{text}"
    );

    // 2. podgpu itself: restarts with its links first and maps the chosen file only.
    let (code, text) = podgpu(&[], &["device"]);
    assert_eq!(code, Some(3));
    assert!(text.contains("restarted with"), "{text}");
    assert!(mapped(&text, &chosen), "the chosen copy is mapped:\n{text}");
    assert!(!mapped(&text, &other), "{text}");
    assert!(
        !text.contains("CONFLICT") && !text.contains("REFUSED"),
        "{text}"
    );

    // 3. `--env` for other programs: with its exports, nothing is shadowed and nothing restarts.
    let (code, env) = podgpu(&[], &["device", "--env"]);
    assert_eq!(code, Some(0));
    let ld = env
        .lines()
        .find_map(|l| l.strip_prefix("export LD_LIBRARY_PATH='"))
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no LD_LIBRARY_PATH export:\n{env}"))
        .to_string();
    assert!(ld.ends_with(&*sys.to_string_lossy()), "{ld}");
    let (code, text) = podgpu(&[("LD_LIBRARY_PATH", &ld)], &["device"]);
    assert_eq!(code, Some(3));
    assert!(!text.contains("restarted with"), "{text}");
    assert!(mapped(&text, &chosen) && !mapped(&text, &other), "{text}");
}
