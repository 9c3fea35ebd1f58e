//! Direct f32 convolutions for stride-1 "same" convolutions (3×3 with padding 1 and alike) on
//! AVX-512: forward, backward-data (a forward with the flipped weights, `ops::conv`) and weight
//! gradient without a column matrix.
//!
//! Why: im2col writes KH·KW shifted copies of the input (9× for 3×3) and the GEMM then packs that
//! matrix once more; on ResNet18-CIFAR width 16 (one thread) that copying was a quarter of a
//! training step. Here each input plane is copied KW times (3×), shifted by one column each, with
//! the padding rows and columns as zeros, and the products read those copies in place.
//!
//! Layout: for a call of nb images, copy j of channel ci of image b is the plane
//! xs[((ci·KW + j)·nb + b)·P ..][.. P], row r, column c holding x[b][ci][r − ph][c + j − pw] (zero
//! outside x), P = (H + KH − 1)·W rounded up to 16. Rows are exactly W wide, so output position p
//! (= oh·W + ow) reads for tap (i, j) the value at p + i·W of copy j: for 16 consecutive positions,
//! 16 consecutive floats, one vector load at offset ((ci·KW + j)·nb)·P + i·W from the tile's start
//! b·P + p0. A tile of 16 positions is thus a row of an implicit GEMM whose k-th operand sits at a
//! per-term offset, and no lane is wasted (but in the last tile of a plane whose size is not a
//! multiple of 16, masked). The images of one call sit side by side inside each channel's copies,
//! so a tile group of small planes (8×8, 4×4: one to four tiles per image) reads a few pages, not
//! one per image.
//!
//! Forward micro-kernel: 8 output channels × 3 tiles (24 accumulators of 16 floats), the weights
//! packed [channel block][k][8] so that one term's 8 broadcasts are adjacent; the terms go by in
//! passes of 16 input channels (a pass's copies stay in L1 while the channel blocks go by; the next
//! pass adds to what the last stored). Each output is its K terms added in k order ((ci, kh, kw)
//! as in the weight tensor), one FMA each: a fixed order whatever the thread count.
//! Weight-gradient micro-kernel: 4 output channels × 4 terms, 16-lane partial sums over every
//! position of the call (the terms in the same passes of 16 input channels), then added across
//! lanes into dw. `ops::conv` decides which convolutions take these kernels (where they measured
//! faster than im2col + the gemm crate: `bench-cpu-conv`).
//!
//! References: plain f64 loops (tests below) and the im2col path (the convolution tests run both:
//! `PODGPU_CPU_KERNELS=portable`, which CI also runs, turns this path off, as do deterministic
//! mode and `PODGPU_CPU_DIRECT_CONV=0`). A CPU without AVX-512 keeps the im2col path.

use std::sync::atomic::{AtomicU8, Ordering};

/// Output channels per forward micro-kernel (one broadcast each per term).
const MR: usize = 8;
/// Positions per tile: one 512-bit vector of f32.
const LANES: usize = 16;
/// Tiles per forward micro-kernel call (accumulators: MR × NV = 24 of the 32 vector registers).
const NV: usize = 3;
/// Input channels per pass of the kernels (see the module comment).
const CHANNELS_PER_PASS: usize = 16;

/// The environment variable that turns the direct kernels off (`0`), to measure them against the
/// im2col path with the same GEMM kernels.
pub const DIRECT_CONV_ENV: &str = "PODGPU_CPU_DIRECT_CONV";

/// Whether this process runs the direct kernels: an AVX-512 CPU, the fast kernels
/// (`PODGPU_CPU_KERNELS=portable` and deterministic mode keep the im2col path),
/// `PODGPU_CPU_DIRECT_CONV` not `0` and no `set_enabled(false)`.
pub fn available() -> bool {
    let on = match ENABLED.load(Ordering::Relaxed) {
        UNREAD => {
            let off = std::env::var(DIRECT_CONV_ENV).is_ok_and(|v| v.trim() == "0");
            let state = if off { OFF } else { ON };
            let _ = ENABLED.compare_exchange(UNREAD, state, Ordering::Relaxed, Ordering::Relaxed);
            !off
        }
        state => state == ON,
    };
    on && has_avx512() && super::kernels::current() == super::kernels::GemmKernel::Fast
}

/// Turns the direct kernels on or off for the whole process (benchmarks measure both paths in one
/// run; the environment variable is the user's switch).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

const UNREAD: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static ENABLED: AtomicU8 = AtomicU8::new(UNREAD);

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One tile of 16 output positions of one image of a call (the forward's unit of work): where it
/// starts in every copy (b·P + p0), where its output starts in y [nb, cout, h·w] (channel 0:
/// b·cout·h·w + p0), and which of its lanes are positions (all but in the last tile of a plane
/// whose size is not a multiple of 16).
#[derive(Clone, Copy, Debug)]
struct Tile {
    src: usize,
    dst: usize,
    mask: u16,
}

/// One call's shifted copies, found in the scratch at `lead` (a 64-byte boundary), with the
/// offsets of every term for its image count and its tiles.
struct Batch {
    lead: usize,
    nb: usize,
    offsets: Vec<usize>,
    tiles: Vec<Tile>,
}

/// Everything about one convolution that does not depend on the images: its sizes and, for the
/// forward, the packed weights. Built once per convolution call, shared by the threads.
#[derive(Debug)]
pub struct SameConv {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    /// Floats per shifted plane: (h + kh − 1)·w rounded up to a whole vector.
    plane: usize,
    /// Weights [ceil(cout / MR)][K][MR], channels past `cout` zero (empty until `with_weights`).
    packed: Vec<f32>,
    /// row_masks[j][v]: the lanes of the v-th vector of a plane's rows (positions 16v..16v + 16)
    /// that copy j takes from x (its column c + j − pw exists and the position is in the plane);
    /// the other lanes are the padding's zeros.
    row_masks: Vec<u16>,
}

impl SameConv {
    /// The geometry of a stride-1 convolution of a [cin, h, w] input with a [cout, cin, kh, kw]
    /// kernel and padding ((kh − 1) / 2, (kw − 1) / 2) (odd kernel sizes: a "same" output), ready
    /// for `weight_grad`; `with_weights` adds what `run` needs.
    pub fn new(
        cout: usize,
        cin: usize,
        (kh, kw): (usize, usize),
        (h, wd): (usize, usize),
    ) -> SameConv {
        assert!(
            kh % 2 == 1 && kw % 2 == 1,
            "same convolution needs odd kernel sizes"
        );
        let (hw, pw, vectors) = (h * wd, (kw - 1) / 2, (h * wd).div_ceil(LANES));
        let row_masks = (0..kw * vectors)
            .map(|jv| {
                let (j, v) = (jv / vectors, jv % vectors);
                (0..LANES).fold(0u16, |m, l| {
                    let pos = v * LANES + l;
                    let c = (pos % wd + j) as isize - pw as isize;
                    let inside = pos < hw && c >= 0 && (c as usize) < wd;
                    m | (u16::from(inside) << l)
                })
            })
            .collect();
        SameConv {
            cin,
            cout,
            h,
            w: wd,
            kh,
            kw,
            plane: ((h + kh - 1) * wd).next_multiple_of(LANES),
            packed: Vec::new(),
            row_masks,
        }
    }

    /// Terms per output: cin·kh·kw.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Packs the weights `w` [cout, cin, kh, kw] for `run`.
    pub fn with_weights(mut self, w: &[f32]) -> SameConv {
        let k = self.k();
        assert_eq!(
            w.len(),
            self.cout * k,
            "weights are not [{}, {}, {}, {}]",
            self.cout,
            self.cin,
            self.kh,
            self.kw
        );
        let mut packed = vec![0.0f32; self.cout.div_ceil(MR) * k * MR];
        for (co, row) in w.chunks_exact(k).enumerate() {
            let (b, m) = (co / MR, co % MR);
            for (kk, &v) in row.iter().enumerate() {
                packed[(b * k + kk) * MR + m] = v;
            }
        }
        self.packed = packed;
        self
    }

    /// Images per call of `run`: enough tiles for several micro-kernel calls of `NV` tiles, and a
    /// tile count that `NV` divides where a few more images make it so (a 16×16 plane has 16
    /// tiles: one image leaves a lone tile for a micro-kernel third as efficient, three none).
    pub fn images_per_call(&self) -> usize {
        let tiles = (self.h * self.w).div_ceil(LANES);
        let least = (4 * NV).div_ceil(tiles);
        (least..least + NV)
            .find(|n| (n * tiles).is_multiple_of(NV))
            .unwrap_or(least)
    }

    /// Images per call of `weight_grad`: its partial sums are added up across lanes once per call,
    /// so a call should cover at least 64 tiles.
    pub fn weight_grad_images_per_call(&self) -> usize {
        64usize.div_ceil((self.h * self.w).div_ceil(LANES))
    }

    /// y [nb, cout, h·w] of the images x [nb, cin, h·w]. `scratch` is resized as needed.
    pub fn run(&self, x: &[f32], scratch: &mut Vec<f32>, y: &mut [f32]) {
        assert!(
            !self.packed.is_empty(),
            "conv_same::run needs `with_weights`"
        );
        let nb = self.images(x, y, "output");
        let batch = self.prepare(x, nb, scratch);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 is present (`prepare` asserts it). A load reads 16 floats at
        // src + offsets[k] ≤ (nb − 1)·P + h·w − 1 + ((cin·kw − 1)·nb)·P + (kh − 1)·w, which ends
        // before cin·kw·nb·P + 16 = the copies and their zero tail (h·w + (kh − 1)·w ≤ P); a store
        // writes, per channel m < cout, the lanes of a tile's mask at dst + m·h·w, positions below
        // h·w of image b's channel m.
        unsafe {
            let xs = scratch.as_ptr().add(batch.lead);
            avx512::run(self, &batch, xs, y.as_mut_ptr())
        }
    }

    /// Adds the weight gradient of the images x [nb, cin, h·w] with output gradients
    /// dy [nb, cout, h·w] to dw [cout, cin, kh, kw]. `scratch` is resized as needed.
    pub fn weight_grad(&self, x: &[f32], dy: &[f32], scratch: &mut Vec<f32>, dw: &mut [f32]) {
        let nb = self.images(x, dy, "output gradient");
        assert_eq!(
            dw.len(),
            self.cout * self.k(),
            "weight gradient is not [{}, {}, {}, {}]",
            self.cout,
            self.cin,
            self.kh,
            self.kw
        );
        let batch = self.prepare(x, nb, scratch);
        // dy gathered channel-major after the copies, [cout, nb, h·w], so that one channel's
        // tiles of all images are adjacent (as the copies are).
        let hw = self.h * self.w;
        let grad = scratch.len();
        for co in 0..self.cout {
            for b in 0..nb {
                scratch.extend_from_slice(&dy[(b * self.cout + co) * hw..][..hw]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `run` for the loads of the copies; the gathered dy is read at
        // grad + m·nb·h·w under each tile's mask (positions of image b's channel m), dw at
        // co·K + k < cout·K.
        unsafe {
            let xs = scratch.as_ptr().add(batch.lead);
            let g = scratch.as_ptr().add(grad);
            avx512::weight_grad(self, &batch, xs, g, dw.as_mut_ptr())
        }
    }

    /// Checks x [nb, cin, h·w] against its partner [nb, cout, h·w] and returns nb.
    fn images(&self, x: &[f32], other: &[f32], what: &str) -> usize {
        let hw = self.h * self.w;
        let nb = x.len() / (self.cin * hw).max(1);
        assert_eq!(
            x.len(),
            nb * self.cin * hw,
            "input is not [n, {}, {hw}]",
            self.cin
        );
        assert_eq!(
            other.len(),
            nb * self.cout * hw,
            "{what} is not [{nb}, {}, {hw}]",
            self.cout
        );
        nb
    }

    /// Writes the shifted copies of nb images into `scratch` (see the module comment), from a
    /// 64-byte boundary, and lists the offsets and tiles of this image count.
    fn prepare(&self, x: &[f32], nb: usize, scratch: &mut Vec<f32>) -> Batch {
        assert!(
            has_avx512(),
            "conv_same needs AVX-512 (check `available()` first)"
        );
        let (hw, w, p) = (self.h * self.w, self.w, self.plane);
        let (ph, pw) = ((self.kh - 1) / 2, (self.kw - 1) / 2);
        let copies = self.cin * self.kw * nb * p;
        // The copies start on a 64-byte boundary: planes and rows of whole vectors then make every
        // load aligned, where a load across two cache lines costs two (malloc gives 16 bytes, and
        // the split loads made the same convolution up to 1.5× slower from one call to the next).
        scratch.clear();
        scratch.reserve(LANES + copies + LANES + self.cout * nb * hw);
        let lead = scratch.as_ptr().align_offset(64).min(LANES);
        // SAFETY: the loop below writes every float of the copies and the zero tail before anything
        // reads them; the `lead` floats before the copies are never read.
        unsafe { super::arena::resize_for_overwrite(scratch, lead + copies + LANES) };
        let (planes, tail) = scratch[lead..].split_at_mut(copies);
        tail.fill(0.0);
        let (vectors, masks) = (hw.div_ceil(LANES), &self.row_masks);
        // Plane ((ci·KW + j)·nb + b): copy j of channel ci of image b, written once: the padding
        // rows, then x's rows shifted by j − pw as one flat run (rows are exactly w wide, so the
        // shift moves each row's values along it, and the masks zero what crosses a row edge).
        for (q, dst) in planes.chunks_exact_mut(p).enumerate() {
            let (ci, j, b) = (q / (self.kw * nb), q / nb % self.kw, q % nb);
            let src = &x[(b * self.cin + ci) * hw..][..hw];
            let (top, rest) = dst.split_at_mut(ph * w);
            top.fill(0.0);
            let (rows, bottom) = rest.split_at_mut(hw);
            bottom.fill(0.0);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 is present (asserted above); `shifted_rows` reads src only under
            // masks of positions whose source (position + j − pw, same row) lies in src, and
            // writes rows[..hw] only.
            unsafe {
                avx512::shifted_rows(
                    src,
                    rows,
                    &masks[j * vectors..][..vectors],
                    j as isize - pw as isize,
                )
            }
        }
        let mut offsets = Vec::with_capacity(self.k());
        for ci in 0..self.cin {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    offsets.push((ci * self.kw + j) * nb * p + i * w);
                }
            }
        }
        let tiles = (0..nb)
            .flat_map(|b| {
                (0..hw).step_by(LANES).map(move |p0| {
                    let n = (hw - p0).min(LANES);
                    Tile {
                        src: b * p + p0,
                        dst: b * self.cout * hw + p0,
                        mask: if n == LANES {
                            u16::MAX
                        } else {
                            (1u16 << n) - 1
                        },
                    }
                })
            })
            .collect();
        Batch {
            lead,
            nb,
            offsets,
            tiles,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Batch, SameConv, Tile, CHANNELS_PER_PASS, LANES, MR, NV};
    use std::arch::x86_64::*;

    /// For each pass of input channels, the tiles NV at a time, each against every block of MR
    /// output channels. The terms of one output are still added in k order: a pass starts from
    /// what the previous one stored.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(c: &SameConv, batch: &Batch, xs: *const f32, y: *mut f32) {
        let hw = c.h * c.w;
        let k = c.k();
        let per_ci = c.kh * c.kw;
        let tiles = &batch.tiles[..];
        for (pass, offsets) in batch.offsets.chunks(CHANNELS_PER_PASS * per_ci).enumerate() {
            let k0 = pass * CHANNELS_PER_PASS * per_ci;
            let add = pass > 0;
            for group in tiles.chunks(NV) {
                for b in 0..c.cout.div_ceil(MR) {
                    let wb = c.packed.as_ptr().add((b * k + k0) * MR);
                    let rows = (c.cout - b * MR).min(MR);
                    let yb = y.add(b * MR * hw);
                    // SAFETY: the caller's bounds hold for every tile and channel block.
                    unsafe {
                        match group.len() {
                            NV => micro::<NV>(xs, wb, offsets, group, yb, hw, rows, add),
                            2 => micro::<2>(xs, wb, offsets, group, yb, hw, rows, add),
                            _ => micro::<1>(xs, wb, offsets, group, yb, hw, rows, add),
                        }
                    }
                }
            }
        }
    }

    /// rows[p] = src[p + shift] in the lanes of `masks[p / 16]`, zero in the others: a plane's
    /// rows shifted along themselves (see `prepare`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn shifted_rows(src: &[f32], rows: &mut [f32], masks: &[u16], shift: isize) {
        let hw = rows.len();
        debug_assert!(src.len() == hw && masks.len() == hw.div_ceil(LANES));
        for (v, &mask) in masks.iter().enumerate() {
            let p = v * LANES;
            // The address may lie before src or past its end; the masked-off lanes are not read.
            let from = src.as_ptr().wrapping_offset(p as isize + shift);
            let value = _mm512_maskz_loadu_ps(mask, from);
            if p + LANES <= hw {
                _mm512_storeu_ps(rows.as_mut_ptr().add(p), value);
            } else {
                let keep = (1u16 << (hw - p)) - 1;
                _mm512_mask_storeu_ps(rows.as_mut_ptr().add(p), keep, value);
            }
        }
    }

    /// Output channels and terms per weight-gradient micro-kernel call (24 accumulators).
    const WG_CO: usize = 4;
    const WG_K: usize = 4;

    /// dw[co][k] += Σ over the tiles' lanes of dy[co] · xs[tile + offsets[k]], in blocks of
    /// WG_CO channels × WG_K terms (the remainders one channel or one term at a time). The terms
    /// go by in passes of CHANNELS_PER_PASS input channels, so that the copies one pass reads (of
    /// every image of the call) stay in L2 while all output channels go by; over the whole call
    /// they would not (a 256-channel 8×8 layer, 16 images: 4 MB, read again for each block of
    /// output channels).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_grad(
        c: &SameConv,
        batch: &Batch,
        xs: *const f32,
        dy: *const f32,
        dw: *mut f32,
    ) {
        let (k, hw) = (c.k(), c.h * c.w);
        let per_pass = CHANNELS_PER_PASS * c.kh * c.kw;
        let full_co = c.cout / WG_CO * WG_CO;
        for pass in (0..k).step_by(per_pass) {
            let end = (pass + per_pass).min(k);
            let full_end = pass + (end - pass) / WG_K * WG_K;
            for co in (0..c.cout).step_by(WG_CO) {
                for k0 in (pass..end).step_by(WG_K) {
                    // SAFETY: the caller's bounds hold for every block.
                    unsafe {
                        if co < full_co && k0 < full_end {
                            wg_micro::<WG_CO, WG_K>(batch, c.plane, hw, xs, dy, dw, co, k0);
                            continue;
                        }
                        for m in co..(co + WG_CO).min(c.cout) {
                            for kk in k0..(k0 + WG_K).min(end) {
                                wg_micro::<1, 1>(batch, c.plane, hw, xs, dy, dw, m, kk);
                            }
                        }
                    }
                }
            }
        }
    }

    /// M channels from `co`, N terms from `k0`: 16-lane partial sums over every position of every
    /// image of the call, then each added across its lanes into dw. The positions of an image go
    /// by 16 at a time with plain pointer steps (the per-tile bookkeeping of `Tile` cost as much as
    /// the loads in this loop of only M·N FMAs per step), the last partial vector masked.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wg_micro<const M: usize, const N: usize>(
        batch: &Batch,
        plane: usize,
        hw: usize,
        xs: *const f32,
        dy: *const f32,
        dw: *mut f32,
        co: usize,
        k0: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let mut off = [0usize; N];
        off.copy_from_slice(&batch.offsets[k0..k0 + N]);
        // Channel stride of the gathered dy [cout, nb, h·w].
        let stride = batch.nb * hw;
        let full = hw / LANES * LANES;
        // One vector of positions: dy of the M channels times the N terms' inputs. Under a mask
        // (the plane's last, partial vector) the lanes past the plane read zero from both, so
        // neighbouring values cannot reach the sums (nor an inf there make a NaN).
        macro_rules! step {
            ($g:expr, $src:expr, $load:expr) => {{
                let mut a = [_mm512_setzero_ps(); M];
                for (m, a) in a.iter_mut().enumerate() {
                    *a = $load($g.add(m * stride));
                }
                for n in 0..N {
                    let b = $load($src.add(off[n]));
                    for m in 0..M {
                        acc[m][n] = _mm512_fmadd_ps(a[m], b, acc[m][n]);
                    }
                }
            }};
        }
        for b in 0..batch.nb {
            let src = xs.add(b * plane);
            let g = dy.add(co * stride + b * hw);
            let mut p = 0;
            while p < full {
                step!(g.add(p), src.add(p), |q| _mm512_loadu_ps(q));
                p += LANES;
            }
            if p < hw {
                let mask: u16 = (1u16 << (hw - p)) - 1;
                step!(g.add(p), src.add(p), |q| _mm512_maskz_loadu_ps(mask, q));
            }
        }
        let k = batch.offsets.len();
        for (m, acc_m) in acc.iter().enumerate() {
            for (n, v) in acc_m.iter().enumerate() {
                *dw.add((co + m) * k + k0 + n) += _mm512_reduce_add_ps(*v);
            }
        }
    }

    /// T tiles × MR channels: acc[m][t] = (y if `add`) + Σ_k w[m][k] · xs[tile t + offsets[k]],
    /// then the tiles' lanes stored into channel m's plane.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const T: usize>(
        xs: *const f32,
        wb: *const f32,
        offsets: &[usize],
        tiles: &[Tile],
        y: *mut f32,
        hw: usize,
        rows: usize,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; MR];
        if add {
            for (m, acc_m) in acc.iter_mut().enumerate().take(rows) {
                for t in 0..T {
                    let p = y.add(tiles[t].dst + m * hw);
                    acc_m[t] = _mm512_maskz_loadu_ps(tiles[t].mask, p);
                }
            }
        }
        let mut src = [xs; T];
        for t in 0..T {
            src[t] = xs.add(tiles[t].src);
        }
        let mut wk = wb;
        for &o in offsets {
            let mut v = [_mm512_setzero_ps(); T];
            for t in 0..T {
                v[t] = _mm512_loadu_ps(src[t].add(o));
            }
            for (m, acc_m) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*wk.add(m));
                for t in 0..T {
                    acc_m[t] = _mm512_fmadd_ps(a, v[t], acc_m[t]);
                }
            }
            wk = wk.add(MR);
        }
        for (m, acc_m) in acc.iter().enumerate().take(rows) {
            for t in 0..T {
                let tile = tiles[t];
                let p = y.add(tile.dst + m * hw);
                if tile.mask == u16::MAX {
                    _mm512_storeu_ps(p, acc_m[t]);
                } else {
                    _mm512_mask_storeu_ps(p, tile.mask, acc_m[t]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The obvious loop, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        cin: usize,
        cout: usize,
        kh: usize,
        kw: usize,
        h: usize,
        wd: usize,
    ) -> Vec<f64> {
        let (ph, pw) = ((kh - 1) / 2, (kw - 1) / 2);
        let mut y = vec![0.0f64; cout * h * wd];
        for co in 0..cout {
            for oh in 0..h {
                for ow in 0..wd {
                    let mut s = 0.0;
                    for ci in 0..cin {
                        for i in 0..kh {
                            for j in 0..kw {
                                let (ih, iw) = (oh + i, ow + j);
                                if ih < ph || iw < pw || ih - ph >= h || iw - pw >= wd {
                                    continue;
                                }
                                let xv = x[(ci * h + ih - ph) * wd + iw - pw] as f64;
                                s += xv * w[((co * cin + ci) * kh + i) * kw + j] as f64;
                            }
                        }
                    }
                    y[(co * h + oh) * wd + ow] = s;
                }
            }
        }
        y
    }

    #[test]
    fn direct_same_convolution_matches_a_plain_loop() {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512, the direct kernel cannot run here");
            return;
        }
        let mut rng = Rng::new(7);
        // (cin, cout, kh, kw, h, w): ResNet shapes, channel counts that leave a partial block of 8,
        // planes narrower than a vector, wider than one, and non-square kernels.
        let cases = [
            (16, 16, 3, 3, 32, 32),
            (3, 5, 3, 3, 7, 9),
            (20, 24, 3, 3, 16, 16),
            (9, 17, 3, 3, 8, 8),
            (32, 8, 3, 3, 4, 4),
            (4, 3, 5, 5, 11, 6),
            (2, 3, 5, 5, 3, 1),
            (2, 9, 1, 3, 5, 17),
            (1, 1, 3, 3, 1, 1),
            (6, 40, 3, 3, 2, 33),
            // More input channels than one pass takes (the later passes add to y).
            (40, 16, 3, 3, 8, 8),
        ];
        for &(cin, cout, kh, kw, h, wd) in &cases {
            // Three images in one call (the tiles of small planes are taken across images).
            let (nb, x_img, y_img) = (3, cin * h * wd, cout * h * wd);
            let x: Vec<f32> = (0..nb * x_img).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..cout * cin * kh * kw)
                .map(|_| rng.normal() as f32)
                .collect();
            let conv = SameConv::new(cout, cin, (kh, kw), (h, wd)).with_weights(&w);
            // NaN where nothing is written would show in the comparison.
            let mut y = vec![f32::NAN; nb * y_img];
            let mut scratch = Vec::new();
            conv.run(&x, &mut scratch, &mut y);
            // f32 sums of k products of unit normals: the error grows like sqrt(k)·eps·|terms|.
            let tol = 4e-5 * ((cin * kh * kw) as f64).sqrt();
            let case = (cin, cout, kh, kw, h, wd);
            for b in 0..nb {
                let want = reference(&x[b * x_img..][..x_img], &w, cin, cout, kh, kw, h, wd);
                for (i, (&got, &exp)) in y[b * y_img..][..y_img].iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - exp).abs() <= tol,
                        "case {case:?}: image {b} output {i}: {got} vs {exp}"
                    );
                }
            }
            // One image alone, through the scratch of three, gives the same values bit for bit.
            let mut y1 = vec![f32::NAN; y_img];
            conv.run(&x[x_img..2 * x_img], &mut scratch, &mut y1);
            assert_eq!(
                y1,
                y[y_img..2 * y_img],
                "case {case:?}: one image alone differs"
            );
        }
    }

    /// dw[co][ci][i][j] = Σ over images and outputs of dy · the input the tap reads, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference_weight_grad(
        x: &[f32],
        dy: &[f32],
        nb: usize,
        cin: usize,
        cout: usize,
        kh: usize,
        kw: usize,
        h: usize,
        wd: usize,
    ) -> Vec<f64> {
        let (ph, pw) = ((kh - 1) / 2, (kw - 1) / 2);
        let mut dw = vec![0.0f64; cout * cin * kh * kw];
        for b in 0..nb {
            for co in 0..cout {
                for ci in 0..cin {
                    for i in 0..kh {
                        for j in 0..kw {
                            let mut s = 0.0;
                            for oh in 0..h {
                                for ow in 0..wd {
                                    let (ih, iw) = (oh + i, ow + j);
                                    if ih < ph || iw < pw || ih - ph >= h || iw - pw >= wd {
                                        continue;
                                    }
                                    let xv = x[((b * cin + ci) * h + ih - ph) * wd + iw - pw];
                                    let g = dy[((b * cout + co) * h + oh) * wd + ow];
                                    s += xv as f64 * g as f64;
                                }
                            }
                            dw[((co * cin + ci) * kh + i) * kw + j] += s;
                        }
                    }
                }
            }
        }
        dw
    }

    #[test]
    fn direct_weight_gradient_matches_a_plain_loop_and_adds_to_dw() {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512, the direct kernel cannot run here");
            return;
        }
        let mut rng = Rng::new(11);
        // Blocks of 4 channels × 4 terms with and without remainders (7 channels; 27 and 45
        // terms), planes whose size is not a multiple of 16 (masked tails), several images per call.
        let cases = [
            (16, 16, 3, 3, 32, 32, 1),
            (3, 16, 3, 3, 8, 8, 4),
            (5, 7, 3, 3, 5, 7, 3),
            (20, 8, 3, 3, 4, 4, 6),
            (2, 3, 5, 5, 9, 6, 2),
        ];
        for &(cin, cout, kh, kw, h, wd, nb) in &cases {
            let x: Vec<f32> = (0..nb * cin * h * wd)
                .map(|_| rng.normal() as f32)
                .collect();
            let dy: Vec<f32> = (0..nb * cout * h * wd)
                .map(|_| rng.normal() as f32)
                .collect();
            let conv = SameConv::new(cout, cin, (kh, kw), (h, wd));
            let start: Vec<f32> = (0..cout * cin * kh * kw)
                .map(|_| rng.normal() as f32)
                .collect();
            let mut dw = start.clone();
            conv.weight_grad(&x, &dy, &mut Vec::new(), &mut dw);
            let want = reference_weight_grad(&x, &dy, nb, cin, cout, kh, kw, h, wd);
            let tol = 4e-5 * ((nb * h * wd) as f64).sqrt();
            for (i, ((&got, &exp), &s0)) in dw.iter().zip(&want).zip(&start).enumerate() {
                assert!(
                    (got as f64 - (exp + s0 as f64)).abs() <= tol,
                    "case {:?}: dw[{i}] = {got}, expected {} + {s0}",
                    (cin, cout, kh, kw, h, wd, nb),
                    exp
                );
            }
        }
    }
}
