//! Any bytes given to the dataset reader are either refused with an error or accepted — and then
//! every image and label of every split can be read. Nothing may panic.
//!
//! Each input is tried twice: as it is, and with the header and metadata CRC-32s recomputed, so that
//! mutations get past the checksums into the size and label validation (libFuzzer cannot fix a
//! CRC by itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use podgpu::data::format::{crc32, HEADER_LEN};
use podgpu::data::Dataset;

fn exercise(data: &[u8]) {
    let Ok(ds) = Dataset::from_bytes(data, "fuzz.bin") else {
        return;
    };
    let _ = ds.verify_all();
    for name in ds.split_names() {
        let s = ds.split(name).expect("a listed split opens");
        let n = s.len();
        for i in [0, n / 2, n.saturating_sub(1)] {
            assert_eq!(s.pixels(i).len(), s.image_len());
            assert!((s.label(i) as usize) < ds.num_classes());
        }
    }
}

/// The input with consistent header and metadata checksums (when its lengths allow).
fn with_fixed_crcs(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HEADER_LEN {
        return None;
    }
    let mut b = data.to_vec();
    let meta_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let meta = b.get(HEADER_LEN..HEADER_LEN.checked_add(meta_len)?)?;
    let meta_crc = crc32(meta);
    b[16..20].copy_from_slice(&meta_crc.to_le_bytes());
    let header_crc = crc32(&b[0..20]);
    b[20..24].copy_from_slice(&header_crc.to_le_bytes());
    Some(b)
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    if let Some(fixed) = with_fixed_crcs(data) {
        exercise(&fixed);
    }
});
