"""Backbone registry: one thin adapter per video model behind the single denoiser contract."""
from __future__ import annotations

from ..config import ModelSpec
from .common import BackboneBase


def load_backbone(spec: ModelSpec) -> BackboneBase:
    """Load the models a spec names (hub ids or local folders) onto its device."""
    if spec.backbone == "animatediff":
        from .animatediff import AnimateDiff

        return AnimateDiff.from_spec(spec)
    if spec.backbone in ("modelscope", "zeroscope"):
        from .modelscope import ModelScope, ZeroScope

        return (ZeroScope if spec.backbone == "zeroscope" else ModelScope).from_spec(spec)
    if spec.backbone == "videocrafter2":
        from .videocrafter2 import VideoCrafter2

        return VideoCrafter2.from_spec(spec)
    raise ValueError(f"backbone: no adapter for {spec.backbone!r}")


__all__ = ["load_backbone", "BackboneBase"]
