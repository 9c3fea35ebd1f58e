//! `podgpu data convert image-folder --classes N` keeps the first N class folders in sorted order
//! (the paper's ImageNet(N) subsets), in every split.

mod common;

use common::*;
use podgpu::data::Dataset;
use std::path::Path;

fn png(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(6, 6, |x, y| {
        image::Rgb([shade, (x * 20) as u8, (y * 20) as u8])
    });
    img.save(path).unwrap();
}

#[test]
fn keeps_the_first_classes_in_sorted_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    // Folder names sort differently from creation order and from their numbers' order.
    for (k, class) in ["n03", "n01", "n10", "n02"].iter().enumerate() {
        for split in ["train", "val"] {
            for i in 0..3 {
                png(
                    &root.join(split).join(class).join(format!("{i}.png")),
                    (k * 50 + i) as u8,
                );
            }
        }
    }
    let out = tmp.path().join("sub.bin");
    let o = run(&[
        "data",
        "convert",
        root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--classes",
        "3",
    ]);
    assert_ok(&o);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.classes(), ["n01", "n02", "n03"]);
    for split in ["train", "test"] {
        let s = ds.split(split).unwrap();
        assert_eq!(s.len(), 9, "{split}");
        assert!((0..s.len()).all(|i| s.label(i) < 3));
    }
    let o = run(&[
        "data",
        "convert",
        root.to_str().unwrap(),
        "--out",
        tmp.path().join("x.bin").to_str().unwrap(),
        "--classes",
        "5",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("--classes 5") && text(&o).1.contains("has 4 class folders"),
        "{}",
        text(&o).1
    );
}
