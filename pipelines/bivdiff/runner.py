"""One BIVDiff worker: loads the models once, then turns resolved rows into videos (docs/algorithms.md §8).

stage 1 (diffusers task pipeline per frame, `stage1.py`; Prompt2Prompt first inverts the source frames with the SD
UNet, `invert_source`) -> SD-VAE encode (posterior sample from a CPU generator
seeded seed + 1) -> Mixed Inversion and smoothing (`program.py`, the IV-Mixed engine's moves) -> SD-VAE decode.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones.common import decode_latents, framewise_eps, load_pretrained, place
from ..backbones.registry import load_backbone
from ..sampling import CFGDenoiser
from ..schedule import AlphaTable
from . import inputs
from .config import BivdiffParams, BivdiffSpec
from .program import CLEAN, LatentSpace, State, bivdiff_sample, inversion_moves, run_moves
from .stage1 import Stage1

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BivdiffResult:
    params: BivdiffParams
    latents: torch.Tensor  # (1, C, F, h, w) float32 cpu, smoothed
    frames: torch.Tensor | None  # (F, H, W, 3) float32 in [0, 1]; None when not decoded
    stage1: np.ndarray  # (F, H, W, 3) uint8 frames that went into the inversion
    calls: dict  # {"I": image-inversion calls, "V": video calls (inversion + smoothing)}; stage-1 calls not counted
    seconds: float

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def nfe(self) -> int:
        """Network evaluations of stages 2-3: inversion calls are single passes, smoothing calls CFG pairs."""
        return self.total_calls + self.params.steps


class _Single:
    """A one-pass denoiser (no CFG: the inversion chains, docs/algorithms.md §8); w is ignored."""

    def __init__(self, eps_fn):
        self.eps_fn = eps_fn

    def __call__(self, x: torch.Tensor, timestep: int, w) -> torch.Tensor:
        return self.eps_fn(x, timestep).to(x.dtype)


class BIVDiff:
    """Models of one worker. The VDM backbone also holds the SD image model (frame-wise inversion UNet and its
    own text encoder); the SD VAE is loaded from the image model and is the one latent space (docs/algorithms.md §8)."""

    def __init__(self, spec: BivdiffSpec, stage1_batch: int = 8):
        from diffusers import AutoencoderKL

        self.spec = spec
        self.backbone = bb = load_backbone(spec.model_spec())
        self.vae = place(load_pretrained(AutoencoderKL, spec.image_model, torch.float32, subfolder="vae"), bb.device,
                         torch.float32)
        self.space = LatentSpace.from_vae_config(self.vae.config)
        if self.space.shift_factor:
            raise ValueError("image_model: VAEs with a shift_factor are not SD-1.5 latent spaces "
                             "(docs/algorithms.md §8)")
        vdm_space = LatentSpace.from_vae_config(bb.vae.config)
        if vdm_space != self.space:
            raise ValueError(f"video_model: the VDM's latent space ({vdm_space.describe()}) differs from the SD image "
                             f"model's ({self.space.describe()}); BIVDiff inverts, mixes and smooths in one shared "
                             "latent space (docs/algorithms.md §8)")
        for name, unet in (("video_model", bb.unet), ("image_model", bb.image_unet)):
            if int(unet.config.in_channels) != self.space.channels:
                raise ValueError(f"{name}: its UNet takes {unet.config.in_channels} latent channels, the SD VAE "
                                 f"has {self.space.channels}")
        self.table = AlphaTable.from_scheduler_config(bb.image_scheduler_config)
        if not self.table.same_as(AlphaTable.from_scheduler_config(bb.scheduler_config)):
            raise ValueError("video_model: its noise schedule (ᾱ table) differs from the SD image model's; BIVDiff "
                             "passes timesteps unchanged between the two (docs/algorithms.md §8)")
        self.device, self.dtype = bb.device, bb.dtype
        # the ControlNet pipeline shares the SD UNet and text encoder (already in the run dtype); its VAE is its own
        # copy in the run dtype, the fp32 one above stays the stages-2/3 latent space
        components = dict(text_encoder=bb.image_text_encoder, tokenizer=bb.image_tokenizer, unet=bb.image_unet)
        self.stage1 = Stage1(spec, components, bb.device, bb.dtype, batch=stage1_batch)
        self.vdm_fps = bb.defaults.fps  # fps conditioning of fps-aware VDMs (VideoCrafter2)

    @property
    def spatial_factor(self) -> int:
        return self.space.spatial_factor

    # -- stages ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frames: np.ndarray, seed: int, chunk: int = 16) -> State:
        """(F, H, W, 3) frames -> clean latents (1, C, F, h, w): posterior sample ε ~ CPU generator(seed + 1), one
        (F, C, h, w) draw, times the VAE's scaling factor (docs/algorithms.md §8)."""
        x = torch.from_numpy(inputs.to_signed(frames)).permute(0, 3, 1, 2).to(self.device, torch.float32)
        means, stds = [], []
        for i in range(0, x.shape[0], chunk):
            dist = self.vae.encode(x[i : i + chunk]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        mean, std = torch.cat(means), torch.cat(stds)
        noise = torch.randn(mean.shape, generator=torch.Generator("cpu").manual_seed(seed + 1), dtype=torch.float32)
        z = (mean + std * noise.to(mean.device)) * self.vae.config.scaling_factor
        return State(z.permute(1, 0, 2, 3).unsqueeze(0), CLEAN, self.space)

    def denoisers(self, p: BivdiffParams) -> dict:
        """"I": SD UNet per frame on the inversion text, "U": VDM on the inversion text (single passes),
        "V": VDM with CFG on [negative; vdm_prompt (+ tags)] (docs/algorithms.md §8)."""
        bb, f = self.backbone, p.frames
        inv = [p.inversion_text()]
        pos, neg = p.smoothing_prompts()
        return {"I": self.image_denoiser(p),
                "U": _Single(bb.vdm_eps(bb.encode_text(inv, "V"), f, self.vdm_fps)),
                "V": CFGDenoiser(bb.vdm_eps(bb.encode_text([neg, pos], "V"), f, self.vdm_fps))}

    def image_denoiser(self, p: BivdiffParams) -> _Single:
        """"I": the SD UNet frame by frame on the inversion text, one pass (docs/algorithms.md §8)."""
        emb = self.backbone.encode_text([p.inversion_text()], "I").repeat_interleave(p.frames, dim=0)
        return _Single(framewise_eps(self.backbone.image_unet, emb, self.dtype, joint_norm=p.frame_joint_norm))

    @torch.inference_mode()
    def invert_source(self, p: BivdiffParams, source: np.ndarray) -> torch.Tensor:
        """Prompt2Prompt's start latents (docs/algorithms.md §8): the source frames encoded like stage 2's, inverted by
        the SD UNet alone (α = 1) on the inversion text over the `idm_steps` grid P2P denoises on; (1, C, F, h, w)."""
        moves = inversion_moves(self.table, p.idm_steps, "I", compat=p.preset.compat)
        return run_moves({"I": self.image_denoiser(p)}, self.encode(source, p.seed), moves).x

    def run(self, p: BivdiffParams, *, decode: bool = True, callback=None,
            loaded: inputs.RowInputs | None = None) -> BivdiffResult:
        """One video; `loaded` = the row's inputs when the caller read (and so validated) them already."""
        start = time.perf_counter()
        self.backbone.check(p)
        source, mask, condition = loaded or inputs.read_row_inputs(p)
        idm = p.spec_task.idm
        if idm == "external":
            edited = source
        elif idm == "p2p":
            edited = self.stage1.p2p(p, self.invert_source(p, source))
        else:
            edited = self.stage1.run(p, source, mask, condition)
        z0 = self.encode(edited, p.seed)
        with torch.inference_mode():
            models = self.denoisers(p)
            x, calls = bivdiff_sample(models, z0, p.alpha, table=self.table, steps=p.steps,
                                      guidance=torch.tensor([p.guidance]), compat=p.preset.compat, callback=callback)
            frames = self.decode(x)[0] if decode else None
        stage1 = inputs.signed_to_uint8(edited)  # uint8 frames pass through
        return BivdiffResult(p, x.float().cpu(), frames, stage1, calls, time.perf_counter() - start)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents, self.device, self.spec.decode_chunk)
