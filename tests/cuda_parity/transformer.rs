//! The transformer ops (issue 13) CPU vs GPU through their public API, forward and backward, on the
//! same random inputs; AdamW and the clipping factor; and a tiny ViT's and Swin's training step
//! (POD loss) compared gradient by gradient.

use super::{close, dev, gpu, host, randn, GPU_LOCK};
use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::loss::{self, PodConfig};
use podgpu::nn::{HeadSpec, ModelSpec, Network, Stem};
use podgpu::ops::{self, AttnSpec, RowIndex};
use podgpu::optim::{clip_grad_norm, AdamW};
use podgpu::pedcc::{self, Method};
use podgpu::rng::Rng;
use podgpu::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn pair(shape: &[usize], rng: &mut Rng) -> (Tensor, Tensor) {
    let v = randn(shape.iter().product(), rng);
    (host(shape, &v), dev(shape, &v))
}

#[track_caller]
fn same(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    assert!(
        gpu.is_cuda(),
        "{what}: the GPU result is on {}",
        gpu.device()
    );
    assert_eq!(gpu.shape(), cpu.shape(), "{what}: shapes");
    close(what, gpu, &cpu.to_vec_f64(), tol);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn gelu_layer_norm_softmax_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(41);
    let (xc, xg) = pair(&[3, 7, 300], &mut rng);
    let (dc, dg) = pair(&[3, 7, 300], &mut rng);
    same("gelu", &ops::gelu_fwd(&xg), &ops::gelu_fwd(&xc), 1e-5);
    same(
        "gelu_bwd",
        &ops::gelu_bwd(&xg, &dg),
        &ops::gelu_bwd(&xc, &dc),
        1e-5,
    );
    let (gc, gg) = pair(&[300], &mut rng);
    let (bc, bg) = pair(&[300], &mut rng);
    let (yc, mc, rc) = ops::layer_norm_fwd(&xc, &gc, &bc, 1e-6);
    let (yg, mg, rg) = ops::layer_norm_fwd(&xg, &gg, &bg, 1e-6);
    same("layer_norm y", &yg, &yc, 1e-5);
    same("layer_norm mean", &mg, &mc, 1e-5);
    same("layer_norm rstd", &rg, &rc, 1e-5);
    let (dxc, dgc, dbc) = ops::layer_norm_bwd(&xc, &dc, &gc, &mc, &rc);
    let (dxg, dgg, dbg) = ops::layer_norm_bwd(&xg, &dg, &gg, &mg, &rg);
    same("layer_norm dx", &dxg, &dxc, 1e-4);
    same("layer_norm dgamma", &dgg, &dgc, 1e-4);
    same("layer_norm dbeta", &dbg, &dbc, 1e-4);
    let sc = ops::softmax_fwd(&xc);
    let sg = ops::softmax_fwd(&xg);
    same("softmax", &sg, &sc, 1e-5);
    same(
        "softmax_bwd",
        &ops::softmax_bwd(&sg, &dg),
        &ops::softmax_bwd(&sc, &dc),
        1e-4,
    );
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn batched_matmul_and_attention_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(42);
    let (ac, ag) = pair(&[5, 7, 9], &mut rng);
    let (bc, bg) = pair(&[5, 9, 4], &mut rng);
    let (tc, tg) = pair(&[5, 4, 9], &mut rng);
    same(
        "bmm nn",
        &ops::bmm_fwd(&ag, false, &bg, false),
        &ops::bmm_fwd(&ac, false, &bc, false),
        1e-5,
    );
    same(
        "bmm tt",
        &ops::bmm_fwd(&bg, true, &tg, true),
        &ops::bmm_fwd(&bc, true, &tc, true),
        1e-5,
    );
    same(
        "bmm nt",
        &ops::bmm_fwd(&ag, false, &tg, true),
        &ops::bmm_fwd(&ac, false, &tc, true),
        1e-5,
    );
    // Swin-like: 2 heads × 3 windows × 2 images, 16 tokens of 8; bias and mask.
    let (heads, windows, n, d) = (2, 3, 16, 8);
    let g = heads * windows * 2;
    let (qc, qg) = pair(&[3, g, n, d], &mut rng);
    let (bc, bg) = pair(&[heads, n, n], &mut rng);
    let mask: Vec<f32> = (0..windows * n * n)
        .map(|i| if i % 7 == 0 { -100.0 } else { 0.0 })
        .collect();
    let (mc, mg) = (host(&[windows, n, n], &mask), dev(&[windows, n, n], &mask));
    let spec = AttnSpec {
        heads,
        windows,
        scale: (d as f64).powf(-0.5),
    };
    let (oc, pc) = ops::attention_fwd(&qc, Some(&bc), Some(&mc), spec);
    let (og, pg) = ops::attention_fwd(&qg, Some(&bg), Some(&mg), spec);
    same("attention out", &og, &oc, 1e-5);
    same("attention probs", &pg, &pc, 1e-5);
    let (doc, dog) = pair(&[g, n, d], &mut rng);
    let (dqc, dbc) = ops::attention_bwd(&qc, &pc, &doc, spec, true);
    let (dqg, dbg) = ops::attention_bwd(&qg, &pg, &dog, spec, true);
    same("attention dqkv", &dqg, &dqc, 1e-4);
    same("attention dbias", &dbg.unwrap(), &dbc.unwrap(), 1e-4);
    // ViT-like: no bias, no mask.
    let spec = AttnSpec {
        heads: 3,
        windows: 1,
        scale: 0.3,
    };
    let (qc, qg) = pair(&[3, 6, 5, 4], &mut rng);
    let (oc, _) = ops::attention_fwd(&qc, None, None, spec);
    let (og, _) = ops::attention_fwd(&qg, None, None, spec);
    same("attention (no bias)", &og, &oc, 1e-5);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn layout_ops_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(43);
    let (xc, xg) = pair(&[2, 4, 6, 3, 5], &mut rng);
    for dims in [
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
        [0, 2, 1, 3, 4],
        [2, 0, 3, 1, 4],
    ] {
        let what = format!("permute {dims:?}");
        same(
            &what,
            &ops::permute_fwd(&xg, &dims),
            &ops::permute_fwd(&xc, &dims),
            0.0,
        );
    }
    same(
        "narrow",
        &ops::narrow_fwd(&xg, 2, 1, 3),
        &ops::narrow_fwd(&xc, 2, 1, 3),
        0.0,
    );
    let (dc, dg) = pair(&[2, 4, 3, 3, 5], &mut rng);
    same(
        "narrow_bwd",
        &ops::narrow_bwd(&dg, &[2, 4, 6, 3, 5], 2, 2),
        &ops::narrow_bwd(&dc, &[2, 4, 6, 3, 5], 2, 2),
        0.0,
    );
    let (rc, rg) = pair(&[2, 6, 6, 3], &mut rng);
    for (sh, sw) in [(-3, -3), (3, 3), (1, -2)] {
        same(
            "roll2d",
            &ops::roll2d_fwd(&rg, sh, sw),
            &ops::roll2d_fwd(&rc, sh, sw),
            0.0,
        );
    }
    let idx = RowIndex::new(9, (0..40).map(|i| (i * 7) % 9).collect());
    let (tc, tg) = pair(&[9, 3], &mut rng);
    same(
        "gather_rows",
        &ops::gather_rows_fwd(&tg, &idx),
        &ops::gather_rows_fwd(&tc, &idx),
        0.0,
    );
    let (gc, gg) = pair(&[40, 3], &mut rng);
    same(
        "scatter_rows",
        &ops::scatter_rows_fwd(&gg, &idx),
        &ops::scatter_rows_fwd(&gc, &idx),
        1e-6,
    );
    let s = vec![0.0f32, 2.0, 1.0, 0.5];
    let (sc, sg) = (host(&[4], &s), dev(&[4], &s));
    let (yc, yg) = pair(&[4, 10], &mut rng);
    same(
        "scale_rows",
        &ops::scale_rows_fwd(&yg, &sg),
        &ops::scale_rows_fwd(&yc, &sc),
        0.0,
    );
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn adamw_and_clipping_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    let mut rng = Rng::new(44);
    let mut stores = [ParamStore::new(), ParamStore::new()];
    let (w, wg) = pair(&[30, 20], &mut rng);
    let (b, bg) = pair(&[30], &mut rng);
    stores[0].add("fc.weight", w, ParamKind::Trainable);
    stores[0].add("fc.bias", b, ParamKind::Trainable);
    stores[1].add("fc.weight", wg, ParamKind::Trainable);
    stores[1].add("fc.bias", bg, ParamKind::Trainable);
    let mut opts = [
        AdamW::new(0.9, 0.999, 1e-8, 0.05).unwrap(),
        AdamW::new(0.9, 0.999, 1e-8, 0.05).unwrap(),
    ];
    for o in &mut opts {
        o.no_decay.insert("fc.bias".into());
    }
    for _ in 0..3 {
        let (gw, gwg) = pair(&[30, 20], &mut rng);
        let (gb, gbg) = pair(&[30], &mut rng);
        for (i, (a, c)) in [(gw, gb), (gwg, gbg)].into_iter().enumerate() {
            let ps = &mut stores[i];
            let ids: Vec<_> = ps.ids().collect();
            ps.get_mut(ids[0]).grad = Some(ops::scale_fwd(&a, 10.0));
            ps.get_mut(ids[1]).grad = Some(c);
            clip_grad_norm(ps, 1.0);
            opts[i].step_unless(ps, 1e-2, None);
        }
    }
    for id in stores[0].ids().collect::<Vec<_>>() {
        let name = stores[0].get(id).name.clone();
        same(
            &format!("adamw {name}"),
            stores[1].value(id),
            stores[0].value(id),
            1e-5,
        );
    }
}

/// One training step of a tiny network, CPU vs GPU: loss and every gradient.
fn step_parity(arch: &str, image: usize) {
    let (classes, dim, batch) = (5, 16, 6);
    let p = pedcc::generate(classes, dim, 5, Method::Simplex)
        .unwrap()
        .to_tensor();
    let spec = ModelSpec {
        arch: arch.into(),
        width: 64,
        stem: Stem::Cifar,
        in_channels: 3,
        classes,
        feature_dim: dim,
        head: HeadSpec::Pedcc(p.clone()),
        image_size: image,
        drop_path: Some(0.0),
    };
    let mut rng = Rng::new(45);
    let images = randn(batch * 3 * image * image, &mut rng);
    let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
    let mut grads = Vec::new();
    for device in [Device::Cpu, GPU] {
        let mut ps = ParamStore::new();
        let net = Network::new(spec.clone(), &mut ps, DType::F32, &mut Rng::new(46)).unwrap();
        ps.to_device(device);
        let mut tape = Tape::train();
        let x = tape.constant(host(&[batch, 3, image, image], &images).to_device(device));
        let out = net.forward(&mut tape, &mut ps, &x);
        let lt = loss::labels_tensor(&labels, out.features.value());
        let l = loss::pod(
            &mut tape,
            &out.features,
            &p.to_device(device),
            &lt,
            0.3,
            &PodConfig::default(),
        )
        .loss;
        tape.backward(&l, &mut ps);
        let mut g: Vec<(String, Tensor)> = vec![("loss".into(), l.value().clone())];
        for q in ps.iter() {
            if let Some(gr) = &q.grad {
                g.push((q.name.clone(), gr.clone()));
            }
        }
        grads.push(g);
    }
    assert_eq!(grads[0].len(), grads[1].len());
    for ((name, c), (_, gp)) in grads[0].iter().zip(&grads[1]) {
        same(&format!("{arch} {name}"), gp, c, 2e-3);
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn tiny_vit_and_swin_steps_match_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _gpu = gpu();
    step_parity("vit(patch=4,dim=16,depth=2,heads=2,mlp_ratio=2)", 16);
    step_parity(
        "swin(patch=2,window=4,dim=8,depths=2-2,heads=2-2,mlp_ratio=2)",
        16,
    );
}
