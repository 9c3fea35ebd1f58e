#!/usr/bin/env python3
"""Loads a podgpu checkpoint of a transformer (ViT, Swin) into timm's own model with a strict
`load_state_dict`, then checks that timm computes what podgpu trained.

    .venv/bin/python tools/load_timm_checkpoint.py runs/RUN/last.safetensors [--image-size S]

The checkpoint's tensors are the timm state_dict (DESIGN §1.8, docs/ZOO.md) plus the optimiser's
buffers under `optim.*`, which are dropped. With the POD loss the PEDCC sits in timm's classifier
(`head.weight` [K, n], `head.bias` zero; Swin `head.fc.*`), so timm's logits are x·Pᵀ and their argmax
is podgpu's cosine prediction. A model trained with `--feature-dim` (FC1 `fc.*` before the head) has no
timm layout and is refused.

Checks: the strict load; an eval-mode forward of a random batch gives finite logits [B, K]; for POD,
the classifier rows are the unit PEDCC rows with a zero bias. With `--features FILE` (a safetensors
file with `input.image` and `expected.features`), timm's pooled features are compared with podgpu's.
"""

import argparse
import json
import re
import sys

import torch
import timm
from safetensors import safe_open

TIMM_NAMES = {
    "vit_b16": "vit_base_patch16_224",
    "swin_b": "swin_base_patch4_window7_224",
}


def load(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    cfg = json.loads(meta["config"])
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    return state, cfg


def parse_custom(name):
    """podgpu's vit(...)/swin(...) names as timm keyword arguments."""
    m = re.fullmatch(r"(vit|swin)\((.*)\)", name)
    if not m:
        return None, None
    kv = dict(p.split("=") for p in m.group(2).split(",") if p)
    if m.group(1) == "vit":
        return "vit", dict(patch_size=int(kv["patch"]), embed_dim=int(kv["dim"]), depth=int(kv["depth"]),
                           num_heads=int(kv["heads"]), mlp_ratio=float(kv.get("mlp_ratio", 4)))
    return "swin", dict(patch_size=int(kv["patch"]), window_size=int(kv["window"]), embed_dim=int(kv["dim"]),
                        depths=tuple(int(x) for x in kv["depths"].split("-")),
                        num_heads=tuple(int(x) for x in kv["heads"].split("-")),
                        mlp_ratio=float(kv.get("mlp_ratio", 4)))


def build(state, cfg, image_size):
    name = cfg["model"]
    if any(k.startswith("fc.") for k in state):
        sys.exit(f"{name} was trained with FC1 (--feature-dim): its layout is not timm's")
    swin = any(k.startswith("layers.") for k in state)
    head_w = state["head.fc.weight" if swin else "head.weight"]
    classes = head_w.shape[0]
    if image_size is None:
        image_size = cfg.get("image_size")
    if image_size is None and not swin:
        grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
        image_size = grid * state["patch_embed.proj.weight"].shape[-1]
    if image_size is None:
        sys.exit("give --image-size (the run used the dataset's stored size)")
    family, kwargs = parse_custom(name)
    kw = dict(num_classes=classes, img_size=image_size, drop_path_rate=0.0,
              in_chans=state["patch_embed.proj.weight"].shape[1])
    if family == "vit":
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(**kwargs, **kw), image_size, swin
    if family == "swin":
        from timm.models.swin_transformer import SwinTransformer
        return SwinTransformer(**kwargs, **kw), image_size, swin
    return timm.create_model(TIMM_NAMES.get(name, name), pretrained=False, **kw), image_size, swin


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--features", default=None)
    a = ap.parse_args()
    state, cfg = load(a.checkpoint)
    model, size, swin = build(state, cfg, a.image_size)
    model.load_state_dict(state, strict=True)
    print(f"strict load_state_dict of {a.checkpoint} into timm's {cfg['model']} at {size}×{size}: ok "
          f"({len(state)} tensors, timm {timm.__version__})")
    model.eval()
    c = state["patch_embed.proj.weight"].shape[1]
    with torch.no_grad():
        logits = model(torch.randn(4, c, size, size, generator=torch.Generator().manual_seed(0)))
    k = logits.shape[1]
    assert logits.shape == (4, k) and torch.isfinite(logits).all(), logits
    print(f"eval forward: logits {tuple(logits.shape)}, finite")
    if cfg["loss"] in ("pod", "nac", "cosine", "pedcc-loss"):
        head = model.head.fc if swin else model.head
        norms = head.weight.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), norms
        assert (head.bias == 0).all()
        print("PEDCC head: unit rows, zero bias (timm's argmax = podgpu's cosine argmax)")
    if a.features:
        with safe_open(a.features, "pt") as f:
            image = f.get_tensor("input.image")
            want = f.get_tensor("expected.features").double()
        with torch.no_grad():
            got = model.forward_head(model.forward_features(image), pre_logits=True).double()
        err = ((got - want).norm() / want.norm()).item()
        print(f"pooled features vs podgpu: relative error {err:.3e}")
        assert err < 1e-4, err


if __name__ == "__main__":
    main()
