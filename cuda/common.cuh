// Shared helpers, prepended to every cuda/*.cu before NVRTC compiles it (NVRTC has no host headers:
// no <cmath>, no INFINITY, no <cstdint>).
typedef unsigned long long u64;
typedef long long i64;

#define PODGPU_INF __int_as_float(0x7f800000)

// Grid-stride loop over [0, n).
#define FOR_N(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block, returned to every thread. Every thread of the block must call it (it
// synchronises); blockDim.x must be a multiple of 32 and at most 1024.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading part[0]
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nwarps ? part[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) part[0] = t;
    }
    __syncthreads();
    return part[0];
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// block_sum in double, for sums whose terms nearly cancel afterwards (same rules as block_sum).
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nwarps ? part[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) part[0] = t;
    }
    __syncthreads();
    return part[0];
}

// Maximum over the whole block, returned to every thread (same rules as block_sum).
__device__ float block_max(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nwarps ? part[lane] : -PODGPU_INF;
        t = warp_max(t);
        if (lane == 0) part[0] = t;
    }
    __syncthreads();
    return part[0];
}

// Arg-max over the block: the largest value, ties to the smallest index (as the CPU reference's
// first-maximum rule). Returns the index to every thread.
__device__ int block_argmax(float v, int idx) {
    __shared__ float pv[32];
    __shared__ int pi[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    __syncthreads();
    if (lane == 0) { pv[warp] = v; pi[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? pv[lane] : -PODGPU_INF;
        idx = lane < nwarps ? pi[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
        }
        if (lane == 0) pi[0] = idx;
    }
    __syncthreads();
    return pi[0];
}

// bf16 storage (bf16.cu, nhwc.cu): f32 -> bf16 bits with round to nearest, ties to even, NaN kept
// as a quiet NaN of the same sign, subnormals rounded like normals: bit for bit the CPU's
// `tensor::bf16`. Integer operations, not cuda_bf16.h, so both devices round by one algorithm.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    const unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((bits >> 16) | 0x0040u);  // NaN: keep the sign, set the quiet bit
    }
    const unsigned int lsb = (bits >> 16) & 1u;
    return (unsigned short)((bits + 0x7fffu + lsb) >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// Element access of the two activation storage types: load as f32, store rounded (bf16) or as is.
// Kernels templated on the storage type read and write through these.
__device__ __forceinline__ float load(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, i64 i) { return bf16_bits_to_f32(p[i]); }
__device__ __forceinline__ void store(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, i64 i, float v) { p[i] = f32_to_bf16_bits(v); }

// The pool kernels' geometry parameters (pool.cu, nhwc.cu), and passing them on.
#define POOL_ARGS int N, int C, int H, int W, int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw
#define POOL_PASS N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw

// Pooling windows (pool.cu, nhwc.cu): the outputs along one axis whose window of k taps at
// stride s with padding p covers input row h are [*lo, *hi] (empty when *lo > *hi).
__device__ __forceinline__ void covering(int h, int k, int s, int p, int OH, int* lo, int* hi) {
    const int hp = h + p;
    int l = hp - k + 1;
    l = l <= 0 ? 0 : (l + s - 1) / s;
    int u = hp / s;
    if (u > OH - 1) u = OH - 1;
    *lo = l;
    *hi = u;
}
