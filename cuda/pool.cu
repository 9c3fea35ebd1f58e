// Pooling over NCHW images, f32 or bf16 storage (the max and global pools; `_f32` / `_bf16`
// kernels); max pooling also over NHWC (`_nhwc_` kernels, the channels-last path). Geometry arguments, in order: N, C, H, W (input), OH, OW (output),
// kh, kw (window), sh, sw (stride), ph, pw (zero padding). Backward kernels gather (one thread per
// input element, summing the windows that cover it) instead of scattering with atomics: deterministic.

// Where element (n, c, h, w) of an [N, C, H, W] image batch lies: NCHW, or channels last (NHWC).
template <bool NHWC>
__device__ __forceinline__ i64 at(i64 n, int c, int h, int w, int C, int H, int W) {
    return NHWC ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// The (n, c, h, w) of linear index i in that layout.
template <bool NHWC>
__device__ __forceinline__ void coords(i64 i, int C, int H, int W, i64* n, int* c, int* h, int* w) {
    if (NHWC) {
        *c = i % C;
        const i64 p = i / C;
        *w = p % W;
        *h = (p / W) % H;
        *n = p / ((i64)H * W);
    } else {
        *w = i % W;
        *h = (i / W) % H;
        const i64 plane = i / ((i64)H * W);
        *c = plane % C;
        *n = plane / C;
    }
}

// Max pooling; argmax[o] = h * W + w of the chosen input within its (n, c) plane whatever the
// layout (padding never wins; the first maximum in row-major window order wins ties, as PyTorch).
// A window of padding only gives -inf. T is the storage (float, or unsigned short for bf16: the
// maximum of bf16 values is one of them, so storing it is exact); NHWC the layout of x and y.
template <typename T, bool NHWC>
__device__ void maxpool_fwd(T* __restrict__ y, int* __restrict__ argmax, const T* __restrict__ x, int N,
                            int C, int H, int W, int OH, int OW, int kh, int kw, int sh, int sw, int ph,
                            int pw) {
    FOR_N(o, (i64)N * C * OH * OW) {
        i64 n;
        int c, oh, ow;
        coords<NHWC>(o, C, OH, OW, &n, &c, &oh, &ow);
        float best = -PODGPU_INF;
        int bi = -1;
        for (int i = 0; i < kh; i++) {
            const int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < kw; j++) {
                const int w = ow * sw - pw + j;
                if (w < 0 || w >= W) continue;
                const float v = load(x, at<NHWC>(n, c, h, w, C, H, W));
                if (bi < 0 || v > best || v != v) { best = v; bi = h * W + w; }  // NaN wins, the last one as on the host
            }
        }
        store(y, o, best);
        argmax[o] = bi;
    }
}

// dx of max pooling: each input gathers the dy of the windows whose argmax it is, summed in f32
// (rounded once for bf16).
template <typename T, bool NHWC>
__device__ void maxpool_bwd(T* __restrict__ dx, const T* __restrict__ dy, const int* __restrict__ argmax,
                            int N, int C, int H, int W, int OH, int OW, int kh, int kw, int sh, int sw,
                            int ph, int pw) {
    FOR_N(i, (i64)N * C * H * W) {
        i64 n;
        int c, h, w;
        coords<NHWC>(i, C, H, W, &n, &c, &h, &w);
        const int me = h * W + w;
        int oh0, oh1, ow0, ow1;
        covering(h, kh, sh, ph, OH, &oh0, &oh1);
        covering(w, kw, sw, pw, OW, &ow0, &ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const i64 o = at<NHWC>(n, c, oh, ow, C, OH, OW);
                if (argmax[o] == me) g += load(dy, o);
            }
        store(dx, i, g);
    }
}

extern "C" __global__ void maxpool2d_fwd_f32(float* y, int* argmax, const float* x, POOL_ARGS) {
    maxpool_fwd<float, false>(y, argmax, x, POOL_PASS);
}
extern "C" __global__ void maxpool2d_fwd_bf16(unsigned short* y, int* argmax, const unsigned short* x,
                                              POOL_ARGS) {
    maxpool_fwd<unsigned short, false>(y, argmax, x, POOL_PASS);
}
extern "C" __global__ void maxpool2d_bwd_f32(float* dx, const float* dy, const int* argmax, POOL_ARGS) {
    maxpool_bwd<float, false>(dx, dy, argmax, POOL_PASS);
}
extern "C" __global__ void maxpool2d_bwd_bf16(unsigned short* dx, const unsigned short* dy,
                                              const int* argmax, POOL_ARGS) {
    maxpool_bwd<unsigned short, false>(dx, dy, argmax, POOL_PASS);
}
extern "C" __global__ void maxpool2d_fwd_nhwc_f32(float* y, int* argmax, const float* x, POOL_ARGS) {
    maxpool_fwd<float, true>(y, argmax, x, POOL_PASS);
}
extern "C" __global__ void maxpool2d_fwd_nhwc_bf16(unsigned short* y, int* argmax, const unsigned short* x,
                                                   POOL_ARGS) {
    maxpool_fwd<unsigned short, true>(y, argmax, x, POOL_PASS);
}
extern "C" __global__ void maxpool2d_bwd_nhwc_f32(float* dx, const float* dy, const int* argmax, POOL_ARGS) {
    maxpool_bwd<float, true>(dx, dy, argmax, POOL_PASS);
}
extern "C" __global__ void maxpool2d_bwd_nhwc_bf16(unsigned short* dx, const unsigned short* dy,
                                                   const int* argmax, POOL_ARGS) {
    maxpool_bwd<unsigned short, true>(dx, dy, argmax, POOL_PASS);
}

// Average pooling. count_include_pad != 0 divides by kh*kw (PyTorch's default), else by the number
// of real input elements in the window.
__device__ __forceinline__ float window_count(int oh, int ow, int H, int W, int kh, int kw, int sh,
                                              int sw, int ph, int pw, int count_include_pad) {
    if (count_include_pad) {
        // PyTorch clips the window to the padded input before counting.
        int h0 = oh * sh - ph, w0 = ow * sw - pw;
        int h1 = min(h0 + kh, H + ph), w1 = min(w0 + kw, W + pw);
        return (float)((h1 - h0) * (w1 - w0));
    }
    int h0 = max(oh * sh - ph, 0), w0 = max(ow * sw - pw, 0);
    int h1 = min(oh * sh - ph + kh, H), w1 = min(ow * sw - pw + kw, W);
    return (float)((h1 - h0) * (w1 - w0));
}

extern "C" __global__ void avgpool2d_fwd_f32(float* __restrict__ y, const float* __restrict__ x,
                                             int N, int C, int H, int W, int OH, int OW, int kh, int kw,
                                             int sh, int sw, int ph, int pw, int count_include_pad) {
    FOR_N(o, (i64)N * C * OH * OW) {
        const int ow = o % OW, oh = (o / OW) % OH;
        const i64 plane = o / ((i64)OH * OW);
        const float* xp = x + plane * H * W;
        float s = 0.0f;
        for (int i = 0; i < kh; i++) {
            const int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < kw; j++) {
                const int w = ow * sw - pw + j;
                if (w >= 0 && w < W) s += xp[h * W + w];
            }
        }
        y[o] = s / window_count(oh, ow, H, W, kh, kw, sh, sw, ph, pw, count_include_pad);
    }
}

extern "C" __global__ void avgpool2d_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy,
                                             int N, int C, int H, int W, int OH, int OW, int kh, int kw,
                                             int sh, int sw, int ph, int pw, int count_include_pad) {
    FOR_N(i, (i64)N * C * H * W) {
        const int w = i % W, h = (i / W) % H;
        const i64 plane = i / ((i64)H * W);
        int oh0, oh1, ow0, ow1;
        covering(h, kh, sh, ph, OH, &oh0, &oh1);
        covering(w, kw, sw, pw, OW, &ow0, &ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++)
                g += dy[plane * OH * OW + oh * OW + ow] /
                     window_count(oh, ow, H, W, kh, kw, sh, sw, ph, pw, count_include_pad);
        dx[i] = g;
    }
}

// Global average pool: y[p] = mean of plane p (p over N*C planes of HW values), f32 whatever the
// storage T of x. One warp per plane, 8 planes per 256-thread block.
template <typename T>
__device__ void gap_fwd(float* __restrict__ y, const T* __restrict__ x, int planes, int HW) {
    const int p = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (p >= planes) return;  // whole warp leaves together: warp_sum below stays convergent
    const T* xp = x + (i64)p * HW;
    float s = 0.0f;
    for (int i = lane; i < HW; i += 32) s += load(xp, i);
    s = warp_sum(s);
    if (lane == 0) y[p] = s / (float)HW;
}

// dx = dy[plane] / HW for every element of the plane (dy f32 [planes]; rounded once for bf16).
template <typename T>
__device__ void gap_bwd(T* __restrict__ dx, const float* __restrict__ dy, int planes, int HW) {
    const float inv = 1.0f / (float)HW;
    FOR_N(i, (i64)planes * HW) store(dx, i, dy[i / HW] * inv);
}

extern "C" __global__ void global_avgpool_fwd_f32(float* y, const float* x, int planes, int HW) {
    gap_fwd(y, x, planes, HW);
}
extern "C" __global__ void global_avgpool_fwd_bf16(float* y, const unsigned short* x, int planes, int HW) {
    gap_fwd(y, x, planes, HW);
}
extern "C" __global__ void global_avgpool_bwd_f32(float* dx, const float* dy, int planes, int HW) {
    gap_bwd(dx, dy, planes, HW);
}
extern "C" __global__ void global_avgpool_bwd_bf16(unsigned short* dx, const float* dy, int planes, int HW) {
    gap_bwd(dx, dy, planes, HW);
}
