"""Frozen configuration: which models to load (`ModelSpec`, `BivdiffSpec`), a row's bounds (`Limits`, `Structure`) and
one video's resolved parameters (`GenParams`, `BivdiffParams`).

`resolve_params` / `resolve_bivdiff_params` merge the defaults and validate once (types and bounds from the one
declaration of each parameter, `pipelines/params.py`), for the CLIs, the job's defaults and manifest rows alike, so a
bad value gets the same one-line `ValueError` wherever it comes from. `from_record` rebuilds resolved parameters
from their metadata record without validating again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from . import params as schema
from . import presets
from .grammar import Interval, Variant, parse_variant
from .schedule import CFGRamp, is_finite_number

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
PLACEMENT = ("device", "dtype", "decode_chunk")  # how a model set runs, not which one: not in its fingerprint


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
    decode_chunk: int = presets.DEFAULT_DECODE_CHUNK  # frames per VAE decode call (README "Memory")

    def __post_init__(self) -> None:
        check_decode_chunk(self.decode_chunk)
        if self.backbone not in presets.BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r}; choose one of {sorted(presets.BACKBONES)}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype: must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if not is_finite_number(self.lora_scale):
            raise ValueError(f"lora_scale: must be a finite number, got {self.lora_scale!r}")
        defaults = presets.BACKBONES[self.backbone]
        for name in ("base", "motion_adapter", "image_model", "unet"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(defaults, name))

    @classmethod
    def from_model_dir(cls, backbone: str, model_dir: str, **kw: Any) -> "ModelSpec":
        """The folder layout written by `python -m pipelines.tiny BACKBONE DIR`."""
        import os

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


def check_decode_chunk(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"decode_chunk: must be an integer >= 1, got {value!r}")


def spec_fingerprint(spec) -> str:
    return hashlib.sha256(spec_json(spec).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Limits:
    """Upper bounds of one row (job config `limits:`; the CLIs use these defaults). A row over them fails alone, before
    any model work: no row may ask a worker for more than it can hold (README, "Reliability")."""

    max_frames: int = 256
    max_height: int = 2048
    max_width: int = 2048
    max_steps: int = 1000
    max_pixels: int = 2**26  # frames x height x width: 64 frames at 1024 x 1024, 256 at 512 x 512

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limits.{f.name}: must be an integer >= 1, got {v!r}")

    def check(self, frames: int, height: int, width: int, steps: int) -> None:
        for name, value in (("frames", frames), ("height", height), ("width", width), ("steps", steps)):
            bound = getattr(self, f"max_{name}")
            if value > bound:
                raise ValueError(f"{name}: at most {bound} (limits.max_{name}), got {value}")
        if frames * height * width > self.max_pixels:
            raise ValueError(f"frames: {frames} x {height} x {width} = {frames * height * width:,} pixels exceed "
                             f"limits.max_pixels = {self.max_pixels:,}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Structure:
    """What a model set allows structurally: sizes in multiples of its VAE factor, at most `max_frames` frames (a motion
    adapter's positional table). Read from config files without weights (`backbones.structure`), or from a loaded
    backbone; `check` is the one place these rules live."""

    spatial_factor: int = 8
    max_frames: int | None = None

    def check(self, frames: int, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if v % self.spatial_factor:
                raise ValueError(f"{name}: must be a multiple of the VAE factor {self.spatial_factor}, got {v}")
        if self.max_frames is not None and frames > self.max_frames:
            raise ValueError(f"frames: the motion adapter handles at most {self.max_frames} frames, got {frames}")


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

    kind = schema.GENERATION

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
        """The resolved parameters back from `record()` (no second validation: the record was made by resolve_params)."""
        out = {f.name: record[f.name] for f in fields(cls)}
        out.update(idm_guidance=CFGRamp.parse(out["idm_guidance"]), vdm_guidance=CFGRamp.parse(out["vdm_guidance"]),
                   interval=Interval.parse(out["interval"]))
        return cls(**out)


def _present(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only None (an absent key or a null Parquet cell read through Arrow) means 'use the default'; NaN is an error."""
    return {k: v for k, v in (row or {}).items() if v is not None}


def resolve_params(row: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *, backbone: str = "animatediff",
                   structure: Structure = Structure(), limits: Limits = DEFAULT_LIMITS) -> GenParams:
    """Merge preset < variant options < job defaults < row values, then validate every field.

    Unknown keys are ignored here (manifest columns pass through to metadata); absent or null values
    take the default. Raises ValueError naming the parameter.
    """
    merged = {**_present(defaults), **_present(row)}
    sampler = merged.get("sampler", presets.DEFAULT_SAMPLER)
    if sampler not in presets.PRESETS:
        raise ValueError(f"sampler: unknown preset {sampler!r}; choose one of {sorted(presets.PRESETS)}")
    preset = presets.PRESETS[sampler]
    if preset.backbones and backbone not in preset.backbones:
        raise ValueError(f"sampler: preset {sampler!r} reproduces the {'/'.join(preset.backbones)} code; "
                         f"the {backbone} backbone takes {sorted(n for n, p in presets.PRESETS.items() if not p.backbones or backbone in p.backbones)}")
    bb = presets.BACKBONES[backbone]
    base = {"negative_prompt": presets.DEFAULT_NEGATIVE_PROMPT, "seed": presets.DEFAULT_SEED,
            "steps": bb.steps, "frames": bb.frames, "height": bb.height, "width": bb.width, "fps": bb.fps,
            "guidance": bb.guidance if bb.guidance is not None else preset.guidance, "idm_guidance": preset.idm_guidance,
            "vdm_guidance": preset.vdm_guidance, "interval": preset.interval, "zz": preset.zz, **preset.overrides}
    pattern = merged.get("variant", preset.variant)
    if not isinstance(pattern, str):
        raise ValueError(f"variant: must be a string pattern, got {pattern!r}")
    try:
        parsed = parse_variant(pattern)
    except ValueError as err:
        raise ValueError(f"variant: {err}") from None
    values = schema.validate(schema.GENERATION, {**base, **parsed.params, **merged, "sampler": sampler,
                                                 "variant": parsed.variant.pattern()})
    if not values["prompt"].strip():
        raise ValueError("prompt: must be a non-empty string")
    limits.check(values["frames"], values["height"], values["width"], values["steps"])
    structure.check(values["frames"], values["height"], values["width"])
    try:
        values["interval"].check(values["steps"])
    except ValueError as err:
        raise ValueError(f"interval: {err}") from None
    return GenParams(**values)


# ---- BIVDiff (docs/algorithms.md) -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BivdiffSpec:
    """Models of a BIVDiff worker (job-level, like ModelSpec): the stage-3 VDM, the SD image model (inversion UNet,
    the shared VAE, the ControlNet base) and one model per stage-1 task kind. Hub ids or local folders."""

    vdm: str = presets.BIVDIFF_MODELS["vdm"]
    video_model: str | None = None  # the VDM's pipeline folder; None = the backbone's default
    video_unet: str | None = None  # VideoCrafter2's own UNet folder
    motion_adapter: str | None = None  # AnimateDiff as the VDM
    image_model: str = presets.BIVDIFF_MODELS["image_model"]
    controlnet_canny: str = presets.BIVDIFF_MODELS["controlnet_canny"]
    controlnet_depth: str = presets.BIVDIFF_MODELS["controlnet_depth"]
    controlnet_pose: str = presets.BIVDIFF_MODELS["controlnet_pose"]
    instruct_pix2pix: str = presets.BIVDIFF_MODELS["instruct_pix2pix"]
    inpainting: str = presets.BIVDIFF_MODELS["inpainting"]
    dtype: str = presets.DEFAULT_DTYPE
    device: str = presets.DEFAULT_DEVICE
    decode_chunk: int = presets.DEFAULT_DECODE_CHUNK

    def __post_init__(self) -> None:
        check_decode_chunk(self.decode_chunk)
        if self.vdm not in presets.BIVDIFF_VDMS:
            raise ValueError(f"vdm: BIVDiff's video model must be one of {presets.BIVDIFF_VDMS}, got {self.vdm!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype: must be one of {DTYPE_NAMES}, got {self.dtype!r}")

    @classmethod
    def from_model_dir(cls, model_dir: str, **kw: Any) -> "BivdiffSpec":
        """The folder layout written by `python -m pipelines.tiny bivdiff DIR`."""
        import os

        j = lambda name: os.path.join(model_dir, name)  # noqa: E731
        return cls(video_model=j("video_model"), image_model=j("image_model"), controlnet_canny=j("controlnet"),
                   controlnet_depth=j("controlnet"), controlnet_pose=j("controlnet"),
                   instruct_pix2pix=j("instruct_pix2pix"), inpainting=j("inpainting"), **kw)

    def model_spec(self) -> ModelSpec:
        """The backbone that serves the VDM (stage 2 video chain and stage 3) and the SD inversion UNet."""
        return ModelSpec(backbone=self.vdm, base=self.video_model, unet=self.video_unet,
                         motion_adapter=self.motion_adapter, image_model=self.image_model,
                         dtype=self.dtype, device=self.device, decode_chunk=self.decode_chunk)

    def task_model(self, task: "presets.BivdiffTask") -> str | None:
        if task.idm == "controlnet":
            return getattr(self, f"controlnet_{task.condition}")
        return {"instruct_pix2pix": self.instruct_pix2pix, "inpainting": self.inpainting}.get(task.idm)

    def fingerprint(self) -> str:
        return spec_fingerprint(self)


@dataclass(frozen=True)
class BivdiffParams:
    """Everything that determines one BIVDiff video (docs/algorithms.md "BIVDiff"), resolved and validated."""

    task: str
    source_video: str | None
    mask_video: str | None
    condition_video: str | None
    idm_prompt: str
    vdm_prompt: str
    negative_prompt: str
    inversion_prompt: str  # clean preset only; compat inverts under the negative prompt
    alpha: float
    sampler: str  # "bivdiff" | "bivdiff_compat"
    frame_joint_norm: bool
    steps: int
    idm_steps: int
    frames: int
    stride: int
    height: int
    width: int
    seed: int
    guidance: float
    idm_guidance: float
    image_guidance: float
    fps: int
    noise: str  # stage-1 noise: "independent" (one generator across frames, official) | "shared" | "per_frame" (stage1.py)

    kind = schema.BIVDIFF

    @property
    def preset(self) -> "presets.BivdiffPreset":
        return presets.BIVDIFF_PRESETS[self.sampler]

    @property
    def spec_task(self) -> "presets.BivdiffTask":
        return presets.BIVDIFF_TASKS[self.task]

    def stage1_prompts(self) -> tuple[str, str]:
        tags = self.spec_task.quality_tags
        return self.idm_prompt + (presets.BIVDIFF_POS if tags else ""), self.negative_prompt

    def smoothing_prompts(self) -> tuple[str, str]:
        tags = self.spec_task.quality_tags
        return self.vdm_prompt + (presets.BIVDIFF_POS if tags else ""), self.negative_prompt

    def inversion_text(self) -> str:
        return self.negative_prompt if self.preset.compat else self.inversion_prompt

    @property
    def prompt(self) -> str:
        """The caption of the output video (metadata and CLIP scores): the VDM prompt."""
        return self.vdm_prompt

    def record(self) -> dict[str, Any]:
        """Plain values; `prompt` = the VDM prompt, `idm_guidance` as text (the metadata column generation rows share)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["prompt"] = self.vdm_prompt
        out["idm_guidance"] = f"{self.idm_guidance:g}"
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "BivdiffParams":
        out = {f.name: record[f.name] for f in fields(cls)}
        return cls(**{**out, "idm_guidance": float(out["idm_guidance"])})


def resolve_bivdiff_params(row: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *,
                           structure: Structure = Structure(), limits: Limits = DEFAULT_LIMITS) -> BivdiffParams:
    """Merge task defaults < BIVDIFF_DEFAULTS < job defaults < row values; ValueError naming the parameter.

    `prompt` fills idm_prompt and vdm_prompt when they are absent; tasks with quality tags default the
    negative prompt to the official NEG string."""
    declared = schema.names(schema.BIVDIFF)
    merged = {**presets.BIVDIFF_DEFAULTS, **{k: v for k, v in _present(defaults).items() if k in declared}, **_present(row)}
    task = presets.BIVDIFF_TASKS.get(merged.get("task"))
    if task is None:
        raise ValueError(f"task: unknown {merged.get('task')!r}; choose one of {sorted(presets.BIVDIFF_TASKS)}")
    if merged["sampler"] not in presets.BIVDIFF_PRESETS:
        raise ValueError(f"sampler: BIVDiff rows take {sorted(presets.BIVDIFF_PRESETS)}, got {merged['sampler']!r}")
    prompt = merged.get("prompt", "")
    given_stride = "stride" in _present(row) or "stride" in _present(defaults)
    v = schema.validate(schema.BIVDIFF, {
        "prompt": prompt, "idm_prompt": merged.get("idm_prompt", prompt), "vdm_prompt": merged.get("vdm_prompt", prompt),
        "negative_prompt": presets.BIVDIFF_NEG if task.quality_tags else "", "inversion_prompt": "", "alpha": task.alpha,
        "frame_joint_norm": presets.BIVDIFF_PRESETS[merged["sampler"]].frame_joint_norm, **merged,
        "stride": merged["stride"] if given_stride or task.idm != "external" else 1})
    for name in ("source_video", "mask_video", "condition_video"):
        if v[name] is not None and not v[name].strip():
            raise ValueError(f"{name}: must be a non-empty string, got {v[name]!r}")
    if not (task.condition in ("depth", "pose") and v["condition_video"]) and v["source_video"] is None:
        raise ValueError(f"source_video: task {task.name!r} needs a source video (an fsspec URI)")
    if task.mask == "video" and v["mask_video"] is None:
        raise ValueError(f"mask_video: task {task.name!r} needs a mask video (white = region to fill)")
    for name, used in (("mask_video", task.mask == "video"), ("condition_video", task.condition in ("depth", "pose"))):
        if v[name] is not None and not used:
            raise ValueError(f"{name}: task {task.name!r} does not use a {name.replace('_', ' ')}")
    limits.check(v["frames"], v["height"], v["width"], max(v["steps"], v["idm_steps"]))
    if 1000 % v["steps"]:
        raise ValueError(f"steps: the SD DDIM grid (leading spacing) needs a divisor of 1000, got {v['steps']}")
    structure.check(v["frames"], v["height"], v["width"])
    del v["prompt"]
    return BivdiffParams(**v)
