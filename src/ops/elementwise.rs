//! Elementwise ops: add (residual connections, gradient accumulation), scale, ReLU, ReLU6.

use super::assert_same_place;
use crate::autograd::{Tape, Var};
use crate::cpu::par_chunks;
use crate::cuda;
use crate::tensor::{Elem, Tensor};

const CHUNK: usize = 1 << 14;

/// Applies `f` elementwise over one host tensor, in parallel chunks.
fn map1<T: Elem>(x: &Tensor, f: impl Fn(T) -> T + Send + Sync) -> Tensor {
    let xs = x.host::<T>();
    // SAFETY: the chunks cover `out` and each writes all of its elements.
    let mut out = unsafe { crate::cpu::arena::vec_for_overwrite(xs.len()) };
    par_chunks(&mut out, CHUNK, CHUNK, |i, o| {
        let xi = &xs[i * CHUNK..i * CHUNK + o.len()];
        for (o, &v) in o.iter_mut().zip(xi) {
            *o = f(v);
        }
    });
    Tensor::from_vec(x.shape(), out)
}

/// Applies `f` elementwise over two host tensors of the same shape.
fn map2<T: Elem>(a: &Tensor, b: &Tensor, f: impl Fn(T, T) -> T + Send + Sync) -> Tensor {
    let (xa, xb) = (a.host::<T>(), b.host::<T>());
    // SAFETY: the chunks cover `out` and each writes all of its elements (xa and xb have its length).
    let mut out = unsafe { crate::cpu::arena::vec_for_overwrite(xa.len()) };
    par_chunks(&mut out, CHUNK, CHUNK, |i, o| {
        let s = i * CHUNK;
        for ((o, &u), &v) in o.iter_mut().zip(&xa[s..]).zip(&xb[s..]) {
            *o = f(u, v);
        }
    });
    Tensor::from_vec(a.shape(), out)
}

// ---- add ----

pub fn add_fwd(a: &Tensor, b: &Tensor) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "add: shapes differ");
    assert_same_place("add", &[a, b]);
    dispatch!(a, add_host, cuda::kernels::add, a, b)
}

fn add_host<T: Elem>(a: &Tensor, b: &Tensor) -> Tensor {
    map2::<T>(a, b, |u, v| u + v)
}

/// a + b (the residual connection).
pub fn add(t: &mut Tape, a: &Var, b: &Var) -> Var {
    let y = add_fwd(a.value(), b.value());
    t.op(y, &[a, b], || {
        Box::new(|g, _| vec![Some(g.clone()), Some(g.clone())])
    })
}

// ---- scale ----

pub fn scale_fwd(x: &Tensor, s: f64) -> Tensor {
    dispatch!(x, scale_host, cuda::kernels::scale, x, s)
}

fn scale_host<T: Elem>(x: &Tensor, s: f64) -> Tensor {
    let s = T::of(s);
    map1::<T>(x, move |v| v * s)
}

/// s · x.
pub fn scale(t: &mut Tape, x: &Var, s: f64) -> Var {
    let y = scale_fwd(x.value(), s);
    t.op(y, &[x], || {
        Box::new(move |g, _| vec![Some(scale_fwd(g, s))])
    })
}

// ---- ReLU / ReLU6 ----

pub fn relu_fwd(x: &Tensor) -> Tensor {
    dispatch!(x, relu_host, cuda::kernels::relu, x)
}

fn relu_host<T: Elem>(x: &Tensor) -> Tensor {
    map1::<T>(x, |v| if v > T::zero() { v } else { T::zero() })
}

/// dx = dy where y > 0 (y is the ReLU output, which is saved instead of the input).
pub fn relu_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    assert_same_place("relu_bwd", &[y, dy]);
    dispatch!(y, relu_bwd_host, cuda::kernels::relu_bwd, y, dy)
}

fn relu_bwd_host<T: Elem>(y: &Tensor, dy: &Tensor) -> Tensor {
    map2::<T>(y, dy, |y, g| if y > T::zero() { g } else { T::zero() })
}

pub fn relu(t: &mut Tape, x: &Var) -> Var {
    let y = relu_fwd(x.value());
    let saved = y.clone();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(relu_bwd(&saved, g))])
    })
}

pub fn relu6_fwd(x: &Tensor) -> Tensor {
    dispatch!(x, relu6_host, cuda::kernels::relu6, x)
}

fn relu6_host<T: Elem>(x: &Tensor) -> Tensor {
    let six = T::of(6.0);
    map1::<T>(x, move |v| v.max(T::zero()).min(six))
}

/// dx = dy where 0 < y < 6 (PyTorch's convention at the kinks: no gradient).
pub fn relu6_bwd(y: &Tensor, dy: &Tensor) -> Tensor {
    assert_same_place("relu6_bwd", &[y, dy]);
    dispatch!(y, relu6_bwd_host, cuda::kernels::relu6_bwd, y, dy)
}

fn relu6_bwd_host<T: Elem>(y: &Tensor, dy: &Tensor) -> Tensor {
    let six = T::of(6.0);
    map2::<T>(y, dy, move |y, g| {
        if y > T::zero() && y < six {
            g
        } else {
            T::zero()
        }
    })
}

pub fn relu6(t: &mut Tape, x: &Var) -> Var {
    let y = relu6_fwd(x.value());
    let saved = y.clone();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(relu6_bwd(&saved, g))])
    })
}
