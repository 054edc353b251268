"""GroupNorm with statistics over the frames of each video folded into the batch: the normalisation of the official
inflated SD UNet (BIVDiff, docs/algorithms.md §8) and of VidRD's resnets (docs/algorithms.md §9)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def frame_joint_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, frames: int) -> torch.Tensor:
    """`norm` applied to folded (B*F, C, h, w) features with statistics over each sample's F frames together."""
    bf, c = x.shape[:2]
    y = x.reshape(bf // frames, frames, c, *x.shape[2:]).transpose(1, 2)  # (B, C, F, h, w)
    y = F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return y.transpose(1, 2).reshape(x.shape)
