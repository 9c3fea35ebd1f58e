// bf16 storage: f32 ↔ bf16 conversions, bit for bit the CPU's `tensor::bf16` (round to nearest,
// ties to even; NaN kept as a quiet NaN of the same sign; subnormals rounded like normals). Written
// with integer operations rather than cuda_bf16.h so that the GPU and the CPU emulation round by
// the same algorithm (and NVRTC needs no header). bf16 values are stored as unsigned short; the
// conversion helpers are in common.cuh (the NHWC kernels use them too).

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

// ---- ops on bf16 activations (the GPU's bf16 step, `--precision bf16`) ----
// Each reads bf16 storage, computes in f32 and rounds its result to bf16 once, as the CPU
// emulation (`cpu::bf16`) rounds the same f32 result. ReLU of bf16 values is exact (no rounding
// happens); the residual add and the gradient sums round once. The bf16 pools are pool.cu's
// kernels instantiated for bf16 storage.

// y = bf16(a + b).
extern "C" __global__ void add_bf16(unsigned short* __restrict__ y, const unsigned short* __restrict__ a,
                                    const unsigned short* __restrict__ b, i64 n) {
    FOR_N(i, n) y[i] = f32_to_bf16_bits(bf16_bits_to_f32(a[i]) + bf16_bits_to_f32(b[i]));
}

// y = max(x, 0) (NaN passes as on the host: NaN > 0 is false, so NaN gives 0 there too).
extern "C" __global__ void relu_bf16(unsigned short* __restrict__ y, const unsigned short* __restrict__ x,
                                     i64 n) {
    FOR_N(i, n) y[i] = bf16_bits_to_f32(x[i]) > 0.0f ? x[i] : (unsigned short)0;
}

// dx = dy where y > 0 (y is the ReLU's output).
extern "C" __global__ void relu_bwd_bf16(unsigned short* __restrict__ dx, const unsigned short* __restrict__ y,
                                         const unsigned short* __restrict__ dy, i64 n) {
    FOR_N(i, n) dx[i] = bf16_bits_to_f32(y[i]) > 0.0f ? dy[i] : (unsigned short)0;
}
