//! Per-epoch metrics, appended to `metrics.jsonl` (exact, one JSON object a line) and `metrics.csv`
//! (for spreadsheets and plotting tools) in the run folder.
//!
//! The JSONL file is the source of truth: on resume both files are rewritten from its records that
//! come before the resumed epoch, so a run killed between the two appends, or in the middle of one,
//! comes back with consistent files and no duplicated header or epoch.

use super::checkpoint::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const JSONL_FILE: &str = "metrics.jsonl";
pub const CSV_FILE: &str = "metrics.csv";

/// One epoch's measurements. `epoch` is numbered as the trainer chooses (podgpu uses 1-based, the
/// paper's e); `MetricsLog::resume` takes the same numbering.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(with = "nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "nan_as_null")]
    pub train_acc: f64,
    /// None when the test split was not evaluated this epoch.
    pub test_acc: Option<f64>,
    #[serde(with = "nan_as_null")]
    pub lr: f64,
    #[serde(with = "nan_as_null")]
    pub delta: f64,
    /// Mean latent norm M over the epoch.
    #[serde(with = "nan_as_null")]
    pub mean_norm: f64,
    #[serde(with = "nan_as_null")]
    pub images_per_s: f64,
    #[serde(with = "nan_as_null")]
    pub epoch_time_s: f64,
    pub peak_mem_bytes: u64,
    /// Free-form fields (loss terms, per-phase timings, ...), written as extra JSON keys / CSV columns.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// JSON has no NaN: write it as null and read null back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// The fixed CSV columns, in order; extra fields follow, sorted by name.
pub const CSV_COLUMNS: [&str; 10] = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_acc",
    "lr",
    "delta",
    "mean_norm",
    "images_per_s",
    "epoch_time_s",
    "peak_mem_bytes",
];

impl EpochRecord {
    /// A record with every measurement NaN/zero and no extra fields, to fill in.
    pub fn new(epoch: usize) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: f64::NAN,
            train_acc: f64::NAN,
            test_acc: None,
            lr: f64::NAN,
            delta: f64::NAN,
            mean_norm: f64::NAN,
            images_per_s: f64::NAN,
            epoch_time_s: f64::NAN,
            peak_mem_bytes: 0,
            extra: BTreeMap::new(),
        }
    }

    fn csv_cell(&self, column: &str) -> String {
        let f = |v: f64| v.to_string();
        match column {
            "epoch" => self.epoch.to_string(),
            "train_loss" => f(self.train_loss),
            "train_acc" => f(self.train_acc),
            "test_acc" => self.test_acc.map(f).unwrap_or_default(),
            "lr" => f(self.lr),
            "delta" => f(self.delta),
            "mean_norm" => f(self.mean_norm),
            "images_per_s" => f(self.images_per_s),
            "epoch_time_s" => f(self.epoch_time_s),
            "peak_mem_bytes" => self.peak_mem_bytes.to_string(),
            extra => match self.extra.get(extra) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => csv_quote(s),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(v) => csv_quote(&v.to_string()),
            },
        }
    }
}

fn csv_quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.trim() != s {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV columns for a set of records: the fixed ones, then every extra key in any record.
fn columns_for(records: &[EpochRecord]) -> Vec<String> {
    let mut extras: Vec<&String> = records.iter().flat_map(|r| r.extra.keys()).collect();
    extras.sort();
    extras.dedup();
    CSV_COLUMNS
        .iter()
        .map(|s| s.to_string())
        .chain(extras.into_iter().cloned())
        .collect()
}

fn csv_line(rec: &EpochRecord, columns: &[String]) -> String {
    let cells: Vec<String> = columns.iter().map(|c| rec.csv_cell(c)).collect();
    cells.join(",") + "\n"
}

fn csv_text(records: &[EpochRecord], columns: &[String]) -> String {
    let header: Vec<String> = columns.iter().map(|c| csv_quote(c)).collect();
    let mut text = header.join(",") + "\n";
    for r in records {
        text.push_str(&csv_line(r, columns));
    }
    text
}

fn jsonl_line(rec: &EpochRecord) -> String {
    serde_json::to_string(rec).expect("an EpochRecord always serializes") + "\n"
}

/// The metrics files of one run, kept open for appending.
pub struct MetricsLog {
    jsonl: PathBuf,
    csv: PathBuf,
    records: Vec<EpochRecord>,
    csv_columns: Vec<String>,
}

impl MetricsLog {
    /// Starts empty metrics files in `run_dir` (replacing any there).
    pub fn create(run_dir: &Path) -> Result<MetricsLog> {
        MetricsLog::from_records(run_dir, Vec::new())
    }

    /// A log that writes nothing (the ranks other than 0 of a data-parallel run).
    pub fn unwritten(run_dir: &Path) -> MetricsLog {
        MetricsLog {
            jsonl: run_dir.join(JSONL_FILE),
            csv: run_dir.join(CSV_FILE),
            records: Vec::new(),
            csv_columns: Vec::new(),
        }
    }

    /// Reopens the metrics of a resumed run whose next epoch is `next_epoch`: keeps the records with
    /// `epoch < next_epoch` and rewrites both files from them. Reads `metrics.jsonl`, or
    /// `metrics.csv` when only that exists; neither is an empty log.
    pub fn resume(run_dir: &Path, next_epoch: usize) -> Result<MetricsLog> {
        let jsonl = run_dir.join(JSONL_FILE);
        let csv = run_dir.join(CSV_FILE);
        let read = if jsonl.exists() {
            read_jsonl(&jsonl)
        } else if csv.exists() {
            read_csv(&csv)
        } else {
            Ok(Vec::new())
        };
        let mut records = read.map_err(|e| {
            anyhow::anyhow!(
                "{}; nothing was changed and the checkpoint is intact: after that, run `podgpu \
                 train --resume {}` again",
                crate::cli::error_text(&e),
                crate::fsutil::quoted(run_dir)
            )
        })?;
        records.retain(|r| r.epoch < next_epoch);
        MetricsLog::from_records(run_dir, records)
    }

    fn from_records(run_dir: &Path, records: Vec<EpochRecord>) -> Result<MetricsLog> {
        let log = MetricsLog {
            jsonl: run_dir.join(JSONL_FILE),
            csv: run_dir.join(CSV_FILE),
            csv_columns: columns_for(&records),
            records,
        };
        let jsonl_text: String = log.records.iter().map(jsonl_line).collect();
        write_atomic(&log.jsonl, jsonl_text.as_bytes())?;
        write_atomic(
            &log.csv,
            csv_text(&log.records, &log.csv_columns).as_bytes(),
        )?;
        Ok(log)
    }

    /// Appends one epoch to both files (fsynced). A record with extra fields the CSV has no column
    /// for makes the CSV be rewritten with the new columns (earlier rows leave them empty).
    pub fn append(&mut self, rec: EpochRecord) -> Result<()> {
        append_fsync(&self.jsonl, jsonl_line(&rec).as_bytes())?;
        let fits = rec.extra.keys().all(|k| self.csv_columns.contains(k));
        self.records.push(rec);
        if fits {
            let line = csv_line(self.records.last().unwrap(), &self.csv_columns);
            append_fsync(&self.csv, line.as_bytes())?;
        } else {
            self.csv_columns = columns_for(&self.records);
            write_atomic(
                &self.csv,
                csv_text(&self.records, &self.csv_columns).as_bytes(),
            )?;
        }
        Ok(())
    }

    pub fn records(&self) -> &[EpochRecord] {
        &self.records
    }

    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl
    }

    pub fn csv_path(&self) -> &Path {
        &self.csv
    }
}

fn append_fsync(path: &Path, bytes: &[u8]) -> Result<()> {
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().append(true).create(true).open(path)?;
        f.write_all(bytes)?;
        f.sync_data()
    })();
    result.with_context(|| {
        format!(
            "could not append to {}; check that the folder is writable and has free space",
            path.display()
        )
    })
}

/// Reads `metrics.jsonl`. A last line without its newline (a write cut short by a crash) is ignored;
/// any other unreadable line is an error.
pub fn read_jsonl(path: &Path) -> Result<Vec<EpochRecord>> {
    let text = crate::fsutil::read_regular_to_string(path)
        .with_context(|| format!("could not read metrics file {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "metrics file {} line {} is not a valid record ({e}): fix or delete that line (the \
                 epoch it held is also in metrics.csv)",
                path.display(),
                i + 1
            )
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// Reads `metrics.csv`. Extra columns come back as numbers, booleans or strings by their look
/// (the JSONL file keeps their exact JSON types); empty cells are left out.
pub fn read_csv(path: &Path) -> Result<Vec<EpochRecord>> {
    let text = crate::fsutil::read_regular_to_string(path)
        .with_context(|| format!("could not read metrics file {}", path.display()))?;
    let shown = path.display();
    let rows = parse_csv(&text).with_context(|| format!("metrics file {shown}"))?;
    let Some((header, body)) = rows.split_first() else {
        return Ok(Vec::new());
    };
    for c in CSV_COLUMNS {
        if !header.iter().any(|h| h == c) {
            bail!("metrics file {shown} has no `{c}` column");
        }
    }
    let mut out = Vec::new();
    for (i, row) in body.iter().enumerate() {
        let line = i + 2;
        if row.len() != header.len() {
            bail!(
                "metrics file {shown} row {line} has {} cells, the header has {}",
                row.len(),
                header.len()
            );
        }
        let mut rec = EpochRecord::new(0);
        for (col, cell) in header.iter().zip(row) {
            let num = |cell: &str| -> Result<f64> {
                cell.parse::<f64>().with_context(|| {
                    format!("metrics file {shown} row {line}: `{col}` is `{cell}`, not a number")
                })
            };
            let int = |cell: &str| -> Result<u64> {
                cell.parse::<u64>().with_context(|| {
                    format!(
                        "metrics file {shown} row {line}: `{col}` is `{cell}`, not a whole number"
                    )
                })
            };
            match col.as_str() {
                "epoch" => rec.epoch = int(cell)? as usize,
                "train_loss" => rec.train_loss = num(cell)?,
                "train_acc" => rec.train_acc = num(cell)?,
                "test_acc" => {
                    rec.test_acc = if cell.is_empty() {
                        None
                    } else {
                        Some(num(cell)?)
                    }
                }
                "lr" => rec.lr = num(cell)?,
                "delta" => rec.delta = num(cell)?,
                "mean_norm" => rec.mean_norm = num(cell)?,
                "images_per_s" => rec.images_per_s = num(cell)?,
                "epoch_time_s" => rec.epoch_time_s = num(cell)?,
                "peak_mem_bytes" => rec.peak_mem_bytes = int(cell)?,
                extra => {
                    if !cell.is_empty() {
                        rec.extra.insert(extra.to_string(), guess_value(cell));
                    }
                }
            }
        }
        out.push(rec);
    }
    Ok(out)
}

fn guess_value(cell: &str) -> Value {
    if let Ok(i) = cell.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(u) = cell.parse::<u64>() {
        return Value::from(u);
    }
    if let Some(n) = cell
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
    {
        return Value::Number(n);
    }
    match cell {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        s => Value::String(s.to_string()),
    }
}

/// RFC 4180 CSV: comma-separated cells, optionally double-quoted (quotes doubled inside, newlines
/// allowed). Rows end with LF or CRLF; blank lines are skipped.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut cell = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut row_started = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => in_quotes = false,
                c => cell.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                in_quotes = true;
                row_started = true;
            }
            ',' => {
                row.push(std::mem::take(&mut cell));
                row_started = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if row_started || !cell.is_empty() {
                    row.push(std::mem::take(&mut cell));
                    rows.push(std::mem::take(&mut row));
                }
                row_started = false;
            }
            c => {
                cell.push(c);
                row_started = true;
            }
        }
    }
    if in_quotes {
        bail!("a quoted cell is not closed");
    }
    if row_started || !cell.is_empty() {
        row.push(cell);
        rows.push(row);
    }
    Ok(rows)
}
