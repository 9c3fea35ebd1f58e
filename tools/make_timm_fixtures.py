#!/usr/bin/env python3
"""Writes the timm reference fixtures for podgpu's transformers (docs/FIXTURES.md):

- tests/fixtures/model_{vit,swin}_tiny_{pod,softmax}.safetensors: a training step (kind=model) of a
  tiny ViT and a tiny Swin built by timm's own classes (random initialisation, every norm and bias
  moved off 1/0, drop path 0), with the POD loss over a PEDCC put in timm's classifier (`head.weight`
  [K, n], `head.bias` 0, both frozen) or softmax cross-entropy over timm's trainable classifier. The
  `model` metadata is the podgpu name of the same configuration, e.g.
  `vit(patch=4,dim=16,depth=2,heads=2,mlp_ratio=2)`.
- tests/fixtures/timm/test_vit.safetensors: the state dict of timm's `test_vit` (random
  initialisation, seed 0), saved with safetensors as a user saves pretrained weights: the file the
  `--init` tests start from (1.5 MB; vit_tiny_patch16_224's 23 MB is made at test time when a Python
  with timm is there).
- tests/fixtures/timm/resample.safetensors: timm's `resample_abs_pos_embed` of a random position
  embedding to other grids and `resize_rel_pos_bias_table` of a window-7 table to windows 4 and 12
  (what `--init` does when the image or window size differs).
- tests/fixtures/timm/adamw.safetensors: three steps of `torch.optim.AdamW` on a decayed weight and an
  undecayed bias.

Usage (from the repository root, with torch, timm and safetensors installed, e.g. in .venv):

    .venv/bin/python tools/make_timm_fixtures.py            # the committed set
    .venv/bin/python tools/make_timm_fixtures.py --out /tmp/fx
"""

import argparse
import copy
import os
import sys

import torch
import timm
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

VIT = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, img_size=12)
VIT_NAME = "vit(patch=4,dim=16,depth=2,heads=2,mlp_ratio=2)"
SWIN = dict(patch_size=2, window_size=2, embed_dim=8, depths=(2, 2), num_heads=(2, 4), mlp_ratio=2.0,
            img_size=8)
SWIN_NAME = "swin(patch=2,window=2,dim=8,depths=2-2,heads=2-4,mlp_ratio=2)"


def build(family, classes, gen):
    if family == "vit":
        from timm.models.vision_transformer import VisionTransformer
        m = VisionTransformer(num_classes=classes, drop_path_rate=0.0, **VIT)
    else:
        from timm.models.swin_transformer import SwinTransformer
        m = SwinTransformer(num_classes=classes, drop_path_rate=0.0, **SWIN)
    # Move every norm, bias, token and table off its initial value so nothing is trivially 0 or 1.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith(".bias") or name in ("cls_token",):
                p.uniform_(-0.3, 0.3, generator=gen)
            elif "relative_position_bias_table" in name or name == "pos_embed":
                p.normal_(0.0, 0.5, generator=gen)
    return m


def timm_fixture(path, family, loss, b, k, seed, variant="paper", delta=0.3, lam=1.0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build(family, k, gen)
    n = model.num_features
    if loss == "pod":
        pedcc = mf.make_pedcc(k, n, gen).to(torch.float32)
        head = model.head if family == "vit" else model.head.fc
        with torch.no_grad():
            head.weight.copy_(pedcc)
            head.bias.zero_()
        head.weight.requires_grad_(False)
        head.bias.requires_grad_(False)
    size = (VIT if family == "vit" else SWIN)["img_size"]
    model32 = copy.deepcopy(model)
    model = model.double()
    image = torch.randn(b, 3, size, size, generator=gen).to(torch.float64)
    labels = torch.randint(0, k, (b,), generator=gen, dtype=torch.int64)

    def loss_fn(m, image, labels):
        feats = m.forward_head(m.forward_features(image), pre_logits=True)
        if loss == "pod":
            w = m.head.weight if family == "vit" else m.head.fc.weight
            return mf.pod_parts(feats, w, labels, delta, lam, variant)[0]
        return torch.nn.functional.cross_entropy(m.forward_head(m.forward_features(image)), labels)

    meta = {"model": VIT_NAME if family == "vit" else SWIN_NAME, "classes": k, "feature_dim": n,
            "loss": loss, "generator_timm": timm.__version__}
    if loss == "pod":
        meta.update({"variant": variant, "lambda": lam, "delta": delta})
    mf.model_fixture(path, model, meta, image, labels, loss_fn, seed)
    mf.record_torch_f32_error(path, model32, image, labels, loss_fn)


def test_vit_file(path):
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path,
              metadata={"timm_model": "test_vit", "timm_version": timm.__version__})


def resample_file(path, seed):
    from timm.layers import resample_abs_pos_embed
    gen = torch.Generator().manual_seed(seed)
    dim = 8
    pos = torch.randn(1, 1 + 14 * 14, dim, generator=gen)
    out = {"input.pos_embed": pos}
    for g in (2, 3, 7, 16):
        out[f"expected.pos_embed_{g}"] = resample_abs_pos_embed(pos, [g, g], num_prefix_tokens=1).contiguous()
    from timm.layers import resize_rel_pos_bias_table
    table = torch.randn(13 * 13, 3, generator=gen)  # a window-7 table, 3 heads
    out["input.rel_table"] = table
    for w in (4, 12):
        out[f"expected.rel_table_{w}"] = resize_rel_pos_bias_table(
            table, new_window_size=(w, w), new_bias_shape=((2 * w - 1) ** 2, 3)).contiguous()
    save_file(out, path, metadata={"generator": "tools/make_timm_fixtures.py", "timm_version": timm.__version__,
                                   "what": "timm.layers.resample_abs_pos_embed(input.pos_embed, [g, g], 1); "
                                           "timm.layers.resize_rel_pos_bias_table(input.rel_table, (w, w), ...)"})


def adamw_file(path, seed):
    """Three steps of torch.optim.AdamW (float64) on a weight (decayed) and a bias (not decayed, as
    timm's groups), from float32 starting values and gradients."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(5, 4, generator=gen)
    b0 = torch.randn(5, generator=gen)
    grads = [(torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)) for _ in range(3)]
    w = w0.double().clone().requires_grad_(True)
    b = b0.double().clone().requires_grad_(True)
    lr, betas, eps, wd = 1e-2, (0.9, 0.99), 1e-6, 0.05
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    out = {"input.w": w0, "input.b": b0}
    for i, (gw, gb) in enumerate(grads):
        out[f"input.grad_w.{i}"] = gw
        out[f"input.grad_b.{i}"] = gb
        w.grad = gw.double()
        b.grad = gb.double()
        opt.step()
        out[f"expected.w.{i}"] = w.detach().clone()
        out[f"expected.b.{i}"] = b.detach().clone()
    save_file(out, path, metadata={"lr": str(lr), "beta1": str(betas[0]), "beta2": str(betas[1]),
                                   "eps": str(eps), "weight_decay": str(wd),
                                   "generator": "tools/make_timm_fixtures.py", "torch_version": torch.__version__})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output folder")
    ap.add_argument("--seed", type=int, default=13)
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "timm"), exist_ok=True)
    for i, (family, loss) in enumerate([("vit", "pod"), ("vit", "softmax"), ("swin", "pod"), ("swin", "softmax")]):
        p = os.path.join(a.out, f"model_{family}_tiny_{loss}.safetensors")
        timm_fixture(p, family, loss, b=4, k=5, seed=a.seed + i)
        print("wrote", p)
    test_vit_file(os.path.join(a.out, "timm", "test_vit.safetensors"))
    resample_file(os.path.join(a.out, "timm", "resample.safetensors"), a.seed)
    adamw_file(os.path.join(a.out, "timm", "adamw.safetensors"), a.seed)
    print("wrote", os.path.join(a.out, "timm"))


if __name__ == "__main__":
    main()
