//! Per-epoch metrics files (JSONL + CSV), resume truncation, and the PNG plots drawn from them.

use podgpu::train::metrics::CSV_COLUMNS;
use podgpu::train::{plot_curves, plot_metrics, read_csv, read_jsonl, EpochRecord, MetricsLog};
use serde_json::json;
use std::path::Path;

fn record(epoch: usize) -> EpochRecord {
    let e = epoch as f64;
    let mut r = EpochRecord::new(epoch);
    r.train_loss = 2.3 / e + 0.013;
    r.train_acc = 1.0 - 0.9 / e;
    r.test_acc = if epoch.is_multiple_of(2) {
        None
    } else {
        Some(0.95 - 0.8 / e)
    };
    r.lr = if epoch > 2 { 0.1 * 0.1 } else { 0.1 };
    r.delta = 0.01 * e * 0.05;
    r.mean_norm = 3.0 + 1.0 / 3.0 * e;
    r.images_per_s = 1234.5678 * e;
    r.epoch_time_s = 40.5 + e / 7.0;
    r.peak_mem_bytes = 3_000_000_000 + epoch as u64;
    r.extra.insert("nac_loss".into(), json!(0.125 * e));
    r.extra
        .insert("note".into(), json!(format!("epoch {epoch}, \"quoted\"")));
    r
}

/// Records compared through their JSON form (NaN is written as null on both sides).
fn as_json(rs: &[EpochRecord]) -> serde_json::Value {
    serde_json::to_value(rs).unwrap()
}

fn header_count(dir: &Path) -> usize {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    text.lines().filter(|l| l.starts_with("epoch,")).count()
}

#[test]
fn records_round_trip_through_jsonl_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    let mut written = Vec::new();
    for e in 1..=4 {
        let mut r = record(e);
        if e == 3 {
            r.train_loss = f64::NAN; // a diverged epoch still gets its row
        }
        log.append(r.clone()).unwrap();
        written.push(r);
    }
    let from_jsonl = read_jsonl(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(as_json(&from_jsonl), as_json(&written));
    assert!(from_jsonl[2].train_loss.is_nan());
    assert_eq!(
        from_jsonl[0].train_loss.to_bits(),
        written[0].train_loss.to_bits()
    );

    let from_csv = read_csv(&dir.path().join("metrics.csv")).unwrap();
    assert_eq!(as_json(&from_csv), as_json(&written));
    assert_eq!(header_count(dir.path()), 1);

    let header = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let first = header.lines().next().unwrap();
    assert_eq!(first, format!("{},nac_loss,note", CSV_COLUMNS.join(",")));
}

#[test]
fn resume_truncates_later_epochs_and_keeps_one_header() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    for e in 1..=5 {
        log.append(record(e)).unwrap();
    }
    // The checkpoint was taken after epoch 3: epochs 4 and 5 are trained again.
    let mut log = MetricsLog::resume(dir.path(), 4).unwrap();
    assert_eq!(log.records().len(), 3);
    for e in 4..=6 {
        log.append(record(e)).unwrap();
    }
    let want: Vec<EpochRecord> = (1..=6).map(record).collect();
    assert_eq!(
        as_json(&read_jsonl(log.jsonl_path()).unwrap()),
        as_json(&want)
    );
    assert_eq!(as_json(&read_csv(log.csv_path()).unwrap()), as_json(&want));
    assert_eq!(header_count(dir.path()), 1);

    // Resuming a run that never logged anything gives empty, valid files.
    let empty = tempfile::tempdir().unwrap();
    let log = MetricsLog::resume(empty.path(), 1).unwrap();
    assert!(log.records().is_empty());
    assert!(read_csv(log.csv_path()).unwrap().is_empty());
}

#[test]
fn a_torn_last_line_is_dropped_and_a_damaged_middle_line_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    for e in 1..=2 {
        log.append(record(e)).unwrap();
    }
    let jsonl = dir.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&jsonl).unwrap();
    text.push_str("{\"epoch\":3,\"train_lo"); // killed in the middle of a write
    std::fs::write(&jsonl, &text).unwrap();
    let log = MetricsLog::resume(dir.path(), 3).unwrap();
    assert_eq!(log.records().len(), 2);
    assert!(!std::fs::read_to_string(&jsonl)
        .unwrap()
        .contains("train_lo\n"));

    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&jsonl, format!("{}\nnot json\n{}\n", lines[0], lines[1])).unwrap();
    let e = format!("{:#}", read_jsonl(&jsonl).unwrap_err());
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn a_new_extra_field_adds_a_csv_column_without_a_second_header() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    let mut r1 = record(1);
    r1.extra.clear();
    log.append(r1.clone()).unwrap();
    let r2 = record(2);
    log.append(r2.clone()).unwrap();
    assert_eq!(header_count(dir.path()), 1);
    let rows = read_csv(log.csv_path()).unwrap();
    assert_eq!(as_json(&rows), as_json(&[r1, r2]));
}

#[test]
fn malformed_csv_rows_are_reported_with_their_row() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("metrics.csv");
    let header = CSV_COLUMNS.join(",");
    std::fs::write(
        &csv,
        format!("{header}\n1,0.5,0.5,,0.1,0,1,100,10,5\n2,0.4\n"),
    )
    .unwrap();
    let e = format!("{:#}", read_csv(&csv).unwrap_err());
    assert!(e.contains("row 3"), "{e}");
    std::fs::write(&csv, format!("{header}\n1,abc,0.5,,0.1,0,1,100,10,5\n")).unwrap();
    let e = format!("{:#}", read_csv(&csv).unwrap_err());
    assert!(e.contains("`train_loss` is `abc`"), "{e}");
}

/// Width and height from a PNG's IHDR chunk (after checking the signature).
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn plots_are_written_as_png_from_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<EpochRecord> = (1..=12).map(record).collect();
    plot_metrics(dir.path(), &records).unwrap();
    assert_eq!(png_size(&dir.path().join("loss.png")), (960, 600));
    assert_eq!(png_size(&dir.path().join("accuracy.png")), (960, 600));

    // Refreshing overwrites in place; a NaN point, a single point and no points at all still plot.
    plot_metrics(dir.path(), &records[..1]).unwrap();
    let cmp = dir.path().join("cmp.png");
    let curves = vec![
        ("pod", vec![(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.7)]),
        ("softmax", vec![(1.0, 0.45)]),
        ("empty", vec![]),
    ];
    plot_curves(&cmp, "comparison", "epoch", "test accuracy", &curves).unwrap();
    assert_eq!(png_size(&cmp), (960, 600));
    let none: &[(&str, Vec<(f64, f64)>)] = &[];
    plot_curves(&cmp, "nothing yet", "epoch", "loss", none).unwrap();

    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["accuracy.png", "cmp.png", "loss.png"],
        "no temporary files left"
    );
}
