//! `podgpu data convert|verify|info` as a user runs them.

use podgpu::data::Dataset;
use std::path::Path;
use std::process::{Command, Output};

fn podgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podgpu"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn make_png_tree(root: &Path) {
    for (k, class) in ["cats", "dogs"].iter().enumerate() {
        for split in ["train", "test"] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..3u8 {
                let img = image::RgbImage::from_fn(6, 6, |x, y| {
                    image::Rgb([40 * k as u8 + i, x as u8 * 30, y as u8 * 30])
                });
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

#[test]
fn convert_info_verify_and_a_damaged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pets");
    make_png_tree(&root);
    let out = tmp.path().join("pets.bin");
    let o = podgpu(&[
        "data",
        "convert",
        root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--size",
        "4x4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("image-folder"), "{}", text(&o));
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.classes(), ["cats", "dogs"]);
    assert_eq!(ds.split("test").unwrap().image_shape(), [3, 4, 4]);

    let o = podgpu(&["data", "info", out.to_str().unwrap()]);
    assert!(o.status.success());
    let t = text(&o);
    assert!(
        t.contains("classes  2: cats, dogs") && t.contains("train") && t.contains("3x4x4"),
        "{t}"
    );
    let o = podgpu(&["data", "info", "--json", out.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["splits"][1]["n"], 6);
    assert_eq!(v["classes"][1], "dogs");

    let o = podgpu(&["data", "verify", out.to_str().unwrap()]);
    assert!(
        o.status.success() && text(&o).contains("ok"),
        "{}",
        text(&o)
    );

    // Flip one byte near the end (inside the test pixels or labels): verify fails and says which section.
    let mut bytes = std::fs::read(&out).unwrap();
    let at = ds.meta().splits[1].pixels.offset as usize + 5;
    bytes[at] ^= 0xff;
    std::fs::write(&out, &bytes).unwrap();
    let o = podgpu(&["data", "verify", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("MISMATCH") && t.contains("split 'test' pixels") && t.contains("damaged"),
        "{t}"
    );

    // Truncated: a clear error, exit status 1, no panic.
    std::fs::write(&out, &bytes[..bytes.len() / 2]).unwrap();
    let o = podgpu(&["data", "info", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("truncated") && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );
}

#[test]
fn bad_arguments_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let o = podgpu(&[
        "data",
        "info",
        tmp.path().join("none.bin").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("does not exist"),
        "{}",
        text(&o)
    );
    let o = podgpu(&[
        "data",
        "convert",
        tmp.path().to_str().unwrap(),
        "--out",
        "x.bin",
        "--size",
        "big",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("HxW"),
        "{}",
        text(&o)
    );
    let o = podgpu(&[
        "data",
        "convert",
        tmp.path().to_str().unwrap(),
        "--out",
        "x.bin",
        "--norm",
        "weird",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("unknown --norm"),
        "{}",
        text(&o)
    );
}
