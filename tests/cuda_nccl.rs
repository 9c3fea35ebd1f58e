//! NCCL on one GPU (cargo feature `nccl`; issue 16's single-GPU smoke test, run by
//! tools/gpu-check.sh): rank 0 of a group of one, through NCCL's own single-process init (the unique
//! id goes through `dist::Single`, no MPI), sums tensors and combines a parameter store's gradients
//! on the device as the ranked trainer does with several GPU ranks. Several ranks need several GPUs
//! (NCCL refuses two ranks on one device): that test waits for such a machine (docs/DISTRIBUTED.md).
//!
//! Without a GPU the tests are ignored, saying why; `--include-ignored` without a usable GPU or
//! without NCCL fails with the reason rather than passing having checked nothing.

use podgpu::dist::grads::BUCKET_VALUES;
use podgpu::dist::nccl::{DeviceGroup, Joined};
use podgpu::dist::Single;
use podgpu::{Device, ParamKind, ParamStore, Tensor};

/// Rank 0 of one on cuda:0.
fn group_of_one() -> DeviceGroup {
    if let Err(why) = podgpu::device::usable_gpu(0) {
        panic!("this test needs a CUDA device and none is usable: {why}");
    }
    match DeviceGroup::join(&Single, Device::Cuda(0)) {
        Ok(Joined::Group(g)) => g,
        Ok(Joined::Unavailable(why)) => panic!("NCCL is not usable here: {why}"),
        Err(e) => panic!("NCCL's init failed: {e}"),
    }
}

fn wave(n: usize, phase: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect()
}

#[test]
#[ignore = "needs a CUDA device and NCCL (tools/gpu-check.sh runs it on the GPU machine)"]
fn one_rank_all_reduce_returns_its_own_values() {
    let g = group_of_one();
    assert_eq!((g.rank(), g.size()), (0, 1));
    let v = wave(1000, 0.0);
    let mut t = Tensor::from_vec(&[10, 100], v.clone()).to_device(Device::Cuda(0));
    g.all_reduce_sum(&mut t).expect("all-reduce");
    assert_eq!(t.device(), Device::Cuda(0));
    assert_eq!(
        t.to_vec_f32(),
        v,
        "a sum over one rank is its own values, bit for bit"
    );
}

#[test]
#[ignore = "needs a CUDA device and NCCL (tools/gpu-check.sh runs it on the GPU machine)"]
fn one_rank_combines_its_share_of_the_global_batch_in_buckets() {
    let g = std::rc::Rc::new(group_of_one());
    // A tensor larger than a bucket (a bucket of its own), a small one, a trainable parameter
    // without a gradient (zeros are sent), a frozen one (untouched).
    let big = BUCKET_VALUES + 3;
    let mut ps = ParamStore::new();
    let shapes: [(&str, usize, ParamKind); 4] = [
        ("big", big, ParamKind::Trainable),
        ("small", 7, ParamKind::Trainable),
        ("no_grad", 5, ParamKind::Trainable),
        ("frozen", 6, ParamKind::Frozen),
    ];
    let ids: Vec<_> = shapes
        .iter()
        .map(|&(name, n, kind)| ps.add(name, Tensor::from_vec(&[n], vec![1f32; n]), kind))
        .collect();
    ps.to_device(Device::Cuda(0));
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(_, n, _))| wave(n, i as f32))
        .collect();
    for (k, &id) in ids.iter().enumerate() {
        if shapes[k].0 != "no_grad" {
            let t = Tensor::from_vec(&[shapes[k].1], grads[k].clone()).to_device(Device::Cuda(0));
            ps.get_mut(id).grad = Some(t);
        }
    }
    // This rank had 2 of the global batch's 8 images: its mean gradient counts a quarter (exact
    // in f32), the other ranks' shares being zero in a group of one.
    g.combine_gradients(&mut ps, 2, 8).expect("combine");
    for (k, &id) in ids.iter().enumerate() {
        let p = ps.get(id);
        let got = p
            .grad
            .as_ref()
            .expect("every trainable parameter has a gradient");
        assert_eq!(got.device(), Device::Cuda(0), "{}", shapes[k].0);
        let got = got.to_vec_f32();
        let want: Vec<f32> = match shapes[k].0 {
            "no_grad" => vec![0.0; shapes[k].1],
            "frozen" => grads[k].clone(),
            _ => grads[k].iter().map(|v| v * 0.25).collect(),
        };
        assert!(
            got == want,
            "{}: the combined gradient differs",
            shapes[k].0
        );
    }
}

/// The overlapped sums of a real backward pass (`Overlap`, as GPU ranks train): a small ResNet's
/// buckets go to NCCL while the backward pass runs, and after `finish` every gradient is the plain
/// backward pass's (one rank of 4 images: Σ = 4·g, then ÷ 4, exact in f32). The buckets are small
/// here (the whole network is one 6.5 M-value bucket otherwise), so several launch during the pass.
#[test]
#[ignore = "needs a CUDA device and NCCL (tools/gpu-check.sh runs it on the GPU machine)"]
fn one_rank_overlapped_sums_during_backward_give_the_plain_gradients() {
    use podgpu::autograd::Tape;
    use podgpu::nn::{HeadSpec, ModelSpec, Network, Stem};
    let g = std::rc::Rc::new(group_of_one());
    let spec = ModelSpec {
        arch: "resnet18".into(),
        width: 8,
        stem: Stem::Cifar,
        in_channels: 3,
        classes: 4,
        feature_dim: 16,
        head: HeadSpec::Linear,
        image_size: 8,
        drop_path: None,
    };
    let mut ps = ParamStore::new();
    let mut rng = podgpu::rng::Rng::new(9);
    let net = Network::new(spec, &mut ps, podgpu::DType::F32, &mut rng).expect("network");
    ps.to_device(Device::Cuda(0));
    let x: Vec<f32> = (0..4 * 3 * 8 * 8).map(|_| rng.normal() as f32).collect();
    let step = |ps: &mut ParamStore, overlap: Option<&mut podgpu::dist::nccl::Overlap>| {
        let mut t = Tape::train();
        let xv = t.constant(Tensor::from_vec(&[4, 3, 8, 8], x.clone()).to_device(Device::Cuda(0)));
        let out = net.forward(&mut t, ps, &xv);
        let labels = podgpu::loss::labels_tensor(&[0, 1, 2, 3], out.logits.value());
        let l = podgpu::loss::softmax_cross_entropy(&mut t, &out.logits, &labels);
        ps.zero_grad();
        match overlap {
            Some(o) => t.backward_then(&l, ps, &mut |ps, id| o.grad_ready(ps, id)),
            None => t.backward(&l, ps),
        }
    };
    podgpu::cuda::set_math_mode(podgpu::cuda::MathMode::Fp32);
    // Deterministic algorithms, chosen in a first step, so that two backward passes agree bit for
    // bit.
    podgpu::cpu::set_deterministic(true);
    step(&mut ps, None);
    step(&mut ps, None);
    let want: Vec<Option<Vec<f32>>> = ps
        .iter()
        .map(|p| p.grad.as_ref().map(|g| g.to_vec_f32()))
        .collect();
    let mut o = g.overlap_in_buckets(&ps, 4, 2_000);
    step(&mut ps, Some(&mut o));
    o.finish(&mut ps, 4).expect("finish");
    podgpu::cpu::set_deterministic(false);
    for (p, w) in ps.iter().zip(&want) {
        if p.kind != ParamKind::Trainable {
            continue;
        }
        let got = p.grad.as_ref().map(|g| g.to_vec_f32());
        assert_eq!(
            got.as_ref(),
            w.as_ref(),
            "{}: the overlapped sum differs",
            p.name
        );
    }
}

#[test]
fn a_cpu_rank_is_refused_nccl_with_the_reason() {
    match DeviceGroup::join(&Single, Device::Cpu) {
        Err(e) => assert!(e.contains("needs a GPU rank") && e.contains("cpu"), "{e}"),
        Ok(_) => panic!("a CPU rank joined NCCL"),
    }
}
