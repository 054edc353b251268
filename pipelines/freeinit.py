"""FreeInit's noise re-initialisation (Wu et al., "FreeInit: Bridging Initialization Gap in Video Diffusion Models",
arXiv 2312.07537; diffusers `AnimateDiffPipeline.enable_free_init`): after a full sampling run, its result is diffused
back to the last training level with the first run's initial noise, and the low spatio-temporal frequencies of that
are kept while the high ones come from fresh noise; sampling then starts again from the mix. Pure tensor functions;
the loop around a sampler is pipelines/generate.py's (docs/lab.md "Comparators").
"""
from __future__ import annotations

import torch
import torch.fft as fft

# diffusers' enable_free_init defaults (the paper's AnimateDiff settings): a Butterworth low-pass of order 4 whose
# stop frequency is 0.25 of the band in space and in time
ORDER = 4
SPATIAL_STOP = 0.25
TEMPORAL_STOP = 0.25


def butterworth_lowpass(frames: int, height: int, width: int, *, order: float = ORDER, spatial: float = SPATIAL_STOP,
                        temporal: float = TEMPORAL_STOP) -> torch.Tensor:
    """(F, h, w) float32 low-pass mask over the centred (fftshift-ed) spectrum: 1 / (1 + (d² / s²)^order), with the
    normalised squared distance d² = ((s/s_t)(2f/F − 1))² + (2y/h − 1)² + (2x/w − 1)² (computed in float64)."""
    if spatial == 0 or temporal == 0:
        return torch.zeros(frames, height, width)

    def axis(n: int) -> torch.Tensor:
        return 2 * torch.arange(n, dtype=torch.float64) / n - 1

    d2 = (((spatial / temporal) * axis(frames)) ** 2).view(-1, 1, 1) + (axis(height) ** 2).view(1, -1, 1) \
        + (axis(width) ** 2).view(1, 1, -1)
    return (1 / (1 + (d2 / spatial**2) ** order)).float()


def reinitialize(result: torch.Tensor, initial_noise: torch.Tensor, fresh_noise: torch.Tensor,
                 alpha_bar_last: torch.Tensor, lowpass: torch.Tensor) -> torch.Tensor:
    """The next run's initial latents from (B, C, F, h, w) `result`: z_T = √ᾱ_T·result + √(1−ᾱ_T)·initial_noise (the
    forward process to the last level T−1), then low frequencies of z_T plus high frequencies of `fresh_noise`, the
    3-D FFT taken over (F, h, w). float32 throughout."""
    a = alpha_bar_last.to(device=result.device, dtype=result.dtype)
    z = (a**0.5 * result + (1 - a) ** 0.5 * initial_noise).float()
    mask = lowpass.to(result.device)
    dims = (-3, -2, -1)
    low = fft.fftshift(fft.fftn(z, dim=dims), dim=dims) * mask
    high = fft.fftshift(fft.fftn(fresh_noise.float(), dim=dims), dim=dims) * (1 - mask)
    return fft.ifftn(fft.ifftshift(low + high, dim=dims), dim=dims).real
