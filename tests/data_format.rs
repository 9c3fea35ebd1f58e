//! The dataset file format: round trip, and every kind of damage gives its own clear error.

use podgpu::data::format::{header_bytes, Meta, FORMAT_VERSION, HEADER_LEN, SECTION_ALIGN};
use podgpu::data::{write_dataset, Dataset, DatasetError, DatasetSpec, SplitData};
use podgpu::rng::Rng;
use std::path::{Path, PathBuf};

fn random_split(
    name: &str,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    classes: usize,
    seed: u64,
) -> SplitData {
    let mut rng = Rng::new(seed);
    SplitData {
        name: name.into(),
        n,
        h,
        w,
        pixels: (0..n * c * h * w).map(|_| rng.below(256) as u8).collect(),
        labels: (0..n).map(|_| rng.below(classes) as u32).collect(),
    }
}

fn sample_spec() -> DatasetSpec {
    DatasetSpec {
        name: "unit".into(),
        classes: vec!["cat".into(), "dog".into(), "émeu".into()],
        channels: 3,
        mean: vec![0.4, 0.5, 0.6],
        std: vec![0.2, 0.25, 0.3],
        source: "test".into(),
        splits: vec![
            random_split("train", 37, 3, 5, 7, 3, 1),
            random_split("test", 11, 3, 5, 7, 3, 2),
        ],
    }
}

fn write_sample(dir: &Path) -> PathBuf {
    let p = dir.join("unit.bin");
    write_dataset(&p, &sample_spec()).unwrap();
    p
}

fn read_meta(bytes: &[u8]) -> Meta {
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[HEADER_LEN..HEADER_LEN + len]).unwrap()
}

/// Rewrites the metadata of a file (with a consistent header), keeping the data where it is.
fn with_meta(bytes: &[u8], edit: impl FnOnce(&mut Meta)) -> Vec<u8> {
    let mut meta = read_meta(bytes);
    edit(&mut meta);
    let json = serde_json::to_vec(&meta).unwrap();
    let first_section = read_meta(bytes).splits[0].pixels.offset as usize;
    assert!(
        HEADER_LEN + json.len() <= first_section,
        "edited metadata no longer fits"
    );
    let mut out = bytes.to_vec();
    out[..HEADER_LEN].copy_from_slice(&header_bytes(FORMAT_VERSION, &json));
    out[HEADER_LEN..first_section].fill(0);
    out[HEADER_LEN..HEADER_LEN + json.len()].copy_from_slice(&json);
    out
}

fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<Dataset, DatasetError> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    Dataset::open(&p)
}

#[test]
fn checksum_is_the_standard_crc32() {
    assert_eq!(podgpu::data::format::crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn round_trip_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let spec = sample_spec();
    let p = write_sample(dir.path());
    let ds = Dataset::open(&p).unwrap();
    assert_eq!(ds.name(), "unit");
    assert_eq!(ds.classes(), &spec.classes[..]);
    assert_eq!(ds.channels(), 3);
    assert_eq!(ds.mean(), &spec.mean[..]);
    assert_eq!(ds.std(), &spec.std[..]);
    assert_eq!(ds.split_names(), vec!["train", "test"]);
    for s in &spec.splits {
        let split = ds.split(&s.name).unwrap();
        assert_eq!(split.len(), s.n);
        assert_eq!(split.image_shape(), [3, 5, 7]);
        assert_eq!(split.pixels_all(), &s.pixels[..]);
        assert_eq!(split.labels(), s.labels);
        for i in [0, s.n / 2, s.n - 1] {
            assert_eq!(split.pixels(i), &s.pixels[i * 105..(i + 1) * 105]);
            assert_eq!(split.label(i), s.labels[i]);
        }
    }
    assert!(ds.verify().iter().all(|c| c.ok()));
    ds.verify_all().unwrap();
    for s in &ds.meta().splits {
        assert_eq!(s.pixels.offset % SECTION_ALIGN, 0);
        assert_eq!(s.labels.offset % SECTION_ALIGN, 0);
    }
    match ds.split("val") {
        Err(DatasetError::NoSuchSplit { available, .. }) => assert_eq!(available, "train, test"),
        other => panic!("expected NoSuchSplit, got {:?}", other.err()),
    }
}

#[test]
fn writer_replaces_atomically_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_sample(dir.path());
    let mut spec = sample_spec();
    spec.name = "second".into();
    write_dataset(&p, &spec).unwrap();
    assert_eq!(Dataset::open(&p).unwrap().name(), "second");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("unit.bin")]);
}

#[test]
fn writer_refuses_inconsistent_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sample_spec();
    spec.splits[0].labels[3] = 3; // only 3 classes
    let err = write_dataset(&dir.path().join("x.bin"), &spec).unwrap_err();
    assert!(err.to_string().contains("label 3"), "{err}");
    let mut spec = sample_spec();
    spec.splits[1].pixels.pop();
    assert!(write_dataset(&dir.path().join("x.bin"), &spec).is_err());
    let mut spec = sample_spec();
    spec.splits[1] = SplitData {
        name: "test".into(),
        n: 0,
        h: 5,
        w: 7,
        pixels: vec![],
        labels: vec![],
    };
    assert!(write_dataset(&dir.path().join("x.bin"), &spec).is_err());
    assert!(!dir.path().join("x.bin").exists());
}

#[test]
fn missing_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::open(dir.path().join("nope.bin")).err().unwrap();
    assert!(matches!(err, DatasetError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("podgpu data convert"), "{err}");
    let err = Dataset::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("folder"), "{err}");
    let err = open_bytes(dir.path(), "empty.bin", &[]).err().unwrap();
    assert!(matches!(err, DatasetError::Empty { .. }), "{err}");
}

#[test]
fn truncation_anywhere_is_reported_as_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    let meta = read_meta(&bytes);
    let cuts = [
        4,                                           // inside the magic
        20,                                          // inside the header
        HEADER_LEN + 10,                             // inside the metadata
        meta.splits[0].pixels.offset as usize + 100, // inside the first pixels
        meta.splits[1].labels.offset as usize + 4,   // inside the last labels
        bytes.len() - 1,                             // one byte short
    ];
    for cut in cuts {
        let err = open_bytes(dir.path(), "cut.bin", &bytes[..cut])
            .err()
            .unwrap();
        assert!(
            matches!(err, DatasetError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn wrong_magic_and_wrong_version() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    let mut b = bytes.clone();
    b[0] = b'X';
    let err = open_bytes(dir.path(), "magic.bin", &b).err().unwrap();
    assert!(matches!(err, DatasetError::BadMagic { .. }), "{err}");
    let err = open_bytes(
        dir.path(),
        "text.bin",
        b"hello, this is not a dataset at all",
    )
    .err()
    .unwrap();
    assert!(matches!(err, DatasetError::BadMagic { .. }), "{err}");

    // A well-formed header of another version.
    let meta_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let json = &bytes[HEADER_LEN..HEADER_LEN + meta_len];
    let mut b = bytes.clone();
    b[..HEADER_LEN].copy_from_slice(&header_bytes(FORMAT_VERSION + 1, json));
    let err = open_bytes(dir.path(), "version.bin", &b).err().unwrap();
    match &err {
        DatasetError::Version {
            found, supported, ..
        } => assert_eq!((*found, *supported), (FORMAT_VERSION + 1, FORMAT_VERSION)),
        other => panic!("expected a version error, got {other}"),
    }
    // A damaged header (version bytes changed without a matching header checksum).
    let mut b = bytes.clone();
    b[9] ^= 0x40;
    let err = open_bytes(dir.path(), "hdr.bin", &b).err().unwrap();
    assert!(
        matches!(err, DatasetError::Corrupt { .. }) && err.to_string().contains("header checksum"),
        "{err}"
    );
}

#[test]
fn damaged_metadata_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = std::fs::read(write_sample(dir.path())).unwrap();
    b[HEADER_LEN + 5] ^= 0x01;
    let err = open_bytes(dir.path(), "meta.bin", &b).err().unwrap();
    assert!(
        matches!(err, DatasetError::Corrupt { .. })
            && err.to_string().contains("metadata checksum"),
        "{err}"
    );
}

#[test]
fn sizes_that_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    // n says 36 but the section holds 37 images.
    let b = with_meta(&bytes, |m| m.splits[0].n = 36);
    let err = open_bytes(dir.path(), "n.bin", &b).err().unwrap();
    assert!(matches!(err, DatasetError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("sizes disagree"), "{err}");
    // Image height changed.
    let b = with_meta(&bytes, |m| m.splits[1].h = 6);
    assert!(matches!(
        open_bytes(dir.path(), "h.bin", &b).err().unwrap(),
        DatasetError::SizeMismatch { .. }
    ));
    // Label section of the wrong length.
    let b = with_meta(&bytes, |m| m.splits[1].labels.len -= 4);
    assert!(matches!(
        open_bytes(dir.path(), "l.bin", &b).err().unwrap(),
        DatasetError::SizeMismatch { .. }
    ));
    // A section that claims to reach past the end of the file.
    let b = with_meta(&bytes, |m| m.splits[1].labels.offset += 1 << 20);
    assert!(matches!(
        open_bytes(dir.path(), "o.bin", &b).err().unwrap(),
        DatasetError::Truncated { .. }
    ));
    // mean/std for the wrong number of channels.
    let b = with_meta(&bytes, |m| m.mean.pop().map(|_| ()).unwrap());
    assert!(matches!(
        open_bytes(dir.path(), "m.bin", &b).err().unwrap(),
        DatasetError::Corrupt { .. }
    ));
}

#[test]
fn label_out_of_range_and_empty_split() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    let meta = read_meta(&bytes);
    let mut b = bytes.clone();
    let at = meta.splits[1].labels.offset as usize + 4 * 5;
    b[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
    match open_bytes(dir.path(), "label.bin", &b).err().unwrap() {
        DatasetError::LabelOutOfRange {
            split,
            index,
            label,
            classes,
        } => {
            assert_eq!((split.as_str(), index, label, classes), ("test", 5, 7, 3))
        }
        other => panic!("expected LabelOutOfRange, got {other}"),
    }
    let b = with_meta(&bytes, |m| {
        let s = &mut m.splits[1];
        s.n = 0;
        s.pixels.len = 0;
        s.labels.len = 0;
    });
    let err = open_bytes(dir.path(), "empty_split.bin", &b).err().unwrap();
    assert!(
        matches!(&err, DatasetError::EmptySplit { split } if split == "test"),
        "{err}"
    );
}

#[test]
fn verify_finds_a_flipped_pixel_in_its_section() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_sample(dir.path())).unwrap();
    let meta = read_meta(&bytes);
    let mut b = bytes.clone();
    b[meta.splits[0].pixels.offset as usize + 777] ^= 0x10;
    let ds = open_bytes(dir.path(), "flip.bin", &b).unwrap(); // structure is intact, so it opens
    let bad: Vec<_> = ds
        .verify()
        .into_iter()
        .filter(|c| !c.ok())
        .map(|c| (c.split, c.section))
        .collect();
    assert_eq!(bad, vec![("train".to_string(), "pixels")]);
    let err = ds.verify_all().unwrap_err();
    assert!(
        matches!(err, DatasetError::Checksum { .. }) && err.to_string().contains("train"),
        "{err}"
    );
}
