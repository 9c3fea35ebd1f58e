//! Ops that only move data: concatenation along channels (DenseNet) and reshape (flatten).

use super::assert_same_place;
use crate::autograd::{Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{Elem, Tensor};

/// Checks that tensors of rank ≥ 2 agree on every dimension but 1 and returns (N, channels, inner).
fn concat_dims(xs: &[&Tensor]) -> (usize, Vec<usize>, usize) {
    assert!(!xs.is_empty(), "concat_channels of no tensors");
    let first = xs[0].shape();
    assert!(
        first.len() >= 2,
        "concat_channels: rank ≥ 2 needed, got {first:?}"
    );
    for x in xs {
        let s = x.shape();
        assert!(
            s.len() == first.len() && s[0] == first[0] && s[2..] == first[2..],
            "concat_channels: shapes {first:?} and {s:?} differ outside dimension 1"
        );
    }
    assert_same_place("concat_channels", xs);
    let inner = first[2..].iter().product();
    (first[0], xs.iter().map(|x| x.dim(1)).collect(), inner)
}

// ---- tensor-level entry points ----

/// Concatenates along dimension 1.
pub fn concat_channels_fwd(xs: &[&Tensor]) -> Tensor {
    concat_dims(xs);
    dispatch!(xs[0], concat_host, concat_cuda, xs)
}

/// Splits along dimension 1 into pieces of `sizes` channels (the inverse of `concat_channels_fwd`).
pub fn split_channels_fwd(x: &Tensor, sizes: &[usize]) -> Vec<Tensor> {
    assert!(
        x.rank() >= 2,
        "split_channels: rank ≥ 2 needed, got {:?}",
        x.shape()
    );
    assert_eq!(
        sizes.iter().sum::<usize>(),
        x.dim(1),
        "split_channels: sizes {sizes:?} do not add up to {:?}",
        x.shape()
    );
    dispatch!(x, split_host, split_cuda, x, sizes)
}

// ---- tape-level ops ----

/// Concatenation along channels; backward splits the gradient.
pub fn concat_channels(t: &mut Tape, xs: &[&Var]) -> Var {
    let values: Vec<&Tensor> = xs.iter().map(|v| v.value()).collect();
    let y = concat_channels_fwd(&values);
    let sizes: Vec<usize> = xs.iter().map(|v| v.shape()[1]).collect();
    t.op(y, xs, move || {
        Box::new(move |g, needs| {
            let parts = split_channels_fwd(g, &sizes);
            parts
                .into_iter()
                .zip(needs)
                .map(|(p, &n)| n.then_some(p))
                .collect()
        })
    })
}

/// Same values, new shape (same element count); backward reshapes the gradient back.
pub fn reshape(t: &mut Tape, x: &Var, shape: &[usize]) -> Var {
    let y = x.value().reshape(shape);
    let back = x.shape().to_vec();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(g.reshape(&back))])
    })
}

/// [N, ...] → [N, product of the rest].
pub fn flatten(t: &mut Tape, x: &Var) -> Var {
    let s = x.shape();
    assert!(!s.is_empty(), "flatten of a scalar");
    let shape = [s[0], s[1..].iter().product()];
    reshape(t, x, &shape)
}

// ---- CUDA arms ----
// The kernels take NCHW tensors; any rank ≥ 2 is the same memory as [N, C, inner, 1].

fn as_nchw(x: &Tensor) -> Tensor {
    let inner = x.shape()[2..].iter().product();
    x.reshape(&[x.dim(0), x.dim(1), inner, 1])
}

fn with_channels(like: &[usize], c: usize) -> Vec<usize> {
    let mut shape = like.to_vec();
    shape[1] = c;
    shape
}

fn concat_cuda(xs: &[&Tensor]) -> Tensor {
    let flat: Vec<Tensor> = xs.iter().map(|x| as_nchw(x)).collect();
    let refs: Vec<&Tensor> = flat.iter().collect();
    let y = cuda::nn_kernels::concat_channels(&refs);
    y.reshape(&with_channels(xs[0].shape(), y.dim(1)))
}

fn split_cuda(x: &Tensor, sizes: &[usize]) -> Vec<Tensor> {
    cuda::nn_kernels::split_channels(&as_nchw(x), sizes)
        .into_iter()
        .zip(sizes)
        .map(|(p, &c)| p.reshape(&with_channels(x.shape(), c)))
        .collect()
}

// ---- host kernels ----

fn concat_host<T: Elem>(xs: &[&Tensor]) -> Tensor {
    let (n, sizes, inner) = concat_dims(xs);
    let total: usize = sizes.iter().sum();
    let srcs: Vec<&[T]> = xs.iter().map(|x| x.host::<T>()).collect();
    let mut out = vec![T::zero(); n * total * inner];
    cpu::par_chunks(&mut out, total * inner, total * inner, |i, o| {
        let mut off = 0;
        for (src, &c) in srcs.iter().zip(&sizes) {
            let len = c * inner;
            o[off..off + len].copy_from_slice(&src[i * len..(i + 1) * len]);
            off += len;
        }
    });
    let mut shape = xs[0].shape().to_vec();
    shape[1] = total;
    Tensor::from_vec(&shape, out)
}

fn split_host<T: Elem>(x: &Tensor, sizes: &[usize]) -> Vec<Tensor> {
    let (n, total) = (x.dim(0), x.dim(1));
    let inner: usize = x.shape()[2..].iter().product();
    let xs = x.host::<T>();
    let mut off = 0;
    sizes
        .iter()
        .map(|&c| {
            let len = c * inner;
            let mut part = Vec::with_capacity(n * len);
            for i in 0..n {
                let s = i * total * inner + off;
                part.extend_from_slice(&xs[s..s + len]);
            }
            off += len;
            let mut shape = x.shape().to_vec();
            shape[1] = c;
            Tensor::from_vec(&shape, part)
        })
        .collect()
}
