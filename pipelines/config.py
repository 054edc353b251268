"""Frozen configuration: which models to load (`ModelSpec`; BIVDiff's in `pipelines/bivdiff/config.py`) and one
generated video's resolved parameters (`GenParams`); a row's bounds (`Limits`, `Structure`) live with the parameters
(params.py).

`resolve_params` (and BIVDiff's `resolve_bivdiff_params`) merge the defaults and validate once (types and bounds from
the one declaration of each parameter, `pipelines/params.py`), for the CLIs, the job's defaults and manifest rows alike,
so a bad value gets the same one-line `ValueError` wherever it comes from. `from_record` rebuilds resolved parameters
from their metadata record without validating again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from . import params, presets
from .backbones import registry
from .grammar import Interval, Variant, parse_variant
from .params import DEFAULT_LIMITS, Limits, Structure
from .schedule import CFGRamp, is_finite_number

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
PLACEMENT = ("device", "dtype", "decode_chunk", "compile", "channels_last")  # how a model set runs, not which one: not
# in its fingerprint


@dataclass(frozen=True)
class ModelSpec:
    """Models a worker loads. Job-level only: a manifest row can never choose a model or a file."""

    backbone: str = "animatediff"
    base: str | None = None  # VDM base pipeline (hub id or folder); None = the backbone's default
    motion_adapter: str | None = None
    image_model: str | None = None  # IDM pipeline or UNet folder
    unet: str | None = None  # VDM UNet folder loaded on its own (VideoCrafter2); None = the backbone's default
    vae: str | None = None  # None: the base pipeline's VAE
    lora: str | None = None  # LoRA for the IDM UNet (file, folder or hub id)
    lora_scale: float = 1.0
    dtype: str = presets.DEFAULT_DTYPE
    device: str = presets.DEFAULT_DEVICE
    decode_chunk: int = presets.DEFAULT_DECODE_CHUNK  # frames per VAE decode call (docs/checkpoints.md "Memory")
    compile: str = "auto"  # torch.compile of the UNets' and VAE decoder's repeated blocks: auto (on for CUDA), on, off
    channels_last: str = "auto"  # channels-last convolution weights: auto (on for CUDA), on, off (docs/speed.md)

    def __post_init__(self) -> None:
        check_placement(self)
        defaults = registry.defaults(self.backbone)  # an unknown backbone: ValueError with the choices
        if not is_finite_number(self.lora_scale):
            raise ValueError(f"lora_scale: must be a finite number, got {self.lora_scale!r}")
        for name in ("base", "motion_adapter", "image_model", "unet"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(defaults, name))

    @classmethod
    def from_model_dir(cls, backbone: str, model_dir: str, **kw: Any) -> "ModelSpec":
        """The folder layout written by `python -m pipelines.fixtures.tiny BACKBONE DIR`."""
        adapter, unet = os.path.join(model_dir, "motion_adapter"), os.path.join(model_dir, "unet")
        return cls(backbone=backbone, base=os.path.join(model_dir, "base"),
                   motion_adapter=adapter if os.path.isdir(adapter) else None,
                   unet=unet if os.path.isdir(unet) else None,
                   image_model=os.path.join(model_dir, "image_model"), **kw)

    def fingerprint(self) -> str:
        """Identifies the model set (not device/dtype placement) for output ids."""
        return spec_fingerprint(self)


def spec_json(spec) -> str:
    """A model spec (ModelSpec or BivdiffSpec) as sorted JSON without its placement (device, dtype, decode chunk)."""
    return json.dumps({k: v for k, v in asdict(spec).items() if k not in PLACEMENT}, sort_keys=True)


def check_placement(spec) -> None:
    """The placement fields every model spec has: dtype and decode chunk."""
    if spec.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: must be one of {DTYPE_NAMES}, got {spec.dtype!r}")
    if isinstance(spec.decode_chunk, bool) or not isinstance(spec.decode_chunk, int) or spec.decode_chunk < 1:
        raise ValueError(f"decode_chunk: must be an integer >= 1, got {spec.decode_chunk!r}")
    for name in ("compile", "channels_last"):
        if getattr(spec, name, "auto") not in presets.SPEED_SWITCHES:
            raise ValueError(f"{name}: must be one of {presets.SPEED_SWITCHES}, got {getattr(spec, name)!r}")


def spec_fingerprint(spec) -> str:
    return hashlib.sha256(spec_json(spec).encode()).hexdigest()[:16]




@dataclass(frozen=True)
class GenParams:
    """Everything that determines one video, resolved and validated."""

    prompt: str
    negative_prompt: str
    seed: int
    sampler: str
    variant: str  # canonical grammar pattern
    steps: int
    frames: int
    height: int
    width: int
    fps: int
    guidance: float
    idm_guidance: CFGRamp
    vdm_guidance: CFGRamp
    interval: Interval
    zz: int | None

    kind = params.GENERATION

    @property
    def preset(self) -> presets.Preset:
        return presets.PRESETS[self.sampler]

    @property
    def parsed(self) -> Variant:
        return parse_variant(self.variant).variant

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one batched sampler call (same size, frames, steps, variant)."""
        return (self.sampler, self.variant, self.steps, self.frames, self.height, self.width,
                self.interval, self.zz, self.fps)  # fps: VideoCrafter2 conditions on it

    def record(self) -> dict[str, Any]:
        """Plain values for metadata tables and MLflow params."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["idm_guidance"] = self.idm_guidance.text()
        out["vdm_guidance"] = self.vdm_guidance.text()
        out["interval"] = self.interval.text()
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "GenParams":
        """The resolved parameters back from `record()` (no second validation: the record was made by
        resolve_params)."""
        out = {f.name: record[f.name] for f in fields(cls)}
        out.update(idm_guidance=CFGRamp.parse(out["idm_guidance"]), vdm_guidance=CFGRamp.parse(out["vdm_guidance"]),
                   interval=Interval.parse(out["interval"]))
        return cls(**out)


def present(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only None (an absent key or a null Parquet cell read through Arrow) means 'use the default'; NaN is an error."""
    return {k: v for k, v in (row or {}).items() if v is not None}


def resolve_params(row: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *, backbone: str = "animatediff",
                   structure: Structure = Structure(), limits: Limits = DEFAULT_LIMITS) -> GenParams:
    """Merge preset < variant options < job defaults < row values, then validate every field.

    Unknown keys are ignored here (manifest columns pass through to metadata); absent or null values
    take the default. Raises ValueError naming the parameter.
    """
    merged = {**present(defaults), **present(row)}
    sampler = merged.get("sampler", presets.DEFAULT_SAMPLER)
    if sampler not in presets.PRESETS:
        raise ValueError(f"sampler: unknown preset {sampler!r}; choose one of {sorted(presets.PRESETS)}")
    preset = presets.PRESETS[sampler]
    if preset.backbones and backbone not in preset.backbones:
        takes = sorted(n for n, p in presets.PRESETS.items() if not p.backbones or backbone in p.backbones)
        why = "runs on" if preset.applies_only else "reproduces the code of"
        raise ValueError(f"sampler: preset {sampler!r} {why} the {'/'.join(preset.backbones)} backbone only; "
                         f"the {backbone} backbone takes {takes}")
    bb = registry.defaults(backbone)
    base = {"negative_prompt": presets.DEFAULT_NEGATIVE_PROMPT, "seed": presets.DEFAULT_SEED,
            "steps": bb.steps, "frames": bb.frames, "height": bb.height, "width": bb.width, "fps": bb.fps,
            "guidance": bb.guidance if bb.guidance is not None else preset.guidance,
            "idm_guidance": preset.idm_guidance,
            "vdm_guidance": preset.vdm_guidance, "interval": preset.interval, "zz": preset.zz, **preset.overrides}
    pattern = merged.get("variant", preset.variant)
    if not isinstance(pattern, str):
        raise ValueError(f"variant: must be a string pattern, got {pattern!r}")
    try:
        parsed = parse_variant(pattern)
    except ValueError as err:
        raise ValueError(f"variant: {err}") from None
    values = params.validate(params.GENERATION, {**base, **parsed.params, **merged, "sampler": sampler,
                                                 "variant": parsed.variant.pattern()})
    if not values["prompt"].strip():
        raise ValueError("prompt: must be a non-empty string")
    limits.check(values["frames"], values["height"], values["width"], values["steps"])
    windows = parsed.variant.freenoise
    structure.check(values["frames"], values["height"], values["width"], windows and windows[0])
    try:
        values["interval"].check(values["steps"])
    except ValueError as err:
        raise ValueError(f"interval: {err}") from None
    return GenParams(**values)
