"""What one sampler call will allocate, estimated from the model configs before it runs, and what the device has free,
so that a row which cannot fit fails alone with both numbers instead of killing its worker (docs/reliability.md).

The estimate is first order and errs high: fp32 latents with their working copies; the largest UNet call's activations
(CFG-doubled batch, frames folded for the image model, the feature maps of every level kept for the skip connections,
attention through memory-efficient kernels so no quadratic term); the VAE decode of one chunk in float32. Weights are
already resident when it is used, so the budget is the memory free at that moment. The copy counts are calibrated on
the published architectures at 16 x 512 x 512 (`benchmarks/memory.py`, docs/checkpoints.md "Memory"): one
video's CFG-doubled UNet call measured 2.11 GiB (AnimateDiff VDM), 2.36 GiB (SD-1.5 IDM), 2.71 GiB (ModelScope
VDM) and 2.67 GiB (VideoCrafter2 VDM); the float32 decode 1.48, 3.51 and 12.29 GiB for chunks of 1, 4 and 16 frames."""
from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATION_COPIES = 20  # live tensors per UNet level during one forward (resnet temporaries, skips, attention in/out)
LATENT_COPIES = 8  # x, ε, the CFG pair, move temporaries, the decoded float copy
DECODE_COPIES = 6  # the VAE decoder's live maps per frame at its widest, full-resolution level
DECODE_FIXED = 6  # plus a working set that does not grow with the chunk (mid-block attention, conv scratch)
MARGIN = 1.1


@dataclass(frozen=True)
class Estimate:
    latents: int
    model_call: int
    decode: int

    @property
    def total(self) -> int:
        """Latents live throughout; the decode runs after the last model call has freed its activations."""
        return int(MARGIN * (self.latents + max(self.model_call, self.decode)))

    def describe(self) -> str:
        return (f"about {gib(self.total)} (latents {gib(self.latents)}, one model call {gib(self.model_call)}, "
                f"decode {gib(self.decode)})")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _unet_call(unet, images: int, h: int, w: int, dtype_bytes: int) -> int:
    """Activations of one UNet forward over `images` latent frames of h x w: every level's feature map, kept."""
    channels = list(unet.config.block_out_channels)
    levels = sum(c * max(1, (h >> i)) * max(1, (w >> i)) for i, c in enumerate(channels))
    return ACTIVATION_COPIES * images * levels * dtype_bytes


def estimate(backbone, batch: int, frames: int, height: int, width: int, decode_chunk: int = 16) -> Estimate:
    """Bytes one batched call of `batch` videos allocates on the backbone's device (see the module docstring)."""
    f = backbone.spatial_factor
    h, w = height // f, width // f
    dtype_bytes = torch.finfo(backbone.dtype).bits // 8
    latents = LATENT_COPIES * batch * backbone.latent_channels * frames * h * w * 4
    calls = [_unet_call(backbone.unet, 2 * batch * frames, h, w, dtype_bytes)]  # CFG-doubled, frames in the batch
    if getattr(backbone, "image_unet", None) is not None:
        calls.append(_unet_call(backbone.image_unet, 2 * batch * frames, h, w, dtype_bytes))
    vae_full = backbone.vae.config.block_out_channels[0]  # the decoder's full-resolution level (SD: 128 channels)
    chunk = min(decode_chunk, batch * frames)
    decode = (DECODE_COPIES * chunk + DECODE_FIXED) * height * width * vae_full * 4  # the VAE decodes in float32
    return Estimate(latents, max(calls), decode)


def free_bytes(device: torch.device) -> int:
    """What the device can still give: CUDA free memory plus the allocator's cached blocks; host RAM available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import psutil

        return int(psutil.virtual_memory().available)


def budget(device: torch.device, override_gb: float | None = None, fraction: float = 0.9) -> int:
    """The bytes a call may allocate: `override_gb` (job config compute.memory_budget_gb), else `fraction` of free."""
    if override_gb is not None:
        return int(override_gb * 2**30)
    return int(fraction * free_bytes(device))

