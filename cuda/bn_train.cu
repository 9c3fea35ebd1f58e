// Training-mode batch norm over NCHW f32 tensors, with the ReLU and the residual add of a ResNet
// block's tail fused into the normalising pass: y = relu(x·scale[c] + shift[c] [+ r]).
//
// The statistics follow the host kernel (src/ops/batchnorm.rs): two passes in double (the mean,
// then the centred squares), every sum in a fixed order (per channel, a fixed split of the batch
// into chunks, each reduced by one block's tree; the chunks added in order by one thread), so the
// results do not depend on timing. One launch per pass:
//   bn_chunk_sums_f32     (x | (x − μ)², or dy and dy·x̂)   grid (chunks, C)
//   bn_finish_mean_f32 / bn_finish_fwd_f32 / bn_finish_bwd_f32     one thread per channel
//   bn_apply_f32      the affine map (+ residual, + ReLU)  elementwise
//   bn_dx_f32         dx = γσ⁻¹ (dy − dβ/M − x̂·dγ/M)       elementwise
// Scratch and per-channel values are double (pool words of two floats each).

// The values of channel `ch` in chunk `k` of `chunks`: samples [n0, n1), all of H·W.
__device__ __forceinline__ void chunk_range(int n, int chunks, int k, int* n0, int* n1) {
    *n0 = (int)(((i64)n * k) / chunks);
    *n1 = (int)(((i64)n * (k + 1)) / chunks);
}

// One chunk's two sums, in double. mode 0 (forward): Σ d and Σ d² with d = x − K, K the channel's
// first value (the shifted-data form of the variance: one pass, and no cancellation worth a double's
// precision); mode 2 (backward): Σ dy and Σ dy·(x − mean[c])·invstd[c] with the forward's stored f32
// mean and 1/σ, as the host's backward reads them. part[c·chunks + k], part2 likewise. Four values
// per load when H·W is a multiple of 4; 32-bit index arithmetic (a chunk holds < 2³² values).
extern "C" __global__ void bn_chunk_sums_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ invstd, int n, int c, int hw,
                                             int chunks, int mode, double* __restrict__ part,
                                             double* __restrict__ part2) {
    const int k = blockIdx.x, ch = blockIdx.y;
    int n0, n1;
    chunk_range(n, chunks, k, &n0, &n1);
    const double shift = mode == 0 ? (double)x[(i64)ch * hw] : (double)mean[ch];
    const double is = mode == 2 ? (double)invstd[ch] : 0.0;
    double a = 0.0, b = 0.0;
    if ((hw & 3) == 0) {
        const unsigned q = (unsigned)hw >> 2, len = (unsigned)(n1 - n0) * q;
        for (unsigned j = threadIdx.x; j < len; j += blockDim.x) {
            const unsigned sj = j / q, pj = j - sj * q;
            const i64 base = ((i64)(n0 + sj) * c + ch) * hw;
            const float4 v = reinterpret_cast<const float4*>(x + base)[pj];
            const double d0 = (double)v.x - shift, d1 = (double)v.y - shift,
                         d2 = (double)v.z - shift, d3 = (double)v.w - shift;
            if (mode == 0) {
                a += (d0 + d1) + (d2 + d3);
                b += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            } else {
                const float4 g = reinterpret_cast<const float4*>(dy + base)[pj];
                a += ((double)g.x + (double)g.y) + ((double)g.z + (double)g.w);
                b += ((double)g.x * d0 * is + (double)g.y * d1 * is) +
                     ((double)g.z * d2 * is + (double)g.w * d3 * is);
            }
        }
    } else {
        const unsigned uhw = (unsigned)hw, len = (unsigned)(n1 - n0) * uhw;
        for (unsigned j = threadIdx.x; j < len; j += blockDim.x) {
            const unsigned sj = j / uhw, pj = j - sj * uhw;
            const i64 idx = ((i64)(n0 + sj) * c + ch) * hw + pj;
            const double d = (double)x[idx] - shift;
            if (mode == 0) {
                a += d;
                b += d * d;
            } else {
                const double g = (double)dy[idx];
                a += g;
                b += g * d * is;
            }
        }
    }
    a = block_sum_d(a);
    b = block_sum_d(b);
    if (threadIdx.x == 0) {
        part[(i64)ch * chunks + k] = a;
        part2[(i64)ch * chunks + k] = b;
    }
}

// From the chunk sums: the batch statistics the backward needs (f32 mean, 1/σ), the affine map of
// the forward (scale, shift rounded to f32 as the host rounds them) and the new running statistics
// (unbiased variance).
extern "C" __global__ void bn_finish_fwd_f32(const double* __restrict__ part,
                                             const double* __restrict__ part_sq, int c, int chunks,
                                             double m, double eps, double momentum, int hw,
                                             const float* __restrict__ x,
                                             const float* __restrict__ gamma,
                                             const float* __restrict__ beta,
                                             const float* __restrict__ running_mean,
                                             const float* __restrict__ running_var,
                                             float* __restrict__ mean_out,
                                             float* __restrict__ invstd_out, float* __restrict__ new_rm,
                                             float* __restrict__ new_rv, float* __restrict__ scale,
                                             float* __restrict__ shift) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, s2 = 0.0;
    for (int k = 0; k < chunks; ++k) {
        s += part[(i64)ch * chunks + k];
        s2 += part_sq[(i64)ch * chunks + k];
    }
    const double dm = s / m;
    double var = s2 / m - dm * dm;
    var = var > 0.0 ? var : 0.0;
    const double mu = (double)x[(i64)ch * hw] + dm;
    const double is = 1.0 / sqrt(var + eps);
    const double sc = (double)gamma[ch] * is;
    scale[ch] = (float)sc;
    shift[ch] = (float)((double)beta[ch] - mu * sc);
    mean_out[ch] = (float)mu;
    invstd_out[ch] = (float)is;
    new_rm[ch] = (float)((1.0 - momentum) * (double)running_mean[ch] + momentum * mu);
    new_rv[ch] = (float)((1.0 - momentum) * (double)running_var[ch] + momentum * var * (m / (m - 1.0)));
}

__device__ __forceinline__ float bn_affine(float x, float sc, float sh, const float* r, i64 i,
                                           int relu) {
    float o = __fadd_rn(__fmul_rn(x, sc), sh);
    if (r) o = __fadd_rn(o, r[i]);
    return relu && !(o > 0.0f) ? 0.0f : o;
}

// y = x·scale[c] + shift[c] (+ r), then max(·, 0) when relu: each step rounded to f32 as the
// host kernel and the unfused ops round it (the _rn intrinsics keep NVRTC's --fmad from fusing).
// total < 2³² (the launcher checks); four values per thread when H·W is a multiple of 4.
extern "C" __global__ void bn_apply_f32(float* __restrict__ y, const float* __restrict__ x,
                                        const float* __restrict__ r, const float* __restrict__ scale,
                                        const float* __restrict__ shift, int c, int hw, i64 total,
                                        int relu) {
    if ((hw & 3) == 0) {
        const unsigned q = (unsigned)hw >> 2;
        FOR_N(i, total >> 2) {
            const unsigned ch = ((unsigned)i / q) % (unsigned)c;
            const float sc = scale[ch], sh = shift[ch];
            const float4 v = reinterpret_cast<const float4*>(x)[i];
            const i64 e = 4 * i;
            float4 o;
            o.x = bn_affine(v.x, sc, sh, r, e, relu);
            o.y = bn_affine(v.y, sc, sh, r, e + 1, relu);
            o.z = bn_affine(v.z, sc, sh, r, e + 2, relu);
            o.w = bn_affine(v.w, sc, sh, r, e + 3, relu);
            reinterpret_cast<float4*>(y)[i] = o;
        }
    } else {
        FOR_N(i, total) {
            const unsigned ch = ((unsigned)i / (unsigned)hw) % (unsigned)c;
            y[i] = bn_affine(x[i], scale[ch], shift[ch], r, i, relu);
        }
    }
}

// dβ = Σ dy, dγ = Σ dy·x̂ (f32 outputs), and their per-value terms for dx (double).
extern "C" __global__ void bn_finish_bwd_f32(const double* __restrict__ part_dy,
                                         const double* __restrict__ part_dyx, int c, int chunks,
                                         float* __restrict__ dgamma, float* __restrict__ dbeta,
                                         double* __restrict__ sums) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double a = 0.0, b = 0.0;
    for (int k = 0; k < chunks; ++k) {
        a += part_dy[(i64)ch * chunks + k];
        b += part_dyx[(i64)ch * chunks + k];
    }
    dbeta[ch] = (float)a;
    dgamma[ch] = (float)b;
    sums[2 * ch] = a;
    sums[2 * ch + 1] = b;
}

// dx = γσ⁻¹ (dy − dβ/M − x̂·dγ/M) with x̂ = (x − μ)σ⁻¹, in double (as the host kernel).
extern "C" __global__ void bn_dx_f32(float* __restrict__ dx, const float* __restrict__ x,
                                     const float* __restrict__ dy, const float* __restrict__ gamma,
                                     const float* __restrict__ mean, const float* __restrict__ invstd,
                                     const double* __restrict__ sums, double m, int c, int hw,
                                     i64 total) {
    FOR_N(i, total) {
        const unsigned ch = ((unsigned)i / (unsigned)hw) % (unsigned)c;
        const double is = (double)invstd[ch];
        const double xhat = ((double)x[i] - (double)mean[ch]) * is;
        const double k = (double)gamma[ch] * is;
        dx[i] = (float)(k * ((double)dy[i] - sums[2 * ch] / m - xhat * sums[2 * ch + 1] / m));
    }
}
