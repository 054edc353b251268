"""FreeNoise's tensor parts (Qiu et al., "FreeNoise: Tuning-Free Longer Video Diffusion via Noise Rescheduling",
arXiv 2310.15169; diffusers' AnimateDiff `enable_free_noise`): the rescheduled initial noise (§3.2: the frames after the
first window repeat earlier noise frames, shuffled window by window) and the per-frame text conditioning. The windowed
temporal attention itself is diffusers' `FreeNoiseTransformerBlock`, swapped into the motion modules by the AnimateDiff
backbone for a batch (pipelines/backbones/animatediff.py); the loop is pipelines/generate.py's (docs/lab.md
"Comparators"). Pure tensor functions.
"""
from __future__ import annotations

from typing import Sequence

import torch


def shuffle_noise(x: torch.Tensor, generators: Sequence[torch.Generator], context: int, stride: int) -> torch.Tensor:
    """(B, C, F, h, w) initial noise with FreeNoise's local shuffle: for i = context, context + stride, … < F, frames
    i … i + stride − 1 become a permutation of frames i − context … i − context + stride − 1 (as they are by then: the
    windows are filled in order), the permutation drawn with `torch.randperm` from row b's own generator (the stream
    its initial noise came from, continued). Rows of at most `context` frames are returned unchanged."""
    frames = x.shape[2]
    out = x.clone()
    for b, generator in enumerate(generators):
        for start in range(context, frames, stride):
            source = start - context
            width = min(frames, source + stride) - source
            order = torch.arange(source, source + width)[torch.randperm(width, generator=generator)]
            n = min(frames - start, width)  # the last window may be cut by the video's end
            out[b, :, start : start + n] = out[b, :, order[:n]]
    return out


def frame_text(emb: torch.Tensor, frames: int) -> torch.Tensor:
    """(B', L, D) text embeddings -> (B'*F, L, D): each row's embedding for every frame, as FreeNoise's prompt
    interpolation computes it between the prompt of the first and of the last frame ((1 − a)·e + a·e, a = f/(F − 1);
    one prompt per row here, so every frame gets that prompt up to the interpolation's rounding)."""
    if frames == 1:
        return emb
    weights = [f / (frames - 1) for f in range(frames)]
    return torch.cat([torch.cat([(1 - a) * e + a * e for a in weights]) for e in emb.split(1)])
