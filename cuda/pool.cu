// Pooling over NCHW images. Geometry arguments, in order: N, C, H, W (input), OH, OW (output),
// kh, kw (window), sh, sw (stride), ph, pw (zero padding). Backward kernels gather (one thread per
// input element, summing the windows that cover it) instead of scattering with atomics: deterministic.

// Windows that cover input row h: oh in [oh_lo, oh_hi].
__device__ __forceinline__ void covering(int h, int k, int s, int p, int OH, int* lo, int* hi) {
    const int hp = h + p;
    int l = hp - k + 1;
    l = l <= 0 ? 0 : (l + s - 1) / s;
    int u = hp / s;
    if (u > OH - 1) u = OH - 1;
    *lo = l;
    *hi = u;
}

// Max pooling; argmax[o] = h * W + w of the chosen input within its plane (padding never wins; the
// first maximum in row-major window order wins ties, as PyTorch). A window of padding only gives -inf.
extern "C" __global__ void maxpool2d_fwd_f32(float* __restrict__ y, int* __restrict__ argmax,
                                             const float* __restrict__ x, int N, int C, int H, int W,
                                             int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    FOR_N(o, (i64)N * C * OH * OW) {
        const int ow = o % OW, oh = (o / OW) % OH;
        const i64 plane = o / ((i64)OH * OW);
        const float* xp = x + plane * H * W;
        float best = -PODGPU_INF;
        int bi = -1;
        for (int i = 0; i < kh; i++) {
            const int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < kw; j++) {
                const int w = ow * sw - pw + j;
                if (w < 0 || w >= W) continue;
                const float v = xp[h * W + w];
                if (bi < 0 || v > best || v != v) { best = v; bi = h * W + w; }  // NaN wins, the last one as on the host
            }
        }
        y[o] = best;
        argmax[o] = bi;
    }
}

extern "C" __global__ void maxpool2d_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy,
                                             const int* __restrict__ argmax, int N, int C, int H, int W,
                                             int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    FOR_N(i, (i64)N * C * H * W) {
        const int w = i % W, h = (i / W) % H;
        const i64 plane = i / ((i64)H * W);
        const int me = h * W + w;
        int oh0, oh1, ow0, ow1;
        covering(h, kh, sh, ph, OH, &oh0, &oh1);
        covering(w, kw, sw, pw, OW, &ow0, &ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                const i64 o = plane * OH * OW + oh * OW + ow;
                if (argmax[o] == me) g += dy[o];
            }
        dx[i] = g;
    }
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

// Global average pool: y[p] = mean of plane p (p over N*C planes of HW values). One warp per plane,
// 8 planes per 256-thread block.
extern "C" __global__ void global_avgpool_fwd_f32(float* __restrict__ y, const float* __restrict__ x,
                                                  int planes, int HW) {
    const int p = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (p >= planes) return;  // whole warp leaves together: warp_sum below stays convergent
    const float* xp = x + (i64)p * HW;
    float s = 0.0f;
    for (int i = lane; i < HW; i += 32) s += xp[i];
    s = warp_sum(s);
    if (lane == 0) y[p] = s / (float)HW;
}

extern "C" __global__ void global_avgpool_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy,
                                                  int planes, int HW) {
    const float inv = 1.0f / (float)HW;
    FOR_N(i, (i64)planes * HW) dx[i] = dy[i / HW] * inv;
}
