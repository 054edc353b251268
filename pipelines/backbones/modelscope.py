"""ModelScope T2V backbone (backbones spec C): VDM = diffusers UNet3DConditionModel with its own CLIP text
encoder; IDM = an SD1.5-family UNet on folded frames with the IDM's *own* text encoder; shared SD VAE."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..config import ModelSpec
from ..sampling import CFGDenoiser, Denoiser
from .common import (BackboneBase, framewise_eps, load_base_components, load_own_text_image_model, place,
                     resolve_placement)

logger = logging.getLogger(__name__)


class ModelScope(BackboneBase):
    name = "modelscope"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "ModelScope":
        from diffusers import UNet3DConditionModel

        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading ModelScope: base=%s image_model=%s on %s/%s", spec.base, spec.image_model, device, dtype)
        parts = {**load_base_components(spec), **load_own_text_image_model(spec, "ModelScope"),
                 "unet": UNet3DConditionModel.from_pretrained(spec.base, subfolder="unet")}
        for name in ("text_encoder", "unet", "image_unet", "image_text_encoder"):
            place(parts[name], device, dtype)
        place(parts["vae"], device, torch.float32)  # fp32 decode (backbones spec C.7)
        return cls(**parts, device=device, dtype=dtype)

    def denoisers(self, prompts: Sequence[str], negatives: Sequence[str], *, frames: int, idm_text: str,
                  fps: int) -> dict[str, Denoiser]:
        """fps is not an input of this VDM."""
        emb_v, emb_i = self.own_text_embeddings(prompts, negatives, frames, idm_text)
        unet, dtype = self.unet, self.dtype

        def vdm_eps(x2: torch.Tensor, t: int) -> torch.Tensor:  # UNet3DConditionModel repeats the text per frame
            return unet(x2.to(dtype), t, encoder_hidden_states=emb_v).sample

        return {"V": CFGDenoiser(vdm_eps), "I": CFGDenoiser(framewise_eps(self.image_unet, emb_i, dtype))}
