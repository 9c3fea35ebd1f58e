//! bfloat16: the upper 16 bits of an IEEE f32 (1 sign, 8 exponent, 7 mantissa bits).
//!
//! bf16 keeps f32's exponent range and drops 16 mantissa bits, so a conversion is a rounding of
//! the mantissa only: round to nearest, ties to even (what CUDA's `__float2bfloat16_rn` does and
//! what PyTorch uses for `.to(torch.bfloat16)`). Subnormals round the same way (their exponent
//! field is 0 in both formats); values above the largest finite bf16 round to infinity; NaN stays
//! a (quiet) NaN with its sign. The CPU backend's bf16 emulation (`crate::cpu::bf16`) rounds with
//! these functions at the points where the GPU path stores bf16.

/// The largest finite bf16, (2 − 2⁻⁷)·2¹²⁷.
pub const BF16_MAX: f32 = f32::from_bits(0x7f7f_0000);

/// Unit roundoff of bf16: a rounding to bf16 changes a normal value by at most |x|·2⁻⁸.
pub const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 256.0;

/// The bf16 bits nearest to `x` (ties to even). NaN maps to a quiet NaN of the same sign.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Keep the sign and set the quiet bit, so that the payload truncation cannot make an inf.
        return ((bits >> 16) as u16) | 0x0040;
    }
    // Add half an ulp of bf16 (0x7fff) plus the lowest kept bit (ties to even), then truncate.
    // An overflow of the mantissa carries into the exponent, which is the correct rounding (up to
    // the next binade, or to infinity above BF16_MAX).
    let lsb = (bits >> 16) & 1;
    ((bits + 0x7fff + lsb) >> 16) as u16
}

/// The f32 value of bf16 bits (exact: every bf16 is an f32).
#[inline]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to the nearest bf16, as an f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

/// Rounds every value to bf16 in place.
pub fn round_slice_bf16(v: &mut [f32]) {
    for x in v {
        *x = round_bf16(*x);
    }
}
