"""VideoElevator (Zhang et al., "VideoElevator: Elevating Video Generation Quality with Versatile Text-to-Image
Diffusion Models", arXiv 2403.05438, ECCV 2024) as a sampler over denoisers: a run of the image model ("I", its
self-attention inflated to each video's first frame by the backbone) in which a few steps hand the predicted clean
video to the video model ("V") for temporal motion refining and invert its result back to the image model's noise
level (the paper's decomposition of each such step into temporal motion refining and spatial quality elevating).

Every choice the paper leaves open, and where this follows the authors' code (github.com/YBYBZhang/VideoElevator,
`VideoElevatorPipeline`) or departs from it, is listed in docs/lab.md "VideoElevator". Pure tensor functions and one
sampler loop: no models, prompts or devices here (pipelines/generate.py binds them).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.fft as fft

from .grammar import COND, Plan
from .sampling import Denoiser
from .schedule import ddim_move

# the mixed-noise prior's weight of the noise frame every frame shares (the pipeline's default alpha = 1.0)
PRIOR_ALPHA = 1.0
# Gaussian low-pass of the refined clean video over normalised frequencies: spatial and temporal stops (the authors'
# 16-frame example; their 24-frame one uses a temporal stop of 0.4)
SPATIAL_STOP = 1.0
TEMPORAL_STOP = 0.5


def gaussian_lowpass(frames: int, height: int, width: int, *, spatial: float = SPATIAL_STOP,
                     temporal: float = TEMPORAL_STOP) -> torch.Tensor:
    """(F, h, w) float32 mask over the centred spectrum: exp(−f_t²/(2 d_t²) − (f_y² + f_x²)/(2 d_s²)), each f the
    normalised frequency 2k/n − 1 of its axis (computed in float64)."""
    def axis(n: int) -> torch.Tensor:
        return 2 * torch.arange(n, dtype=torch.float64) / n - 1

    e = (axis(frames) ** 2 / (2 * temporal**2)).view(-1, 1, 1) + (axis(height) ** 2 / (2 * spatial**2)).view(1, -1, 1) \
        + (axis(width) ** 2 / (2 * spatial**2)).view(1, 1, -1)
    return torch.exp(-e).float()


def lowpass(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) latents with their 3-D spectrum over (F, h, w) multiplied by `mask` (high band dropped), in
    float32, the real part."""
    dims = (-3, -2, -1)
    spectrum = fft.fftshift(fft.fftn(x.float(), dim=dims), dim=dims) * mask.to(x.device)
    return fft.ifftn(fft.ifftshift(spectrum, dim=dims), dim=dims).real


def mixed_prior(x: torch.Tensor, shared: torch.Tensor, alpha: float = PRIOR_ALPHA) -> torch.Tensor:
    """The initial noise of each frame, (α·ε_shared + ε_frame)/√(1 + α²): (B, C, F, h, w) `x` and one (B, C, 1, h, w)
    frame every frame shares; unit variance kept."""
    return (alpha * shared + x) / math.sqrt(1 + alpha * alpha)


def sample_videoelevator(models: Mapping[str, Denoiser], x: torch.Tensor, plan: Plan, *,
                         noise: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor,
                         callback: Callable[[dict], None] | None = None
                         ) -> tuple[torch.Tensor, dict[str, int]]:
    """Run VideoElevator over the plan's grid with the plan's `elevator` schedule (`grammar.Elevation`: refining
    steps, video-model steps in each). Every denoising move is the plan's main move of its step (levels, timestep,
    per-row guidance w: the moves `standard` makes); the inversion climbs to each step's starting level ᾱ_i.

    Each step i: the image model's guided ε at x_i gives x̂0 and the DDIM move to level i+1. On a refining step, x̂0
    (low-passed over (F, h, w), except on the last refining step) is diffused to level i with fresh noise, the video
    model takes `sub` guided DDIM steps from there, and its last x̂0 is inverted with the image model's
    conditional ε (DDIM inversion, ε labelled with the level each move goes to, as diffusers' DDIMInverseScheduler)
    through every level of the grid up to i+1, which becomes x_{i+1}. After a refinement, each step adds the inversion
    correction: x_{i+1} += inv_{i+1} − DDIM(inv_i), the DDIM move of the stored inverted latent along the conditional
    ε. Returns (x, calls)."""
    steps = plan.steps
    n = len(steps)
    levels = [s.main.a_from for s in steps] + [steps[-1].main.a_to]
    refine, sub = set(plan.elevator.refine), plan.elevator.sub
    last = max(refine)
    made = {"I": 0, "V": 0, "I" + COND: 0}
    inverted: dict[int, torch.Tensor] = {}
    image, video = models["I"], models["V"]
    for i, step in enumerate(steps):
        a, a_next = step.main.a_from.to(x.device), step.main.a_to.to(x.device)
        eps = image(x, step.t, step.main.w)
        made["I"] += 1
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x_next = ddim_move(x, eps, a, a_next)
        if i in refine:
            clean = lowpass(x0, mask).to(x.dtype) if i != last else x0
            z = a**0.5 * clean + (1 - a) ** 0.5 * noise(clean)
            for k in range(i, min(i + sub, n)):
                a_k, a_after = steps[k].main.a_from.to(x.device), steps[k].main.a_to.to(x.device)
                e = video(z, steps[k].t, steps[k].main.w)
                made["V"] += 1
                refined = (z - (1 - a_k) ** 0.5 * e) / a_k**0.5
                z = ddim_move(z, e, a_k, a_after)
            y = refined
            inverted = {n: y}
            for j in range(n - 1, i, -1):  # up from the clean end to level i+1, one grid level at a time
                e = image(y, steps[j].t, None)
                made["I" + COND] += 1
                y = ddim_move(y, e, levels[j + 1].to(x.device), levels[j].to(x.device))
                inverted[j] = y
            x_next = y
        elif i in inverted and i + 1 in inverted:
            e = image(inverted[i], step.t, None)
            made["I" + COND] += 1
            x_next = x_next + inverted[i + 1] - ddim_move(inverted[i], e, a, a_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": step.t, "x": x, "calls": dict(made)})
    return x, made
