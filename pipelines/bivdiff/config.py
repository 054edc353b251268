"""BIVDiff's configuration: the models of a BIVDiff worker (`BivdiffSpec`) and one row's resolved parameters
(`BivdiffParams`, `resolve_bivdiff_params`; the checks come from `pipelines/params.py`, docs/algorithms.md §8)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .. import params, presets
from ..backbones import registry
from ..config import ModelSpec, check_placement, present, spec_fingerprint
from ..params import DEFAULT_LIMITS, Limits, Structure
from .p2p import check_words


@dataclass(frozen=True)
class BivdiffSpec:
    """Models of a BIVDiff worker (job-level, like ModelSpec): the stage-3 VDM, the SD image model (inversion UNet,
    the shared VAE, the ControlNet / T2I-Adapter base, Prompt2Prompt's model) and one model per stage-1 task kind.
    Hub ids or local folders."""

    vdm: str = presets.BIVDIFF_MODELS["vdm"]
    video_model: str | None = None  # the VDM's pipeline folder; None = the backbone's default
    video_unet: str | None = None  # VideoCrafter2's own UNet folder
    motion_adapter: str | None = None  # AnimateDiff as the VDM
    image_model: str = presets.BIVDIFF_MODELS["image_model"]
    controlnet_canny: str = presets.BIVDIFF_MODELS["controlnet_canny"]
    controlnet_depth: str = presets.BIVDIFF_MODELS["controlnet_depth"]
    controlnet_pose: str = presets.BIVDIFF_MODELS["controlnet_pose"]
    t2i_adapter_depth: str = presets.BIVDIFF_MODELS["t2i_adapter_depth"]
    t2i_adapter_canny: str = presets.BIVDIFF_MODELS["t2i_adapter_canny"]
    instruct_pix2pix: str = presets.BIVDIFF_MODELS["instruct_pix2pix"]
    inpainting: str = presets.BIVDIFF_MODELS["inpainting"]
    dtype: str = presets.DEFAULT_DTYPE
    device: str = presets.DEFAULT_DEVICE
    decode_chunk: int = presets.DEFAULT_DECODE_CHUNK

    def __post_init__(self) -> None:
        check_placement(self)
        if self.vdm not in registry.BACKBONES:  # every registered backbone can be BIVDiff's video model
            raise ValueError(f"vdm: BIVDiff's video model must be one of {tuple(registry.BACKBONES)}, got {self.vdm!r}")

    @classmethod
    def from_model_dir(cls, model_dir: str, **kw: Any) -> "BivdiffSpec":
        """The folder layout written by `python -m pipelines.fixtures.tiny bivdiff DIR`."""
        def j(name: str) -> str:
            return os.path.join(model_dir, name)

        return cls(video_model=j("vidrd" if kw.get("vdm") == "vidrd" else "video_model"), image_model=j("image_model"),
                   controlnet_canny=j("controlnet"), controlnet_depth=j("controlnet"), controlnet_pose=j("controlnet"),
                   t2i_adapter_depth=j("t2i_adapter_depth"), t2i_adapter_canny=j("t2i_adapter_canny"),
                   instruct_pix2pix=j("instruct_pix2pix"), inpainting=j("inpainting"), **kw)

    def model_spec(self) -> ModelSpec:
        """The backbone that serves the VDM (stage 2 video chain and stage 3) and the SD inversion UNet."""
        return ModelSpec(backbone=self.vdm, base=self.video_model, unet=self.video_unet,
                         motion_adapter=self.motion_adapter, image_model=self.image_model,
                         dtype=self.dtype, device=self.device, decode_chunk=self.decode_chunk)

    def task_model(self, task: "presets.BivdiffTask") -> str | None:
        if task.idm in ("controlnet", "t2i_adapter"):
            return getattr(self, f"{task.idm}_{task.condition}")
        return {"instruct_pix2pix": self.instruct_pix2pix, "inpainting": self.inpainting,
                "p2p": self.image_model}.get(task.idm)

    def fingerprint(self) -> str:
        return spec_fingerprint(self)


@dataclass(frozen=True)
class BivdiffParams:
    """Everything that determines one BIVDiff video (docs/algorithms.md §8), resolved and validated."""

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
    # stage-1 noise: "independent" (one generator across frames, official) | "shared" | "per_frame" (stage1.py)
    noise: str
    edit_type: str  # p2p: "refine" | "replace"
    cross_replace: float  # p2p: fraction of steps with cross-attention replaced
    self_replace: float  # p2p: fraction of steps with self-attention replaced
    local_blend: str  # p2p: local-blend words, comma-separated groups (one per prompt), "" = none

    def blend_words(self) -> tuple[str, ...]:
        """The local-blend word groups of [source, edited] caption (`blend_groups`): () when off."""
        return blend_groups(self.local_blend)

    kind = params.BIVDIFF

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
        """Plain values; `prompt` = the VDM prompt, `idm_guidance` as text (the metadata column generation rows
        share)."""
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
    declared = params.names(params.BIVDIFF)
    merged = {**presets.BIVDIFF_DEFAULTS, **{k: v for k, v in present(defaults).items() if k in declared},
              **present(row)}
    task = presets.BIVDIFF_TASKS.get(merged.get("task"))
    if task is None:
        raise ValueError(f"task: unknown {merged.get('task')!r}; choose one of {sorted(presets.BIVDIFF_TASKS)}")
    if merged["sampler"] not in presets.BIVDIFF_PRESETS:
        raise ValueError(f"sampler: BIVDiff rows take {sorted(presets.BIVDIFF_PRESETS)}, got {merged['sampler']!r}")
    prompt = merged.get("prompt", "")
    given_stride = "stride" in present(row) or "stride" in present(defaults)
    v = params.validate(params.BIVDIFF, {
        "prompt": prompt, "idm_prompt": merged.get("idm_prompt", prompt),
        "vdm_prompt": merged.get("vdm_prompt", prompt),
        "negative_prompt": presets.BIVDIFF_NEG if task.quality_tags else "", "inversion_prompt": "",
        "alpha": task.alpha,
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
    if task.idm == "p2p":
        _check_p2p(v)
    if 1000 % v["steps"]:
        raise ValueError(f"steps: the SD DDIM grid (leading spacing) needs a divisor of 1000, got {v['steps']}")
    structure.check(v["frames"], v["height"], v["width"])
    del v["prompt"]
    return BivdiffParams(**v)


def _check_p2p(v: dict) -> None:
    """Prompt2Prompt rows (docs/algorithms.md §8): two different captions, word-for-word for `replace`, local-blend
    words that occur in their prompt, an inversion grid that divides 1000."""
    src, edit = v["idm_prompt"], v["vdm_prompt"]
    if not src.strip() or not edit.strip():
        raise ValueError("idm_prompt: p2p needs the source caption (idm_prompt) and the edited one (vdm_prompt)")
    check_words(src, edit, v["edit_type"], blend_groups(v["local_blend"]))
    if 1000 % v["idm_steps"]:
        raise ValueError(f"idm_steps: p2p inverts the source frames on the SD DDIM grid; give a divisor of 1000, "
                         f"got {v['idm_steps']}")


def blend_groups(text: str) -> tuple[str, ...]:
    """Local-blend words as two space-separated groups, one per caption [source, edited]: "" -> (), "car" -> ("car",
    "car"), "car,bus" -> ("car", "bus"); anything else is a ValueError."""
    if not text.strip():
        return ()
    groups = tuple(g.strip() for g in text.split(","))
    if len(groups) > 2 or not all(groups):
        raise ValueError(f"local_blend: one or two comma-separated word groups (source, edited), got {text!r}")
    return groups * (2 if len(groups) == 1 else 1)
