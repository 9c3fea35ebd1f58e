// Transformer kernels (ViT, Swin): GELU, layer norm, softmax over rows, the attention bias/mask add and
// its gradient, axis permutation, slices, the cyclic shift, the relative-position-bias scatter and per-row
// scaling. Each mirrors a host kernel in src/ops/transformer.rs or src/ops/tokens.rs.

#define PODGPU_SQRT1_2 0.70710678118654752440f
#define PODGPU_INV_SQRT_2PI 0.39894228040143267794f

// y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), the exact GELU.
extern "C" __global__ void gelu_f32(float* __restrict__ y, const float* __restrict__ x, i64 n) {
    FOR_N(i, n) { const float v = x[i]; y[i] = 0.5f * v * (1.0f + erff(v * PODGPU_SQRT1_2)); }
}

// dx = dy * (Phi(x) + x phi(x)).
extern "C" __global__ void gelu_bwd_f32(float* __restrict__ dx, const float* __restrict__ x,
                                        const float* __restrict__ dy, i64 n) {
    FOR_N(i, n) {
        const float v = x[i];
        const float cdf = 0.5f * (1.0f + erff(v * PODGPU_SQRT1_2));
        const float pdf = PODGPU_INV_SQRT_2PI * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}

// Layer norm over the last axis: one block per row. Two passes (mean, then the centred variance) as
// the host kernel does.
extern "C" __global__ void layer_norm_fwd_f32(float* __restrict__ y, float* __restrict__ mean_out,
                                              float* __restrict__ rstd_out, const float* __restrict__ x,
                                              const float* __restrict__ g, const float* __restrict__ b,
                                              int rows, int c, float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (i64)r * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    const float mean = block_sum(s) / (float)c;
    float v = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { const float d = xr[j] - mean; v += d * d; }
    const float var = block_sum(v) / (float)c;
    const float rstd = 1.0f / sqrtf(var + eps);
    float* yr = y + (i64)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] = (xr[j] - mean) * rstd * g[j] + b[j];
    if (threadIdx.x == 0) { mean_out[r] = mean; rstd_out[r] = rstd; }
}

// dx = rstd (gh - mean(gh) - xh mean(gh xh)) with gh = dy * gamma, xh = (x - mean) rstd; block per row.
extern "C" __global__ void layer_norm_bwd_dx_f32(float* __restrict__ dx, const float* __restrict__ x,
                                                 const float* __restrict__ dy, const float* __restrict__ g,
                                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                                 int rows, int c) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (i64)r * c;
    const float* gr = dy + (i64)r * c;
    const float m = mean[r], s = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float gh = gr[j] * g[j];
        sg += gh;
        sgx += gh * (xr[j] - m) * s;
    }
    const float mg = block_sum(sg) / (float)c;
    const float mgx = block_sum(sgx) / (float)c;
    float* o = dx + (i64)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float xh = (xr[j] - m) * s;
        o[j] = s * (gr[j] * g[j] - mg - xh * mgx);
    }
}

// dgamma[j] = sum_r dy[r, j] xh[r, j], dbeta[j] = sum_r dy[r, j]: (32, 8) tiles of columns, rows in a
// fixed order per thread and a fixed tree across the 8 row lanes (deterministic).
extern "C" __global__ void layer_norm_bwd_params_f32(float* __restrict__ dg, float* __restrict__ db,
                                                     const float* __restrict__ x, const float* __restrict__ dy,
                                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                                     int rows, int c) {
    __shared__ float sg[8][33];
    __shared__ float sb[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    float ag = 0.0f, ab = 0.0f;
    if (j < c) {
        for (int r = threadIdx.y; r < rows; r += 8) {
            const float gv = dy[(i64)r * c + j];
            ag += gv * (x[(i64)r * c + j] - mean[r]) * rstd[r];
            ab += gv;
        }
    }
    sg[threadIdx.y][threadIdx.x] = ag;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && j < c) {
        float tg = 0.0f, tb = 0.0f;
        for (int k = 0; k < 8; ++k) { tg += sg[k][threadIdx.x]; tb += sb[k][threadIdx.x]; }
        dg[j] = tg;
        db[j] = tb;
    }
}

// Softmax of each row of a [rows, c] matrix; y may be x (in place). One block per row.
extern "C" __global__ void softmax_rows_f32(float* y, const float* x, int rows, int c) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (i64)r * c;
    float* yr = y + (i64)r * c;
    float m = -PODGPU_INF;
    for (int j = threadIdx.x; j < c; j += blockDim.x) m = fmaxf(m, xr[j]);
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { const float e = expf(xr[j] - m); yr[j] = e; s += e; }
    s = block_sum(s);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] *= inv;
}

// dx = y (dy - sum_j dy_j y_j) per row; dx may be dy (in place). One block per row.
extern "C" __global__ void softmax_bwd_rows_f32(float* dx, const float* y, const float* dy, int rows, int c) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* yr = y + (i64)r * c;
    const float* gr = dy + (i64)r * c;
    float d = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) d += gr[j] * yr[j];
    d = block_sum(d);
    float* o = dx + (i64)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = yr[j] * (gr[j] - d);
}

// s[g, :, :] += bias[g % heads] + mask[(g / heads) % windows], in place over G groups of nn scores;
// bias or mask may be null.
extern "C" __global__ void attn_bias_add_f32(float* __restrict__ s, const float* __restrict__ bias,
                                             const float* __restrict__ mask, int groups, int heads,
                                             int windows, int nn) {
    FOR_N(i, (i64)groups * nn) {
        const int g = (int)(i / nn), e = (int)(i % nn);
        float add = 0.0f;
        if (bias) add += bias[(i64)(g % heads) * nn + e];
        if (mask) add += mask[(i64)((g / heads) % windows) * nn + e];
        s[i] += add;
    }
}

// dbias[h, e] = sum over g = h, h + heads, ... of ds[g, e] (ascending g).
extern "C" __global__ void attn_bias_grad_f32(float* __restrict__ db, const float* __restrict__ ds,
                                              int groups, int heads, int nn) {
    FOR_N(i, (i64)heads * nn) {
        const int h = (int)(i / nn), e = (int)(i % nn);
        float acc = 0.0f;
        for (int g = h; g < groups; g += heads) acc += ds[(i64)g * nn + e];
        db[i] = acc;
    }
}

// y = x.permute(...): output dims d0..d5 (unused leading ones 1) and, per output axis, the stride of
// the input element it walks.
extern "C" __global__ void permute_f32(float* __restrict__ y, const float* __restrict__ x, i64 n,
                                       i64 d0, i64 d1, i64 d2, i64 d3, i64 d4, i64 d5,
                                       i64 s0, i64 s1, i64 s2, i64 s3, i64 s4, i64 s5) {
    FOR_N(i, n) {
        i64 r = i;
        const i64 i5 = r % d5; r /= d5;
        const i64 i4 = r % d4; r /= d4;
        const i64 i3 = r % d3; r /= d3;
        const i64 i2 = r % d2; r /= d2;
        const i64 i1 = r % d1; r /= d1;
        const i64 i0 = r;
        y[i] = x[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4 + i5 * s5];
    }
}

// y[o, l, i] = x[o, start + l, i] for x [outer, dim, inner] and y [outer, len, inner].
extern "C" __global__ void narrow_f32(float* __restrict__ y, const float* __restrict__ x, i64 outer,
                                      i64 dim, i64 inner, i64 start, i64 len) {
    FOR_N(i, outer * len * inner) {
        const i64 o = i / (len * inner), r = i % (len * inner);
        y[i] = x[o * dim * inner + start * inner + r];
    }
}

// The backward of narrow: dx [outer, dim, inner] is dy inside the slice and 0 elsewhere.
extern "C" __global__ void narrow_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy, i64 outer,
                                          i64 dim, i64 inner, i64 start, i64 len) {
    FOR_N(i, outer * dim * inner) {
        const i64 o = i / (dim * inner), a = (i / inner) % dim, r = i % inner;
        dx[i] = (a >= start && a < start + len) ? dy[(o * len + (a - start)) * inner + r] : 0.0f;
    }
}

// torch.roll over axes 1, 2 of [B, H, W, C]: y[b, i, j, :] = x[b, (i - sh) mod H, (j - sw) mod W, :];
// sh, sw already reduced to [0, H) and [0, W).
extern "C" __global__ void roll2d_f32(float* __restrict__ y, const float* __restrict__ x, int b, int h,
                                      int w, int c, int sh, int sw) {
    FOR_N(idx, (i64)b * h * w * c) {
        const i64 ch = idx % c;
        i64 r = idx / c;
        const int j = (int)(r % w); r /= w;
        const int i = (int)(r % h);
        const i64 bi = r / h;
        const int si = (i - sh + h) % h, sj = (j - sw + w) % w;
        y[idx] = x[((bi * h + si) * w + sj) * c + ch];
    }
}

// out[t, :] = sum of dy[m, :] over the rows m listed for t in the CSR inverse (offsets, inverse), in
// its ascending order: the deterministic backward of a row gather.
extern "C" __global__ void scatter_rows_csr_f32(float* __restrict__ out, const float* __restrict__ dy,
                                                const int* __restrict__ offsets, const int* __restrict__ inverse,
                                                int table_rows, int c) {
    FOR_N(i, (i64)table_rows * c) {
        const int t = (int)(i / c), j = (int)(i % c);
        float acc = 0.0f;
        for (int k = offsets[t]; k < offsets[t + 1]; ++k) acc += dy[(i64)inverse[k] * c + j];
        out[i] = acc;
    }
}

// y[r, :] = x[r, :] * s[r] for x viewed as [rows, inner].
extern "C" __global__ void scale_rows_f32(float* __restrict__ y, const float* __restrict__ x,
                                          const float* __restrict__ s, i64 rows, i64 inner) {
    FOR_N(i, rows * inner) y[i] = x[i] * s[i / inner];
}
