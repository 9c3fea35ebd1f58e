// AdamW's update of one tensor and the global-norm gradient clipping factor. Mirrors
// src/optim/adamw.rs and src/optim/clip.rs.

// PyTorch's AdamW: w *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// w -= step * m / (sqrt(v) / sqrt_bc2 + eps) with step = lr / (1 - b1^t). Nothing changes while *skip
// (an i32 flag, may be null) is non-zero.
extern "C" __global__ void adamw_f32(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, i64 n, float decay, float b1, float b2, float eps,
                                     float step, float sqrt_bc2, const int* __restrict__ skip) {
    if (skip && *skip) return;
    FOR_N(i, n) {
        const float gi = g[i];
        float wi = w[i] * decay;
        const float mi = m[i] * b1 + (1.0f - b1) * gi;
        const float vi = v[i] * b2 + (1.0f - b2) * gi * gi;
        wi -= step * mi / (sqrtf(vi) / sqrt_bc2 + eps);
        m[i] = mi;
        v[i] = vi;
        w[i] = wi;
    }
}

// out[slot] = sum of x^2 over n values, in double, by one block (a fixed order: deterministic).
extern "C" __global__ void sumsq_slot_f32(double* __restrict__ out, int slot, const float* __restrict__ x, i64 n) {
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) { const double v = x[i]; s += v * v; }
    s = block_sum_d(s);
    if (threadIdx.x == 0) out[slot] = s;
}

// coef[0] = min(1, max_norm / (sqrt(sum of the count partial sums) + 1e-6)).
extern "C" __global__ void clip_coef_f32(float* __restrict__ coef, const double* __restrict__ partial, int count,
                                         float max_norm) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < count; ++i) s += partial[i];
        const double c = (double)max_norm / (sqrt(s) + 1e-6);
        coef[0] = (float)(c < 1.0 ? c : 1.0);
    }
}
