//! MNIST and Fashion-MNIST in the IDX format (gzipped or not; gzip is recognised by its magic bytes, not
//! the file name).
//!
//! IDX: big-endian `0x00 0x00 <type 0x08 = u8> <ndims>`, then ndims u32 sizes, then the data. Images are
//! N×28×28 (ndims 3), labels N (ndims 1). Files pair up as `<prefix>-images-idx3-ubyte[.gz]` and
//! `<prefix>-labels-idx1-ubyte[.gz]` with prefix `train` or `t10k`.

use anyhow::{bail, Context, Result};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{split_of_file, RawDataset, RawSplit};

pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Reads an IDX u8 array from a file, gunzipping it when it starts with the gzip magic: (dims,
/// data). The header is read first and exactly the data it announces after it, so that a file that
/// decompresses to more (a gzip bomb) never grows past what its header says; the announced size is
/// checked against the machine before it is allocated.
pub fn read_idx(p: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let shown = p.display();
    let mut f = crate::fsutil::open_regular(p).with_context(|| format!("cannot read {shown}"))?;
    let mut magic = [0u8; 2];
    let gz = f
        .read(&mut magic)
        .with_context(|| format!("cannot read {shown}"))?
        == 2
        && magic == [0x1f, 0x8b];
    f.seek(SeekFrom::Start(0))
        .with_context(|| format!("cannot read {shown}"))?;
    let mut r: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    let broken = |e: std::io::Error| {
        if gz && e.kind() != std::io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!("{shown} looks gzipped but does not decompress: {e}")
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!(
                "{shown} is truncated: it ends before the data its IDX header announces"
            )
        } else {
            anyhow::anyhow!("cannot read {shown}: {e}")
        }
    };
    let mut head = [0u8; 4];
    r.read_exact(&mut head).map_err(broken)?;
    if head[0] != 0 || head[1] != 0 {
        bail!("{shown} is not an IDX file (bad magic)");
    }
    if head[2] != 0x08 {
        bail!(
            "{shown}: IDX element type 0x{:02x} is not unsigned bytes (0x08)",
            head[2]
        );
    }
    let nd = head[3] as usize;
    let mut raw = vec![0u8; 4 * nd];
    r.read_exact(&mut raw).map_err(broken)?;
    let dims: Vec<usize> = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let n = crate::budget::product(&dims.iter().map(|&d| d as u128).collect::<Vec<_>>());
    crate::budget::ensure_fits(
        n,
        || format!("{shown}: its IDX header announces dims {dims:?} ({n} bytes), which"),
        "the header is probably corrupt; download the file again",
    )?;
    let mut data = vec![0u8; n as usize];
    r.read_exact(&mut data).map_err(broken)?;
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(broken)? != 0 {
        bail!(
            "{shown}: IDX header says {dims:?} ({n} bytes) but the file holds more data; it is \
             corrupt"
        );
    }
    Ok((dims, data))
}

/// Parses an IDX u8 array held in memory: (dims, data).
pub fn parse_idx(bytes: &[u8], what: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{} is not an IDX file (bad magic)", what.display());
    }
    if bytes[2] != 0x08 {
        bail!(
            "{}: IDX element type 0x{:02x} is not unsigned bytes (0x08)",
            what.display(),
            bytes[2]
        );
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        bail!("{} is truncated inside its IDX header", what.display());
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n.is_none_or(|n| bytes.len() - header != n) {
        bail!(
            "{}: IDX header says {:?} but the file holds {} data bytes; it is truncated or corrupt",
            what.display(),
            dims,
            bytes.len() - header
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// MNIST-style IDX files (images + labels per split).
pub fn from_idx(files: &[PathBuf], fashion: bool) -> Result<RawDataset> {
    let mut splits: Vec<RawSplit> = Vec::new();
    let mut images: Vec<&PathBuf> = files
        .iter()
        .filter(|p| file_name(p).contains("images"))
        .collect();
    images.sort_by_key(|p| {
        if split_of_file(&file_name(p)) == "train" {
            0
        } else {
            1
        }
    });
    if images.is_empty() {
        bail!("no '*-images-idx3-ubyte[.gz]' files among the inputs");
    }
    for img_path in images {
        let name = file_name(img_path);
        let label_name = name
            .replace("images-idx3", "labels-idx1")
            .replace("images", "labels");
        let lab_path = files
            .iter()
            .find(|p| file_name(p) == label_name)
            .cloned()
            .or_else(|| {
                let p = img_path.with_file_name(&label_name);
                p.is_file().then_some(p)
            })
            .with_context(|| format!("no label file {label_name} for {}", img_path.display()))?;
        let (dims, pixels) = read_idx(img_path)?;
        let (ldims, labels) = read_idx(&lab_path)?;
        let [n, h, w] = dims[..] else {
            bail!(
                "{}: expected N×H×W images, found dims {:?}",
                img_path.display(),
                dims
            );
        };
        if ldims != [n] {
            bail!(
                "{} has {:?} labels for {n} images",
                lab_path.display(),
                ldims
            );
        }
        let split = split_of_file(&name).to_string();
        if splits.iter().any(|s| s.name == split) {
            bail!("two image files for the '{split}' split among the inputs");
        }
        splits.push(RawSplit {
            name: split,
            n,
            h,
            w,
            pixels,
            labels: labels.into_iter().map(u32::from).collect(),
        });
    }
    let classes: Vec<String> = if fashion {
        FASHION_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..10).map(|d| d.to_string()).collect()
    };
    Ok(RawDataset {
        name: if fashion { "fashion-mnist" } else { "mnist" }.into(),
        classes,
        channels: 1,
        splits,
    })
}
