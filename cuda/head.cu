// The PEDCC head: row L2-normalisation and prediction (arg-max of <x, p_k>) with accuracy counting.

// y[r, :] = x[r, :] / max(||x[r, :]||, eps); norms[r] = ||x[r, :]|| (saved for backward). One block
// per row.
extern "C" __global__ void l2norm_rows_fwd_f32(float* __restrict__ y, float* __restrict__ norms,
                                               const float* __restrict__ x, int rows, int cols, float eps) {
    const int r = blockIdx.x;
    const float* xr = x + (i64)r * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i] * xr[i];
    const float nrm = sqrtf(block_sum(s));
    const float inv = 1.0f / fmaxf(nrm, eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) y[(i64)r * cols + i] = xr[i] * inv;
    if (threadIdx.x == 0) norms[r] = nrm;
}

// Backward of the above. For ||x|| > eps: dx = (dy - y <y, dy>) / ||x||; else y = x / eps is linear
// and dx = dy / eps.
extern "C" __global__ void l2norm_rows_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy,
                                               const float* __restrict__ y, const float* __restrict__ norms,
                                               int rows, int cols, float eps) {
    const int r = blockIdx.x;
    const float* yr = y + (i64)r * cols;
    const float* gr = dy + (i64)r * cols;
    const float nrm = norms[r];
    if (nrm > eps) {
        float s = 0.0f;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) s += yr[i] * gr[i];
        const float yg = block_sum(s);
        const float inv = 1.0f / nrm;
        for (int i = threadIdx.x; i < cols; i += blockDim.x)
            dx[(i64)r * cols + i] = (gr[i] - yr[i] * yg) * inv;
    } else {
        const float inv = 1.0f / eps;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) dx[(i64)r * cols + i] = gr[i] * inv;
    }
}

// pred[r] = argmax_k logits[r, k] (first maximum on ties); when labels is not null, correct[0] +=
// the number of rows with pred == label. One block per row.
extern "C" __global__ void argmax_rows_f32(int* __restrict__ pred, int* __restrict__ correct,
                                           const float* __restrict__ logits, const int* __restrict__ labels,
                                           int rows, int K) {
    const int r = blockIdx.x;
    const float* lr = logits + (i64)r * K;
    float best = -PODGPU_INF;
    int bi = 0x7fffffff;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float v = lr[k];
        if (v > best || bi == 0x7fffffff) { best = v; bi = k; }
    }
    const int a = block_argmax(best, bi);
    if (threadIdx.x == 0) {
        pred[r] = a;
        if (labels && correct && a == labels[r]) atomicAdd(correct, 1);
    }
}

// The PEDCC projection and prediction fused, without writing the logits: pred[r] = argmax_k <x_r, p_k>
// with P [K, n] (unit rows). Each warp takes classes k = warp, warp + nwarps, …; one block per row.
// For evaluation; training uses the cuBLAS projection (it needs the logits anyway).
extern "C" __global__ void pedcc_predict_f32(int* __restrict__ pred, int* __restrict__ correct,
                                             const float* __restrict__ x, const float* __restrict__ P,
                                             const int* __restrict__ labels, int rows, int n, int K) {
    const int r = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float* xr = x + (i64)r * n;
    float best = -PODGPU_INF;
    int bi = 0x7fffffff;
    for (int k = warp; k < K; k += nwarps) {
        const float* pk = P + (i64)k * n;
        float s = 0.0f;
        for (int i = lane; i < n; i += 32) s += xr[i] * pk[i];
        s = warp_sum(s);
        if (s > best || bi == 0x7fffffff) { best = s; bi = k; }
    }
    const int a = block_argmax(best, bi);
    if (threadIdx.x == 0) {
        pred[r] = a;
        if (labels && correct && a == labels[r]) atomicAdd(correct, 1);
    }
}
