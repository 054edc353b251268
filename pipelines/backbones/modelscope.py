"""ModelScope T2V backbone (docs/algorithms.md §5): VDM = diffusers UNet3DConditionModel with its own CLIP text
encoder; IDM = an SD1.5-family UNet on folded frames with the IDM's *own* text encoder; shared SD VAE."""
from __future__ import annotations

import logging

import torch

from ..config import ModelSpec
from .common import (BackboneBase, load_base_components, load_own_text_image_model, load_pretrained, place,
                     resolve_placement)

logger = logging.getLogger(__name__)


class ModelScope(BackboneBase):
    name = "modelscope"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "ModelScope":
        from diffusers import UNet3DConditionModel

        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading ModelScope: base=%s image_model=%s on %s/%s", spec.base, spec.image_model, device, dtype)
        parts = {**load_base_components(spec, dtype), **load_own_text_image_model(spec, "ModelScope", dtype),
                 "unet": load_pretrained(UNet3DConditionModel, spec.base, dtype, subfolder="unet")}
        for name in ("text_encoder", "unet", "image_unet", "image_text_encoder"):
            place(parts[name], device, dtype)
        place(parts["vae"], device, torch.float32)  # fp32 decode (the ModelScope pipeline upcasts too)
        return cls(**parts, device=device, dtype=dtype)

    def vdm_eps(self, emb: torch.Tensor, frames: int, fps: int):
        """fps is not an input of this VDM; UNet3DConditionModel repeats the text per frame itself."""
        unet, dtype = self.unet, self.dtype

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            return unet(x.to(dtype), t, encoder_hidden_states=emb).sample

        return eps


class ZeroScope(ModelScope):
    """ZeroScope v2 (cerspense/zeroscope_v2_576w): a ModelScope-architecture UNet3DConditionModel fine-tune with the
    same folder layout; BIVDiff's stage-3 VDM (docs/algorithms.md §8)."""

    name = "zeroscope"
