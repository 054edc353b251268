"""ModelScope T2V backbone (docs/algorithms.md §5): VDM = diffusers UNet3DConditionModel with its own CLIP text
encoder (it repeats the text per frame itself; fps is not an input: `BackboneBase.vdm_eps`); IDM = an SD1.5-family UNet
on folded frames with the IDM's *own* text encoder; shared SD VAE."""
from __future__ import annotations

import logging

from ..config import ModelSpec
from .common import BackboneBase, load_pretrained, resolve_placement

logger = logging.getLogger(__name__)


class ModelScope(BackboneBase):
    name = "modelscope"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "ModelScope":
        from diffusers import UNet3DConditionModel

        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading ModelScope: base=%s image_model=%s on %s/%s", spec.base, spec.image_model, device, dtype)
        unet = load_pretrained(UNet3DConditionModel, spec.base, dtype, subfolder="unet")
        return cls.assemble(spec, unet, dtype, device)  # fp32 decode (the ModelScope pipeline upcasts too)


class ZeroScope(ModelScope):
    """ZeroScope v2 (cerspense/zeroscope_v2_576w): a ModelScope-architecture UNet3DConditionModel fine-tune with the
    same folder layout; BIVDiff's stage-3 VDM (docs/algorithms.md §8)."""

    name = "zeroscope"
