"""The backbone registry: name -> backbone class, the one place the library looks a backbone up (model specs, row
defaults, the CLIs' choices, loading, the driver's structure checks, the tiny fixtures).

Each class carries its name, its defaults (`BackboneDefaults`), its main solver, its tiny fixture builder and how its
structure is read (`BackboneBase`). Adding a backbone = one module with its class + one line in `BUILTIN` below.
"""
from __future__ import annotations

from ..params import Structure
from ..speed import accelerate
from .animatediff import AnimateDiff
from .common import BackboneBase, BackboneDefaults
from .modelscope import ModelScope, ZeroScope
from .videocrafter2 import VideoCrafter2
from .vidrd import VidRD

BUILTIN: tuple[type[BackboneBase], ...] = (AnimateDiff, ModelScope, ZeroScope, VideoCrafter2, VidRD)
BACKBONES: dict[str, type[BackboneBase]] = {}  # in registration order (the CLIs list them so)


def register(cls: type[BackboneBase]) -> type[BackboneBase]:
    """Make a backbone class usable by its `name` everywhere (specs, defaults, CLI choices, loading); usable as a
    class decorator."""
    if not isinstance(getattr(cls, "name", None), str) or not isinstance(getattr(cls, "defaults", None),
                                                                          BackboneDefaults):
        raise ValueError(f"backbone: {cls.__name__} needs a `name` and `defaults` (BackboneDefaults) to register")
    if cls.name in BACKBONES and BACKBONES[cls.name] is not cls:
        raise ValueError(f"backbone: {cls.name!r} is already registered ({BACKBONES[cls.name].__name__})")
    BACKBONES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    BACKBONES.pop(name, None)


def get(name: str) -> type[BackboneBase]:
    """The class registered as `name`; an unknown name is a ValueError listing the choices."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(f"backbone: unknown {name!r}; choose one of {sorted(BACKBONES)}") from None


def defaults(name: str) -> BackboneDefaults:
    return get(name).defaults


def load_backbone(spec) -> BackboneBase:
    """Load the models a spec (`config.ModelSpec`) names (hub ids or local folders) onto its device."""
    backbone = get(spec.backbone).from_spec(spec)
    backbone.decode_chunk = spec.decode_chunk
    accelerate(backbone, compile=spec.compile, channels_last=spec.channels_last)
    return backbone


def structure(spec) -> Structure:
    """The spec's VAE factor and frame limit from its config files, without weights (`BackboneBase.read_structure`)."""
    return get(spec.backbone).read_structure(spec)


for _cls in BUILTIN:
    register(_cls)
