"""A BiFPN-style self-teacher network over a backbone's stage outputs (FRSKD's self-teacher: Ji et al., Refine
Myself by Teaching Myself: Feature Refinement via Self-Knowledge Distillation, CVPR 2021, sec. 3.1).

The self-teacher takes the feature maps `F_1..F_n` of n levels (finest first) and refines them in one BiFPN layer
(Tan et al., EfficientDet): lateral 1x1 convolutions `L_i`, a top-down path `P_i` and a bottom-up path `T_i`, each
node a fast normalised fusion of its inputs (weights `relu(w) / (sum relu(w) + 1e-6)`) followed by depthwise
separable convolutions; its own linear classifier reads the pooled deepest output `T_n`. Node widths are
`width x` the backbone's channels at that level (FRSKD's "BiFPNc"; `d_i = w c_i` in the paper).

Resampling between levels goes to the exact size of the receiving level: the official code's nearest x2
upsampling and 3x3/2 max pooling with static "same" zero padding where the levels differ by two (ResNet,
EfficientNet, Swin, ConvNeXt at sizes divisible by their reductions), nearest interpolation and adaptive max
pooling to the receiving size otherwise (e.g. 7 -> 4 -> 7, where the official code's x2 upsampling would give 8),
and none between levels of one resolution (ViT-like models' token maps: a same-resolution BiFPN).
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['BiFPN', 'BiFPNLayer', 'pointwise_block', 'SeparableConvs', 'resize_up', 'resize_down']

FUSION_EPS = 1e-6  # the official code's epsilon of the fast normalised fusion


def pointwise_block(in_chs: int, out_chs: int) -> nn.Sequential:
    """1x1 convolution (no bias), BatchNorm, ReLU: the lateral and resampling projections."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False), nn.BatchNorm2d(out_chs),
                         nn.ReLU(inplace=True))


class SeparableConvs(nn.Sequential):
    """`depth` depthwise-separable 3x3 convolutions at `chs` channels, each depthwise 3x3 -> pointwise 1x1 ->
    BatchNorm, with a ReLU between consecutive units (none before the first, none after the last): a fusion node's
    convolution."""

    def __init__(self, chs: int, depth: int):
        units = []
        for i in range(depth):
            unit = [nn.ReLU(inplace=True)] if i else []
            unit += [nn.Conv2d(chs, chs, kernel_size=3, padding=1, groups=chs, bias=False),
                     nn.Conv2d(chs, chs, kernel_size=1, bias=False), nn.BatchNorm2d(chs)]
            units.append(nn.Sequential(*unit))
        super().__init__(*units)


def resize_up(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of a coarser map to `size` (x2 nearest upsampling where `size` is twice it)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode='nearest')


def resize_down(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Max pooling of a finer map to `size`: 3x3, stride 2 with static "same" zero padding (the official code's
    `MaxPool2dStaticSamePadding`, which gives ceil(h / 2)) where `size` is that, adaptive max pooling otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if tuple(size) == (math.ceil(h / 2), math.ceil(w / 2)):
        extra_w, extra_h = (size[1] - 1) * 2 - w + 3, (size[0] - 1) * 2 - h + 3
        x = F.pad(x, [extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2])
        return F.max_pool2d(x, kernel_size=3, stride=2)
    return F.adaptive_max_pool2d(x, tuple(size))


def _fusion_weights(weight: torch.Tensor) -> torch.Tensor:
    weight = F.relu(weight)
    return weight / (weight.sum(dim=0) + FUSION_EPS)


class BiFPNLayer(nn.Module):
    """One bidirectional layer over n levels of `in_chs` channels, giving n maps of `width x in_chs` channels.

    With `F_i` the inputs (finest first), `r` a ReLU and `w` each node's normalised fusion weights:

    - top-down: `P_n = L_n(r F_n)`, `P_i = conv(w1 r L_i(r F_i) + w2 proj(up(r P_{i+1})))` for i < n;
    - bottom-up: `T_1 = P_1`, `T_i = conv(w1 r L'_i(r F_i) + w2 r P_i + w3 proj(down(r T_{i-1})))` for
      1 < i < n, and `T_n = conv(w1 r L'_n(r F_n) + w2 proj(down(r T_{n-1})))`;
    - output: `r T_1, ..., r T_n`.

    `L` and `L'` are separate lateral 1x1 projections (the official code's `lat_conv` and `lat_conv2`), `proj`
    1x1 projections to the receiving level's width applied after resampling, `conv` `SeparableConvs` of `depth`
    units.
    """

    def __init__(self, in_chs: Sequence[int], width: int = 2, depth: int = 2):
        super().__init__()
        if len(in_chs) < 2:
            raise ValueError(f'a BiFPN needs at least two levels, got {len(in_chs)}')
        chs = [c * width for c in in_chs]
        n = len(chs)
        self.lateral = nn.ModuleList([pointwise_block(c, d) for c, d in zip(in_chs, chs)])
        self.lateral_bottom_up = nn.ModuleList([pointwise_block(in_chs[i], chs[i]) for i in range(1, n)])
        self.up_proj = nn.ModuleList([pointwise_block(chs[i + 1], chs[i]) for i in range(n - 1)])
        self.up_conv = nn.ModuleList([SeparableConvs(chs[i], depth) for i in range(n - 1)])
        self.up_weight = nn.ParameterList([nn.Parameter(torch.ones(2)) for _ in range(n - 1)])
        self.down_proj = nn.ModuleList([pointwise_block(chs[i - 1], chs[i]) for i in range(1, n)])
        self.down_conv = nn.ModuleList([SeparableConvs(chs[i], depth) for i in range(1, n)])
        self.down_weight = nn.ParameterList([nn.Parameter(torch.ones(3 if i < n - 1 else 2)) for i in range(1, n)])
        self.out_chs = chs

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        # Every map is kept after its ReLU (`r P_i`, `r T_i`), each computed once: the lateral and resampling
        # projections end in a ReLU already, so the official code's ReLUs of their outputs are identities.
        n = len(feats)
        sizes = [f.shape[-2:] for f in feats]
        inputs = [F.relu(f) for f in feats]
        lateral = [block(x) for block, x in zip(self.lateral, inputs)]
        bottom_up_in = [block(x) for block, x in zip(self.lateral_bottom_up, inputs[1:])]
        top_down = [lateral[-1]] * n  # r P_i; P_n = L_n(r F_n)
        for i in range(n - 2, -1, -1):
            w = _fusion_weights(self.up_weight[i])
            upsampled = self.up_proj[i](resize_up(top_down[i + 1], sizes[i]))
            top_down[i] = F.relu(self.up_conv[i](w[0] * lateral[i] + w[1] * upsampled))
        out = [top_down[0]]  # r T_i; T_1 = P_1
        for i in range(1, n):
            w = _fusion_weights(self.down_weight[i - 1])
            pooled = self.down_proj[i - 1](resize_down(out[-1], sizes[i]))
            fused = w[0] * bottom_up_in[i - 1]
            if i < n - 1:
                fused = fused + w[1] * top_down[i] + w[2] * pooled
            else:
                fused = fused + w[1] * pooled
            out.append(F.relu(self.down_conv[i - 1](fused)))
        return out


class BiFPN(nn.Module):
    """FRSKD's self-teacher: one `BiFPNLayer` over the stage outputs and a linear classifier on its pooled
    deepest output.

    Args:
        in_chs: Channels of the input levels, finest first.
        num_classes: Classes of the classifier.
        width: Node widths as multiples of the input channels (`d_i = width c_i`).
        depth: Depthwise-separable units per fusion node.

    `forward(feats)` returns `(refined maps T_1..T_n (after ReLU), logits)`.
    """

    def __init__(self, in_chs: Sequence[int], num_classes: int, width: int = 2, depth: int = 2):
        super().__init__()
        self.width, self.depth = width, depth
        self.layer = BiFPNLayer(in_chs, width, depth)
        self.fc = nn.Linear(self.layer.out_chs[-1], num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        refined = self.layer(feats)
        return refined, self.fc(F.adaptive_avg_pool2d(refined[-1], 1).flatten(1))
