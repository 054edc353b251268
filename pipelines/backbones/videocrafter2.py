"""VideoCrafter2 backbone (docs/algorithms.md §5): the VC UNet (fps-conditioned UNet3D), zeroscope's VAE, text encoder,
tokenizer and scheduler config, an SD-family IDM with its own text encoder, SDE-DPM-Solver++ (order 2) main steps
(`sampling.sde_dpmpp_2m`, chosen by the class's `main_solver`)."""
from __future__ import annotations

import logging

import torch

from ..fixtures import fixture
from .common import BackboneBase, BackboneDefaults, load_pretrained, resolve_placement

logger = logging.getLogger(__name__)


class VideoCrafter2(BackboneBase):
    name = "videocrafter2"
    # docs/algorithms.md §5: VideoCrafter2 UNet (diffusers conversion) + zeroscope's VAE/text encoder/scheduler, RV6.0
    # IDM, fps conditioning 24, SDE-DPM-Solver++ main steps with CFG 9.0
    defaults = BackboneDefaults(
        base="cerspense/zeroscope_v2_576w",
        motion_adapter=None,
        image_model="SG161222/Realistic_Vision_V6.0_B1_noVAE",
        unet="adamdad/videocrafterv2_diffusers",
        frames=16, height=512, width=512, fps=24, guidance=9.0,
    )
    main_solver = "sde-dpmpp2m"
    tiny = staticmethod(fixture("build_videocrafter2"))

    @classmethod
    def from_spec(cls, spec) -> "VideoCrafter2":
        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading VideoCrafter2: unet=%s base=%s image_model=%s on %s/%s", spec.unet, spec.base,
                    spec.image_model, device, dtype)
        from .videocrafter_unet import UNet3DVideoCrafterConditionModel  # lazy: keeps diffusers out of row resolution

        unet, info = load_pretrained(UNet3DVideoCrafterConditionModel, spec.unet, dtype, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:  # docs/algorithms.md §5: never run without fps weights
            raise ValueError(f"unet: {spec.unet!r} does not match the VideoCrafter2 layout "
                             f"(missing {info['missing_keys'][:4]}, unexpected {info['unexpected_keys'][:4]})")
        # the VC code decodes in the run dtype; every backbone here decodes in float32 (docs/checkpoints.md)
        return cls.assemble(spec, unet, dtype, device)

    def vdm_eps(self, emb: torch.Tensor, frames: int, fps: int):
        """The VC UNet is conditioned on fps (the code: 24)."""
        unet, dtype = self.unet, self.dtype

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            return unet(x.to(dtype), t, emb, fps).sample

        return eps
