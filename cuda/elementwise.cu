// Elementwise kernels: one thread per element, grid-stride loops (launch: 256 threads, enough blocks
// to fill the GPU). Each mirrors a host kernel in src/ops/.

extern "C" __global__ void add_f32(float* __restrict__ y, const float* __restrict__ a,
                                   const float* __restrict__ b, i64 n) {
    FOR_N(i, n) y[i] = a[i] + b[i];
}

// y += a * x (gradient accumulation in place).
extern "C" __global__ void axpy_f32(float* __restrict__ y, const float* __restrict__ x, float a, i64 n) {
    FOR_N(i, n) y[i] += a * x[i];
}

extern "C" __global__ void scale_f32(float* __restrict__ y, const float* __restrict__ x, float s, i64 n) {
    FOR_N(i, n) y[i] = x[i] * s;
}

// y = x * s[0], the scale read from device memory (an upstream scalar gradient, no host round trip).
extern "C" __global__ void scale_dev_f32(float* __restrict__ y, const float* __restrict__ x,
                                         const float* __restrict__ s, i64 n) {
    const float k = s[0];
    FOR_N(i, n) y[i] = x[i] * k;
}

extern "C" __global__ void fill_f32(float* __restrict__ y, float v, i64 n) {
    FOR_N(i, n) y[i] = v;
}

extern "C" __global__ void relu_f32(float* __restrict__ y, const float* __restrict__ x, i64 n) {
    FOR_N(i, n) { float v = x[i]; y[i] = v > 0.0f ? v : 0.0f; }
}

// dx = dy where y > 0; y is the saved ReLU output.
extern "C" __global__ void relu_bwd_f32(float* __restrict__ dx, const float* __restrict__ y,
                                        const float* __restrict__ dy, i64 n) {
    FOR_N(i, n) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

extern "C" __global__ void relu6_f32(float* __restrict__ y, const float* __restrict__ x, i64 n) {
    FOR_N(i, n) y[i] = fminf(fmaxf(x[i], 0.0f), 6.0f);
}

// dx = dy where 0 < y < 6 (no gradient at the kinks, as PyTorch).
extern "C" __global__ void relu6_bwd_f32(float* __restrict__ dx, const float* __restrict__ y,
                                         const float* __restrict__ dy, i64 n) {
    FOR_N(i, n) { float v = y[i]; dx[i] = (v > 0.0f && v < 6.0f) ? dy[i] : 0.0f; }
}

// out[r, c] = y[r, c] + b[c] for a row-major [rows, cols] matrix.
extern "C" __global__ void bias_add_f32(float* __restrict__ out, const float* __restrict__ y,
                                        const float* __restrict__ b, i64 rows, int cols) {
    FOR_N(i, rows * cols) out[i] = y[i] + b[i % cols];
}
