//! `podgpu fidelity` against the committed PyTorch fixtures (tests/fixtures, written by
//! tools/make_fixtures.py), and against altered copies that must fail loudly.

use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

fn fidelity(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_podgpu"))
        .arg("fidelity")
        .args(args)
        .output()
        .expect("run podgpu");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("podgpu-fidelity-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fixture's tensors (name → dtype, shape, bytes) and metadata, to be altered and written back.
struct Raw {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    Raw {
        tensors: st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect(),
        meta: header.metadata().clone().unwrap_or_default(),
    }
}

fn write_raw(raw: &Raw, path: &Path) {
    let views: Vec<(String, TensorView)> = raw
        .tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, Some(raw.meta.clone())).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Applies `f` to every f64 value of tensor `name` (expected tensors are F64).
fn alter(raw: &mut Raw, name: &str, f: impl Fn(usize, f64) -> f64) {
    let t = raw
        .tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .expect("tensor present");
    assert_eq!(t.1, Dtype::F64, "{name} is expected to be stored as F64");
    let vals: Vec<f64> =
        t.3.chunks_exact(8)
            .enumerate()
            .map(|(i, c)| f(i, f64::from_le_bytes(c.try_into().unwrap())))
            .collect();
    t.3 = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
}

fn pod_fixture() -> PathBuf {
    fixtures()
        .into_iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pod_reference")
        })
        .expect("a committed pod_reference fixture")
}

#[test]
fn every_committed_fixture_passes() {
    let all = fixtures();
    let kinds: Vec<String> = all
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into())
        .collect();
    assert!(
        kinds.iter().any(|k| k.starts_with("pod_paper")),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k.starts_with("pod_reference")),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k.starts_with("softmax_ce")),
        "{kinds:?}"
    );
    // timm's ViT and Swin (tools/make_timm_fixtures.py), with POD and softmax.
    for k in [
        "model_vit_tiny_pod",
        "model_vit_tiny_softmax",
        "model_swin_tiny_pod",
        "model_swin_tiny_softmax",
    ] {
        assert!(
            kinds.iter().any(|n| n.starts_with(k)),
            "{k} missing: {kinds:?}"
        );
    }
    let args: Vec<&str> = all.iter().map(|p| p.to_str().unwrap()).collect();
    let (ok, out) = fidelity(&args);
    assert!(ok, "{out}");
    assert!(
        out.contains("grad.x") && out.contains("grad.logits"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn an_altered_gradient_fails_and_is_named() {
    let dir = tmp_dir("altered");
    let mut raw = read_raw(&pod_fixture());
    // One element off by 5% of the gradient's largest entry: far over 1e-4 relative.
    let big = {
        let t = raw
            .tensors
            .iter()
            .find(|t| t.0 == "expected.grad.x")
            .unwrap();
        t.3.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()).abs())
            .fold(0.0, f64::max)
    };
    alter(&mut raw, "expected.grad.x", |i, v| {
        if i == 3 {
            v + 0.05 * big
        } else {
            v
        }
    });
    let bad = dir.join("altered.safetensors");
    write_raw(&raw, &bad);
    let (ok, out) = fidelity(&[bad.to_str().unwrap()]);
    assert!(!ok, "an altered gradient must fail:\n{out}");
    assert!(out.contains("FAIL"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("altered.safetensors: grad.x")),
        "the failing tensor must be named:\n{out}"
    );

    // Together with good fixtures the run still fails, and only the altered one is blamed.
    let good = fixtures();
    let mut args: Vec<&str> = good.iter().map(|p| p.to_str().unwrap()).collect();
    args.push(bad.to_str().unwrap());
    let (ok, out) = fidelity(&args);
    assert!(!ok, "{out}");
    assert!(out.contains("1 check(s) failed"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn nan_never_passes() {
    let dir = tmp_dir("nan");
    let mut raw = read_raw(&pod_fixture());
    alter(&mut raw, "expected.loss", |_, _| f64::NAN);
    let bad = dir.join("nan.safetensors");
    write_raw(&raw, &bad);
    let (ok, out) = fidelity(&["--tolerance", "1e9", bad.to_str().unwrap()]);
    assert!(!ok, "a NaN must fail whatever the tolerance:\n{out}");
    assert!(out.contains("nan.safetensors: loss"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn malformed_fixtures_are_clear_errors() {
    let dir = tmp_dir("malformed");
    let base = read_raw(&pod_fixture());
    type Edit = Box<dyn Fn(&mut Raw)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unknown_kind",
            Box::new(|r: &mut Raw| {
                r.meta.insert("kind".into(), "triplet_loss".into());
            }),
            "unknown fixture kind `triplet_loss`",
        ),
        (
            "model_kind",
            Box::new(|r: &mut Raw| {
                r.meta.insert("kind".into(), "model".into());
                r.meta.insert("model".into(), "resnet50".into());
            }),
            "metadata `base_width` is missing",
        ),
        (
            "no_kind",
            Box::new(|r: &mut Raw| {
                r.meta.remove("kind");
            }),
            "no `kind`",
        ),
        (
            "bad_variant",
            Box::new(|r: &mut Raw| {
                r.meta.insert("variant".into(), "mine".into());
            }),
            "unknown POD variant `mine`",
        ),
        (
            "wrong_batch",
            Box::new(|r: &mut Raw| {
                r.meta.insert("batch".into(), "999".into());
            }),
            "metadata `batch` = 999",
        ),
        (
            "no_x",
            Box::new(|r: &mut Raw| r.tensors.retain(|t| t.0 != "input.x")),
            "tensor `input.x` is missing",
        ),
        (
            "unknown_output",
            Box::new(|r: &mut Raw| {
                let t = r
                    .tensors
                    .iter()
                    .find(|t| t.0 == "expected.loss")
                    .unwrap()
                    .clone();
                r.tensors.push(("expected.grad.w".into(), t.1, t.2, t.3));
            }),
            "`expected.grad.w` is not an output",
        ),
        (
            "bad_label",
            Box::new(|r: &mut Raw| {
                let t = r
                    .tensors
                    .iter_mut()
                    .find(|t| t.0 == "input.labels")
                    .unwrap();
                assert_eq!(t.1, Dtype::I64);
                t.3[..8].copy_from_slice(&1000i64.to_le_bytes());
            }),
            "labels must be class indices",
        ),
    ];
    for (name, edit, needle) in cases {
        let mut raw = Raw {
            tensors: base.tensors.clone(),
            meta: base.meta.clone(),
        };
        edit(&mut raw);
        let path = dir.join(format!("{name}.safetensors"));
        write_raw(&raw, &path);
        let (ok, out) = fidelity(&[path.to_str().unwrap()]);
        assert!(!ok, "{name} must fail:\n{out}");
        assert!(
            out.contains(needle),
            "{name}: expected `{needle}` in:\n{out}"
        );
        assert!(!out.contains("panicked"), "{name} panicked:\n{out}");
    }

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"junk").unwrap();
    let (ok, out) = fidelity(&[junk.to_str().unwrap()]);
    assert!(!ok && out.contains("not a safetensors file"), "{out}");
    let (ok, out) = fidelity(&["--device", "tpu", junk.to_str().unwrap()]);
    assert!(!ok && out.contains("unknown device \"tpu\""), "{out}");
    if podgpu::cuda::Gpu::get(0).is_err() {
        let (ok, out) = fidelity(&["--device", "cuda", pod_fixture().to_str().unwrap()]);
        assert!(!ok && out.contains("--device cpu"), "{out}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn f64_on_the_cpu_matches_the_reference_to_rounding() {
    let all = fixtures();
    let mut args = vec!["--dtype", "f64", "--tolerance", "1e-10"];
    args.extend(all.iter().map(|p| p.to_str().unwrap()));
    let (ok, out) = fidelity(&args);
    assert!(ok, "{out}");
}
