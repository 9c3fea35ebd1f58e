// Channel concatenation (DenseNet) and its backward, the split. Tensors are NCHW; HW = H * W.

// y[n, c_off + c, :] = x[n, c, :] for x of Cx channels into y of Cy channels. One launch per input.
extern "C" __global__ void concat_channels_f32(float* __restrict__ y, const float* __restrict__ x,
                                               int N, int Cx, int HW, int Cy, int c_off) {
    const i64 per = (i64)Cx * HW;
    FOR_N(i, (i64)N * per) {
        const i64 n = i / per, r = i % per;
        y[n * Cy * HW + (i64)c_off * HW + r] = x[i];
    }
}

// dx[n, c, :] = dy[n, c_off + c, :]: the gradient of one concatenated input.
extern "C" __global__ void split_channels_f32(float* __restrict__ dx, const float* __restrict__ dy,
                                              int N, int Cx, int HW, int Cy, int c_off) {
    const i64 per = (i64)Cx * HW;
    FOR_N(i, (i64)N * per) {
        const i64 n = i / per, r = i % per;
        dx[i] = dy[n * Cy * HW + (i64)c_off * HW + r];
    }
}

// out[b, :] = src[idx[b], :] (the PEDCC centroid of each sample's label).
extern "C" __global__ void gather_rows_f32(float* __restrict__ out, const float* __restrict__ src,
                                           const int* __restrict__ idx, int rows, int cols) {
    FOR_N(i, (i64)rows * cols) {
        const i64 b = i / cols, c = i % cols;
        out[i] = src[(i64)idx[b] * cols + c];
    }
}
