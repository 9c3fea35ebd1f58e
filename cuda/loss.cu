// Loss kernels: NaC (fused forward + backward), the SC pieces around the cuBLAS Gram products, and
// softmax cross-entropy (fused forward + backward). Per-row losses are written to a [B] buffer and
// summed by sum_into_f32 (deterministic, no float atomics).

// Each thread keeps up to ROW_REGS of its row's elements in registers, so a row of up to
// ROW_REGS * blockDim.x values (4096 with 256 threads) is read from memory once.
#define ROW_REGS 16

// NaC, forward and backward in one pass over x. Per row b with y = labels[b], p = P[y]:
//   variant 0 (paper):     den = ||x|| + delta
//   variant 1 (reference): den = sqrt(||x||^2 + delta^2)
//   c = <x, p> / den,  row_loss[b] = (1 - c)^2 / B   (so that sum(row_loss) = L_NaC)
//   dx[b] = dL_NaC/dx_b = -(2 / B) (1 - c) dc/dx with
//     variant 0: dc/dx = p / den - <x, p> / den^2 * x / ||x||   (x / ||x|| taken as 0 when x = 0)
//     variant 1: dc/dx = p / den - <x, p> / den^3 * x
//   norms[b] = ||x_b|| (for the delta schedule; may be null). One block per row.
// When D is not null (the fused POD head, pod_loss_f32 / pod_dx_f32 below), the same pass also
// writes SC's first step, D[b] = x_b / max(||x_b||, eps) - p: what l2norm_rows_fwd_f32 and
// sc_diff_f32 compute, with the norm summed in the same order, so the values are theirs.
extern "C" __global__ void nac_fwd_bwd_f32(float* __restrict__ row_loss, float* __restrict__ dx,
                                           float* __restrict__ norms, float* __restrict__ D,
                                           const float* __restrict__ x,
                                           const float* __restrict__ P, const int* __restrict__ labels,
                                           int B, int n, float delta, int variant, float eps) {
    const int b = blockIdx.x;
    const float* xb = x + (i64)b * n;
    const float* pb = P + (i64)labels[b] * n;
    float xr[ROW_REGS], pr[ROW_REGS];
    float sxx = 0.0f, sxp = 0.0f;
#pragma unroll
    for (int j = 0; j < ROW_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        xr[j] = 0.0f;
        pr[j] = 0.0f;
        if (i < n) { xr[j] = xb[i]; pr[j] = pb[i]; }
        sxx += xr[j] * xr[j];
        sxp += xr[j] * pr[j];
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < n; i += blockDim.x) {
        sxx += xb[i] * xb[i];
        sxp += xb[i] * pb[i];
    }
    sxx = block_sum(sxx);
    sxp = block_sum(sxp);
    const float nx = sqrtf(sxx);
    float den, kx;  // dc/dx = p / den - kx * x
    if (variant == 0) {
        den = nx + delta;
        kx = nx > 0.0f ? sxp / (den * den * nx) : 0.0f;
    } else {
        den = sqrtf(sxx + delta * delta);
        kx = sxp / (den * den * den);
    }
    const float c = sxp / den;
    const float g = -2.0f * (1.0f - c) / (float)B;  // dL/dc
    const float kp = g / den;
    kx *= -g;  // dx = kp * p - g * kx * x
    float* db = dx + (i64)b * n;
#pragma unroll
    for (int j = 0; j < ROW_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n) db[i] = kp * pr[j] + kx * xr[j];
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < n; i += blockDim.x) db[i] = kp * pb[i] + kx * xb[i];
    if (D) {
        const float inv = 1.0f / fmaxf(nx, eps);
        float* Db = D + (i64)b * n;
#pragma unroll
        for (int j = 0; j < ROW_REGS; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < n) Db[i] = xr[j] * inv - pr[j];
        }
        for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < n; i += blockDim.x) Db[i] = xb[i] * inv - pb[i];
    }
    if (threadIdx.x == 0) {
        row_loss[b] = (1.0f - c) * (1.0f - c) / (float)B;
        if (norms) norms[b] = nx;
    }
}

// SC step 1: D = xt - P[labels] (xt the row-normalised features), B x n.
extern "C" __global__ void sc_diff_f32(float* __restrict__ D, const float* __restrict__ xt,
                                       const float* __restrict__ P, const int* __restrict__ labels,
                                       int B, int n) {
    FOR_N(i, (i64)B * n) {
        const i64 b = i / n, c = i % n;
        D[i] = xt[i] - P[(i64)labels[b] * n + c];
    }
}

// SC step 2: s[c] = sum_b D[b, c]^2 (column sums of squares). Same tiling as sum_rows_f32:
// block (32, 8), grid ceil(n / 32).
extern "C" __global__ void col_sumsq_f32(float* __restrict__ s, const float* __restrict__ D, int B, int n) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (c < n)
        for (int r = threadIdx.y; r < B; r += 8) { const float v = D[(i64)r * n + c]; acc += v * v; }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < n) {
        float t = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) t += part[k][threadIdx.x];
        s[c] = t;
    }
}

// SC step 3 (after G = D D^T by cuBLAS): loss[0] = (||G||_F^2 - sum_c s[c]^2) * norm, where
// norm = 1 / (B-1)^2 (paper) or 1 / ((B-1)^2 (n-1)) (reference code). One block. The two sums
// nearly cancel when the off-diagonal correlations are small (the value is what is left of the
// off-diagonal terms), so they are accumulated and subtracted in double, as the CPU reference does;
// only the result is rounded to float.
extern "C" __global__ void sc_loss_f32(float* __restrict__ loss, const float* __restrict__ G,
                                       const float* __restrict__ s, int B, int n, double norm) {
    double a = 0.0;
    for (i64 i = threadIdx.x; i < (i64)B * B; i += blockDim.x) { const double g = G[i]; a += g * g; }
    double d = 0.0;
    for (int c = threadIdx.x; c < n; c += blockDim.x) { const double v = s[c]; d += v * v; }
    a = block_sum_d(a);
    d = block_sum_d(d);
    if (threadIdx.x == 0) loss[0] = (float)((a - d) * norm);
}

// SC step 4 (after GD = G D by cuBLAS): dD = 4 norm (GD - D * s[col]), the gradient of the loss
// above with respect to D (and so to xt: P is constant).
extern "C" __global__ void sc_grad_f32(float* __restrict__ dD, const float* __restrict__ GD,
                                       const float* __restrict__ D, const float* __restrict__ s,
                                       int B, int n, float norm) {
    const float k = 4.0f * norm;
    FOR_N(i, (i64)B * n) dD[i] = k * (GD[i] - D[i] * s[i % n]);
}

// The fused POD head (src/cuda/pod_head.rs), after nac_fwd_bwd_f32 with D, M = D D^T or D^T D
// (cuBLAS, mm values) and s = col_sumsq_f32(D): loss, nac and sc [1] with nac = sum(row_loss)
// (as sum_into_f32 sums it), sc as sc_loss_f32 computes it and loss = nac + lambda * sc in float,
// as the unfused scale and add kernels do. One block of 1024 threads (sum_into_f32's launch).
extern "C" __global__ void pod_loss_f32(float* __restrict__ loss, float* __restrict__ nac,
                                        float* __restrict__ sc_out, const float* __restrict__ row_loss,
                                        const float* __restrict__ M, i64 mm, const float* __restrict__ s,
                                        int B, int n, double norm, float lambda) {
    float r = 0.0f;
    for (int i = threadIdx.x; i < B; i += blockDim.x) r += row_loss[i];
    r = block_sum(r);
    double a = 0.0;
    for (i64 i = threadIdx.x; i < mm; i += blockDim.x) { const double g = M[i]; a += g * g; }
    double d = 0.0;
    for (int c = threadIdx.x; c < n; c += blockDim.x) { const double v = s[c]; d += v * v; }
    a = block_sum_d(a);
    d = block_sum_d(d);
    if (threadIdx.x == 0) {
        const float sc = (float)((a - d) * norm);
        loss[0] = r + sc * lambda;
        nac[0] = r;
        sc_out[0] = sc;
    }
}

// Its backward, one block per row b, from the upstream gradient g[0]: the SC gradient
// k (MD - D s) (sc_grad_f32, k = 4 norm) times g lambda, taken back through the row
// normalisation (l2norm_rows_bwd_f32, with y = x / max(||x||, eps) as the forward made it), plus
// NaC's gradient dx_nac times g. MD is M D (Gram form) or D M (covariance form), [B, n].
extern "C" __global__ void pod_dx_f32(float* __restrict__ dx, const float* __restrict__ g,
                                      const float* __restrict__ dx_nac, const float* __restrict__ MD,
                                      const float* __restrict__ D, const float* __restrict__ s,
                                      const float* __restrict__ x, const float* __restrict__ norms,
                                      int n, float k, float lambda, float eps) {
    const int b = blockIdx.x;
    const i64 o = (i64)b * n;
    const float gl = g[0], gsc = g[0] * lambda;
    const float nrm = norms[b];
    const float inv_y = 1.0f / fmaxf(nrm, eps);
    if (nrm > eps) {
        float acc = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float gr = k * (MD[o + i] - D[o + i] * s[i]) * gsc;
            acc += x[o + i] * inv_y * gr;
        }
        const float yg = block_sum(acc);
        const float inv = 1.0f / nrm;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float gr = k * (MD[o + i] - D[o + i] * s[i]) * gsc;
            dx[o + i] = dx_nac[o + i] * gl + (gr - x[o + i] * inv_y * yg) * inv;
        }
    } else {
        const float inv = 1.0f / eps;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float gr = k * (MD[o + i] - D[o + i] * s[i]) * gsc;
            dx[o + i] = dx_nac[o + i] * gl + gr * inv;
        }
    }
}

// Softmax cross-entropy, forward and backward in one kernel. Per row b:
//   row_loss[b] = (logsumexp(z_b) - z_b[y_b]) / B,  dz[b] = (softmax(z_b) - onehot(y_b)) / B.
// One block per row; the row is cached in registers (K <= ROW_REGS * blockDim.x read once).
extern "C" __global__ void softmax_ce_f32(float* __restrict__ row_loss, float* __restrict__ dz,
                                          const float* __restrict__ z, const int* __restrict__ labels,
                                          int B, int K) {
    const int b = blockIdx.x;
    const float* zb = z + (i64)b * K;
    const int y = labels[b];
    float zr[ROW_REGS];
    float m = -PODGPU_INF;
#pragma unroll
    for (int j = 0; j < ROW_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        zr[j] = i < K ? zb[i] : -PODGPU_INF;
        m = fmaxf(m, zr[j]);
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < K; i += blockDim.x) m = fmaxf(m, zb[i]);
    m = block_max(m);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < ROW_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < K) s += expf(zr[j] - m);
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < K; i += blockDim.x) s += expf(zb[i] - m);
    s = block_sum(s);
    const float inv_s = 1.0f / s, inv_b = 1.0f / (float)B;
    float* db = dz + (i64)b * K;
#pragma unroll
    for (int j = 0; j < ROW_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < K) db[i] = (expf(zr[j] - m) * inv_s - (i == y ? 1.0f : 0.0f)) * inv_b;
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < K; i += blockDim.x)
        db[i] = (expf(zb[i] - m) * inv_s - (i == y ? 1.0f : 0.0f)) * inv_b;
    if (threadIdx.x == 0) row_loss[b] = (m + logf(s) - zb[y]) * inv_b;
}
