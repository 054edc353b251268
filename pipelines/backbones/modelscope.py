"""ModelScope T2V backbone (docs/algorithms.md §5): VDM = diffusers UNet3DConditionModel with its own CLIP text
encoder (it repeats the text per frame itself; fps is not an input: `BackboneBase.vdm_eps`); IDM = an SD1.5-family UNet
on folded frames with the IDM's *own* text encoder; shared SD VAE."""
from __future__ import annotations

import logging

from ..fixtures import fixture
from .common import BackboneBase, BackboneDefaults, load_pretrained, resolve_placement

logger = logging.getLogger(__name__)


class ModelScope(BackboneBase):
    name = "modelscope"
    # docs/algorithms.md §5: UNet3DConditionModel VDM, SD1.5 IDM with its own text encoder; the code runs
    # 16 x 512 x 512 (the model card's native size is 256)
    defaults = BackboneDefaults(
        base="ali-vilab/text-to-video-ms-1.7b",
        motion_adapter=None,
        image_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        frames=16, height=512, width=512, fps=8,
    )
    tiny = staticmethod(fixture("build_modelscope"))

    @classmethod
    def from_spec(cls, spec) -> "ModelScope":
        from diffusers import UNet3DConditionModel

        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading ModelScope: base=%s image_model=%s on %s/%s", spec.base, spec.image_model, device, dtype)
        unet = load_pretrained(UNet3DConditionModel, spec.base, dtype, subfolder="unet")
        return cls.assemble(spec, unet, dtype, device)  # fp32 decode (the ModelScope pipeline upcasts too)


class ZeroScope(ModelScope):
    """ZeroScope v2 (cerspense/zeroscope_v2_576w): a ModelScope-architecture UNet3DConditionModel fine-tune with the
    same folder layout; BIVDiff's stage-3 VDM (docs/algorithms.md §8)."""

    name = "zeroscope"
    # BIVDiff's VDM (docs/algorithms.md §8): ModelScope architecture; model card: 24 x 320 x 576 (BIVDiff runs
    # 8 x 512 x 512). Its tiny models are the BIVDiff set's video_model/ (`python -m pipelines.fixtures.tiny bivdiff`)
    defaults = BackboneDefaults(
        base="cerspense/zeroscope_v2_576w",
        motion_adapter=None,
        image_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        frames=24, height=320, width=576, fps=8,
    )
    tiny = None
