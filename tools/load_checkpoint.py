#!/usr/bin/env python3
"""Loads a podgpu checkpoint into the reference PyTorch ResNet (tools/reference_resnet.py) with a strict
`load_state_dict` and runs an eval-mode forward.

    python tools/load_checkpoint.py runs/RUN/last.safetensors

A podgpu checkpoint is a safetensors file whose tensors are the model's state_dict under the reference
names (DESIGN.md §1.7), plus the optimizer's momentum buffers under `optim.momentum.*`; its metadata
holds the run's configuration as JSON. The optimizer keys are dropped before the strict load.
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_resnet  # noqa: E402


def load(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    cfg = json.loads(meta["config"])
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    return state, cfg


def build(state, cfg):
    feature_dim, pooled = state["fc.weight"].shape
    stem_conv = state["pre_layers.0.weight"]
    width, in_channels, k = stem_conv.shape[0], stem_conv.shape[1], stem_conv.shape[2]
    if cfg["loss"] == "pod":
        centroids = state["out.weight"].t().contiguous()
        classes = centroids.shape[0]
    else:
        centroids, classes = None, state["out.weight"].shape[0]
    stem = "imagenet" if k == 7 else "cifar"
    return reference_resnet.ResNet(cfg["model"], classes, feature_dim, width=width, stem=stem,
                                   in_channels=in_channels, centroids=centroids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    args = ap.parse_args()
    state, cfg = load(args.checkpoint)
    model = build(state, cfg)
    # num_batches_tracked is an int64 scalar in PyTorch; the rest float32.
    model.load_state_dict(state, strict=True)
    print(f"strict load_state_dict of {args.checkpoint} into the reference {cfg['model']}: ok "
          f"({len(state)} tensors)")
    model.eval()
    # A forward on a random batch must run and give finite logits of the right shape.
    c = state["pre_layers.0.weight"].shape[1]
    x = torch.randn(4, c, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
    assert torch.isfinite(logits).all()
    print(f"forward: logits {tuple(logits.shape)}, features {tuple(feats.shape)}")


if __name__ == "__main__":
    main()
