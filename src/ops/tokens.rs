//! Ops that move token data around for the transformers: a general axis permutation (head split and
//! merge, Swin's window partition and reverse, patch merging's 2×2 gather), a slice along one axis
//! (ViT's class token), the cyclic shift of Swin's shifted windows, a row gather with a deterministic
//! scatter-add backward (the relative-position-bias lookup), and a per-row constant scale (drop path
//! and dropout masks).

use super::assert_same_place;
use crate::autograd::{Tape, Var};
use crate::cpu;
use crate::cuda;
use crate::tensor::{Elem, Tensor};
use std::sync::Arc;

/// Most axes a permutation handles (the GPU kernel's fixed argument list).
pub const MAX_PERMUTE_RANK: usize = 6;

const CHUNK: usize = 1 << 14;

/// For `y = x.permute(dims)`: the output shape, and for each output axis the stride of the input
/// element it walks.
pub fn permute_plan(shape: &[usize], dims: &[usize]) -> (Vec<usize>, Vec<usize>) {
    assert_eq!(
        shape.len(),
        dims.len(),
        "permute: {dims:?} for shape {shape:?}"
    );
    assert!(
        shape.len() <= MAX_PERMUTE_RANK,
        "permute: rank {} > {MAX_PERMUTE_RANK}",
        shape.len()
    );
    let mut seen = vec![false; dims.len()];
    for &d in dims {
        assert!(
            d < dims.len() && !seen[d],
            "permute: {dims:?} is not a permutation"
        );
        seen[d] = true;
    }
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    (
        dims.iter().map(|&d| shape[d]).collect(),
        dims.iter().map(|&d| strides[d]).collect(),
    )
}

/// `x.permute(dims).contiguous()`.
pub fn permute_fwd(x: &Tensor, dims: &[usize]) -> Tensor {
    dispatch!(x, permute_host, cuda::transformer::permute, x, dims)
}

fn permute_host<T: Elem>(x: &Tensor, dims: &[usize]) -> Tensor {
    let (oshape, istr) = permute_plan(x.shape(), dims);
    let xs = x.host::<T>();
    let mut out = vec![T::zero(); xs.len()];
    let r = oshape.len();
    cpu::par_chunks(&mut out, CHUNK, CHUNK, |ci, o| {
        // Odometer over the output index, starting at the chunk's first element.
        let mut idx = vec![0usize; r];
        let mut rem = ci * CHUNK;
        for a in (0..r).rev() {
            idx[a] = rem % oshape[a];
            rem /= oshape[a];
        }
        let mut src: usize = idx.iter().zip(&istr).map(|(i, s)| i * s).sum();
        for v in o.iter_mut() {
            *v = xs[src];
            for a in (0..r).rev() {
                idx[a] += 1;
                src += istr[a];
                if idx[a] < oshape[a] {
                    break;
                }
                src -= istr[a] * oshape[a];
                idx[a] = 0;
            }
        }
    });
    Tensor::from_vec(&oshape, out)
}

/// The inverse permutation of `dims`.
pub fn inverse_permutation(dims: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; dims.len()];
    for (i, &d) in dims.iter().enumerate() {
        inv[d] = i;
    }
    inv
}

/// `x.permute(dims)` (contiguous) on the tape.
pub fn permute(t: &mut Tape, x: &Var, dims: &[usize]) -> Var {
    let y = permute_fwd(x.value(), dims);
    let inv = inverse_permutation(dims);
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(permute_fwd(g, &inv))])
    })
}

// ---- slice along one axis ----

/// (outer, dim, inner) of `shape` around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    assert!(axis < shape.len(), "axis {axis} of shape {shape:?}");
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// `x.narrow(axis, start, len)` (a copy).
pub fn narrow_fwd(x: &Tensor, axis: usize, start: usize, len: usize) -> Tensor {
    let (_, dim, _) = around(x.shape(), axis);
    assert!(
        start + len <= dim,
        "narrow: {start}+{len} > {dim} on axis {axis} of {x:?}"
    );
    dispatch!(
        x,
        narrow_host,
        cuda::transformer::narrow,
        x,
        axis,
        start,
        len
    )
}

fn narrow_host<T: Elem>(x: &Tensor, axis: usize, start: usize, len: usize) -> Tensor {
    let (outer, dim, inner) = around(x.shape(), axis);
    let xs = x.host::<T>();
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let s = (o * dim + start) * inner;
        out.extend_from_slice(&xs[s..s + len * inner]);
    }
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    Tensor::from_vec(&shape, out)
}

/// The backward of `narrow_fwd`: dy placed at `start` along `axis` of a zero tensor of `full` shape.
pub fn narrow_bwd(dy: &Tensor, full: &[usize], axis: usize, start: usize) -> Tensor {
    dispatch!(
        dy,
        narrow_bwd_host,
        cuda::transformer::narrow_bwd,
        dy,
        full,
        axis,
        start
    )
}

fn narrow_bwd_host<T: Elem>(dy: &Tensor, full: &[usize], axis: usize, start: usize) -> Tensor {
    let (outer, dim, inner) = around(full, axis);
    let len = dy.dim(axis);
    let gs = dy.host::<T>();
    let mut out = vec![T::zero(); outer * dim * inner];
    for o in 0..outer {
        let s = (o * dim + start) * inner;
        out[s..s + len * inner].copy_from_slice(&gs[o * len * inner..(o + 1) * len * inner]);
    }
    Tensor::from_vec(full, out)
}

/// `x.narrow(axis, start, len)` on the tape.
pub fn narrow(t: &mut Tape, x: &Var, axis: usize, start: usize, len: usize) -> Var {
    let y = narrow_fwd(x.value(), axis, start, len);
    let full = x.shape().to_vec();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(narrow_bwd(g, &full, axis, start))])
    })
}

// ---- cyclic shift ----

/// `torch.roll(x, shifts=(sh, sw), dims=(1, 2))` of a [B, H, W, C] tensor: y[b, i, j] =
/// x[b, (i − sh) mod H, (j − sw) mod W]. Negative shifts roll the other way.
pub fn roll2d_fwd(x: &Tensor, sh: isize, sw: isize) -> Tensor {
    assert_eq!(x.rank(), 4, "roll2d: [B, H, W, C] needed, got {x:?}");
    dispatch!(x, roll2d_host, cuda::transformer::roll2d, x, sh, sw)
}

fn roll2d_host<T: Elem>(x: &Tensor, sh: isize, sw: isize) -> Tensor {
    let (b, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let xs = x.host::<T>();
    let mut out = vec![T::zero(); xs.len()];
    for bi in 0..b {
        for i in 0..h {
            let si = (i as isize - sh).rem_euclid(h as isize) as usize;
            for j in 0..w {
                let sj = (j as isize - sw).rem_euclid(w as isize) as usize;
                let d = ((bi * h + i) * w + j) * c;
                let s = ((bi * h + si) * w + sj) * c;
                out[d..d + c].copy_from_slice(&xs[s..s + c]);
            }
        }
    }
    Tensor::from_vec(x.shape(), out)
}

/// The cyclic shift on the tape (backward: the opposite shift).
pub fn roll2d(t: &mut Tape, x: &Var, sh: isize, sw: isize) -> Var {
    let y = roll2d_fwd(x.value(), sh, sw);
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(roll2d_fwd(g, -sh, -sw))])
    })
}

// ---- row gather with a deterministic scatter-add backward ----

/// A fixed list of row indices into a table of `table_rows` rows, with its inverse (which output
/// rows read each table row) for a scatter-add that sums in a fixed order on both devices.
#[derive(Clone, Debug)]
pub struct RowIndex {
    pub table_rows: usize,
    pub index: Vec<usize>,
    /// CSR of the inverse: the output rows reading table row t are
    /// `inverse[offsets[t]..offsets[t + 1]]`, ascending.
    pub offsets: Vec<usize>,
    pub inverse: Vec<usize>,
}

impl RowIndex {
    pub fn new(table_rows: usize, index: Vec<usize>) -> RowIndex {
        let mut counts = vec![0usize; table_rows + 1];
        for &i in &index {
            assert!(
                i < table_rows,
                "row index {i} outside a table of {table_rows} rows"
            );
            counts[i + 1] += 1;
        }
        for t in 0..table_rows {
            counts[t + 1] += counts[t];
        }
        let mut fill = counts.clone();
        let mut inverse = vec![0usize; index.len()];
        for (m, &i) in index.iter().enumerate() {
            inverse[fill[i]] = m;
            fill[i] += 1;
        }
        RowIndex {
            table_rows,
            index,
            offsets: counts,
            inverse,
        }
    }
}

/// out[m, :] = table[index[m], :] for a [T, C] table → [M, C].
pub fn gather_rows_fwd(table: &Tensor, idx: &RowIndex) -> Tensor {
    assert!(
        table.rank() == 2 && table.dim(0) == idx.table_rows,
        "gather_rows: table {table:?}"
    );
    dispatch!(
        table,
        gather_rows_host,
        cuda::transformer::gather_rows,
        table,
        idx
    )
}

fn gather_rows_host<T: Elem>(table: &Tensor, idx: &RowIndex) -> Tensor {
    let c = table.dim(1);
    let ts = table.host::<T>();
    let mut out = Vec::with_capacity(idx.index.len() * c);
    for &i in &idx.index {
        out.extend_from_slice(&ts[i * c..(i + 1) * c]);
    }
    Tensor::from_vec(&[idx.index.len(), c], out)
}

/// dtable[t, :] = Σ over the m with index[m] = t of dy[m, :], in ascending m.
pub fn scatter_rows_fwd(dy: &Tensor, idx: &RowIndex) -> Tensor {
    assert!(
        dy.rank() == 2 && dy.dim(0) == idx.index.len(),
        "scatter_rows: {dy:?}"
    );
    dispatch!(
        dy,
        scatter_rows_host,
        cuda::transformer::scatter_rows,
        dy,
        idx
    )
}

fn scatter_rows_host<T: Elem>(dy: &Tensor, idx: &RowIndex) -> Tensor {
    let c = dy.dim(1);
    let gs = dy.host::<T>();
    let mut out = vec![T::zero(); idx.table_rows * c];
    for t in 0..idx.table_rows {
        for &m in &idx.inverse[idx.offsets[t]..idx.offsets[t + 1]] {
            for j in 0..c {
                out[t * c + j] += gs[m * c + j];
            }
        }
    }
    Tensor::from_vec(&[idx.table_rows, c], out)
}

/// Row gather on the tape (the relative-position-bias lookup).
pub fn gather_rows(t: &mut Tape, table: &Var, idx: &Arc<RowIndex>) -> Var {
    let y = gather_rows_fwd(table.value(), idx);
    let idx = idx.clone();
    t.op(y, &[table], move || {
        Box::new(move |g, _| vec![Some(scatter_rows_fwd(g, &idx))])
    })
}

// ---- per-row constant scale (drop path, dropout) ----

/// y[r, :] = x[r, :]·s[r] for x viewed as [R, inner] with R = s.numel() (s a constant).
pub fn scale_rows_fwd(x: &Tensor, s: &Tensor) -> Tensor {
    assert!(
        s.numel() > 0 && x.numel().is_multiple_of(s.numel()),
        "scale_rows: {s:?} does not divide {x:?}"
    );
    assert_same_place("scale_rows", &[x, s]);
    dispatch!(x, scale_rows_host, cuda::transformer::scale_rows, x, s)
}

fn scale_rows_host<T: Elem>(x: &Tensor, s: &Tensor) -> Tensor {
    let ss = s.host::<T>();
    let inner = x.numel() / ss.len();
    let mut out = x.host::<T>().to_vec();
    for (row, &k) in out.chunks_mut(inner.max(1)).zip(ss) {
        for v in row {
            *v = *v * k;
        }
    }
    Tensor::from_vec(x.shape(), out)
}

/// x scaled row by row by the constant `s` (its gradient is scaled the same way).
pub fn scale_rows(t: &mut Tape, x: &Var, s: &Tensor) -> Var {
    let y = scale_rows_fwd(x.value(), s);
    let s = s.clone();
    t.op(y, &[x], move || {
        Box::new(move |g, _| vec![Some(scale_rows_fwd(g, &s))])
    })
}

/// Stochastic depth (timm's `DropPath`): in training, each sample's residual branch is zeroed with
/// probability `p` and the kept ones are scaled by 1/(1 − p), drawn from the tape's seeded RNG; the
/// identity otherwise.
pub fn drop_path(t: &mut Tape, x: &Var, p: f64) -> Var {
    if p <= 0.0 || !t.is_training() || !t.is_recording() {
        return x.clone();
    }
    let b = x.shape()[0];
    let keep = 1.0 - p;
    let rng = t.rng();
    let s: Vec<f64> = (0..b)
        .map(|_| {
            if rng.uniform() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    let s = Tensor::from_f64_as(&[b], &s, x.value().dtype()).to_device(x.value().device());
    scale_rows(t, x, &s)
}

/// Dropout: in training each element is zeroed with probability `p`, the rest scaled by 1/(1 − p)
/// (the mask drawn from the tape's seeded RNG); the identity otherwise.
pub fn dropout(t: &mut Tape, x: &Var, p: f64) -> Var {
    if p <= 0.0 || !t.is_training() || !t.is_recording() {
        return x.clone();
    }
    let n = x.value().numel();
    let keep = 1.0 - p;
    let rng = t.rng();
    let s: Vec<f64> = (0..n)
        .map(|_| {
            if rng.uniform() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    let s = Tensor::from_f64_as(&[n], &s, x.value().dtype()).to_device(x.value().device());
    scale_rows(t, x, &s)
}
