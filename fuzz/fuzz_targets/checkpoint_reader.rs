//! Any bytes given to the checkpoint reader are either refused with an error or accepted as a
//! checkpoint whose tensors can all be read. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(ck) = podgpu::train::checkpoint::parse_checkpoint(Path::new("fuzz.safetensors"), data)
    {
        for t in ck.tensors.values().chain(ck.optim.momentum.values()) {
            let _ = t.to_vec_f64();
        }
    }
});
