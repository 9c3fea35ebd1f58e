//! Converters on real sample files (`$PODGPU_SHARED_DATA`, default `../shared/data`) and on files made
//! here: CIFAR binary and python pickles, MNIST/Fashion-MNIST IDX, image folders of PNG/JPEG.

use podgpu::data::convert::{self, channel_stats, ConvertOptions, LabelKind, Norm, SourceFormat};
use podgpu::data::{shared_data_dir, DatasetSpec, SplitData};
use podgpu::rng::Rng;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn shared(what: &str) -> Option<PathBuf> {
    let d = shared_data_dir();
    if d.is_none() {
        eprintln!(
            "SKIP {what}: shared data not found; set PODGPU_SHARED_DATA to the folder with cifar10-subset/ and mnist/"
        );
    }
    d
}

fn python3() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: python3 not found, cannot make pickles");
    }
    ok
}

fn run(opts: &ConvertOptions) -> (SourceFormat, DatasetSpec) {
    convert::convert(opts).unwrap_or_else(|e| panic!("convert failed: {e:#}"))
}

fn split<'a>(spec: &'a DatasetSpec, name: &str) -> &'a SplitData {
    spec.splits
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no split {name}"))
}

/// CIFAR-10 records `<label><3072>`: the first `n` of the shared subset, or made-up ones without it.
fn cifar10_records(n: usize, test: bool) -> Vec<u8> {
    if let Some(d) = shared_data_dir() {
        let f = if test {
            "test_batch_subset.bin"
        } else {
            "data_batch_subset.bin"
        };
        let b = std::fs::read(d.join("cifar10-subset").join(f)).unwrap();
        return b[..n * 3073].to_vec();
    }
    let mut rng = Rng::new(if test { 2 } else { 1 });
    (0..n)
        .flat_map(|_| {
            let mut r = vec![rng.below(10) as u8];
            r.extend((0..3072).map(|_| rng.below(256) as u8));
            r
        })
        .collect()
}

/// CIFAR-100-style records `<coarse><fine><3072>` made from CIFAR-10 records with fine = 10·label + i%10.
fn cifar100_records(n: usize, test: bool) -> Vec<u8> {
    cifar10_records(n, test)
        .chunks_exact(3073)
        .enumerate()
        .flat_map(|(i, r)| {
            let fine = 10 * r[0] as usize + i % 10;
            let mut out = vec![(fine / 5) as u8, fine as u8];
            out.extend_from_slice(&r[1..]);
            out
        })
        .collect()
}

fn check_records(s: &SplitData, records: &[u8], rec: usize, label_at: usize) {
    let n = records.len() / rec;
    assert_eq!(s.n, n);
    assert_eq!((s.h, s.w), (32, 32));
    for (i, r) in records.chunks_exact(rec).enumerate() {
        assert_eq!(s.labels[i], r[label_at] as u32, "label {i}");
        assert_eq!(
            &s.pixels[i * 3072..(i + 1) * 3072],
            &r[rec - 3072..],
            "pixels of image {i}"
        );
    }
}

#[test]
fn cifar10_binary_subset() {
    let Some(d) = shared("cifar10_binary_subset") else {
        return;
    };
    let dir = d.join("cifar10-subset");
    let (format, spec) = run(&ConvertOptions::new(vec![dir.clone()]));
    assert_eq!(format, SourceFormat::Cifar10Bin);
    assert_eq!(spec.classes[0], "airplane");
    assert_eq!(spec.classes[9], "truck");
    assert_eq!(
        spec.splits
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["train", "test"]
    );
    let train = split(&spec, "train");
    let test = split(&spec, "test");
    assert_eq!(train.labels[..10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]);
    assert_eq!(test.labels[..10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]);
    check_records(
        train,
        &std::fs::read(dir.join("data_batch_subset.bin")).unwrap(),
        3073,
        0,
    );
    check_records(
        test,
        &std::fs::read(dir.join("test_batch_subset.bin")).unwrap(),
        3073,
        0,
    );
    // Normalisation is the paper's CIFAR-10 values, while the data's own mean is the documented one.
    assert_eq!(spec.mean, [0.4914, 0.4822, 0.4465]);
    assert_eq!(spec.std, [0.2023, 0.1994, 0.2010]);
    let (mean, _) = channel_stats(train, 3);
    for (m, want) in mean.iter().zip([0.4916, 0.4818, 0.4447]) {
        assert!((m - want).abs() < 6e-4, "train mean {mean:?}");
    }
    // Subsets keep the first images.
    let mut opts = ConvertOptions::new(vec![
        dir.join("data_batch_subset.bin"),
        dir.join("test_batch_subset.bin"),
    ]);
    opts.format = Some(SourceFormat::Cifar10Bin);
    opts.max_train = Some(20);
    opts.max_test = Some(7);
    let (_, small) = run(&opts);
    assert_eq!(split(&small, "train").labels[..], train.labels[..20]);
    assert_eq!(split(&small, "train").pixels[..], train.pixels[..20 * 3072]);
    assert_eq!(split(&small, "test").n, 7);
}

#[test]
fn cifar100_binary_fine_and_coarse() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (cifar100_records(30, false), cifar100_records(12, true));
    std::fs::write(dir.path().join("train.bin"), &train).unwrap();
    std::fs::write(dir.path().join("test.bin"), &test).unwrap();
    let names: String = (0..100).map(|i| format!("fine_{i}\n")).collect();
    std::fs::write(dir.path().join("fine_label_names.txt"), names).unwrap();
    let (format, spec) = run(&ConvertOptions::new(vec![dir.path().to_path_buf()]));
    assert_eq!(format, SourceFormat::Cifar100Bin);
    assert_eq!(spec.classes.len(), 100);
    assert_eq!(spec.classes[42], "fine_42");
    assert_eq!(spec.mean, [0.507, 0.487, 0.441]);
    check_records(split(&spec, "train"), &train, 3074, 1);
    check_records(split(&spec, "test"), &test, 3074, 1);
    let mut opts = ConvertOptions::new(vec![dir.path().to_path_buf()]);
    opts.label_kind = LabelKind::Coarse;
    let (_, coarse) = run(&opts);
    assert_eq!(coarse.classes.len(), 20); // no coarse names file: numbered
    check_records(split(&coarse, "train"), &train, 3074, 0);
}

#[test]
fn cifar_binary_with_wrong_record_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data_batch_1.bin"), vec![1u8; 3073 * 2 + 5]).unwrap();
    let err = convert::convert(&ConvertOptions::new(vec![dir.path().to_path_buf()])).unwrap_err();
    assert!(format!("{err:#}").contains("3073-byte"), "{err:#}");
}

fn make_pickles(kind: &str, style: &str, source: &Path, n: usize, split: &str, out: &Path) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data_fixtures/make_cifar_pickle.py");
    let status = Command::new("python3")
        .arg(script)
        .args([source.to_str().unwrap(), out.to_str().unwrap()])
        .args([
            "--kind",
            kind,
            "--style",
            style,
            "--n",
            &n.to_string(),
            "--split",
            split,
        ])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "make_cifar_pickle.py failed for {kind} {style}"
    );
}

#[test]
fn cifar10_python_pickles_of_every_protocol() {
    if !python3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (cifar10_records(25, false), cifar10_records(9, true));
    std::fs::write(dir.path().join("train.src"), &train).unwrap();
    std::fs::write(dir.path().join("test.src"), &test).unwrap();
    for style in ["py2", "p2", "p4", "p5"] {
        let out = dir.path().join(style);
        make_pickles(
            "cifar10",
            style,
            &dir.path().join("train.src"),
            25,
            "train",
            &out,
        );
        make_pickles(
            "cifar10",
            style,
            &dir.path().join("test.src"),
            9,
            "test",
            &out,
        );
        let (format, spec) = run(&ConvertOptions::new(vec![out.clone()]));
        assert_eq!(format, SourceFormat::Cifar10Python, "{style}");
        assert_eq!(spec.classes[1], "automobile", "{style}");
        check_records(split(&spec, "train"), &train, 3073, 0);
        check_records(split(&spec, "test"), &test, 3073, 0);
    }
}

#[test]
fn cifar100_python_pickles() {
    if !python3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let train = cifar100_records(21, false);
    std::fs::write(dir.path().join("train.src"), &train).unwrap();
    for style in ["py2", "p5"] {
        let out = dir.path().join(style);
        make_pickles(
            "cifar100",
            style,
            &dir.path().join("train.src"),
            21,
            "train",
            &out,
        );
        make_pickles(
            "cifar100",
            style,
            &dir.path().join("train.src"),
            21,
            "test",
            &out,
        );
        let (format, spec) = run(&ConvertOptions::new(vec![out.clone()]));
        assert_eq!(format, SourceFormat::Cifar100Python);
        assert_eq!(spec.classes.len(), 100);
        assert_eq!(spec.classes[7], "fine7");
        check_records(split(&spec, "train"), &train, 3074, 1);
        let mut opts =
            ConvertOptions::new(vec![out.join("train"), out.join("test"), out.join("meta")]);
        opts.format = Some(SourceFormat::Cifar100Python);
        opts.label_kind = LabelKind::Coarse;
        let (_, coarse) = run(&opts);
        assert_eq!(coarse.classes[19], "coarse19");
        check_records(split(&coarse, "test"), &train, 3074, 0);
    }
}

#[test]
fn pickle_reader_rejects_garbage_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bytes) in [
        &b"\x80\x02}q\x00(U\x04data"[..],
        b"not a pickle",
        b"\x80\x02\xff",
        b"",
    ]
    .iter()
    .enumerate()
    {
        let d = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("data_batch_1"), bytes).unwrap();
        let err = convert::convert(&ConvertOptions::new(vec![d])).unwrap_err();
        assert!(format!("{err:#}").contains("pickle"), "{err:#}");
    }
}

fn gunzip(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn mnist_gzipped_real_files() {
    let Some(d) = shared("mnist_gzipped_real_files") else {
        return;
    };
    let dir = d.join("mnist");
    let (format, spec) = run(&ConvertOptions::new(vec![dir.clone()]));
    assert_eq!(format, SourceFormat::Mnist);
    assert_eq!(spec.channels, 1);
    assert_eq!(
        spec.classes,
        (0..10).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    let train = split(&spec, "train");
    let test = split(&spec, "test");
    assert_eq!((train.n, train.h, train.w), (60000, 28, 28));
    assert_eq!(test.n, 10000);
    assert_eq!(train.labels[..10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
    assert_eq!(test.labels[..10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    assert_eq!(
        test.pixels[..],
        gunzip(&dir.join("t10k-images-idx3-ubyte.gz"))[16..]
    );
    // Normalisation computed from the train split: MNIST's well-known 0.1307 / 0.3081.
    assert!(
        (spec.mean[0] - 0.1307).abs() < 1e-4 && (spec.std[0] - 0.3081).abs() < 1e-4,
        "{:?} {:?}",
        spec.mean,
        spec.std
    );

    // The same files un-gzipped convert to the same test split.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::write(tmp.path().join(f), gunzip(&dir.join(format!("{f}.gz")))).unwrap();
    }
    let (_, plain) = run(&ConvertOptions::new(vec![tmp.path().to_path_buf()]));
    assert_eq!(split(&plain, "test").pixels, test.pixels);
    assert_eq!(split(&plain, "test").labels, test.labels);
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

#[test]
fn fashion_mnist_idx_and_broken_idx() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("fashion-mnist");
    std::fs::create_dir(&dir).unwrap();
    let mut rng = Rng::new(5);
    let (n, h, w) = (13, 28, 28);
    let pixels: Vec<u8> = (0..n * h * w).map(|_| rng.below(256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx(&[n as u32, h as u32, w as u32], &pixels),
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx(&[n as u32], &labels),
    )
    .unwrap();
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte"),
        idx(&[2, 28, 28], &pixels[..2 * 784]),
    )
    .unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx(&[2], &labels[..2])).unwrap();
    let (format, spec) = run(&ConvertOptions::new(vec![dir.clone()]));
    assert_eq!(format, SourceFormat::FashionMnist);
    assert_eq!(spec.classes[9], "Ankle boot");
    assert_eq!(split(&spec, "train").pixels, pixels);
    assert_eq!(
        split(&spec, "train").labels,
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>()
    );
    assert_eq!(split(&spec, "test").n, 2);

    // One image byte missing: a clear error, not a panic.
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx(&[n as u32, 28, 28], &pixels[..pixels.len() - 1]),
    )
    .unwrap();
    let err = convert::convert(&ConvertOptions::new(vec![dir.clone()])).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    // Labels that do not match the images.
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx(&[n as u32, 28, 28], &pixels),
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx(&[n as u32 - 1], &labels[1..]),
    )
    .unwrap();
    assert!(convert::convert(&ConvertOptions::new(vec![dir.clone()])).is_err());

    // The real Fashion-MNIST when its Debian package is installed.
    let real = Path::new("/usr/share/datasets/fashion-mnist");
    if real.is_dir() {
        let mut opts = ConvertOptions::new(vec![real.to_path_buf()]);
        opts.format = Some(SourceFormat::FashionMnist);
        let (_, spec) = run(&opts);
        assert_eq!(
            (split(&spec, "train").n, split(&spec, "test").n),
            (60000, 10000)
        );
        // The first training image is an ankle boot; the dataset's published mean/std are 0.2860/0.3530.
        assert_eq!(
            split(&spec, "train").labels[..10],
            [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
        );
        assert!((spec.mean[0] - 0.2860).abs() < 1e-4 && (spec.std[0] - 0.3530).abs() < 1e-4);
    } else {
        eprintln!("note: /usr/share/datasets/fashion-mnist absent (apt-get install dataset-fashion-mnist); synthetic files only");
    }
}

/// Extracts a few JPEGs of two classes from the shared CIFAR-10 JPEG archive.
fn extract_jpegs(shared: &Path, dest: &Path) -> bool {
    let tar = shared.join("cifar10-jpeg.tar.xz");
    if !tar.is_file() {
        eprintln!("SKIP: {} absent", tar.display());
        return false;
    }
    let status = Command::new("tar")
        .args([
            "-xJf",
            tar.to_str().unwrap(),
            "-C",
            dest.to_str().unwrap(),
            "--wildcards",
        ])
        .args([
            "cifar10-jpeg/train/frog/000[0-4].jpg",
            "cifar10-jpeg/train/truck/000[0-2].jpg",
        ])
        .args([
            "cifar10-jpeg/test/frog/000[0-1].jpg",
            "cifar10-jpeg/test/truck/000[0-1].jpg",
        ])
        .status();
    matches!(status, Ok(s) if s.success())
}

#[test]
fn image_folder_of_real_jpegs() {
    let Some(d) = shared("image_folder_of_real_jpegs") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    if !extract_jpegs(&d, tmp.path()) {
        return;
    }
    let root = tmp.path().join("cifar10-jpeg");
    let (format, spec) = run(&ConvertOptions::new(vec![root.clone()]));
    assert_eq!(format, SourceFormat::ImageFolder);
    assert_eq!(spec.classes, ["frog", "truck"]);
    let train = split(&spec, "train");
    assert_eq!((train.n, train.h, train.w, spec.channels), (8, 32, 32, 3));
    // Classes interleaved, so that the first N images cover every class.
    assert_eq!(train.labels, [0, 1, 0, 1, 0, 1, 0, 0]);
    assert_eq!(split(&spec, "test").labels, [0, 1, 0, 1]);
    // frog/0000.jpg is the first frog of the training set, which is image 0 of the lossless subset:
    // the JPEG (quality 75) stays close to it, and far from another image.
    let subset = std::fs::read(d.join("cifar10-subset/data_batch_subset.bin")).unwrap();
    let mad = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).abs())
            .sum::<f64>()
            / a.len() as f64
    };
    let frog0 = &train.pixels[..3072];
    let close = mad(frog0, &subset[1..3073]);
    let far = mad(frog0, &subset[3073 + 1..2 * 3073]);
    assert!(
        close < 12.0 && far > 3.0 * close,
        "mean |diff| to the original {close}, to another image {far}"
    );
    // Resized on the way in.
    let mut opts = ConvertOptions::new(vec![root]);
    opts.folder.size = Some((16, 24));
    let (_, small) = run(&opts);
    assert_eq!(
        (split(&small, "train").h, split(&small, "train").w),
        (16, 24)
    );
}

fn png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    img.save(path).unwrap();
}

#[test]
fn image_folder_of_pngs_single_tree_with_test_fraction() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("shapes");
    let pattern = |k: u32, i: u32| {
        move |x: u32, y: u32| [(10 * k + i) as u8, (x * 20 + 1) as u8, (y * 30 + 2) as u8]
    };
    for (k, class) in ["b_class", "a_class", "c_class"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..8 {
            png(
                &root.join(class).join(format!("{i:02}.png")),
                5,
                4,
                pattern(k as u32, i),
            );
        }
        std::fs::write(root.join(class).join("notes.txt"), "not an image").unwrap();
    }
    let mut opts = ConvertOptions::new(vec![root.clone()]);
    opts.folder.test_fraction = 0.25;
    opts.folder.split_seed = 3;
    let (format, spec) = run(&opts);
    assert_eq!(format, SourceFormat::ImageFolder);
    assert_eq!(spec.classes, ["a_class", "b_class", "c_class"]); // sorted
    let (train, test) = (split(&spec, "train"), split(&spec, "test"));
    assert_eq!((train.n, test.n), (18, 6));
    for k in 0..3u32 {
        assert_eq!(test.labels.iter().filter(|&&l| l == k).count(), 2);
    }
    // Every image is exactly one of the PNGs, pixels planar (R plane, G plane, B plane).
    let mut seen = std::collections::HashSet::new();
    for s in [train, test] {
        for (j, img) in s.pixels.chunks_exact(60).enumerate() {
            let folder_k = [1, 0, 2][s.labels[j] as usize]; // class a is folder 1, b is 0, c is 2
            let i = img[0] as u32 - 10 * folder_k;
            assert!(i < 8, "red {} is not from class folder {folder_k}", img[0]);
            let f = pattern(folder_k, i);
            for y in 0..4 {
                for x in 0..5 {
                    let px = f(x, y);
                    for c in 0..3 {
                        assert_eq!(img[c * 20 + (y * 5 + x) as usize], px[c]);
                    }
                }
            }
            assert!(seen.insert((folder_k, i)), "image twice");
        }
    }
    // Same seed, same split; the normalisation was computed from the train split.
    let (_, again) = run(&opts);
    assert_eq!(split(&again, "test").pixels, split(&spec, "test").pixels);
    assert!(matches!(opts.norm, Norm::Auto));
    assert_eq!(spec.mean, channel_stats(split(&spec, "train"), 3).0);

    // Grey output: one channel.
    opts.folder.grayscale = true;
    let (_, grey) = run(&opts);
    assert_eq!(grey.channels, 1);
    assert_eq!(split(&grey, "train").pixels.len(), 18 * 20);
}

#[test]
fn image_folder_sizes_must_agree_unless_resized() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mixed");
    for (class, w) in [("one", 6), ("two", 9)] {
        std::fs::create_dir_all(root.join("train").join(class)).unwrap();
        std::fs::create_dir_all(root.join("val").join(class)).unwrap();
        png(
            &root.join("train").join(class).join("a.png"),
            w,
            6,
            |_, _| [200, 100, 50],
        );
        png(&root.join("val").join(class).join("a.png"), w, 6, |_, _| {
            [200, 100, 50]
        });
    }
    let err = convert::convert(&ConvertOptions::new(vec![root.clone()])).unwrap_err();
    assert!(format!("{err:#}").contains("--size"), "{err:#}");
    let mut opts = ConvertOptions::new(vec![root.clone()]);
    opts.folder.size = Some((3, 3));
    let (_, spec) = run(&opts);
    assert_eq!(
        spec.splits
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["train", "test"]
    ); // val → test
       // Resizing a constant image keeps it constant.
    for s in &spec.splits {
        assert_eq!(
            s.pixels,
            [[200u8; 9], [100; 9], [50; 9], [200; 9], [100; 9], [50; 9]].concat()
        );
    }
    // A class missing from one split is an error that names the folders.
    std::fs::remove_dir_all(root.join("val").join("two")).unwrap();
    let err = convert::convert(&opts).unwrap_err();
    assert!(format!("{err:#}").contains("same class folders"), "{err:#}");
}

#[test]
fn unknown_inputs_ask_for_from() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("whatever.dat"), b"xyz").unwrap();
    let err = convert::convert(&ConvertOptions::new(vec![tmp.path().to_path_buf()])).unwrap_err();
    assert!(format!("{err:#}").contains("--from"), "{err:#}");
    let err = convert::convert(&ConvertOptions::new(vec![tmp.path().join("missing")])).unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}
