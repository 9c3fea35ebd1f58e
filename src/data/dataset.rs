//! Opening a dataset file: memory-map it, validate the header and every size against the file length,
//! and hand out zero-copy views of its splits.
//!
//! A file changed under a running job (issue 14): every mapping is registered with `mapguard`, which
//! survives the SIGBUS of a truncated file and lets the reader stop cleanly (`Split::data_changed`);
//! for training, files up to `in_memory_limit()` are read into memory when opened
//! (`open_for_training`), so that nothing done to the file later reaches the run. Only regular files
//! are opened (a FIFO would block, a device never end).

use memmap2::Mmap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mapguard;

/// The bytes of an opened dataset: a private copy, or a guarded memory map of the file.
struct Bytes {
    map: Mmap,
    guard: Option<mapguard::Guard>,
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Bytes {
    /// Whether pages of the mapped file could not be read since it was opened (it was truncated).
    fn changed(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.faults() > 0)
    }
}

/// Environment variable: dataset files larger than this many bytes are memory-mapped, smaller ones
/// read into memory (default: a quarter of the machine's memory, at most 2 GiB).
pub const IN_MEMORY_ENV: &str = "PODGPU_DATASET_IN_MEMORY_MAX";

/// The largest dataset file read into memory rather than mapped.
pub fn in_memory_limit() -> u64 {
    if let Some(v) = std::env::var(IN_MEMORY_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return v;
    }
    let quarter = crate::budget::machine_memory().map_or(u64::MAX, |m| m / 4);
    quarter.min(2 << 30)
}

use super::format::{
    crc32, Meta, Section, SplitMeta, FORMAT_VERSION, HEADER_LEN, LAYOUT, MAGIC, MAX_META_LEN,
};
use super::DatasetError;

/// An opened dataset file. Cheap to clone (the memory map is shared).
#[derive(Clone)]
pub struct Dataset {
    path: PathBuf,
    map: Arc<Bytes>,
    meta: Arc<Meta>,
}

/// A zero-copy view of one split: image `i` is `pixels(i)`, C×H×W u8 bytes in the memory map.
#[derive(Clone)]
pub struct Split {
    map: Arc<Bytes>,
    meta: Arc<Meta>,
    index: usize,
}

/// What `verify` found for one section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionCheck {
    pub split: String,
    pub section: &'static str,
    pub len: u64,
    pub expected_crc32: u32,
    pub actual_crc32: u32,
}

impl SectionCheck {
    pub fn ok(&self) -> bool {
        self.expected_crc32 == self.actual_crc32
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl Dataset {
    /// Opens and validates `path`. Every structural problem (missing, empty, truncated, wrong magic or
    /// version, corrupt metadata, sizes that disagree, labels out of range, empty splits) is a
    /// `DatasetError` with a message that says what to do; pixel checksums are checked by `verify`.
    pub fn open(path: impl AsRef<Path>) -> Result<Dataset, DatasetError> {
        Dataset::open_with(path.as_ref(), 0)
    }

    /// `open` for a long job: a file up to `in_memory_limit()` bytes is read into memory (a private
    /// copy nothing done to the file can reach), a larger one mapped as `open` does.
    pub fn open_for_training(path: impl AsRef<Path>) -> Result<Dataset, DatasetError> {
        Dataset::open_with(path.as_ref(), in_memory_limit())
    }

    /// Opens `path`, reading it into memory when it is at most `copy_up_to` bytes, else mapping it.
    fn open_with(path: &Path, copy_up_to: u64) -> Result<Dataset, DatasetError> {
        let path = path.to_path_buf();
        let p = path.display().to_string();
        let file = crate::fsutil::open_regular(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DatasetError::Missing { path: p.clone() },
            _ => DatasetError::Io {
                path: p.clone(),
                source: e,
            },
        })?;
        let md = file.metadata().map_err(|e| DatasetError::Io {
            path: p.clone(),
            source: e,
        })?;
        if !md.is_file() {
            return Err(DatasetError::Io {
                path: p,
                source: std::io::Error::other("it is a folder or a device, not a dataset file"),
            });
        }
        let len = md.len();
        if len == 0 {
            return Err(DatasetError::Empty { path: p });
        }
        let io = |e: std::io::Error| DatasetError::Io {
            path: p.clone(),
            source: e,
        };
        let bytes = if len <= copy_up_to {
            // A private copy: whatever happens to the file later cannot reach the run.
            let mut map = memmap2::MmapOptions::new()
                .len(len as usize)
                .map_anon()
                .map_err(io)?;
            use std::io::Read;
            (&file).read_exact(&mut map).map_err(|e| {
                io(std::io::Error::new(
                    e.kind(),
                    format!("{e} (the file changed while it was being read)"),
                ))
            })?;
            Bytes {
                map: map.make_read_only().map_err(io)?,
                guard: None,
            }
        } else {
            // SAFETY: the map is read-only. The writer replaces files by rename, so podgpu never
            // rewrites a file under a reader; another process truncating it makes its pages fault,
            // which `mapguard` turns into pages of zeros and a count the trainer checks.
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let guard = Some(mapguard::register(map.as_ptr(), map.len()));
            Bytes { map, guard }
        };
        let meta = parse_and_validate(&bytes, &p)?;
        let ds = Dataset {
            path,
            map: Arc::new(bytes),
            meta: Arc::new(meta),
        };
        ds.check_unchanged()?;
        Ok(ds)
    }

    /// Validates a dataset held in memory (`name` stands for the file in messages), as `open` does a
    /// file: the fuzz targets and tests use it to reach the reader without the file system.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Dataset, DatasetError> {
        let io = |e: std::io::Error| DatasetError::Io {
            path: name.to_string(),
            source: e,
        };
        if bytes.is_empty() {
            return Err(DatasetError::Empty {
                path: name.to_string(),
            });
        }
        let mut map = memmap2::MmapOptions::new()
            .len(bytes.len())
            .map_anon()
            .map_err(io)?;
        map.copy_from_slice(bytes);
        let map = Bytes {
            map: map.make_read_only().map_err(io)?,
            guard: None,
        };
        let meta = parse_and_validate(&map, name)?;
        Ok(Dataset {
            path: PathBuf::from(name),
            map: Arc::new(map),
            meta: Arc::new(meta),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file changed under this process since it was opened (a mapped file that was
    /// truncated: some of what was read since are zeros, not the data).
    pub fn data_changed(&self) -> bool {
        self.map.changed()
    }

    fn check_unchanged(&self) -> Result<(), DatasetError> {
        if self.data_changed() {
            return Err(DatasetError::Changed {
                path: self.path.display().to_string(),
            });
        }
        Ok(())
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn classes(&self) -> &[String] {
        &self.meta.classes
    }

    pub fn num_classes(&self) -> usize {
        self.meta.classes.len()
    }

    pub fn channels(&self) -> usize {
        self.meta.channels as usize
    }

    pub fn mean(&self) -> &[f32] {
        &self.meta.mean
    }

    pub fn std(&self) -> &[f32] {
        &self.meta.std
    }

    pub fn split_names(&self) -> Vec<&str> {
        self.meta.splits.iter().map(|s| s.name.as_str()).collect()
    }

    pub fn has_split(&self, name: &str) -> bool {
        self.meta.splits.iter().any(|s| s.name == name)
    }

    /// The split called `name` ("train", "test", …).
    pub fn split(&self, name: &str) -> Result<Split, DatasetError> {
        let index = self
            .meta
            .splits
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| DatasetError::NoSuchSplit {
                path: self.path.display().to_string(),
                split: name.to_string(),
                available: self.split_names().join(", "),
            })?;
        Ok(Split {
            map: self.map.clone(),
            meta: self.meta.clone(),
            index,
        })
    }

    /// Recomputes the CRC-32 of the metadata and of every section. Returns one entry per section;
    /// `verify_all` turns a mismatch into an error.
    pub fn verify(&self) -> Vec<SectionCheck> {
        let mut out = Vec::new();
        for s in &self.meta.splits {
            for (name, sec) in [("pixels", &s.pixels), ("labels", &s.labels)] {
                let bytes = &self.map[sec.offset as usize..(sec.offset + sec.len) as usize];
                out.push(SectionCheck {
                    split: s.name.clone(),
                    section: name,
                    len: sec.len,
                    expected_crc32: sec.crc32,
                    actual_crc32: crc32(bytes),
                });
            }
        }
        out
    }

    /// `verify`, failing on the first checksum mismatch.
    pub fn verify_all(&self) -> Result<(), DatasetError> {
        let checks = self.verify();
        self.check_unchanged()?;
        match checks.into_iter().find(|c| !c.ok()) {
            None => Ok(()),
            Some(c) => Err(DatasetError::Checksum {
                path: self.path.display().to_string(),
                what: format!("split '{}' {}", c.split, c.section),
                expected: c.expected_crc32,
                actual: c.actual_crc32,
            }),
        }
    }
}

fn parse_and_validate(b: &[u8], p: &str) -> Result<Meta, DatasetError> {
    let file_len = b.len() as u64;
    let truncated = |what: String, need: u64| DatasetError::Truncated {
        path: p.to_string(),
        what,
        need,
        have: file_len,
    };
    if b.len() < 8 || b[0..8] != MAGIC {
        // A short file that starts like ours is truncated; anything else is not a podgpu dataset.
        if b.len() < 8 && MAGIC.starts_with(b) {
            return Err(truncated("the header".into(), HEADER_LEN as u64));
        }
        return Err(DatasetError::BadMagic {
            path: p.to_string(),
        });
    }
    if b.len() < HEADER_LEN {
        return Err(truncated("the header".into(), HEADER_LEN as u64));
    }
    let version = u32_at(b, 8);
    let meta_len = u32_at(b, 12);
    let meta_crc = u32_at(b, 16);
    let header_crc = u32_at(b, 20);
    if crc32(&b[0..20]) != header_crc {
        return Err(DatasetError::Corrupt {
            path: p.to_string(),
            what: "the header checksum does not match".into(),
        });
    }
    if version != FORMAT_VERSION {
        return Err(DatasetError::Version {
            path: p.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if meta_len == 0 || meta_len > MAX_META_LEN {
        return Err(DatasetError::Corrupt {
            path: p.to_string(),
            what: format!("metadata length {meta_len} is implausible"),
        });
    }
    let meta_end = HEADER_LEN as u64 + meta_len as u64;
    if meta_end > file_len {
        return Err(truncated("the metadata".into(), meta_end));
    }
    let meta_bytes = &b[HEADER_LEN..meta_end as usize];
    if crc32(meta_bytes) != meta_crc {
        return Err(DatasetError::Corrupt {
            path: p.to_string(),
            what: "the metadata checksum does not match".into(),
        });
    }
    let meta: Meta = serde_json::from_slice(meta_bytes).map_err(|e| DatasetError::Corrupt {
        path: p.to_string(),
        what: format!("the metadata is not valid JSON for this format: {e}"),
    })?;
    let invalid = |what: String| DatasetError::Corrupt {
        path: p.to_string(),
        what,
    };
    if meta.layout != LAYOUT {
        return Err(invalid(format!(
            "pixel layout '{}' is not supported (expected {LAYOUT})",
            meta.layout
        )));
    }
    if meta.classes.is_empty() {
        return Err(invalid("it lists no classes".into()));
    }
    let c = meta.channels as u64;
    if c == 0 {
        return Err(invalid("it has 0 channels".into()));
    }
    if meta.mean.len() as u64 != c || meta.std.len() as u64 != c {
        return Err(invalid(format!(
            "mean/std have {} and {} values for {c} channels",
            meta.mean.len(),
            meta.std.len()
        )));
    }
    if let Some(problem) = super::format::normalisation_problem(&meta.mean, &meta.std) {
        return Err(invalid(format!(
            "normalisation mean {:?} / std {:?} is not usable: {problem}",
            meta.mean, meta.std
        )));
    }
    if meta.splits.is_empty() {
        return Err(invalid("it has no splits".into()));
    }
    for (i, s) in meta.splits.iter().enumerate() {
        if meta.splits[..i].iter().any(|o| o.name == s.name) {
            return Err(invalid(format!("split '{}' appears twice", s.name)));
        }
        if s.n == 0 {
            return Err(DatasetError::EmptySplit {
                split: s.name.clone(),
            });
        }
        if s.h == 0 || s.w == 0 {
            return Err(invalid(format!(
                "split '{}' has image size {}x{}",
                s.name, s.h, s.w
            )));
        }
        let pixels =
            s.n.checked_mul(c)
                .and_then(|x| x.checked_mul(s.h as u64))
                .and_then(|x| x.checked_mul(s.w as u64));
        check_section(s, "pixels", &s.pixels, pixels, p, file_len, meta_end)?;
        check_section(
            s,
            "labels",
            &s.labels,
            s.n.checked_mul(4),
            p,
            file_len,
            meta_end,
        )?;
        let labels = &b[s.labels.offset as usize..(s.labels.offset + s.labels.len) as usize];
        for (index, chunk) in labels.chunks_exact(4).enumerate() {
            let label = u32::from_le_bytes(chunk.try_into().unwrap());
            if label as usize >= meta.classes.len() {
                return Err(DatasetError::LabelOutOfRange {
                    split: s.name.clone(),
                    index,
                    label,
                    classes: meta.classes.len(),
                });
            }
        }
    }
    Ok(meta)
}

fn check_section(
    s: &SplitMeta,
    what: &str,
    sec: &Section,
    expected_len: Option<u64>,
    p: &str,
    file_len: u64,
    meta_end: u64,
) -> Result<(), DatasetError> {
    let expected_len = expected_len.ok_or_else(|| DatasetError::Corrupt {
        path: p.to_string(),
        what: format!("split '{}' sizes overflow", s.name),
    })?;
    if sec.len != expected_len {
        return Err(DatasetError::SizeMismatch {
            path: p.to_string(),
            what: format!(
                "split '{}' {what}: the section holds {} bytes but n={} c×h×w={}×{} needs {expected_len}",
                s.name, sec.len, s.n, s.h, s.w
            ),
        });
    }
    if sec.offset < meta_end {
        return Err(DatasetError::Corrupt {
            path: p.to_string(),
            what: format!("split '{}' {what} starts inside the header", s.name),
        });
    }
    let end = sec.offset.saturating_add(sec.len);
    if end > file_len {
        return Err(DatasetError::Truncated {
            path: p.to_string(),
            what: format!("split '{}' {what}", s.name),
            need: end,
            have: file_len,
        });
    }
    Ok(())
}

impl Split {
    fn m(&self) -> &SplitMeta {
        &self.meta.splits[self.index]
    }

    /// Whether the dataset file changed under this process since it was opened (see
    /// `Dataset::data_changed`): images read since may be zeros.
    pub fn data_changed(&self) -> bool {
        self.map.changed()
    }

    pub fn name(&self) -> &str {
        &self.m().name
    }

    pub fn len(&self) -> usize {
        self.m().n as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn channels(&self) -> usize {
        self.meta.channels as usize
    }

    pub fn height(&self) -> usize {
        self.m().h as usize
    }

    pub fn width(&self) -> usize {
        self.m().w as usize
    }

    /// (C, H, W) of every image.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels(), self.height(), self.width()]
    }

    /// Bytes per image, C×H×W.
    pub fn image_len(&self) -> usize {
        self.channels() * self.height() * self.width()
    }

    pub fn num_classes(&self) -> usize {
        self.meta.classes.len()
    }

    pub fn classes(&self) -> &[String] {
        &self.meta.classes
    }

    pub fn mean(&self) -> &[f32] {
        &self.meta.mean
    }

    pub fn std(&self) -> &[f32] {
        &self.meta.std
    }

    /// All pixels of the split, N×C×H×W.
    pub fn pixels_all(&self) -> &[u8] {
        let s = &self.m().pixels;
        &self.map[s.offset as usize..(s.offset + s.len) as usize]
    }

    /// Image `i` as C×H×W u8 (channel planes).
    pub fn pixels(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels_all()[i * n..(i + 1) * n]
    }

    pub fn label(&self, i: usize) -> u32 {
        assert!(
            i < self.len(),
            "label index {i} out of range for {} images",
            self.len()
        );
        u32_at(&self.map, self.m().labels.offset as usize + 4 * i)
    }

    pub fn labels(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.label(i)).collect()
    }
}
