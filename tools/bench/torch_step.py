#!/usr/bin/env python3
"""Times PyTorch training steps of the same model, batch, loss and optimizer as podgpu's `bench-step`:
the reference ResNet layout (tools/reference_resnet.py) with the frozen PEDCC head, the POD loss (paper
variant, lambda 1, delta = alpha * M0 = 5e-4, written as in tools/make_fixtures.py), SGD lr 0.1 momentum
0.9 weight decay 5e-4, synthetic normal images uploaded from the host every step.

Modes (--mode):
    eager-fp32         eager, true fp32 (cuDNN/cuBLAS TF32 switched off)   ~ podgpu fp32
    eager-tf32         eager, TF32 convolutions and matmuls                  ~ podgpu tf32
    amp-bf16-cl        eager, autocast bf16 + channels_last, FC1 output f32 (CUDA) ~ podgpu bf16
    compile-bf16-cl    torch.compile of amp-bf16-cl (CUDA; compile time reported apart)
    compile-fp32       torch.compile, true fp32
On the CPU only eager-fp32 (and compile-fp32, which needs a C++ compiler) make sense.

Prints one JSON line {"bench": "torch-step", ...} at the end (and a human line before it).

    python tools/bench/torch_step.py --device cpu --threads 2 --model resnet18 --width 16 --batch 32
    python tools/bench/torch_step.py --device cuda --model resnet50 --batch 128 --mode amp-bf16-cl
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference_resnet import ResNet  # noqa: E402

MODES = ["eager-fp32", "eager-tf32", "amp-bf16-cl", "compile-bf16-cl", "compile-fp32"]
DELTA = 0.01 * 0.05  # the paper's first-epoch delta: alpha * M0


# --------------------------------------------------------------------------------------------------
# The POD loss, as tools/make_fixtures.py writes it (paper variant).


def nac_loss(x, p_y, delta):
    a = (x * p_y).sum(dim=1)
    q = x.norm(dim=1) + delta
    return ((1.0 - a / q) ** 2).mean()


def sc_loss(x, p_y):
    b = x.shape[0]
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = xn - p_y
    r = d.T @ d / (b - 1)
    return (r ** 2).sum() - (torch.diagonal(r) ** 2).sum()


def pod_loss(x, pedcc, labels, delta=DELTA, lam=1.0):
    p_y = pedcc[labels]
    return nac_loss(x, p_y, delta) + lam * sc_loss(x, p_y)


def make_pedcc(k, n, seed):
    """K unit rows with pairwise inner product -1/(K-1) (a rotated regular simplex), as podgpu's."""
    gen = torch.Generator().manual_seed(seed)
    e = (torch.eye(k, dtype=torch.float64) - 1.0 / k) * (k / (k - 1)) ** 0.5
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    return (e @ q.T).to(torch.float32)


def recommended_dim(classes):
    return 256 if classes <= 30 else 512 if classes <= 200 else 1 << (2 * classes - 1).bit_length()


class F32OutLinear(torch.nn.Module):
    """FC1 as podgpu's bf16 path computes it (issue 12): bf16 inputs, f32 accumulation, f32 output.

    Under autocast nn.Linear returns bf16; podgpu keeps FC1's output (the latent features the POD loss
    reads) in f32, so the amp rows wrap FC1 in this to compare like with like.
    """

    def __init__(self, fc):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            bf = torch.bfloat16
            bias = self.fc.bias
            return F.linear(x.to(bf).float(), self.fc.weight.to(bf).float(), bias)


# --------------------------------------------------------------------------------------------------


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--mode", default="eager-fp32", choices=MODES)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--feature-dim", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    amp = args.mode in ("amp-bf16-cl", "compile-bf16-cl")
    channels_last = amp
    compiled = args.mode.startswith("compile")
    tf32 = args.mode == "eager-tf32"
    # True fp32 unless TF32 is asked for (PyTorch's default lets cuDNN use TF32 for convolutions).
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True

    torch.manual_seed(args.seed)
    n = args.feature_dim or recommended_dim(args.classes)
    pedcc = make_pedcc(args.classes, n, args.seed)
    model = ResNet(args.model, args.classes, n, width=args.width, centroids=pedcc).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if amp:
        model.fc = F32OutLinear(model.fc)
    pedcc_dev = pedcc.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.image, args.image)
    labels = torch.arange(args.batch) % args.classes
    fwd = torch.compile(model) if compiled else model

    def step():
        x = images.to(device)
        y = labels.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            _, feats = fwd(x)
        loss = pod_loss(feats.float(), pedcc_dev, y)
        loss.backward()
        opt.step()
        return loss

    # The first step compiles (torch.compile) and picks cuDNN algorithms (benchmark mode).
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step()
    cpu_times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        events[0].record()
        for i in range(args.steps):
            loss = step()
            events[i + 1].record()
        torch.cuda.synchronize()
        times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(args.steps)]
    else:
        times = []
        for _ in range(args.steps):
            t, c = time.perf_counter(), time.process_time()
            loss = step()
            times.append(time.perf_counter() - t)
            # CPU seconds of the whole process (all threads) for this step: what the step costs
            # whatever else runs on a shared machine (tools/bench/cpu_time.py).
            cpu_times.append(time.process_time() - c)
    med = statistics.median(times)
    result = {
        "bench": "torch-step",
        "mode": args.mode,
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "width": args.width,
        "image": args.image,
        "classes": args.classes,
        "feature_dim": n,
        "steps": args.steps,
        "warmup": args.warmup,
        "ms_per_step": med * 1e3,
        "images_per_s": args.batch / med,
        "images_per_s_total": args.batch * len(times) / sum(times),
        "first_step_s": first_s,
        "peak_mem_bytes": peak_memory(device),
        "final_loss": float(loss.detach()),
        "torch": torch.__version__,
        "time": {"median_s": med, "min_s": min(times), "max_s": max(times), "samples": len(times)},
        "step_times_s": times,
    }
    if cpu_times:
        result["cpu_s_per_step"] = statistics.median(cpu_times)
        result["step_cpu_s"] = cpu_times
    print(
        f"torch {args.mode} {args.model} batch {args.batch} on {device}: {med * 1e3:.2f} ms/step, "
        f"{args.batch / med:.1f} images/s (first step {first_s:.1f} s)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
