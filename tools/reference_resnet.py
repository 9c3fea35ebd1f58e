"""The reference code's ResNet layout in plain PyTorch (DESIGN.md §1.7), written here from its
description: the same module names, so that its `state_dict` keys are exactly podgpu's parameter names.

    pre_layers.{0,1}                 stem conv 3x3 (7x7 stride 2 for the ImageNet stem) + BN
    layerL.I.layers.{0,1,3,4[,6,7]}  the block's convs and BNs (ReLUs at 2 and 5 hold no parameters)
    layerL.0.shortcut.{0,1}          projection conv 1x1 + BN where the shape changes
    fc                               FC1, pooled features -> latent dim n (with bias)
    out.weight                       frozen PEDCC, stored transposed as [n, K]; or a trainable
                                     Linear(n, K) (`out.weight` [K, n], `out.bias`) for softmax

Used by tools/make_fixtures.py (model fixtures) and tools/load_checkpoint.py (podgpu checkpoints load
into it with a strict load_state_dict).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

DEPTHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}


class Block(nn.Module):
    def __init__(self, kind, in_planes, planes, stride, shortcut):
        super().__init__()
        if kind == "basic":
            self.layers = nn.Sequential(
                nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(True),
                nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:  # bottleneck, stride on the 3x3 conv
            self.layers = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(True),
                nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(True),
                nn.Conv2d(planes, planes * 4, 1, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        self.shortcut = shortcut

    def forward(self, x):
        y = self.layers(x)
        residual = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(y + residual)


class PedccHead(nn.Module):
    """logits = x @ W with W = PEDCC^T [n, K], frozen."""

    def __init__(self, centroids):
        super().__init__()
        self.weight = nn.Parameter(centroids.t().contiguous(), requires_grad=False)

    def forward(self, x):
        return x.mm(self.weight)


class ResNet(nn.Module):
    def __init__(self, arch, classes, feature_dim, width=64, stem="cifar", in_channels=3, centroids=None):
        super().__init__()
        kind, blocks = DEPTHS[arch]
        expansion = 1 if kind == "basic" else 4
        if stem == "imagenet":
            conv = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        else:
            conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.pre_layers = nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(True))
        self.maxpool = stem != "cifar"
        in_planes = width
        for layer, n in enumerate(blocks):
            planes = width << layer
            stride = 1 if layer == 0 else 2
            mods = []
            for i in range(n):
                s = stride if i == 0 else 1
                out = planes * expansion
                shortcut = None
                if i == 0 and (s != 1 or in_planes != out):
                    shortcut = nn.Sequential(
                        nn.Conv2d(in_planes, out, 1, s, bias=False), nn.BatchNorm2d(out)
                    )
                mods.append(Block(kind, in_planes, planes, s, shortcut))
                in_planes = out
            setattr(self, f"layer{layer + 1}", nn.Sequential(*mods))
        self.fc = nn.Linear(in_planes, feature_dim)
        self.out = PedccHead(centroids) if centroids is not None else nn.Linear(feature_dim, classes)

    def forward(self, x):
        """Returns (logits, latent features x)."""
        y = self.pre_layers(x)
        if self.maxpool:
            y = F.max_pool2d(y, 3, 2, 1)
        for layer in range(1, 5):
            y = getattr(self, f"layer{layer}")(y)
        feats = self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
        return self.out(feats), feats
