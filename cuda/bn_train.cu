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

// mode 0: Σ x; mode 1: Σ (x − center[c])² (the double mean); mode 2: Σ dy into part and
// Σ dy·(x − mean[c])·invstd[c] into part2 (the forward's stored f32 mean and 1/σ, as the host's
// backward reads them). part[c·chunks + k].
extern "C" __global__ void bn_chunk_sums_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                         const double* __restrict__ center,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ invstd, int n, int c, int hw,
                                         int chunks, int mode, double* __restrict__ part,
                                         double* __restrict__ part2) {
    const int k = blockIdx.x, ch = blockIdx.y;
    int n0, n1;
    chunk_range(n, chunks, k, &n0, &n1);
    const i64 len = (i64)(n1 - n0) * hw;
    const double mu = mode == 0 ? 0.0 : (mode == 1 ? center[ch] : (double)mean[ch]);
    const double is = mode == 2 ? (double)invstd[ch] : 0.0;
    double a = 0.0, b = 0.0;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
        const i64 s = n0 + j / hw, p = j % hw;
        const i64 idx = (s * c + ch) * hw + p;
        const double v = (double)x[idx];
        if (mode == 0) {
            a += v;
        } else if (mode == 1) {
            const double d = v - mu;
            a += d * d;
        } else {
            const double g = (double)dy[idx];
            a += g;
            b += g * (v - mu) * is;
        }
    }
    a = block_sum_d(a);
    if (mode == 2) b = block_sum_d(b);
    if (threadIdx.x == 0) {
        part[(i64)ch * chunks + k] = a;
        if (mode == 2) part2[(i64)ch * chunks + k] = b;
    }
}

// mean[c] = Σ_k part[c, k] / m (double).
extern "C" __global__ void bn_finish_mean_f32(const double* __restrict__ part, int c, int chunks,
                                          double m, double* __restrict__ mean) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0;
    for (int k = 0; k < chunks; ++k) s += part[(i64)ch * chunks + k];
    mean[ch] = s / m;
}

// From the centred squares: the batch statistics the backward needs (f32 mean, 1/σ), the affine
// map of the forward (scale, shift rounded to f32 as the host rounds them) and the new running
// statistics (unbiased variance).
extern "C" __global__ void bn_finish_fwd_f32(const double* __restrict__ part_sq, int c, int chunks,
                                         double m, double eps, double momentum,
                                         const double* __restrict__ mean,
                                         const float* __restrict__ gamma,
                                         const float* __restrict__ beta,
                                         const float* __restrict__ running_mean,
                                         const float* __restrict__ running_var,
                                         float* __restrict__ mean_out, float* __restrict__ invstd_out,
                                         float* __restrict__ new_rm, float* __restrict__ new_rv,
                                         float* __restrict__ scale, float* __restrict__ shift) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0;
    for (int k = 0; k < chunks; ++k) s += part_sq[(i64)ch * chunks + k];
    const double var = s / m;
    const double is = 1.0 / sqrt(var + eps);
    const double mu = mean[ch];
    const double sc = (double)gamma[ch] * is;
    scale[ch] = (float)sc;
    shift[ch] = (float)((double)beta[ch] - mu * sc);
    mean_out[ch] = (float)mu;
    invstd_out[ch] = (float)is;
    new_rm[ch] = (float)((1.0 - momentum) * (double)running_mean[ch] + momentum * mu);
    new_rv[ch] = (float)((1.0 - momentum) * (double)running_var[ch] + momentum * var * (m / (m - 1.0)));
}

// y = x·scale[c] + shift[c] (+ r), then max(·, 0) when relu: each step rounded to f32 as the
// host kernel and the unfused ops round it (the _rn intrinsics keep NVRTC's --fmad from fusing).
extern "C" __global__ void bn_apply_f32(float* __restrict__ y, const float* __restrict__ x,
                                        const float* __restrict__ r, const float* __restrict__ scale,
                                        const float* __restrict__ shift, int c, int hw, i64 total,
                                        int relu) {
    FOR_N(i, total) {
        const int ch = (int)((i / hw) % c);
        float o = __fadd_rn(__fmul_rn(x[i], scale[ch]), shift[ch]);
        if (r) o = __fadd_rn(o, r[i]);
        if (relu) o = o > 0.0f ? o : 0.0f;
        y[i] = o;
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
        const int ch = (int)((i / hw) % c);
        const double is = (double)invstd[ch];
        const double xhat = ((double)x[i] - (double)mean[ch]) * is;
        const double k = (double)gamma[ch] * is;
        dx[i] = (float)(k * ((double)dy[i] - sums[2 * ch] / m - xhat * sums[2 * ch + 1] / m));
    }
}
