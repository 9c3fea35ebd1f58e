// The baseline losses of the paper's Table IV (src/loss/baselines): fused forward + backward per
// row, one block per row (256 threads), so that a step with one of them never copies to the host.
// Per-row losses go to a [B] buffer that sum_into_f32 adds in a fixed order (no float atomics). Each
// kernel is the host kernel's arithmetic (src/loss/baselines/*.rs), written down again for the GPU.

#define PODGPU_PI 3.14159265358979323846

// Cosine loss, paper eq. 9: row_loss[b] = (1 - cos(x_b, p_{y_b})) / B (1 / B when a norm is zero);
// dx = -p / (B r q) + cos x / (B r^2) with r = ||x_b||, q = ||p_{y_b}|| (0 when a norm is zero).
extern "C" __global__ void cosine_loss_f32(float* __restrict__ row_loss, float* __restrict__ dx,
                                           const float* __restrict__ x, const float* __restrict__ P,
                                           const int* __restrict__ labels, int B, int n, int with_grad) {
    const int b = blockIdx.x;
    const float* xb = x + (i64)b * n;
    const float* pb = P + (i64)labels[b] * n;
    float sxx = 0.0f, spp = 0.0f, sxp = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        sxx += xb[i] * xb[i];
        spp += pb[i] * pb[i];
        sxp += xb[i] * pb[i];
    }
    sxx = block_sum(sxx);
    spp = block_sum(spp);
    sxp = block_sum(sxp);
    const float r = sqrtf(sxx), q = sqrtf(spp), inv_b = 1.0f / (float)B;
    const bool zero = r == 0.0f || q == 0.0f;
    const float c = zero ? 0.0f : sxp / (r * q);
    if (with_grad) {
        const float cp = zero ? 0.0f : -inv_b / (r * q), cx = zero ? 0.0f : inv_b * c / (r * r);
        float* db = dx + (i64)b * n;
        for (int i = threadIdx.x; i < n; i += blockDim.x) db[i] = cp * pb[i] + cx * xb[i];
    }
    if (threadIdx.x == 0) row_loss[b] = (zero ? 1.0f : 1.0f - c) * inv_b;
}

// Margin softmax cross-entropy over cosines (AM-Softmax, ArcFace, the combined margin): the target
// cosine becomes f(c) = cos(m1 theta + m2) - m3 (continued linearly past theta_t = (pi - m2) / m1,
// see margin.rs), everything is scaled by s, then softmax cross-entropy; dc as margin.rs says. f and
// f' are computed in double from the clamped cosine, as the host does.
extern "C" __global__ void margin_ce_f32(float* __restrict__ row_loss, float* __restrict__ dc,
                                         const float* __restrict__ cosv, const int* __restrict__ labels,
                                         int B, int K, double m1, double m2, double m3, float s,
                                         int with_grad) {
    __shared__ float f_shared, fp_shared;
    const int b = blockIdx.x;
    const int y = labels[b];
    const float* cb = cosv + (i64)b * K;
    if (threadIdx.x == 0) {
        const double c = fmin(fmax((double)cb[y], -1.0), 1.0);
        double f, fp;
        if (m1 == 1.0 && m2 == 0.0) {
            f = c - m3;
            fp = 1.0;
        } else {
            const double theta = acos(c);
            const double a = m1 * theta + m2;
            if (a <= PODGPU_PI) {
                f = cos(a) - m3;
                fp = m1 * sin(a) / fmax(sin(theta), 1e-6);
            } else {
                const double c_t = cos((PODGPU_PI - m2) / m1);
                f = c - m3 - (1.0 + c_t);
                fp = 1.0;
            }
        }
        f_shared = (float)f;
        fp_shared = (float)fp;
    }
    __syncthreads();
    const float zy = s * f_shared;
    float m = -PODGPU_INF;
    for (int j = threadIdx.x; j < K; j += blockDim.x) m = fmaxf(m, j == y ? zy : s * cb[j]);
    m = block_max(m);
    float e = 0.0f;
    for (int j = threadIdx.x; j < K; j += blockDim.x) e += expf((j == y ? zy : s * cb[j]) - m);
    e = block_sum(e);
    const float lse = m + logf(e), inv_b = 1.0f / (float)B;
    if (with_grad) {
        float* db = dc + (i64)b * K;
        for (int j = threadIdx.x; j < K; j += blockDim.x) {
            const float p = expf((j == y ? zy : s * cb[j]) - lse);
            db[j] = j == y ? s * (p - 1.0f) * fp_shared * inv_b : s * p * inv_b;
        }
    }
    if (threadIdx.x == 0) row_loss[b] = (lse - zy) * inv_b;
}

// COT's complement entropy: over the classes other than y_b, log-softmax lp_j, plogp = sum_j e^lp_j lp_j;
// row_loss[b] = plogp / (B K), dz_j = e^lp_j (lp_j - plogp) / (B K) for j != y_b, 0 for y_b (and a
// zero row when K = 1: no complement classes).
extern "C" __global__ void complement_entropy_f32(float* __restrict__ row_loss, float* __restrict__ dz,
                                                  const float* __restrict__ z, const int* __restrict__ labels,
                                                  int B, int K, int with_grad) {
    const int b = blockIdx.x;
    const int y = labels[b];
    const float* zb = z + (i64)b * K;
    float m = -PODGPU_INF;
    for (int j = threadIdx.x; j < K; j += blockDim.x) if (j != y) m = fmaxf(m, zb[j]);
    m = block_max(m);
    const float scale = 1.0f / ((float)B * (float)K);
    float* db = dz + (i64)b * K;
    if (m == -PODGPU_INF) {
        if (with_grad) for (int j = threadIdx.x; j < K; j += blockDim.x) db[j] = 0.0f;
        if (threadIdx.x == 0) row_loss[b] = 0.0f;
        return;  // every thread of the block takes this branch (m is the block's value)
    }
    float e = 0.0f;
    for (int j = threadIdx.x; j < K; j += blockDim.x) if (j != y) e += expf(zb[j] - m);
    e = block_sum(e);
    const float lse = m + logf(e);
    float pl = 0.0f;
    for (int j = threadIdx.x; j < K; j += blockDim.x) if (j != y) { const float lp = zb[j] - lse; pl += expf(lp) * lp; }
    pl = block_sum(pl);
    if (with_grad) {
        for (int j = threadIdx.x; j < K; j += blockDim.x) {
            const float lp = zb[j] - lse;
            db[j] = j == y ? 0.0f : expf(lp) * (lp - pl) * scale;
        }
    }
    if (threadIdx.x == 0) row_loss[b] = pl * scale;
}

// Center Loss: row_loss[b] = ||x_b - c_{y_b}||^2 / (2B), dx = (x_b - c_{y_b}) / B.
extern "C" __global__ void center_loss_f32(float* __restrict__ row_loss, float* __restrict__ dx,
                                           const float* __restrict__ x, const float* __restrict__ C,
                                           const int* __restrict__ labels, int B, int n, int with_grad) {
    const int b = blockIdx.x;
    const float* xb = x + (i64)b * n;
    const float* cb = C + (i64)labels[b] * n;
    const float inv_b = 1.0f / (float)B;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = xb[i] - cb[i];
        acc += d * d;
        if (with_grad) dx[(i64)b * n + i] = d * inv_b;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) row_loss[b] = acc / (2.0f * (float)B);
}

// The Center Loss centre update (Wen et al. 2016): for every class j,
// c_j -= alpha / (1 + n_j) * sum_{b: y_b = j} (c_j - x_b), the sum taken in batch order as the host
// does. One block per class, threads over the feature dimension.
extern "C" __global__ void center_update_f32(float* __restrict__ out, const float* __restrict__ C,
                                             const float* __restrict__ x, const int* __restrict__ labels,
                                             int B, int n, double alpha) {
    const int j = blockIdx.x;
    int count = 0;
    for (int b = 0; b < B; b++) count += labels[b] == j;
    const float rate = (float)(alpha / (1.0 + (double)count));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float c = C[(i64)j * n + i];
        float d = 0.0f;
        for (int b = 0; b < B; b++) if (labels[b] == j) d += c - x[(i64)b * n + i];
        out[(i64)j * n + i] = c - rate * d;
    }
}

// v^e of a one-element tensor (PEDCC-Loss's root of the MSE term).
extern "C" __global__ void scalar_pow_f32(float* __restrict__ y, const float* __restrict__ v, float e) {
    if (blockIdx.x == 0 && threadIdx.x == 0) y[0] = powf(v[0], e);
}
