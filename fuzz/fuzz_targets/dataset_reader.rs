//! Any bytes given to the dataset reader are either refused with an error or accepted — and then
//! every image and label of every split can be read. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podgpu::data::Dataset;

fuzz_target!(|data: &[u8]| {
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
});
