"""Backbone registry: one thin adapter per video model behind the single denoiser contract."""
from __future__ import annotations

from ..config import ModelSpec
from .common import BackboneBase


def load_backbone(spec: ModelSpec) -> BackboneBase:
    """Load the models a spec names (hub ids or local folders) onto its device."""
    if spec.backbone == "animatediff":
        from .animatediff import AnimateDiff as cls
    elif spec.backbone in ("modelscope", "zeroscope"):
        from .modelscope import ModelScope, ZeroScope

        cls = ZeroScope if spec.backbone == "zeroscope" else ModelScope
    elif spec.backbone == "videocrafter2":
        from .videocrafter2 import VideoCrafter2 as cls
    else:
        raise ValueError(f"backbone: no adapter for {spec.backbone!r}")
    backbone = cls.from_spec(spec)
    backbone.decode_chunk = spec.decode_chunk
    return backbone


__all__ = ["load_backbone", "BackboneBase"]
