// Channels-last (NHWC) images on the GPU: the layout changes at the network's input (the image,
// NCHW → NHWC; the weights, KCRS → KRSC for cuDNN's NHWC convolutions, and their gradients back),
// and the global pool that reads NHWC activations (max pooling over NHWC is pool.cu's, one
// template for both layouts). Every kernel exists for f32 (`float`) and bf16 storage
// (`unsigned short`; `load`/`store` in common.cuh); the pools compute in f32 and round once, as their
// NCHW forms in pool.cu and bf16.cu do, with the same window, tie and NaN rules.

// The element conversions of the layout changes: a copy of the stored element, or f32 → bf16
// (round to nearest even) for the bf16 step's weights, cast and reordered in one pass.
struct Same {
    template <typename T>
    __device__ T operator()(T v) const { return v; }
};
struct PackBf16 {
    __device__ unsigned short operator()(float v) const { return f32_to_bf16_bits(v); }
};

// y[n, h, w, c] = conv(x[n, c, h, w]). One thread per output element, so the writes are coalesced.
template <typename To, typename Ti, typename Conv>
__device__ void to_nhwc(To* __restrict__ y, const Ti* __restrict__ x, int N, int C, int H, int W, Conv conv) {
    FOR_N(o, (i64)N * C * H * W) {
        const int c = o % C;
        const i64 p = o / C;  // (n, h, w)
        const int w = p % W, h = (p / W) % H;
        const i64 n = p / ((i64)H * W);
        y[o] = conv(x[((n * C + c) * H + h) * W + w]);
    }
}

// y[n, c, h, w] = x[n, h, w, c].
template <typename T>
__device__ void to_nchw(T* __restrict__ y, const T* __restrict__ x, int N, int C, int H, int W) {
    FOR_N(o, (i64)N * C * H * W) {
        const int w = o % W, h = (o / W) % H;
        const i64 nc = o / ((i64)H * W);
        const int c = nc % C;
        const i64 n = nc / C;
        y[o] = x[((n * H + h) * W + w) * C + c];
    }
}

extern "C" __global__ void nchw_to_nhwc_f32(float* y, const float* x, int N, int C, int H, int W) {
    to_nhwc(y, x, N, C, H, W, Same());
}
extern "C" __global__ void nhwc_to_nchw_f32(float* y, const float* x, int N, int C, int H, int W) {
    to_nchw(y, x, N, C, H, W);
}
extern "C" __global__ void nchw_to_nhwc_bf16(unsigned short* y, const unsigned short* x, int N, int C,
                                             int H, int W) {
    to_nhwc(y, x, N, C, H, W, Same());
}
// f32 NCHW (a KCRS weight) → bf16 NHWC (KRSC): the bf16 step's weight cast and reorder in one pass.
extern "C" __global__ void nchw_f32_to_nhwc_bf16(unsigned short* y, const float* x, int N, int C,
                                                 int H, int W) {
    to_nhwc(y, x, N, C, H, W, PackBf16());
}
extern "C" __global__ void nhwc_to_nchw_bf16(unsigned short* y, const unsigned short* x, int N, int C,
                                             int H, int W) {
    to_nchw(y, x, N, C, H, W);
}

// Global average pool of NHWC x into f32 y [N, C]: one thread per (n, c), neighbouring threads
// neighbouring channels (coalesced reads), summing the H·W positions in order.
template <typename T>
__device__ void gap_fwd_nhwc(float* __restrict__ y, const T* __restrict__ x, int N, int C, int HW) {
    FOR_N(o, (i64)N * C) {
        const int c = o % C;
        const i64 n = o / C;
        const T* xp = x + n * HW * C + c;
        float s = 0.0f;
        for (int i = 0; i < HW; i++) s += load(xp, (i64)i * C);
        y[o] = s / (float)HW;
    }
}

// dx[n, hw, c] = dy[n, c] / HW (rounded once for bf16).
template <typename T>
__device__ void gap_bwd_nhwc(T* __restrict__ dx, const float* __restrict__ dy, int N, int C, int HW) {
    const float inv = 1.0f / (float)HW;
    FOR_N(i, (i64)N * HW * C) {
        const int c = i % C;
        const i64 n = i / ((i64)HW * C);
        store(dx, i, dy[n * C + c] * inv);
    }
}

extern "C" __global__ void global_avgpool_fwd_nhwc_f32(float* y, const float* x, int N, int C, int HW) {
    gap_fwd_nhwc(y, x, N, C, HW);
}
extern "C" __global__ void global_avgpool_fwd_nhwc_bf16(float* y, const unsigned short* x, int N, int C,
                                                        int HW) {
    gap_fwd_nhwc(y, x, N, C, HW);
}
extern "C" __global__ void global_avgpool_bwd_nhwc_f32(float* dx, const float* dy, int N, int C, int HW) {
    gap_bwd_nhwc(dx, dy, N, C, HW);
}
extern "C" __global__ void global_avgpool_bwd_nhwc_bf16(unsigned short* dx, const float* dy, int N, int C,
                                                        int HW) {
    gap_bwd_nhwc(dx, dy, N, C, HW);
}
