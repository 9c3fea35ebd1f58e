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
// emulation (`cpu::bf16`) rounds the same f32 result. ReLU and max pooling of bf16 values are
// exact (no rounding happens); the residual add and the gradient sums round once.

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

// Max pooling of bf16 x into bf16 y, argmax as pool.cu's maxpool2d_fwd_f32 (same geometry
// arguments, the same tie and NaN rules, so both pick the same input).
extern "C" __global__ void maxpool2d_fwd_bf16(unsigned short* __restrict__ y, int* __restrict__ argmax,
                                              const unsigned short* __restrict__ x, int N, int C, int H,
                                              int W, int OH, int OW, int kh, int kw, int sh, int sw,
                                              int ph, int pw) {
    FOR_N(o, (i64)N * C * OH * OW) {
        const int ow = o % OW, oh = (o / OW) % OH;
        const i64 plane = o / ((i64)OH * OW);
        const unsigned short* xp = x + plane * H * W;
        float best = -PODGPU_INF;
        int bi = -1;
        for (int i = 0; i < kh; i++) {
            const int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < kw; j++) {
                const int w = ow * sw - pw + j;
                if (w < 0 || w >= W) continue;
                const float v = bf16_bits_to_f32(xp[h * W + w]);
                if (bi < 0 || v > best || v != v) { best = v; bi = h * W + w; }
            }
        }
        y[o] = f32_to_bf16_bits(best);  // a bf16 value (or -inf): exact
        argmax[o] = bi;
    }
}

// dx of max pooling: each input gathers the dy of the windows whose argmax it is, summed in f32
// and rounded once (deterministic, as maxpool2d_bwd_f32).
extern "C" __global__ void maxpool2d_bwd_bf16(unsigned short* __restrict__ dx,
                                              const unsigned short* __restrict__ dy,
                                              const int* __restrict__ argmax, int N, int C, int H, int W,
                                              int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    FOR_N(i, (i64)N * C * H * W) {
        const int w = i % W, h = (i / W) % H;
        const i64 plane = i / ((i64)H * W);
        const int me = h * W + w;
        // The output windows covering (h, w), as pool.cu's `covering`.
        int oh0 = h + ph - kh + 1, ow0 = w + pw - kw + 1;
        oh0 = oh0 <= 0 ? 0 : (oh0 + sh - 1) / sh;
        ow0 = ow0 <= 0 ? 0 : (ow0 + sw - 1) / sw;
        const int oh1 = min((h + ph) / sh, OH - 1), ow1 = min((w + pw) / sw, OW - 1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const i64 o = plane * OH * OW + oh * OW + ow;
                if (argmax[o] == me) g += bf16_bits_to_f32(dy[o]);
            }
        dx[i] = f32_to_bf16_bits(g);
    }
}

// Global average pool of bf16 x into an f32 y [planes] (the pooled features feed FC1, whose input
// the linear layer rounds itself). One warp per plane, as global_avgpool_fwd_f32.
extern "C" __global__ void global_avgpool_fwd_bf16(float* __restrict__ y, const unsigned short* __restrict__ x,
                                                   int planes, int HW) {
    const int p = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (p >= planes) return;
    const unsigned short* xp = x + (i64)p * HW;
    float s = 0.0f;
    for (int i = lane; i < HW; i += 32) s += bf16_bits_to_f32(xp[i]);
    s = warp_sum(s);
    if (lane == 0) y[p] = s / (float)HW;
}

// dx = bf16(dy[plane] / HW) for every element of the plane (dy f32 [planes]).
extern "C" __global__ void global_avgpool_bwd_bf16(unsigned short* __restrict__ dx, const float* __restrict__ dy,
                                                   int planes, int HW) {
    const float inv = 1.0f / (float)HW;
    FOR_N(i, (i64)planes * HW) dx[i] = f32_to_bf16_bits(dy[i / HW] * inv);
}
