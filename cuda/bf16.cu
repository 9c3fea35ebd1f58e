// bf16 storage: f32 ↔ bf16 conversions, bit for bit the CPU's `tensor::bf16` (round to nearest,
// ties to even; NaN kept as a quiet NaN of the same sign; subnormals rounded like normals). Written
// with integer operations rather than cuda_bf16.h so that the GPU and the CPU emulation round by
// the same algorithm (and NVRTC needs no header). bf16 values are stored as unsigned short.

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    const unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((bits >> 16) | 0x0040u);  // NaN: keep the sign, set the quiet bit
    }
    const unsigned int lsb = (bits >> 16) & 1u;
    return (unsigned short)((bits + 0x7fffu + lsb) >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// out[i] = bf16(x[i]): f32 activations into bf16 storage (a conv/GEMM input, a stored activation).
extern "C" __global__ void pack_bf16_f32(unsigned short* __restrict__ out,
                                         const float* __restrict__ x, i64 n) {
    FOR_N(i, n) out[i] = f32_to_bf16_bits(x[i]);
}

// out[i] = f32(b[i]) (exact): bf16 storage back into f32 (the loss side, FC1's output).
extern "C" __global__ void unpack_bf16_f32(float* __restrict__ out,
                                           const unsigned short* __restrict__ b, i64 n) {
    FOR_N(i, n) out[i] = bf16_bits_to_f32(b[i]);
}

// x[i] = f32(bf16(x[i])) in place: rounds f32 values to bf16 and keeps them in f32 words, as the
// CPU emulation does (the GPU twin of `cpu::bf16::round_if`).
extern "C" __global__ void round_bf16_f32(float* __restrict__ x, i64 n) {
    FOR_N(i, n) x[i] = bf16_bits_to_f32(f32_to_bf16_bits(x[i]));
}
