// The trainer's step ledger (src/train/ledger.rs): an epoch's running sums and the numerics guard,
// kept on the device so that a training step never waits for the host. The host reads the ledger
// every few steps, at the end of the epoch and before a checkpoint.
//
// Layout in 32-bit words (matches `layout` in src/cuda/guard.rs and the host kernels in
// src/train/ledger.rs; the f64/i64 fields are 8-byte aligned because pool blocks are):
#define L_LOSS_SUM 0   // f64: sum over steps of (f64)loss * batch size
#define L_NORM_SUM 2   // f64: sum over steps of the delta schedule's norm sum
#define L_CORRECT 4    // i64: correctly classified training images
#define L_BAD_STEP 6   // i64: the (1-based) step whose loss or gradient was first not finite; 0: none
#define L_FLAG 8       // int: 1 from that step on (sticky); the SGD kernel skips while it is set
#define L_BAD_LOSS 9   // f32: that step's loss
#define L_LAST_LOSS 10 // f32: the latest step's loss
#define L_ENTRIES 11   // int: tensors guarded per step (the gradients, then the loss)
#define L_RECORD 12    // u32 [2 * entries]: NaN and inf counts of every guarded tensor at that step

// No float atomics anywhere: every sum is made in one thread in step order, so the numbers are those
// the host would get (and what `metrics.jsonl` showed when the host added them itself).

// One step's statistics into the ledger. `correct` is the step's count from argmax_rows_f32 (reset
// to 0 here for the next step), `norm_sum` the step's sum of norms (sum_into_f32), `b` the batch
// size. __dmul_rn/__dadd_rn keep the multiply and the add separately rounded (no FMA contraction),
// as the host computes them. Launch one thread.
extern "C" __global__ void ledger_add_step(unsigned int* __restrict__ ledger, int* __restrict__ correct,
                                           const float* __restrict__ loss,
                                           const float* __restrict__ norm_sum, double b) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double* acc = (double*)(ledger + L_LOSS_SUM);
    const float lv = loss[0];
    acc[0] = __dadd_rn(acc[0], __dmul_rn((double)lv, b));
    double* norms = (double*)(ledger + L_NORM_SUM);
    norms[0] = __dadd_rn(norms[0], (double)norm_sum[0]);
    i64* right = (i64*)(ledger + L_CORRECT);
    right[0] += (i64)correct[0];
    correct[0] = 0;
    ((float*)ledger)[L_LAST_LOSS] = lv;
}

// One row per guarded tensor: its data and element count. Matches `GuardEntry` in src/cuda/guard.rs.
struct GuardEntry {
    const float* p;
    i64 n;
};

// counts[2t], counts[2t + 1] += the NaN and ±inf values of table entry t. blockIdx.y picks the entry,
// blockIdx.x and the threads stride over its elements. Integer atomics (only where a value is not
// finite), so the counts do not depend on the schedule.
extern "C" __global__ void guard_count_f32(const GuardEntry* __restrict__ table, int count,
                                           unsigned int* __restrict__ counts) {
    const int t = blockIdx.y;
    if (t >= count) return;
    const GuardEntry e = table[t];
    unsigned int nan = 0, inf = 0;
    FOR_N(i, e.n) {
        const unsigned int bits = __float_as_uint(e.p[i]) & 0x7fffffffu;
        nan += bits > 0x7f800000u;
        inf += bits == 0x7f800000u;
    }
    if (nan) atomicAdd(&counts[2 * t], nan);
    if (inf) atomicAdd(&counts[2 * t + 1], inf);
}

// After guard_count_f32: when a count is non-zero and no earlier step was bad, records `step`, the
// loss (the table's last entry) and every count in the ledger and sets the flag. Zeroes the counts
// for the next step either way. Launch one block. `step_dev` (may be null) overrides `step` with a
// value read on the device: a step replayed from a CUDA graph has its number written there before
// each replay (kernel arguments are frozen at capture).
extern "C" __global__ void guard_finalize(unsigned int* __restrict__ ledger,
                                          unsigned int* __restrict__ counts, int count, i64 step,
                                          const i64* __restrict__ step_dev,
                                          const float* __restrict__ loss) {
    if (step_dev) step = *step_dev;
    const unsigned int already = ledger[L_FLAG];  // read by every thread before thread 0 writes it
    int bad = 0;
    for (int t = threadIdx.x; t < count; t += blockDim.x) bad |= (counts[2 * t] | counts[2 * t + 1]) != 0;
    bad = __syncthreads_or(bad);
    const int record = bad && !already;
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
        if (record) {
            ledger[L_RECORD + 2 * t] = counts[2 * t];
            ledger[L_RECORD + 2 * t + 1] = counts[2 * t + 1];
        }
        counts[2 * t] = 0;
        counts[2 * t + 1] = 0;
    }
    if (threadIdx.x == 0 && record) {
        *(i64*)(ledger + L_BAD_STEP) = step;
        ((float*)ledger)[L_BAD_LOSS] = loss[0];
        ledger[L_FLAG] = 1;
    }
}
