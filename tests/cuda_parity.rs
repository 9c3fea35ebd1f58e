//! CPU vs GPU for every op with a CUDA implementation, on random inputs (never zeros).
//!
//! This file checks the launchers (`podgpu::cuda::*`) against straightforward f64 host references
//! written here; the host references of NaC and SC are themselves checked against finite differences
//! on the CPU, so that part runs everywhere. `cuda_parity/ops.rs` checks every op through its public
//! API (`podgpu::ops`, `podgpu::loss`, `optim::Sgd`, the fidelity fixtures) against the same op on
//! the CPU, and `cuda_parity/resnet.rs` a small ResNet's training step and five SGD steps. The GPU
//! tests are `#[ignore = "needs a CUDA device…"]`, so a plain `cargo test` counts them as ignored, not
//! passed; `--include-ignored` (tools/gpu-check.sh) runs them, and without a usable GPU they fail.
//!
//! Tolerances (relative error ‖a−b‖/‖b‖): fp32 1e-4 (1e-5 for elementwise), tf32 5e-3; whole-network
//! gradients 2e-3 (fp32) and 5e-2 (tf32).

#[path = "cuda_parity/baselines.rs"]
mod baselines;
#[path = "cuda_parity/bf16.rs"]
mod bf16;
#[path = "cuda_parity/bn_train.rs"]
mod bn_train;
#[path = "cuda_parity/failures.rs"]
mod failures;
#[path = "cuda_parity/graph.rs"]
mod graph;
#[path = "cuda_parity/nhwc.rs"]
mod nhwc;
#[path = "cuda_parity/ops.rs"]
mod ops_parity;
#[path = "cuda_parity/resnet.rs"]
mod resnet;
#[path = "cuda_parity/trainer.rs"]
mod trainer;
#[path = "cuda_parity/transformer.rs"]
mod transformer;

use podgpu::cuda::dnn::{self, ConvGeom};
use podgpu::cuda::loss_kernels as lk;
use podgpu::cuda::nn_kernels::{self as nk, PoolGeom};
use podgpu::cuda::optim::{sgd_step, SgdParam};
use podgpu::cuda::{self, Gpu, MathMode};
use podgpu::loss::Variant;
use podgpu::rng::Rng;
use podgpu::tensor::rel_error;
use podgpu::{ops, Device, Tensor};
use std::sync::{Arc, Mutex};

/// The math mode is process-wide: tests that run GPU work take this lock.
static GPU_LOCK: Mutex<()> = Mutex::new(());

/// The GPU, for a test marked `#[ignore = "needs a CUDA device…"]`: such a test runs only when asked
/// for (`--include-ignored`, as tools/gpu-check.sh does), so without a usable GPU it fails rather
/// than pass having checked nothing. Every GPU test starts in fp32 math mode.
fn gpu() -> Arc<Gpu> {
    match podgpu::device::usable_gpu(0) {
        Ok(()) => {
            cuda::set_math_mode(MathMode::Fp32);
            Gpu::get(0).expect("usable GPU")
        }
        Err(why) => panic!("this test needs a CUDA device and none is usable: {why}"),
    }
}

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn host(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape, v.to_vec())
}

fn dev(shape: &[usize], v: &[f32]) -> Tensor {
    host(shape, v).to_device(Device::Cuda(0))
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[track_caller]
fn close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    assert!(!got.is_cuda() || got.device() == Device::Cuda(0));
    let g = got.to_vec_f64();
    assert_eq!(g.len(), want.len(), "{what}: length");
    let e = rel_error(&g, want);
    println!("{what:<40} rel error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

// ---------------------------------------------------------------------------------------------
// Host references (f64)
// ---------------------------------------------------------------------------------------------

fn nac_host(
    x: &[f64],
    p: &[f64],
    y: &[usize],
    n: usize,
    delta: f64,
    v: Variant,
) -> (f64, Vec<f64>) {
    let b = y.len();
    let mut loss = 0.0;
    let mut dx = vec![0.0; b * n];
    for r in 0..b {
        let xr = &x[r * n..(r + 1) * n];
        let pr = &p[y[r] * n..(y[r] + 1) * n];
        let nx = xr.iter().map(|a| a * a).sum::<f64>().sqrt();
        let dot: f64 = xr.iter().zip(pr).map(|(a, c)| a * c).sum();
        let (den, kx) = match v {
            Variant::Paper => (
                nx + delta,
                if nx > 0.0 {
                    dot / ((nx + delta).powi(2) * nx)
                } else {
                    0.0
                },
            ),
            Variant::Reference => {
                let d = (nx * nx + delta * delta).sqrt();
                (d, dot / d.powi(3))
            }
        };
        let c = dot / den;
        loss += (1.0 - c).powi(2) / b as f64;
        let g = -2.0 * (1.0 - c) / b as f64;
        for i in 0..n {
            dx[r * n + i] = g * (pr[i] / den - kx * xr[i]);
        }
    }
    (loss, dx)
}

/// SC loss straight from the definition: R = DᵀD/(B−1), L = Σ_{i≠j} R_ij² (÷(n−1) for the reference).
fn sc_loss_direct(x: &[f64], p: &[f64], y: &[usize], n: usize, v: Variant) -> f64 {
    let b = y.len();
    let d = sc_d(x, p, y, n).0;
    let mut l = 0.0;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let r: f64 =
                    (0..b).map(|k| d[k * n + i] * d[k * n + j]).sum::<f64>() / (b - 1) as f64;
                l += r * r;
            }
        }
    }
    match v {
        Variant::Paper => l,
        Variant::Reference => l / (n - 1) as f64,
    }
}

/// (D = x̃ − P_Y, x̃, ‖x‖ per row).
fn sc_d(x: &[f64], p: &[f64], y: &[usize], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let b = y.len();
    let (mut d, mut xt, mut norms) = (vec![0.0; b * n], vec![0.0; b * n], vec![0.0; b]);
    for r in 0..b {
        let nx = x[r * n..(r + 1) * n]
            .iter()
            .map(|a| a * a)
            .sum::<f64>()
            .sqrt();
        norms[r] = nx;
        for i in 0..n {
            xt[r * n + i] = x[r * n + i] / nx.max(1e-12);
            d[r * n + i] = xt[r * n + i] - p[y[r] * n + i];
        }
    }
    (d, xt, norms)
}

/// The analytic SC gradient (Gram form), the reference the GPU's dx is compared with.
fn sc_grad_host(x: &[f64], p: &[f64], y: &[usize], n: usize, v: Variant) -> Vec<f64> {
    let b = y.len();
    let (d, xt, norms) = sc_d(x, p, y, n);
    let mut norm = 1.0 / ((b - 1) as f64).powi(2);
    if v == Variant::Reference {
        norm /= (n - 1) as f64;
    }
    let s: Vec<f64> = (0..n)
        .map(|i| (0..b).map(|k| d[k * n + i].powi(2)).sum())
        .collect();
    let g: Vec<f64> = (0..b * b)
        .map(|ij| {
            (0..n)
                .map(|c| d[(ij / b) * n + c] * d[(ij % b) * n + c])
                .sum()
        })
        .collect();
    let mut dx = vec![0.0; b * n];
    for r in 0..b {
        let dd: Vec<f64> = (0..n)
            .map(|i| {
                let gd: f64 = (0..b).map(|k| g[r * b + k] * d[k * n + i]).sum();
                4.0 * norm * (gd - d[r * n + i] * s[i])
            })
            .collect();
        let yg: f64 = (0..n).map(|i| xt[r * n + i] * dd[i]).sum();
        for i in 0..n {
            dx[r * n + i] = (dd[i] - xt[r * n + i] * yg) / norms[r];
        }
    }
    dx
}

fn softmax_ce_host(z: &[f64], y: &[usize], k: usize) -> (f64, Vec<f64>) {
    let b = y.len();
    let mut loss = 0.0;
    let mut dz = vec![0.0; b * k];
    for r in 0..b {
        let zr = &z[r * k..(r + 1) * k];
        let m = zr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = zr.iter().map(|v| (v - m).exp()).sum();
        loss += (m + s.ln() - zr[y[r]]) / b as f64;
        for i in 0..k {
            dz[r * k + i] = ((zr[i] - m).exp() / s - if i == y[r] { 1.0 } else { 0.0 }) / b as f64;
        }
    }
    (loss, dz)
}

struct ConvRef {
    x: [usize; 4],
    w: [usize; 4],
    g: ConvGeom,
}

impl ConvRef {
    fn out(&self) -> [usize; 4] {
        let (oh, ow) = self.g.out_hw(self.x[2], self.x[3], self.w[2], self.w[3]);
        [self.x[0], self.w[0], oh, ow]
    }

    /// Calls f(x index, w index, y index) for every multiply of the convolution.
    fn each(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [n, c, h, wd] = self.x;
        let [k, cg, r, s] = self.w;
        let [_, _, oh, ow] = self.out();
        let kg = k / self.g.groups;
        for ni in 0..n {
            for ki in 0..k {
                let grp = ki / kg;
                for ci in 0..cg {
                    let cin = grp * cg + ci;
                    debug_assert!(cin < c);
                    for ri in 0..r {
                        for si in 0..s {
                            for ohi in 0..oh {
                                let ih = (ohi * self.g.stride[0] + ri * self.g.dilation[0])
                                    as isize
                                    - self.g.pad[0] as isize;
                                if ih < 0 || ih >= h as isize {
                                    continue;
                                }
                                for owi in 0..ow {
                                    let iw = (owi * self.g.stride[1] + si * self.g.dilation[1])
                                        as isize
                                        - self.g.pad[1] as isize;
                                    if iw < 0 || iw >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((ni * c + cin) * h + ih as usize) * wd + iw as usize;
                                    let wi = ((ki * cg + ci) * r + ri) * s + si;
                                    let yi = ((ni * k + ki) * oh + ohi) * ow + owi;
                                    f(xi, wi, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU-only: the host references agree with finite differences (runs without a GPU too).
// ---------------------------------------------------------------------------------------------

#[test]
fn host_references_match_finite_differences() {
    let mut rng = Rng::new(7);
    let (b, n, k) = (5, 6, 3);
    let x: Vec<f64> = (0..b * n).map(|_| rng.normal()).collect();
    let p: Vec<f64> = (0..k * n).map(|_| rng.normal() * 0.4).collect();
    let y: Vec<usize> = (0..b).map(|i| i % k).collect();
    let h = 1e-6;
    for v in [Variant::Paper, Variant::Reference] {
        let (_, dx) = nac_host(&x, &p, &y, n, 0.3, v);
        let dxs = sc_grad_host(&x, &p, &y, n, v);
        for i in [0, 7, 13, 29] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (nac_host(&xp, &p, &y, n, 0.3, v).0 - nac_host(&xm, &p, &y, n, 0.3, v).0)
                / (2.0 * h);
            assert!(
                (fd - dx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "NaC {v:?} dx[{i}]: fd {fd} vs {}",
                dx[i]
            );
            let fd =
                (sc_loss_direct(&xp, &p, &y, n, v) - sc_loss_direct(&xm, &p, &y, n, v)) / (2.0 * h);
            assert!(
                (fd - dxs[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "SC {v:?} dx[{i}]: fd {fd} vs {}",
                dxs[i]
            );
        }
    }
    let z: Vec<f64> = (0..b * k).map(|_| rng.normal() * 2.0).collect();
    let (_, dz) = softmax_ce_host(&z, &y, k);
    for i in [0, 4, 11] {
        let (mut zp, mut zm) = (z.clone(), z.clone());
        zp[i] += h;
        zm[i] -= h;
        let fd = (softmax_ce_host(&zp, &y, k).0 - softmax_ce_host(&zm, &y, k).0) / (2.0 * h);
        assert!(
            (fd - dz[i]).abs() < 1e-6,
            "CE dz[{i}]: fd {fd} vs {}",
            dz[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// GPU vs CPU
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn elementwise_and_linear_ops_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(1);
    let shape = [37, 41];
    let n = 37 * 41;
    // Spread over (−8, 8) so that both ReLU6 kinks are crossed.
    let a: Vec<f32> = randn(n, &mut rng).iter().map(|v| v * 4.0).collect();
    let b = randn(n, &mut rng);
    let (ha, hb, da, db) = (
        host(&shape, &a),
        host(&shape, &b),
        dev(&shape, &a),
        dev(&shape, &b),
    );
    let t = 1e-6;
    close(
        "add",
        &ops::add_fwd(&da, &db),
        &ops::add_fwd(&ha, &hb).to_vec_f64(),
        t,
    );
    close(
        "scale",
        &ops::scale_fwd(&da, -0.37),
        &ops::scale_fwd(&ha, -0.37).to_vec_f64(),
        t,
    );
    let (hy, dy) = (ops::relu_fwd(&ha), ops::relu_fwd(&da));
    close("relu", &dy, &hy.to_vec_f64(), t);
    close(
        "relu_bwd",
        &ops::relu_bwd(&dy, &db),
        &ops::relu_bwd(&hy, &hb).to_vec_f64(),
        t,
    );
    let (hy6, dy6) = (ops::relu6_fwd(&ha), ops::relu6_fwd(&da));
    close("relu6", &dy6, &hy6.to_vec_f64(), t);
    close(
        "relu6_bwd",
        &ops::relu6_bwd(&dy6, &db),
        &ops::relu6_bwd(&hy6, &hb).to_vec_f64(),
        t,
    );
    let bias = randn(41, &mut rng);
    close(
        "bias_add",
        &ops::bias_add_fwd(&da, &dev(&[41], &bias)),
        &ops::bias_add_fwd(&ha, &host(&[41], &bias)).to_vec_f64(),
        t,
    );
    close(
        "sum_rows",
        &ops::sum_rows_fwd(&db),
        &ops::sum_rows_fwd(&hb).to_vec_f64(),
        1e-5,
    );
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn matmul_matches_cpu_in_fp32_and_tf32() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(2);
    let (m, k, n) = (37, 53, 29);
    for (mode, tol) in [(MathMode::Fp32, 1e-5), (MathMode::Tf32, 5e-3)] {
        let _mode = cuda::math_mode_scope(mode);
        for ta in [false, true] {
            for tb in [false, true] {
                let ash = if ta { [k, m] } else { [m, k] };
                let bsh = if tb { [n, k] } else { [k, n] };
                let a = randn(m * k, &mut rng);
                let b = randn(k * n, &mut rng);
                let want = ops::matmul_fwd(&host(&ash, &a), ta, &host(&bsh, &b), tb).to_vec_f64();
                let got = ops::matmul_fwd(&dev(&ash, &a), ta, &dev(&bsh, &b), tb);
                assert_eq!(got.shape(), &[m, n]);
                close(
                    &format!("matmul {mode:?} ta={ta} tb={tb}"),
                    &got,
                    &want,
                    tol,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn pooling_concat_and_normalisation_match_host() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut rng = Rng::new(3);
    let xs = [2, 3, 9, 8];
    let nx: usize = xs.iter().product();
    let x = randn(nx, &mut rng);
    let dx_ = dev(&xs, &x);
    let g = PoolGeom {
        kernel: [3, 3],
        stride: [2, 2],
        pad: [1, 1],
    };
    let (oh, ow) = g.out_hw(9, 8);
    let ny = 2 * 3 * oh * ow;
    let gy = randn(ny, &mut rng);

    // Max pool: forward value and arg-max, backward by scattering into the arg-max.
    let (y, am) = nk::max_pool2d_fwd(&dx_, &g);
    let (mut want_y, mut want_dx) = (vec![0.0; ny], vec![0.0; nx]);
    for pl in 0..6 {
        for i in 0..oh {
            for j in 0..ow {
                let (mut best, mut bi) = (f64::NEG_INFINITY, 0);
                for a in 0..3 {
                    for b in 0..3 {
                        let (h, w) = ((i * 2 + a) as isize - 1, (j * 2 + b) as isize - 1);
                        if (0..9).contains(&h) && (0..8).contains(&w) {
                            let v = x[pl * 72 + h as usize * 8 + w as usize] as f64;
                            if v > best {
                                best = v;
                                bi = h as usize * 8 + w as usize;
                            }
                        }
                    }
                }
                let o = (pl * oh + i) * ow + j;
                want_y[o] = best;
                want_dx[pl * 72 + bi] += gy[o] as f64;
            }
        }
    }
    close("max_pool2d_fwd", &y, &want_y, 1e-7);
    close(
        "max_pool2d_bwd",
        &nk::max_pool2d_bwd(&dev(&[2, 3, oh, ow], &gy), &am, &xs, &g),
        &want_dx,
        1e-6,
    );

    // Average pool, both counting rules.
    for cip in [true, false] {
        let (mut want_y, mut want_dx) = (vec![0.0; ny], vec![0.0; nx]);
        for pl in 0..6 {
            for i in 0..oh {
                for j in 0..ow {
                    let mut cells = Vec::new();
                    let mut count = 0;
                    for a in 0..3 {
                        for b in 0..3 {
                            let (h, w) = ((i * 2 + a) as isize - 1, (j * 2 + b) as isize - 1);
                            // Inside the padded input (PyTorch's count_include_pad window).
                            if h < 10 && w < 9 {
                                count += 1;
                            }
                            if (0..9).contains(&h) && (0..8).contains(&w) {
                                cells.push(pl * 72 + h as usize * 8 + w as usize);
                            }
                        }
                    }
                    let div = if cip { count } else { cells.len() } as f64;
                    let o = (pl * oh + i) * ow + j;
                    want_y[o] = cells.iter().map(|&c| x[c] as f64).sum::<f64>() / div;
                    for &c in &cells {
                        want_dx[c] += gy[o] as f64 / div;
                    }
                }
            }
        }
        close(
            &format!("avg_pool2d_fwd cip={cip}"),
            &nk::avg_pool2d_fwd(&dx_, &g, cip),
            &want_y,
            1e-6,
        );
        let got = nk::avg_pool2d_bwd(&dev(&[2, 3, oh, ow], &gy), &xs, &g, cip);
        close(&format!("avg_pool2d_bwd cip={cip}"), &got, &want_dx, 1e-6);
    }

    // Global average pool.
    let want: Vec<f64> = (0..6)
        .map(|p| {
            x[p * 72..(p + 1) * 72]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / 72.0
        })
        .collect();
    close(
        "global_avg_pool_fwd",
        &nk::global_avg_pool_fwd(&dx_),
        &want,
        1e-6,
    );
    let gp = randn(6, &mut rng);
    let want: Vec<f64> = (0..nx).map(|i| gp[i / 72] as f64 / 72.0).collect();
    close(
        "global_avg_pool_bwd",
        &nk::global_avg_pool_bwd(&dev(&[2, 3], &gp), &xs),
        &want,
        1e-7,
    );

    // Channel concat and split round trip.
    let x2 = randn(2 * 5 * 72, &mut rng);
    let cat = nk::concat_channels(&[&dx_, &dev(&[2, 5, 9, 8], &x2)]);
    assert_eq!(cat.shape(), &[2, 8, 9, 8]);
    let mut want = Vec::new();
    for nn in 0..2 {
        want.extend(x[nn * 216..(nn + 1) * 216].iter().map(|&v| v as f64));
        want.extend(x2[nn * 360..(nn + 1) * 360].iter().map(|&v| v as f64));
    }
    close("concat_channels", &cat, &want, 0.0);
    let parts = nk::split_channels(&cat, &[3, 5]);
    close("split_channels[0]", &parts[0], &f64s(&x), 0.0);
    close("split_channels[1]", &parts[1], &f64s(&x2), 0.0);

    // Row L2-normalisation forward and backward, and the gather of rows by label.
    let (r, c) = (7, 33);
    let m = randn(r * c, &mut rng);
    let gm = randn(r * c, &mut rng);
    let (yn, norms) = nk::l2norm_rows_fwd(&dev(&[r, c], &m), 1e-12);
    let (mut want_y, mut want_dx, mut want_n) = (vec![0.0; r * c], vec![0.0; r * c], vec![0.0; r]);
    for i in 0..r {
        let row = &m[i * c..(i + 1) * c];
        let nrm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        want_n[i] = nrm;
        let yg: f64 = (0..c)
            .map(|j| row[j] as f64 / nrm * gm[i * c + j] as f64)
            .sum();
        for j in 0..c {
            want_y[i * c + j] = row[j] as f64 / nrm;
            want_dx[i * c + j] = (gm[i * c + j] as f64 - row[j] as f64 / nrm * yg) / nrm;
        }
    }
    close("l2norm_rows_fwd y", &yn, &want_y, 1e-6);
    close("l2norm_rows_fwd norms", &norms, &want_n, 1e-6);
    close(
        "l2norm_rows_bwd",
        &nk::l2norm_rows_bwd(&dev(&[r, c], &gm), &yn, &norms, 1e-12),
        &want_dx,
        1e-5,
    );
    let labels: Vec<i32> = vec![3, 0, 6, 6, 1];
    let gathered = nk::gather_rows(&dev(&[r, c], &m), &lk::labels_to_gpu(&gpu, &labels));
    let want: Vec<f64> = labels
        .iter()
        .flat_map(|&l| {
            m[l as usize * c..(l as usize + 1) * c]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    close("gather_rows", &gathered, &want, 0.0);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn loss_kernels_match_host_references() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut rng = Rng::new(4);
    // n > ROW_REGS·256 exercises the kernels' second loop; K ≠ n exercises the indexing.
    for (b, n, k) in [(16, 40, 10), (9, 4500, 7)] {
        let x = randn(b * n, &mut rng);
        let p = randn(k * n, &mut rng);
        let y: Vec<usize> = (0..b).map(|_| rng.below(k)).collect();
        let yl: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        let (xd, pd, ld) = (
            dev(&[b, n], &x),
            dev(&[k, n], &p),
            lk::labels_to_gpu(&gpu, &yl),
        );
        let (x64, p64) = (f64s(&x), f64s(&p));
        for v in [Variant::Paper, Variant::Reference] {
            let delta = 0.37;
            let out = lk::nac_fwd_bwd(&xd, &pd, &ld, delta, v.nac_form());
            let (loss, dx) = nac_host(&x64, &p64, &y, n, delta, v);
            close(&format!("nac loss {v:?} n={n}"), &out.loss, &[loss], 1e-5);
            close(&format!("nac dx {v:?} n={n}"), &out.dx, &dx, 1e-4);
            let norms: Vec<f64> = (0..b)
                .map(|r| {
                    x64[r * n..(r + 1) * n]
                        .iter()
                        .map(|a| a * a)
                        .sum::<f64>()
                        .sqrt()
                })
                .collect();
            close("nac norms", &out.norms, &norms, 1e-6);
            if n <= 64 {
                let sc = lk::sc_fwd_bwd(&xd, &pd, &ld, podgpu::loss::sc_coefficient(b, n, v));
                close(
                    &format!("sc loss {v:?}"),
                    &sc.loss,
                    &[sc_loss_direct(&x64, &p64, &y, n, v)],
                    1e-4,
                );
                close(
                    &format!("sc dx {v:?}"),
                    &sc.dx,
                    &sc_grad_host(&x64, &p64, &y, n, v),
                    1e-4,
                );
            }
        }
        // Softmax CE on logits of width n (as if n classes).
        let yk: Vec<usize> = (0..b).map(|_| rng.below(n)).collect();
        let ykl: Vec<i32> = yk.iter().map(|&v| v as i32).collect();
        let (loss, dz) = lk::softmax_ce_fwd_bwd(&xd, &lk::labels_to_gpu(&gpu, &ykl));
        let (wl, wdz) = softmax_ce_host(&x64, &yk, n);
        close(&format!("softmax_ce loss K={n}"), &loss, &[wl], 1e-5);
        close(&format!("softmax_ce dz K={n}"), &dz, &wdz, 1e-4);

        // Predictions and accuracy counting, both from logits and fused with the projection.
        let logits = ops::matmul_fwd(&xd, false, &pd, true);
        let lh = logits.to_vec_f64();
        let want_pred: Vec<i32> = (0..b)
            .map(|r| {
                let row = &lh[r * k..(r + 1) * k];
                (0..k).fold(0, |best, j| if row[j] > row[best] { j } else { best }) as i32
            })
            .collect();
        let correct = lk::accumulator(&gpu);
        let pred = lk::argmax_rows(&logits, Some(&ld), Some(&correct));
        assert_eq!(lk::ints_to_host(&pred), want_pred, "argmax_rows");
        // The fused kernel sums the dot products in its own order: compare with the f64 argmax
        // where the top two logits are clearly apart.
        let pred2 = lk::ints_to_host(&lk::pedcc_predict(&xd, &pd, Some(&ld), Some(&correct)));
        for r in 0..b {
            let mut l64: Vec<(f64, usize)> = (0..k)
                .map(|j| {
                    (
                        (0..n).map(|i| x64[r * n + i] * p64[j * n + i]).sum::<f64>(),
                        j,
                    )
                })
                .collect();
            l64.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            if l64[0].0 - l64[1].0 > 1e-3 * (1.0 + l64[0].0.abs()) {
                assert_eq!(pred2[r] as usize, l64[0].1, "pedcc_predict row {r}");
            }
        }
        let hits = |pred: &[i32]| pred.iter().zip(&yl).filter(|(a, b)| a == b).count() as i32;
        assert_eq!(
            lk::ints_to_host(&correct),
            vec![hits(&want_pred) + hits(&pred2)],
            "accuracy counter"
        );

        // Device-side running sums.
        let acc = lk::accumulator(&gpu);
        let rn = lk::row_norms(&xd);
        lk::sum_into(&acc, &rn, true);
        lk::sum_into(&acc, &rn, true);
        let total: f64 = 2.0
            * (0..b)
                .map(|r| {
                    x64[r * n..(r + 1) * n]
                        .iter()
                        .map(|a| a * a)
                        .sum::<f64>()
                        .sqrt()
                })
                .sum::<f64>();
        close("row_norms + sum_into", &acc, &[total], 1e-5);
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn sgd_step_matches_host_and_skips_frozen() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut rng = Rng::new(5);
    let sizes = [1000, 7, 70_000];
    let ps: Vec<Vec<f32>> = sizes.iter().map(|&n| randn(n, &mut rng)).collect();
    let gs: Vec<Vec<f32>> = sizes.iter().map(|&n| randn(n, &mut rng)).collect();
    let pd: Vec<Tensor> = ps.iter().map(|p| dev(&[p.len()], p)).collect();
    let gd: Vec<Tensor> = gs.iter().map(|g| dev(&[g.len()], g)).collect();
    let md: Vec<Tensor> = sizes
        .iter()
        .map(|&n| podgpu::cuda::tensor(&[n], gpu.alloc_zeros(n)))
        .collect();
    let (lr, mom, wd) = (0.1f32, 0.9f32, 5e-4f32);
    let frozen = [false, true, false];
    let table: Vec<SgdParam> = (0..3)
        .map(|i| SgdParam {
            param: &pd[i],
            grad: &gd[i],
            momentum: &md[i],
            weight_decay: wd,
            frozen: frozen[i],
        })
        .collect();
    sgd_step(&table, lr, mom);
    sgd_step(&table, lr, mom);
    for i in 0..3 {
        let (mut p, mut m) = (f64s(&ps[i]), vec![0.0; sizes[i]]);
        if !frozen[i] {
            for _ in 0..2 {
                for j in 0..sizes[i] {
                    let g = gs[i][j] as f64 + wd as f64 * p[j];
                    m[j] = mom as f64 * m[j] + g;
                    p[j] -= lr as f64 * m[j];
                }
            }
        }
        close(
            &format!("sgd param {i} (frozen={})", frozen[i]),
            &pd[i],
            &p,
            1e-6,
        );
        close(&format!("sgd momentum {i}"), &md[i], &m, 1e-6);
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn convolutions_match_host_in_fp32_and_tf32() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(6);
    let cases = [
        // ResNet 3×3, stride 1, pad 1.
        ConvRef {
            x: [2, 4, 8, 8],
            w: [6, 4, 3, 3],
            g: ConvGeom {
                stride: [1, 1],
                pad: [1, 1],
                dilation: [1, 1],
                groups: 1,
            },
        },
        // Strided 1×1 projection shortcut.
        ConvRef {
            x: [2, 4, 9, 9],
            w: [8, 4, 1, 1],
            g: ConvGeom {
                stride: [2, 2],
                pad: [0, 0],
                dilation: [1, 1],
                groups: 1,
            },
        },
        // Depthwise 3×3 stride 2 (MobileNetV2) and a grouped, dilated one.
        ConvRef {
            x: [2, 6, 9, 7],
            w: [6, 1, 3, 3],
            g: ConvGeom {
                stride: [2, 2],
                pad: [1, 1],
                dilation: [1, 1],
                groups: 6,
            },
        },
        ConvRef {
            x: [1, 4, 10, 10],
            w: [6, 2, 3, 3],
            g: ConvGeom {
                stride: [1, 1],
                pad: [2, 2],
                dilation: [2, 2],
                groups: 2,
            },
        },
    ];
    for (mode, tol) in [(MathMode::Fp32, 1e-4), (MathMode::Tf32, 5e-3)] {
        let _mode = cuda::math_mode_scope(mode);
        for (ci, c) in cases.iter().enumerate() {
            let ys = c.out();
            let (nx, nw, ny) = (
                c.x.iter().product(),
                c.w.iter().product(),
                ys.iter().product::<usize>(),
            );
            let (x, w, gy) = (
                randn(nx, &mut rng),
                randn(nw, &mut rng),
                randn(ny, &mut rng),
            );
            let (mut y, mut dx, mut dw) = (vec![0.0; ny], vec![0.0; nx], vec![0.0; nw]);
            c.each(|xi, wi, yi| {
                y[yi] += x[xi] as f64 * w[wi] as f64;
                dx[xi] += gy[yi] as f64 * w[wi] as f64;
                dw[wi] += gy[yi] as f64 * x[xi] as f64;
            });
            let (xd, wd, gd) = (dev(&c.x, &x), dev(&c.w, &w), dev(&ys, &gy));
            close(
                &format!("conv2d_fwd #{ci} {mode:?}"),
                &dnn::conv2d_fwd(&xd, &wd, &c.g),
                &y,
                tol,
            );
            close(
                &format!("conv2d_bwd_data #{ci} {mode:?}"),
                &dnn::conv2d_bwd_data(&gd, &wd, &c.x, &c.g),
                &dx,
                tol,
            );
            close(
                &format!("conv2d_bwd_filter #{ci} {mode:?}"),
                &dnn::conv2d_bwd_filter(&xd, &gd, &c.w, &c.g),
                &dw,
                tol,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn batch_norm_matches_host() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(8);
    let (n, c, hw) = (4, 3, 25);
    let shape = [n, c, 5, 5];
    let m = (n * hw) as f64;
    let x: Vec<f32> = randn(n * c * hw, &mut rng)
        .iter()
        .map(|v| v * 2.0 + 0.5)
        .collect();
    let (gamma, beta, gy) = (
        randn(c, &mut rng),
        randn(c, &mut rng),
        randn(n * c * hw, &mut rng),
    );
    let rm: Vec<f32> = randn(c, &mut rng);
    let rv: Vec<f32> = randn(c, &mut rng).iter().map(|v| v.abs() + 0.5).collect();
    let (eps, mom) = (1e-5, 0.1);
    let idx = |ni: usize, ci: usize, i: usize| (ni * c + ci) * hw + i;

    let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let (mut mean, mut invstd, mut nrm, mut nrv, mut dg, mut db, mut yinf) = (
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; x.len()],
    );
    for ci in 0..c {
        let vals: Vec<(usize, f64)> = (0..n)
            .flat_map(|ni| (0..hw).map(move |i| (ni, i)))
            .map(|(ni, i)| (idx(ni, ci, i), x[idx(ni, ci, i)] as f64))
            .collect();
        let mu = vals.iter().map(|v| v.1).sum::<f64>() / m;
        let var = vals.iter().map(|v| (v.1 - mu).powi(2)).sum::<f64>() / m;
        let is = 1.0 / (var + eps).sqrt();
        mean[ci] = mu;
        invstd[ci] = is;
        nrm[ci] = (1.0 - mom) * rm[ci] as f64 + mom * mu;
        nrv[ci] = (1.0 - mom) * rv[ci] as f64 + mom * var * m / (m - 1.0);
        let (g, bt) = (gamma[ci] as f64, beta[ci] as f64);
        let (mut sdy, mut sdyx) = (0.0, 0.0);
        for &(i, v) in &vals {
            let xh = (v - mu) * is;
            y[i] = xh * g + bt;
            yinf[i] = (v - rm[ci] as f64) / (rv[ci] as f64 + eps).sqrt() * g + bt;
            sdy += gy[i] as f64;
            sdyx += gy[i] as f64 * xh;
        }
        dg[ci] = sdyx;
        db[ci] = sdy;
        for &(i, v) in &vals {
            let xh = (v - mu) * is;
            dx[i] = g * is / m * (m * gy[i] as f64 - sdy - xh * sdyx);
        }
    }
    let xd = dev(&shape, &x);
    let (gd, bd) = (dev(&[c], &gamma), dev(&[c], &beta));
    let out = dnn::batch_norm_fwd_train(&xd, &gd, &bd, &dev(&[c], &rm), &dev(&[c], &rv), mom, eps);
    close("bn train y", &out.y, &y, 1e-5);
    close("bn save_mean", &out.save_mean, &mean, 1e-5);
    close("bn save_invstd", &out.save_invstd, &invstd, 1e-5);
    close("bn running_mean", &out.running_mean, &nrm, 1e-5);
    close("bn running_var", &out.running_var, &nrv, 1e-5);
    let (gx, gg, gb) = dnn::batch_norm_bwd(
        &xd,
        &dev(&shape, &gy),
        &gd,
        &out.save_mean,
        &out.save_invstd,
        eps,
    );
    close("bn bwd dx", &gx, &dx, 1e-4);
    close("bn bwd dgamma", &gg, &dg, 1e-5);
    close("bn bwd dbeta", &gb, &db, 1e-5);
    let yi = dnn::batch_norm_fwd_infer(&xd, &gd, &bd, &dev(&[c], &rm), &dev(&[c], &rv), eps);
    close("bn inference y", &yi, &yinf, 1e-5);
}

/// After a first step has filled the pool, an identical step allocates no device memory.
#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn steady_state_step_makes_no_device_allocations() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut rng = Rng::new(9);
    let x = randn(64 * 96, &mut rng);
    let w = randn(32 * 96, &mut rng);
    let step = || {
        let xd = dev(&[64, 96], &x);
        let wd = dev(&[32, 96], &w);
        let h = ops::relu_fwd(&ops::matmul_fwd(&xd, false, &wd, true));
        let g = ops::sum_rows_fwd(&ops::relu_bwd(&h, &h));
        let conv = dnn::conv2d_fwd(
            &xd.reshape(&[4, 16, 12, 8]),
            &wd.reshape(&[32, 16, 3, 2]),
            &ConvGeom {
                stride: [1, 1],
                pad: [1, 1],
                dilation: [1, 1],
                groups: 1,
            },
        );
        (g.to_vec_f32(), conv.to_vec_f32())
    };
    let first = step();
    let before = gpu.pool_stats();
    let second = step();
    let after = gpu.pool_stats();
    assert_eq!(first, second, "identical steps give identical results");
    assert_eq!(
        after.device_allocs, before.device_allocs,
        "steady state allocated: {before:?} -> {after:?}"
    );
    assert!(after.reuses > before.reuses);
    println!("pool after two steps: {after:?}");
}
