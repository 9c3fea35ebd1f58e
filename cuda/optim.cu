// SGD with momentum and weight decay over all parameters in one launch (PyTorch's torch.optim.SGD,
// dampening 0):
//   g = grad + wd * p;  m = momentum * m + g;  p -= lr * (nesterov ? g + momentum * m : m)
// or, without momentum (with_momentum == 0), p -= lr * g.
// The table has one entry per parameter tensor; blockIdx.y picks the entry, blockIdx.x and the
// threads stride over its elements. Frozen tensors (flags & 1) are skipped: the PEDCC head and
// BN buffers never change. The layout matches `SgdEntry` in src/cuda/optim.rs (40 bytes).
//
// `lr_dev` (may be null) overrides `lr`. `skip` (may be null) is the numerics guard's flag in the trainer's step ledger (cuda/guard.cu):
// while it is non-zero nothing is updated, so that the weights and momentum stay those before the
// first step with a non-finite loss or gradient, although the host learns of it only later.
struct SgdEntry {
    float* p;
    const float* g;
    float* m;
    i64 n;
    float wd;
    int flags;
};

extern "C" __global__ void sgd_multi_f32(const SgdEntry* __restrict__ table, int count, float lr,
                                         const float* __restrict__ lr_dev, float momentum,
                                         int nesterov, int with_momentum,
                                         const int* __restrict__ skip) {
    if (skip && *skip) return;
    // A step replayed from a CUDA graph reads its learning rate on the device (written before each
    // replay; kernel arguments are frozen at capture).
    if (lr_dev) lr = *lr_dev;
    const int t = blockIdx.y;
    if (t >= count) return;
    const SgdEntry e = table[t];
    if (e.flags & 1) return;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < e.n; i += (i64)gridDim.x * blockDim.x) {
        // Each product and sum rounded on its own (no FMA contraction), as the host and the
        // per-tensor path compute them, so the three agree bit for bit.
        // No decay term when wd == 0, as PyTorch and the host (0·inf would be NaN).
        const float g = e.wd != 0.0f ? __fadd_rn(e.g[i], __fmul_rn(e.wd, e.p[i])) : e.g[i];
        float d = g;  // plain SGD (with_momentum == 0): no buffer, e.m is not touched
        if (with_momentum) {
            const float m = __fadd_rn(__fmul_rn(momentum, e.m[i]), g);
            e.m[i] = m;
            // Nesterov as the per-tensor path computes it: d = g + fl(momentum * m), separately rounded.
            d = nesterov ? __fadd_rn(g, __fmul_rn(momentum, m)) : m;
        }
        e.p[i] = __fsub_rn(e.p[i], __fmul_rn(lr, d));
    }
}
