//! bf16 storage on the GPU (`podgpu::cuda::bf16`) against the CPU's rounding (`tensor::bf16`),
//! bit for bit: the GPU's bf16 path and the CPU's bf16 emulation must store the same values.

use super::{dev, gpu, GPU_LOCK};
use podgpu::cuda::bf16 as gb;
use podgpu::rng::Rng;
use podgpu::tensor::bf16::{f32_to_bf16_bits, round_bf16};
use podgpu::DType;

/// Random bit patterns plus the special cases: ties, subnormals, overflow, infinities, NaNs.
fn awkward_values(n: usize) -> Vec<f32> {
    let mut rng = Rng::new(5);
    let mut v: Vec<f32> = [
        0x3f80_8000u32, // 1 + 2⁻⁸: tie → 1
        0x3f81_8000,    // tie → up (even)
        0x0000_8000,    // subnormal tie → 0
        0x0001_8000,    // subnormal tie → 2
        0x007f_ffff,    // largest subnormal → smallest normal
        0x7f7f_8000,    // above the largest bf16 by half an ulp → inf
        0x7f80_0000,    // inf
        0xff80_0000,    // −inf
        0x7f80_0001,    // NaN with a low payload only
        0xffc0_0000,    // negative quiet NaN
        0x8000_0000,    // −0
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    while v.len() < n {
        v.push(f32::from_bits(rng.next_u64() as u32));
    }
    v
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gpu_bf16_conversions_match_the_cpu_bit_for_bit() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _g = gpu();
    // An odd count: the last bf16 value sits alone in its 32-bit word.
    let v = awkward_values(100_001);
    let x = dev(&[v.len()], &v);
    let b = gb::to_bf16(&x);
    assert_eq!(b.dtype(), DType::Bf16);
    assert_eq!(b.shape(), x.shape());
    let want: Vec<u16> = v.iter().map(|&f| f32_to_bf16_bits(f)).collect();
    assert_eq!(gb::bf16_buf(&b).to_host_bits(), want, "pack_bf16_f32");
    // Back to f32: exact, NaN stays NaN.
    let back = gb::to_f32(&b).to_vec_f32();
    let rounded = gb::round_to_bf16(&x).to_vec_f32();
    for (i, &f) in v.iter().enumerate() {
        let r = round_bf16(f);
        if r.is_nan() {
            assert!(
                back[i].is_nan() && rounded[i].is_nan(),
                "value {i}: NaN lost"
            );
        } else {
            assert_eq!(back[i].to_bits(), r.to_bits(), "unpack_bf16_f32 at {i}");
            assert_eq!(rounded[i].to_bits(), r.to_bits(), "round_bf16_f32 at {i}");
        }
    }
    // The rounding made a copy: x itself is unchanged.
    assert_eq!(x.to_vec_f32()[0].to_bits(), v[0].to_bits());
    // A bf16 GPU tensor reads back through the tensor API as its f32 values.
    assert_eq!(b.to_vec_f32()[1], round_bf16(v[1]));
}
