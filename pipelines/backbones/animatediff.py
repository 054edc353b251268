"""AnimateDiff backbone (docs/algorithms.md §5): VDM = UNetMotionModel(base SD1.5-family UNet + motion
adapter), IDM = an SD1.5-family UNet2DConditionModel on frames folded into the batch, shared VAE.

Every model comes from `from_pretrained` with a hub id or a local folder; the default ids are the class's `defaults`
(what a model spec leaves unset), nothing else here names one.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..fixtures import fixture
from ..freenoise import frame_text
from ..sampling import Denoiser
from .common import (
    BackboneBase,
    BackboneDefaults,
    encode_prompts,
    load_image_model,
    load_pretrained,
    load_vae,
    place,
    read_config,
    resolve_placement,
)

logger = logging.getLogger(__name__)


def motion_unet(unet, adapter):
    """UNetMotionModel from the base UNet's and the adapter's tensors, built on the meta device and filled tensor by
    tensor (each copied into a fresh allocation, its source released), so host RAM stays near the weights' size.
    `UNetMotionModel.from_unet2d` builds a float32 model first (2x the float16 weights and more); it is used for
    layouts whose keys do not line up. Copies, not views, keep the output bit-identical to diffusers' pipeline."""
    from diffusers import UNetMotionModel

    with torch.device("meta"):
        model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    state = {**unet.state_dict(), **{k: v for k, v in adapter.state_dict().items() if ".motion_modules." in k}}
    if state.keys() != model.state_dict().keys():
        logger.debug("motion UNet keys differ from the base UNet's and the adapter's; copying through from_unet2d")
        return UNetMotionModel.from_unet2d(unet, adapter)
    del unet, adapter  # the state dict now holds the only references: each source goes once it is copied
    filled = {}
    for key in list(state):
        filled[key] = state.pop(key).clone()
    model.load_state_dict(filled, assign=True)
    return model


class AnimateDiff(BackboneBase):
    name = "animatediff"
    # docs/algorithms.md §5: RV5.1 + motion adapter v1-5-3 as VDM, SD1.5 as IDM, 16 x 512 x 512, 8 fps output
    defaults = BackboneDefaults(
        base="SG161222/Realistic_Vision_V5.1_noVAE",
        motion_adapter="guoyww/animatediff-motion-adapter-v1-5-3",
        image_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        frames=16, height=512, width=512, fps=8,
    )
    tiny = staticmethod(fixture("build_animatediff"))

    def __init__(self, **components):
        super().__init__(**components)
        self.max_frames = int(getattr(self.unet.config, "motion_max_seq_length", 32) or 32)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def _read_max_frames(cls, spec) -> int:
        """The motion adapter's positional table bounds the frames (its config, no weights)."""
        return int(read_config(spec.motion_adapter).get("motion_max_seq_length") or 32)

    @classmethod
    def from_spec(cls, spec) -> "AnimateDiff":
        from diffusers import DDIMScheduler, MotionAdapter, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading AnimateDiff: base=%s motion_adapter=%s image_model=%s on %s/%s",
                    spec.base, spec.motion_adapter, spec.image_model, device, dtype)
        tokenizer = CLIPTokenizer.from_pretrained(spec.base, subfolder="tokenizer")
        text_encoder = load_pretrained(CLIPTextModel, spec.base, dtype, subfolder="text_encoder")
        vae = load_vae(spec)
        unet = motion_unet(load_pretrained(UNet2DConditionModel, spec.base, dtype, subfolder="unet"),
                           load_pretrained(MotionAdapter, spec.motion_adapter, dtype))
        scheduler_config = DDIMScheduler.load_config(spec.base, subfolder="scheduler")
        image_unet, image_tokenizer, image_text_encoder, image_scheduler_config = load_image_model(
            spec.image_model, spec.lora, spec.lora_scale, dtype)
        for m in (text_encoder, unet, image_unet, image_text_encoder):
            if m is not None:
                place(m, device, dtype)
        place(vae, device, torch.float32)  # fp32 decode (docs/algorithms.md §5)
        return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                   scheduler_config=scheduler_config, image_unet=image_unet, image_tokenizer=image_tokenizer,
                   image_text_encoder=image_text_encoder, image_scheduler_config=image_scheduler_config,
                   device=device, dtype=dtype)

    # -- conditioning and denoisers -------------------------------------------------------------
    def denoisers(self, prompts: Sequence[str], negatives: Sequence[str], *, frames: int, idm_text: str,
                  fps: int, pag: float | None = None, freenoise: tuple[int, int] | None = None
                  ) -> dict[str, Denoiser]:
        """Bind the batch's text conditioning into one CFG denoiser per model ("V" and "I"); fps is not an input;
        `pag`: the video model's with perturbed-attention guidance of that scale; `freenoise`: the video model's text
        per frame as FreeNoise interpolates it (pipelines/freenoise.py)."""
        # (2B, L, D): negatives first, then prompts, as the CFG halves of docs/algorithms.md §1
        emb_v = encode_prompts(self.tokenizer, self.text_encoder, [*negatives, *prompts], self.device)
        if idm_text == "vdm" or self.image_text_encoder is None:
            if idm_text == "own":
                logger.warning("image model has no text encoder; the IDM uses the VDM's text embeddings")
            emb_i = emb_v
        else:
            emb_i = encode_prompts(self.image_tokenizer, self.image_text_encoder, [*negatives, *prompts], self.device)
        emb_i = emb_i.to(self.dtype).repeat_interleave(frames, dim=0)
        b = len(prompts)  # the prompt halves alone: the steps without guidance (a variant's cfg=)
        per_frame = None if freenoise is None else (lambda e: self.frame_eps(frame_text(e, frames)))
        return {"V": self.video_denoiser(emb_v.to(self.dtype), b, frames, fps, pag, per_frame),
                "I": self.image_denoiser(emb_i, b, frames)}

    def vdm_eps(self, emb: torch.Tensor, frames: int, fps: int):
        """UNetMotionModel takes the text per frame: (B', L, D) is repeated to (B'*F, L, D), as AnimateDiffPipeline."""
        return self.frame_eps(emb.repeat_interleave(frames, dim=0))

    def frame_eps(self, emb: torch.Tensor):
        """ε of the motion UNet on (B', C, F, h, w) latents with (B'*F, L, D) per-frame text embeddings bound."""
        unet, dtype = self.unet, self.dtype

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:  # x: (B', C, F, h, w)
            return unet(x.to(dtype), t, encoder_hidden_states=emb).sample

        return eps
