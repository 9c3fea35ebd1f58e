// Reductions. All deterministic (fixed order, no float atomics) so that runs repeat bit for bit.

// out[c] = sum_r x[r, c] (the bias gradient). Block (32, 8): 32 columns per block, 8 row lanes that
// each sum every 8th row, then combine in shared memory. Grid: ceil(cols / 32) blocks.
extern "C" __global__ void sum_rows_f32(float* __restrict__ out, const float* __restrict__ x,
                                        int rows, int cols) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (c < cols)
        for (int r = threadIdx.y; r < rows; r += 8) acc += x[(i64)r * cols + c];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) s += part[k][threadIdx.x];
        out[c] = s;
    }
}

// norms[r] = ||x[r, :]||_2. One block per row.
extern "C" __global__ void row_norms_f32(float* __restrict__ norms, const float* __restrict__ x,
                                         int rows, int cols) {
    const int r = blockIdx.x;
    const float* xr = x + (i64)r * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s);
    if (threadIdx.x == 0) norms[r] = sqrtf(s);
}

// acc[0] = (accumulate ? acc[0] : 0) + sum(x): the running sums the trainer keeps on the device
// (loss, ||x|| for delta). Launch exactly one block.
extern "C" __global__ void sum_into_f32(float* __restrict__ acc, const float* __restrict__ x, i64 n,
                                        int accumulate) {
    float s = 0.0f;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) acc[0] = (accumulate ? acc[0] : 0.0f) + s;
}

// acc[0] += the integer counts in x (accuracy counters). One block.
extern "C" __global__ void sum_into_i32(int* __restrict__ acc, const int* __restrict__ x, int n,
                                        int accumulate) {
    float s = 0.0f;  // counts stay exact in f32 up to 2^24 per call
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += (float)x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) acc[0] = (accumulate ? acc[0] : 0) + (int)s;
}
