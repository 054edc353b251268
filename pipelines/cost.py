"""What a video costs in floating-point operations (docs/algorithms.md §10): each model call and the VAE decode counted
once per shape on the `meta` device by torch's FLOP counter (2 per multiply-add; no memory, no weights), then
multiplied by the calls a plan makes.

A call is one CFG-batched forward of one row (both halves): the video model on (2, C, F, h, w), the image model on
the 2F frames, each through the backbone's own ε function; the decode is the VAE decoder over the F frames.
`Costs.of(calls)` gives a video's FLOPs; `backbone_costs` counts the loaded models' architectures (a tiny set costs
what it is), `published_costs` a backbone's default models from their published configurations
(`pipelines/model_configs/`), for `--list-presets`.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbones import registry
from .backbones.common import framewise_eps
from .grammar import call_size

logger = logging.getLogger(__name__)
TOKENS = 77  # CLIP's text length: every backbone's text conditioning is (·, 77, D)
PREVIEW = 64  # resize=nearest64: the image model runs on 64 x 64 latents (docs/algorithms.md §5)


@dataclass(frozen=True)
class Costs:
    """FLOPs of one call of each model ("I", "V") for one row, and of decoding its video."""

    call: Mapping[str, float]
    decode: float

    def of(self, calls: Mapping[str, int], decode: bool = True) -> float:
        """A video's FLOPs: its calls times each call's cost, plus its decode (unless left latent). A conditional-only
        call ("V_cond": a step without guidance) evaluates half the batch of a CFG pair, a perturbed-attention call
        ("V_pag") three halves (grammar.call_size)."""
        calls_cost = 0.0
        for key, n in calls.items():
            model, pairs, _ = call_size(key)
            calls_cost += n * pairs * self.call[model]
        return calls_cost + (self.decode if decode else 0.0)


def count(fn) -> float:
    """FLOPs of `fn()` as torch's FLOP counter counts them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def _on_meta(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture on the meta device (a diffusers model rebuilt from its config)."""
    with torch.device("meta"):
        return type(model).from_config(model.config)


def _latent(frames: int, height: int, width: int, factor: int, channels: int, size: int | None = None):
    h, w = (size, size) if size else (height // factor, width // factor)
    return torch.empty((2, channels, frames, h, w), device="meta")


def measure(backbone, frames: int, height: int, width: int, fps: int, resize: str = "none") -> Costs:
    """Count `backbone`'s calls at one row's shape, on a meta twin of its models (its own ε functions, so every
    backbone's conditioning is what it really runs)."""
    twin = copy.copy(backbone)
    twin.unet, twin.image_unet, twin.vae = (_on_meta(m) for m in (backbone.unet, backbone.image_unet, backbone.vae))
    twin.device, twin.dtype = torch.device("meta"), torch.float32
    factor, channels = backbone.spatial_factor, backbone.latent_channels
    text_v = torch.empty((2, TOKENS, twin.unet.config.cross_attention_dim), device="meta")
    text_i = torch.empty((2 * frames, TOKENS, twin.image_unet.config.cross_attention_dim), device="meta")
    vdm = twin.vdm_eps(text_v, frames, fps)
    idm = framewise_eps(twin.image_unet, text_i, twin.dtype)
    x = _latent(frames, height, width, factor, channels)
    small = _latent(frames, height, width, factor, channels, PREVIEW if resize == "nearest64" else None)
    z = torch.empty((frames, channels, height // factor, width // factor), device="meta")
    return Costs({"V": count(lambda: vdm(x, 500)), "I": count(lambda: idm(small, 500))},
                 count(lambda: twin.vae.decode(z)))


def backbone_costs(backbone, frames: int, height: int, width: int, fps: int, resize: str = "none") -> Costs | None:
    """`measure`, kept per shape on the backbone (an actor counts each shape once); None where the models cannot be
    rebuilt on meta (a model that is not a diffusers model: no count rather than a wrong one)."""
    cache = backbone.__dict__.setdefault("_costs", {})
    key = (frames, height, width, fps, resize)
    if key not in cache:
        try:
            cache[key] = measure(backbone, frames, height, width, fps, resize)
        except Exception as err:  # noqa: BLE001 - a count is a report, never a reason to fail the video
            logger.warning("no FLOP count for %s at %d x %dx%d: %s", getattr(backbone, "name", "?"), frames, height,
                           width, " ".join(str(err).split())[:200])
            cache[key] = None
    return cache[key]


@functools.lru_cache(maxsize=64)
def published_costs(name: str, frames: int, height: int, width: int, fps: int, resize: str = "none") -> Costs:
    """`measure` on the published architectures of backbone `name`'s default models (pipelines/fixtures/published.py
    builds them on meta). ValueError for a backbone without a published layout here (VidRD)."""
    from .fixtures.published import meta_backbone  # lazy: builds diffusers models, only for --list-presets

    return measure(meta_backbone(registry.get(name)), frames, height, width, fps, resize)


def tflop(flops: float) -> float:
    return flops / 1e12

