"""Backbone registry: one thin adapter per video model behind the single denoiser contract."""
from __future__ import annotations

import logging
import os

from ..config import ModelSpec
from ..params import Structure
from .common import BackboneBase

logger = logging.getLogger(__name__)


def load_backbone(spec: ModelSpec) -> BackboneBase:
    """Load the models a spec names (hub ids or local folders) onto its device."""
    if spec.backbone == "animatediff":
        from .animatediff import AnimateDiff as cls
    elif spec.backbone in ("modelscope", "zeroscope"):
        from .modelscope import ModelScope, ZeroScope

        cls = ZeroScope if spec.backbone == "zeroscope" else ModelScope
    elif spec.backbone == "vidrd":
        from .vidrd import VidRD as cls
    elif spec.backbone == "videocrafter2":
        from .videocrafter2 import VideoCrafter2 as cls
    else:
        raise ValueError(f"backbone: no adapter for {spec.backbone!r}")
    backbone = cls.from_spec(spec)
    backbone.decode_chunk = spec.decode_chunk
    return backbone


def structure(spec: ModelSpec) -> Structure:
    """The model set's VAE factor and frame limit read from its config files, without weights: what the driver resolves
    rows with. Config files it cannot read (a hub id with no access from the driver) leave the default (factor 8, no
    frame limit) with a warning; the actor's `backbone.check` applies the loaded models' own facts anyway."""
    from diffusers import AutoencoderKL, MotionAdapter

    def vae_config() -> dict:
        if not spec.vae:
            return AutoencoderKL.load_config(spec.base, subfolder="vae")
        root = os.path.isfile(os.path.join(spec.vae, "config.json")) or not os.path.isdir(spec.vae)
        try:
            return AutoencoderKL.load_config(spec.vae, subfolder=None if root else "vae")
        except OSError:
            return AutoencoderKL.load_config(spec.vae, subfolder="vae")

    try:
        factor = 2 ** (len(vae_config()["block_out_channels"]) - 1)
        frames = None
        if spec.backbone == "animatediff":
            frames = int(MotionAdapter.load_config(spec.motion_adapter).get("motion_max_seq_length") or 32)
        return Structure(factor, frames)
    except Exception as err:  # noqa: BLE001 - no hub access, a missing folder: the actors check anyway
        logger.warning("could not read the model configs (%s); rows are checked against a VAE factor of 8 here and "
                       "against the loaded models in the actors", " ".join(str(err).split())[:200])
        return Structure()


__all__ = ["load_backbone", "structure", "BackboneBase"]
