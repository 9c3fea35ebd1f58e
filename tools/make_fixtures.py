#!/usr/bin/env python3
"""Writes reference fixtures for `podgpu fidelity`: plain PyTorch computations of the POD loss (both
variants) and softmax cross-entropy, with their inputs, expected loss and expected gradients, as
safetensors files whose metadata says what was computed. The schema is in docs/FIXTURES.md.

Inputs are stored as float32 (exactly what podgpu reads); the expected values are computed from those
same float32 values in float64, so they are the exact answer up to float64 rounding.

Usage (from the repository root, with PyTorch and safetensors installed):

    python tools/make_fixtures.py                      # the committed set, into tests/fixtures/
    python tools/make_fixtures.py --out /tmp/fx --seed 7 --pod 128,512,100 --pod 33,7,4 --softmax 64,10

The losses follow the paper's equations (variant=paper) or the public reference code's form
(variant=reference, github.com/TianYuZu/POD-Loss), written here from DESIGN.md §1.3-1.6.
"""

import argparse
import os

import torch
from safetensors.torch import save_file

FORMAT = "podgpu-fixture"
VERSION = "1"

# --------------------------------------------------------------------------------------------------
# The losses, exactly as DESIGN.md §1 writes them.


def nac_loss(x, p_y, delta, variant):
    """NaC: mean_b (1 - <x_b, p_yb> / q_b)^2 with q = |x| + delta (paper) or sqrt(|x|^2 + delta^2)
    (reference code: delta appended to x as an extra coordinate)."""
    a = (x * p_y).sum(dim=1)
    if variant == "paper":
        q = x.norm(dim=1) + delta
    else:
        extra = torch.full((x.shape[0], 1), float(delta), dtype=x.dtype)
        q = torch.cat((x, extra), dim=1).norm(dim=1)
    return ((1.0 - a / q) ** 2).mean()


def sc_loss(x, p_y, variant):
    """SC: sum_{i != j} R_ij^2 with R = D^T D / (B-1), D = normalise(x) - P_Y; the reference code
    divides by n-1 as well."""
    b, n = x.shape
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = xn - p_y
    r = d.T @ d / (b - 1)
    loss = (r ** 2).sum() - (torch.diagonal(r) ** 2).sum()
    if variant == "reference":
        loss = loss / (n - 1)
    return loss


def pod_parts(x, pedcc, labels, delta, lam, variant):
    p_y = pedcc[labels]
    nac = nac_loss(x, p_y, delta, variant)
    sc = sc_loss(x, p_y, variant)
    return nac + lam * sc, nac, sc


# --------------------------------------------------------------------------------------------------
# Inputs.


def make_pedcc(k, n, gen):
    """K unit rows with pairwise inner product -1/(K-1) when K <= n (centred identity, mapped by a
    random orthonormal n x K frame); random unit rows otherwise (the loss does not need a PEDCC)."""
    if k <= n:
        e = (torch.eye(k, dtype=torch.float64) - 1.0 / k) * (k / (k - 1)) ** 0.5
        q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
        return e @ q.T
    p = torch.randn(k, n, dtype=torch.float64, generator=gen)
    return p / p.norm(dim=1, keepdim=True)


def features_near_centroids(pedcc, labels, gen):
    """x_b = r_b (p_yb + 0.7 noise) with norms r_b in [0.5, 3]: realistic, far from trivial values."""
    b, n = labels.shape[0], pedcc.shape[1]
    r = 0.5 + 2.5 * torch.rand(b, 1, dtype=torch.float64, generator=gen)
    noise = torch.randn(b, n, dtype=torch.float64, generator=gen)
    return r * (pedcc[labels] + 0.7 * noise)


def as_f32_then_f64(t):
    """The float32 value podgpu will read, and the same value in float64 for the reference."""
    t32 = t.to(torch.float32).contiguous()
    return t32, t32.to(torch.float64)


def meta_of(kind, seed, **kw):
    m = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "seed": str(seed),
        "generator": f"tools/make_fixtures.py (torch {torch.__version__})",
        "expected_dtype": "float64",
    }
    m.update({k: str(v) for k, v in kw.items()})
    return m


# --------------------------------------------------------------------------------------------------
# Fixtures.


def pod_fixture(path, b, n, k, variant, delta, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    pedcc32, pedcc = as_f32_then_f64(make_pedcc(k, n, gen))
    labels = torch.randint(0, k, (b,), generator=gen, dtype=torch.int64)
    x32, x = as_f32_then_f64(features_near_centroids(pedcc, labels, gen))
    x.requires_grad_(True)
    loss, nac, sc = pod_parts(x, pedcc, labels, delta, lam, variant)
    loss.backward()
    tensors = {
        "input.x": x32,
        "input.labels": labels,
        "input.pedcc": pedcc32,
        "expected.loss": loss.detach(),
        "expected.nac": nac.detach(),
        "expected.sc": sc.detach(),
        "expected.grad.x": x.grad.detach(),
    }
    meta = meta_of(
        "pod_loss", seed, variant=variant, **{"lambda": lam}, delta=delta, classes=k,
        feature_dim=n, batch=b,
    )
    save_file(tensors, path, metadata=meta)


def softmax_fixture(path, b, k, seed):
    gen = torch.Generator().manual_seed(seed)
    z32, z = as_f32_then_f64(3.0 * torch.randn(b, k, dtype=torch.float64, generator=gen))
    labels = torch.randint(0, k, (b,), generator=gen, dtype=torch.int64)
    z.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z, labels)  # mean over the batch
    loss.backward()
    tensors = {
        "input.logits": z32,
        "input.labels": labels,
        "expected.loss": loss.detach(),
        "expected.grad.logits": z.grad.detach(),
    }
    save_file(tensors, path, metadata=meta_of("softmax_ce", seed, classes=k, batch=b))


def model_fixture(path, model, meta, image, labels, loss_fn, seed):
    """kind=model (for the networks, when podgpu has them): `model` a torch.nn.Module in training mode
    whose parameter names are the reference state_dict keys, `loss_fn(model, image, labels)` returning
    the scalar loss. Writes every state_dict entry (parameters and BN buffers, before the step) as
    param.<key>, the expected loss, the gradient of the image and of every trainable parameter, and the
    BN buffers after the forward pass (running statistics updated as in training). `meta` must hold at
    least model, base_width, classes, feature_dim, loss (and variant, lambda, delta for loss=pod)."""
    model.train()
    # Parameters and the image are stored as float32 (what podgpu reads); compute in float64 from
    # those same values so that the expected results are exact.
    f32 = lambda v: v.detach().clone().to(torch.float32).contiguous() if v.is_floating_point() \
        else v.detach().clone().contiguous()
    before = {f"param.{k}": f32(v) for k, v in model.state_dict().items()}
    image = image.clone().requires_grad_(True)
    loss = loss_fn(model, image, labels)
    loss.backward()
    tensors = dict(before)
    tensors["input.image"] = f32(image)
    tensors["input.labels"] = labels
    tensors["expected.loss"] = loss.detach()
    tensors["expected.grad.image"] = image.grad.detach().contiguous()
    for name, prm in model.named_parameters():
        if prm.requires_grad and prm.grad is not None:
            tensors[f"expected.grad.{name}"] = prm.grad.detach().contiguous()
    params = dict(model.named_parameters())
    for key, v in model.state_dict().items():
        if key not in params:
            tensors[f"expected.buffer.{key}"] = v.detach().clone().contiguous()
    m = meta_of("model", seed, batch=image.shape[0], image_size=image.shape[-1], **meta)
    save_file(tensors, path, metadata=m)


def resnet_fixture(path, arch, width, b, size, k, n, loss, variant, delta, lam, seed):
    """kind=model for the reference ResNet layout (tools/reference_resnet.py) at a reduced width:
    PyTorch-default initialisation, batch-norm affine parameters and running statistics moved off
    their initial values (so that nothing is trivially 0 or 1), f32 values computed in float64."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reference_resnet

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pedcc = make_pedcc(k, n, gen).to(torch.float32) if loss == "pod" else None
    model = reference_resnet.ResNet(arch, k, n, width=width, centroids=pedcc)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(3)
    import copy
    model32 = copy.deepcopy(model)
    model = model.double()  # every value is a float32 value: the float64 run is exact
    image = torch.randn(b, 3, size, size, generator=gen).to(torch.float64)
    labels = torch.randint(0, k, (b,), generator=gen, dtype=torch.int64)

    def loss_fn(model, image, labels):
        logits, feats = model(image)
        if loss == "pod":
            return pod_parts(feats, model.out.weight.t(), labels, delta, lam, variant)[0]
        return torch.nn.functional.cross_entropy(logits, labels)

    meta = {"model": arch, "stem": "cifar", "base_width": width, "classes": k, "feature_dim": n,
            "loss": loss}
    if loss == "pod":
        meta.update({"variant": variant, "lambda": lam, "delta": delta})
    model_fixture(path, model, meta, image, labels, loss_fn, seed)
    record_torch_f32_error(path, model32, image, labels, loss_fn)


def record_torch_f32_error(path, model32, image, labels, loss_fn):
    """Runs the same step in PyTorch float32 and stores, as metadata `torch_f32_rel_error`, the largest
    relative error of PyTorch's own float32 result against the float64 expectation. A small, narrow
    network with batch norm over few values amplifies float32 rounding; `podgpu fidelity` judges an
    f32 run against this figure instead of a fixed 1e-4 (docs/FIXTURES.md)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model32.train()
    x = image.to(torch.float32).clone().requires_grad_(True)
    loss = loss_fn(model32, x, labels)
    loss.backward()
    got = {"expected.loss": loss.detach(), "expected.grad.image": x.grad}
    for name, prm in model32.named_parameters():
        if prm.grad is not None:
            got[f"expected.grad.{name}"] = prm.grad
    worst = 0.0
    for k, v in got.items():
        want = tensors[k].to(torch.float64)
        worst = max(worst, ((v.to(torch.float64) - want).norm() / want.norm()).item())
    meta["torch_f32_rel_error"] = f"{worst:.3e}"
    save_file(tensors, path, metadata=meta)


# --------------------------------------------------------------------------------------------------

# The committed set: (B, n, K, delta) with n > B, n < B and K > n+1, both variants; softmax (B, K).
DEFAULT_POD = [(8, 32, 10, 0.3), (24, 6, 5, 0.05), (12, 4, 8, 0.5)]
DEFAULT_SOFTMAX = [(8, 10), (32, 100)]
# ResNet50-CIFAR topology at base width 2 (the full network has 64), 16x16 images:
# (arch, width, batch, image size, K, n, loss, variant, delta)
DEFAULT_MODELS = [("resnet50", 2, 8, 16, 4, 8, "pod", "paper", 0.3),
                  ("resnet50", 2, 8, 16, 4, 8, "pod", "reference", 0.05),
                  ("resnet18", 4, 4, 8, 10, 16, "softmax", None, None)]


def triple(s):
    parts = [int(v) for v in s.split(",")]
    if len(parts) != 3 or parts[0] < 2 or parts[1] < 2 or parts[2] < 2:
        raise argparse.ArgumentTypeError("expected B,n,K with B, n, K >= 2")
    return tuple(parts)


def pair(s):
    parts = [int(v) for v in s.split(",")]
    if len(parts) != 2 or parts[0] < 1 or parts[1] < 1:
        raise argparse.ArgumentTypeError("expected B,K with B, K >= 1")
    return tuple(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="base seed (each fixture derives its own)")
    ap.add_argument("--pod", type=triple, action="append",
                    help="POD fixture shape B,n,K (both variants); repeatable")
    ap.add_argument("--softmax", type=pair, action="append",
                    help="softmax CE fixture shape B,K; repeatable")
    ap.add_argument("--model", action="append", metavar="ARCH,WIDTH,B,SIZE,K,N",
                    help="ResNet model fixture (POD paper variant); repeatable, e.g. resnet50,4,8,16,10,32")
    ap.add_argument("--delta", type=float, default=None, help="delta for --pod fixtures (default 0.3)")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="SC weight (default 1)")
    args = ap.parse_args()

    models = []
    for spec in args.model or []:
        a, w, b, size, k, n = spec.split(",")
        d = 0.3 if args.delta is None else args.delta
        models.append((a, int(w), int(b), int(size), int(k), int(n), "pod", "paper", d))
    if args.pod is None and args.softmax is None and args.model is None:
        pods, softmaxes, models = DEFAULT_POD, DEFAULT_SOFTMAX, DEFAULT_MODELS
    else:
        d = 0.3 if args.delta is None else args.delta
        pods = [(b, n, k, d) for b, n, k in (args.pod or [])]
        softmaxes = args.softmax or []

    os.makedirs(args.out, exist_ok=True)
    seed = args.seed
    for b, n, k, delta in pods:
        for variant in ("paper", "reference"):
            seed += 1
            path = os.path.join(args.out, f"pod_{variant}_b{b}_n{n}_k{k}.safetensors")
            pod_fixture(path, b, n, k, variant, delta, args.lam, seed)
            print(path)
    for b, k in softmaxes:
        seed += 1
        path = os.path.join(args.out, f"softmax_ce_b{b}_k{k}.safetensors")
        softmax_fixture(path, b, k, seed)
        print(path)
    for arch, w, b, size, k, n, loss, variant, delta in models:
        seed += 1
        tag = f"{loss}_{variant}" if loss == "pod" else loss
        path = os.path.join(args.out, f"model_{arch}_w{w}_{tag}.safetensors")
        resnet_fixture(path, arch, w, b, size, k, n, loss, variant, delta, args.lam, seed)
        print(path)


if __name__ == "__main__":
    main()
