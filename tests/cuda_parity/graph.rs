//! A training step captured as a CUDA graph (`cuda::graph::StepGraph`) against the same steps run
//! eagerly: replays must update the model exactly as eager steps do (bit for bit in deterministic
//! mode), allocate nothing and never wait for the host; a step that cannot be captured must fail
//! with a message and leave the GPU usable.

use super::resnet::{batch, network, DELTA};
use super::{gpu, GPU_LOCK};
use podgpu::autograd::{ParamStore, Tape};
use podgpu::cuda::graph::{addresses, StepGraph};
use podgpu::loss::{self, PodConfig, ScForm, Variant};
use podgpu::nn::Network;
use podgpu::optim::Sgd;
use podgpu::{Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// Forward, POD loss, backward and SGD on inputs already on the GPU; returns the loss tensor.
fn step(net: &Network, ps: &mut ParamStore, sgd: &mut Sgd, x: &Tensor, y: &Tensor) -> Tensor {
    let mut t = Tape::train();
    let xv = t.constant(x.clone());
    let out = net.forward(&mut t, ps, &xv);
    let p = net.centroids(ps).expect("PEDCC head");
    let cfg = PodConfig {
        variant: Variant::Paper,
        lambda: 1.0,
        sc_form: ScForm::Auto,
    };
    let pod = loss::pod(&mut t, &out.features, &p, y, DELTA, &cfg);
    t.backward(&pod.loss, ps);
    let l = pod.loss.value().clone();
    drop(t);
    sgd.step(ps, 0.05);
    ps.zero_grad();
    l
}

/// Every parameter and buffer (running statistics, batch counts) as bits.
fn bits(ps: &ParamStore) -> Vec<(String, Vec<u32>)> {
    ps.iter()
        .map(|p| {
            let v = p.value.to_vec_f32().iter().map(|v| v.to_bits()).collect();
            (p.name.clone(), v)
        })
        .collect()
}

struct Deterministic;
impl Drop for Deterministic {
    fn drop(&mut self) {
        podgpu::cpu::set_deterministic(false);
    }
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn graph_replays_update_the_model_exactly_as_eager_steps() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let _d = Deterministic;
    podgpu::cpu::set_deterministic(true);
    let (images, labels) = batch();
    let x = images.to_device(GPU);
    let y = loss::labels_tensor(&labels, &x);
    const STEPS: usize = 6;

    let (net, mut ps) = network();
    ps.to_device(GPU);
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    let eager: Vec<f64> = (0..STEPS)
        .map(|_| step(&net, &mut ps, &mut sgd, &x, &y).item())
        .collect();
    let want = bits(&ps);

    let (net, mut ps) = network();
    ps.to_device(GPU);
    let mut sgd = Sgd::new(0.9, 5e-4, false).unwrap();
    for _ in 0..2 {
        step(&net, &mut ps, &mut sgd, &x, &y);
    }
    let state = |ps: &ParamStore, sgd: &Sgd| {
        addresses(
            ps.iter()
                .map(|p| &p.value)
                .chain(sgd.state().momentum.values()),
        )
    };
    let before = state(&ps, &sgd);
    let (graph, loss_t) =
        StepGraph::capture(&gpu, || step(&net, &mut ps, &mut sgd, &x, &y)).expect("capture");
    assert_eq!(state(&ps, &sgd), before, "the capture moved model state");
    let (allocs, waits) = (gpu.pool_stats().device_allocs, gpu.host_waits());
    let mut replayed = Vec::new();
    for _ in 2..STEPS {
        graph.replay().expect("replay");
        // Reading the loss waits; counted apart from the replays themselves.
        replayed.push(loss_t.item());
    }
    assert_eq!(gpu.pool_stats().device_allocs, allocs, "a replay allocated");
    assert_eq!(
        gpu.host_waits() - waits,
        (STEPS - 2) as u64,
        "replays waited for the host beyond the loss reads"
    );
    println!("eager losses {eager:?}\nreplayed (steps 3..) {replayed:?}");
    assert_eq!(&eager[2..], &replayed[..], "losses of the replayed steps");
    let got = bits(&ps);
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert!(
            w == g,
            "{name} differs after {STEPS} steps (eager vs graph)"
        );
    }
    drop(graph);
    assert_eq!(gpu.pool_stats().bytes_reserved_for_graphs, 0);
}

#[test]
#[ignore = "needs a CUDA device: tools/gpu-check.sh runs it (--include-ignored)"]
fn a_step_that_uploads_or_reads_back_is_refused_and_the_gpu_stays_usable() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let a = Tensor::from_vec(&[4], vec![1f32, 2., 3., 4.]).to_device(GPU);
    let upload = StepGraph::capture(&gpu, || {
        Tensor::from_vec(&[2], vec![5f32, 6.]).to_device(GPU)
    });
    let e = upload.err().expect("an upload inside a capture is refused");
    assert!(e.contains("copies host data"), "{e}");
    let read = StepGraph::capture(&gpu, || podgpu::ops::relu_fwd(&a).to_vec_f32());
    let e = read.err().expect("a read-back inside a capture is refused");
    assert!(e.contains("reads a GPU buffer"), "{e}");
    assert!(!gpu.is_capturing());
    assert_eq!(gpu.pool_stats().bytes_reserved_for_graphs, 0);
    // Eager work goes on as before.
    let b = podgpu::ops::relu_fwd(&a);
    assert_eq!(b.to_vec_f32(), vec![1., 2., 3., 4.]);
}
