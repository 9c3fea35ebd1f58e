//! Forward FLOPs per image, counted while a network runs: the conv and linear layers (and the head's
//! matrix product) report their multiply-accumulates into a per-thread counter that is only active
//! inside `count`.
//!
//! Convention: one multiply-accumulate = one FLOP, as in the paper's tables, thop and ptflops (so
//! ResNet50 on 224×224 ImageNet is the familiar "4.1 GFLOPs" and on 32×32 CIFAR about 1.3). Batch norm,
//! activations, pooling and additions are not counted: they are a fraction of a percent of the total.

use std::cell::Cell;

thread_local! {
    static COUNTER: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` and returns its result with the multiply-accumulates the layers reported meanwhile.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let outer = COUNTER.with(|c| c.replace(Some(0)));
    let r = f();
    let n = COUNTER.with(|c| c.replace(outer)).unwrap_or(0);
    // Nested counts also add up into the enclosing one.
    if let Some(o) = outer {
        COUNTER.with(|c| c.set(Some(o + n)));
    }
    (r, n)
}

/// Adds `macs` to the active counter (nothing when no `count` is running).
pub fn add(macs: u64) {
    COUNTER.with(|c| {
        if let Some(v) = c.get() {
            c.set(Some(v + macs));
        }
    });
}

/// Multiply-accumulates of a convolution with output shape [N, Cout, Ho, Wo] and weight shape
/// [Cout, Cin/groups, kh, kw]: every output value sums Cin/groups · kh · kw products.
pub fn conv2d_macs(y_shape: &[usize], w_shape: &[usize]) -> u64 {
    let per_output: usize = w_shape[1..].iter().product();
    (y_shape.iter().product::<usize>() * per_output) as u64
}

/// Multiply-accumulates of x [B, in] · Wᵀ → [B, out].
pub fn matmul_macs(rows: usize, inner: usize, cols: usize) -> u64 {
    (rows * inner * cols) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_inside_count_and_nests() {
        add(5);
        let ((), n) = count(|| {
            add(3);
            let ((), inner) = count(|| add(4));
            assert_eq!(inner, 4);
            add(1);
        });
        assert_eq!(n, 8);
        assert_eq!(conv2d_macs(&[2, 8, 4, 4], &[8, 3, 3, 3]), 2 * 8 * 16 * 27);
        assert_eq!(matmul_macs(2, 3, 4), 24);
    }
}
