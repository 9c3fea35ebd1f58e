//! PEDCC generation, verification, files and the `podgpu pedcc` command.

use podgpu::pedcc::{self, Method};
use std::path::PathBuf;
use std::process::Command;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("podgpu-pedcc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn podgpu(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_podgpu"))
        .args(args)
        .output()
        .expect("run podgpu");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn simplex_is_exact_for_every_fitting_k() {
    // K = 2, K ≪ n, K = n, K = n+1 (the tightest fit).
    for (k, n) in [(2, 1), (2, 5), (10, 256), (7, 7), (8, 7), (30, 40)] {
        let p = pedcc::generate(k, n, 3, Method::Simplex).unwrap();
        let v = pedcc::verify(&p.values, k, n);
        assert!(v.max_norm_error < 1e-13, "K={k} n={n}: {v:?}");
        assert!(v.max_simplex_error < 1e-13, "K={k} n={n}: {v:?}");
        assert!((v.max_cosine + 1.0 / (k as f64 - 1.0)).abs() < 1e-13);
        // Stored as f32, the inner products are still −1/(K−1) to about 1e-7.
        let v32 = pedcc::verify_tensor(&p.to_tensor());
        assert!(v32.max_simplex_error < 1e-6, "K={k} n={n} f32: {v32:?}");
    }
}

#[test]
fn seeds_are_reproducible_and_rotations_random() {
    let a = pedcc::generate(10, 64, 1, Method::Simplex).unwrap().values;
    let b = pedcc::generate(10, 64, 1, Method::Simplex).unwrap().values;
    let c = pedcc::generate(10, 64, 2, Method::Simplex).unwrap().values;
    assert_eq!(a, b);
    let diff = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(diff > 0.1, "different seeds must give different rotations");
    // A random rotation uses all n coordinates, not only the first K−1.
    let tail: f64 = a
        .chunks(64)
        .map(|r| r[32..].iter().map(|v| v * v).sum::<f64>())
        .sum();
    assert!(
        tail > 1.0,
        "the centroids are not rotated into the whole space"
    );
}

#[test]
fn repulsion_spreads_300_points_in_256_dims_far_better_than_random() {
    let (k, n) = (300, 256);
    let p = pedcc::generate(k, n, 0, Method::Repulsion).unwrap();
    let v = pedcc::verify(&p.values, k, n);
    assert!(v.max_norm_error < 1e-12, "{v:?}");
    // Random unit vectors reach a largest pairwise cosine of about 0.26 here.
    assert!(
        v.max_cosine < 0.05,
        "repulsion left a largest cosine of {}",
        v.max_cosine
    );
}

#[test]
fn repulsion_finds_known_optima_in_low_dimensions() {
    // The regular pentagon (cos 72°) and 12 points on S² (icosahedron, cos 63.43° = 1/√5).
    let p = pedcc::generate(5, 2, 1, Method::Repulsion).unwrap();
    let v = pedcc::verify(&p.values, 5, 2);
    assert!(
        (v.max_cosine - (72f64).to_radians().cos()).abs() < 1e-3,
        "{v:?}"
    );
    let p = pedcc::generate(12, 3, 1, Method::Repulsion).unwrap();
    let v = pedcc::verify(&p.values, 12, 3);
    assert!((v.max_cosine - 1.0 / 5f64.sqrt()).abs() < 2e-3, "{v:?}");
}

#[test]
fn bad_arguments_are_errors_that_say_what_to_do() {
    let e = pedcc::generate(1, 10, 0, Method::Simplex)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 classes"), "{e}");
    let e = pedcc::generate(5, 0, 0, Method::Simplex)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 1"), "{e}");
    let e = pedcc::generate(300, 256, 0, Method::Simplex)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--repulsion") && e.contains("--dim"), "{e}");
}

#[test]
fn recommended_dim_follows_the_paper_table() {
    for (k, n) in [
        (10, 256),
        (30, 256),
        (100, 512),
        (200, 512),
        (500, 1024),
        (1000, 2048),
    ] {
        assert_eq!(pedcc::recommended_dim(k), n, "K = {k}");
    }
    for k in [2, 31, 64, 201, 5000] {
        let n = pedcc::recommended_dim(k);
        assert!(
            n + 1 >= k && n >= 2 * k.min(128),
            "K = {k}: n = {n} too small"
        );
    }
}

#[test]
fn file_round_trip_and_bad_files() {
    let dir = tmp_dir("io");
    let path = dir.join("p.safetensors");
    let p = pedcc::generate(10, 32, 5, Method::Simplex).unwrap();
    pedcc::save(&path, &p).unwrap();
    let t = pedcc::load(&path).unwrap();
    assert_eq!(t.shape(), &[10, 32]);
    assert_eq!(t.to_vec_f32(), p.to_tensor().to_vec_f32());
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let e = pedcc::load(&junk).unwrap_err().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
    let e = pedcc::load(&dir.join("missing.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read"), "{e}");
    let e = pedcc::save(&dir.join("no/such/dir/p.safetensors"), &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_writes_and_verifies_and_refuses_nonsense() {
    let dir = tmp_dir("cli");
    let out = dir.join("c10.safetensors");
    let (ok, stdout, stderr) = podgpu(&[
        "pedcc",
        "--classes",
        "10",
        "--dim",
        "256",
        "--seed",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("-0.111111"),
        "the cosines of −1/9 must be printed:\n{stdout}"
    );
    let t = pedcc::load(&out).unwrap();
    assert_eq!(t.shape(), &[10, 256]);
    let v = pedcc::verify_tensor(&t);
    assert!(v.max_simplex_error < 1e-6 && (v.max_cosine + 1.0 / 9.0).abs() < 1e-6);

    let out = dir.join("c300.safetensors");
    let (ok, stdout, stderr) = podgpu(&[
        "pedcc",
        "--classes",
        "300",
        "--dim",
        "256",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("repulsion"),
        "K > n+1 must warn that the repulsion method is used: {stderr}"
    );
    assert!(pedcc::verify_tensor(&pedcc::load(&out).unwrap()).max_cosine < 0.05);

    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["pedcc", "--classes", "1", "--dim", "8", "--out", o],
            "at least 2 classes",
        ),
        (
            vec!["pedcc", "--classes", "4", "--dim", "0", "--out", o],
            "at least 1",
        ),
        (
            vec![
                "pedcc",
                "--classes",
                "4",
                "--dim",
                "8",
                "--out",
                "/nonexistent-dir/x.safetensors",
            ],
            "does not exist",
        ),
    ] {
        let (ok, stdout, stderr) = podgpu(&args);
        assert!(!ok, "{args:?} must fail:\n{stdout}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected `{needle}` in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
