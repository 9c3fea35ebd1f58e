//! Device selection never panics: `auto` falls back to the CPU with a reason when no GPU is usable,
//! `cuda` fails with an error naming what is missing; on a GPU machine both pick the GPU.

use podgpu::cuda::libs::{self, Lib};
use podgpu::device::{select, usable_gpu};
use podgpu::Device;

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
        let found = r.found.iter().filter(|(l, _)| *l == lib).count();
        let missing = r.missing.iter().filter(|l| **l == lib).count();
        assert_eq!(
            found + missing,
            1,
            "{lib:?} found {found}x, missing {missing}x"
        );
    }
    // The search covers the places the issue lists that exist here.
    let msg = r.missing_message(&Lib::ALL);
    assert!(msg.contains("searched"), "{msg}");
    println!("{}", podgpu::device::describe());
}
