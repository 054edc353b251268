"""Every per-row parameter, declared once (docs/parameters.md), and the bounds a run (`Limits`, job config `limits:`)
or its model set (`Structure`: VAE factor, frame limit) puts on a row.

A declaration says the parameter's type, bounds, which row kind takes it and its help text. From `PARAMS` come the
manifest's accepted column types (`manifest_columns`), the flags of both CLIs (`add_flags`), the job config's
`defaults` keys (`names`), the metadata columns (`metadata_fields`) and the type and range checks (`validate`, built
on pydantic). Where a value's default comes from (preset, backbone, task) is the resolvers' business
(`pipelines/config.py`); cross-field rules (VAE multiple, limits, the interval against the steps) are too.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, Mapping, Optional

import pyarrow as pa
from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, ValidationError, create_model

from . import presets
from .grammar import Interval
from .schedule import CFGRamp

GENERATION, BIVDIFF = "generation", "bivdiff"
KINDS = (GENERATION, BIVDIFF)
MAX_SEED = 2**63 - 1
NOISE_POLICIES = ("independent", "shared", "per_frame")


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # int | float | str | bool | ramp | interval | choice
    kinds: tuple[str, ...] = KINDS
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""
    nullable: bool = False  # None is a value (no default fills it)
    bivdiff_help: str = ""  # a parameter of both kinds: its meaning in BIVDiff rows, where it differs

    def help_for(self, kind: str) -> str:
        """The help the CLI of `kind` shows."""
        return self.bivdiff_help if kind == BIVDIFF and self.bivdiff_help else self.help

    @property
    def arrow_kinds(self) -> tuple[str, ...]:
        """Arrow column kinds a manifest may use for it."""
        return {"int": ("integer",), "float": ("integer", "floating"), "bool": ("bool",),
                "ramp": ("string", "integer", "floating")}.get(self.type, ("string",))

    @property
    def arrow_type(self) -> pa.DataType:
        """Its metadata column type: ramps, intervals and BIVDiff's stage-1 CFG are written as text."""
        if self.name == "idm_guidance":
            return pa.string()  # one column for both kinds: the ramp's text, or BIVDiff's float as text
        return {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}.get(self.type, pa.string())


@dataclass(frozen=True)
class Limits:
    """Upper bounds of one row (job config `limits:`; the CLIs use these defaults). A row over them fails alone, before
    any model work: no row may ask a worker for more than it can hold (docs/reliability.md)."""

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
# the CPU's pace with the tiny models (ivmixed, 2 cores): 16.8 s for 6 steps of 8 x 128 x 128, i.e. about 2e-5 s per
# step x frame x pixel (measured); the published models are far slower. A row past SLOW_ON_CPU takes over a minute.
CPU_SECONDS_PER_UNIT = 2e-5
SLOW_ON_CPU = 25 * 8 * 128 * 128


def cpu_units(p) -> int:
    """steps x frames x height x width of resolved parameters (a BIVDiff row adds its image model's steps)."""
    return (p.steps + getattr(p, "idm_steps", 0)) * p.frames * p.height * p.width


@dataclass(frozen=True)
class Structure:
    """What a model set allows structurally: sizes in multiples of its VAE factor, at most `max_frames` frames (a motion
    adapter's positional table). Read from config files without weights (`backbones.registry.structure`), or from a
    loaded backbone; `check` is the one place these rules live."""

    spatial_factor: int = 8
    max_frames: int | None = None

    def check(self, frames: int, height: int, width: int, window: int | None = None) -> None:
        """`window`: the frames the temporal layers see at once under FreeNoise (a variant's freenoise=); None: all."""
        for name, v in (("height", height), ("width", width)):
            if v % self.spatial_factor:
                raise ValueError(f"{name}: must be a multiple of the VAE factor {self.spatial_factor}, got {v}")
        if self.max_frames is not None and window is not None and window > self.max_frames:
            raise ValueError(f"variant: freenoise's window of {window} frames is longer than the {self.max_frames} "
                             "frames the motion adapter handles")
        if self.max_frames is not None and window is None and frames > self.max_frames:
            raise ValueError(f"frames: the motion adapter handles at most {self.max_frames} frames, got {frames}; "
                             "longer videos: a freenoise variant (sampler freenoise, or @freenoise=16/4)")


G, B = (GENERATION,), (BIVDIFF,)
PARAMS: tuple[Param, ...] = (
    Param("prompt", "str", help="the caption",
          bivdiff_help="the caption: sets idm_prompt and vdm_prompt when they are not given"),
    Param("negative_prompt", "str", help="default ''",
          bivdiff_help="default '' (tasks with quality tags: the official NEG tags)"),
    Param("seed", "int", lo=0, hi=MAX_SEED,
          help=f"initial-noise seed (default {presets.DEFAULT_SEED}; the *_v1 presets: 23523)",
          bivdiff_help=f"seed of stage 1's noise (the VAE posterior draws with seed + 1; default "
          f"{presets.BIVDIFF_DEFAULTS['seed']})"),
    Param("sampler", "str", help="preset: " + ", ".join(presets.PRESETS),
          bivdiff_help="preset: " + ", ".join(presets.BIVDIFF_PRESETS)),
    Param("variant", "str", G, help="grammar pattern overriding the preset's, e.g. 'down:IV-IV', 'up:IV-IV@main=V'"),
    Param("steps", "int", lo=1, hi=1000, help="sampling steps",
          bivdiff_help="inversion = smoothing steps, a divisor of 1000"),
    Param("frames", "int", lo=1, help="frames of the video"),
    Param("height", "int", lo=1, help="pixels, a multiple of the VAE factor"),
    Param("width", "int", lo=1, help="pixels, a multiple of the VAE factor"),
    Param("fps", "int", lo=1, hi=240, help="frame rate of the mp4 (VideoCrafter2 also conditions on it)"),
    Param("guidance", "float", help="main-step CFG scale (default 7.5; videocrafter2 and ivmixed_vc_v1: 9.0)",
          bivdiff_help="CFG scale of the video model's smoothing (default 7.5)"),
    Param("idm_guidance", "ramp", G, help="zigzag CFG of IDM sub-steps: W or BEGIN,END[,RHO] (Karras ramp; default 4)"),
    Param("idm_guidance", "float", B, help="stage-1 CFG of the image model (7.5)"),
    Param("vdm_guidance", "ramp", G, help="zigzag CFG of VDM sub-steps: W or BEGIN,END[,RHO] (default 4)"),
    Param("interval", "interval", G,
          help="steps with the zigzag: 'a..b' step indices or '0.0..0.5' fractions (default all)"),
    Param("zz", "int", G, lo=1, nullable=True, help="substitute the IDM letters by the VDM when step %% zz == zz-1"),
    Param("task", "choice", B, choices=tuple(presets.BIVDIFF_TASKS), help="the BIVDiff stage-1 task"),
    Param("source_video", "str", B, nullable=True,
          help="source video URI (external: the edited frames: mp4, PNG folder or .npy)"),
    Param("mask_video", "str", B, nullable=True, help="inpaint: mask video URI, white = region to fill"),
    Param("condition_video", "str", B, nullable=True,
          help="controlnet-depth/-pose: precomputed condition maps (default: the source)"),
    Param("idm_prompt", "str", B, help="stage-1 prompt (instruct-pix2pix: the edit instruction)"),
    Param("vdm_prompt", "str", B, help="smoothing prompt: a caption of the target video"),
    Param("inversion_prompt", "str", B, help="bivdiff preset: text the inversions are conditioned on (default '')"),
    Param("alpha", "float", B, lo=0.0, hi=1.0, help="weight of the image-model inversion (default: the task's)"),
    Param("stride", "int", B, lo=1, hi=1000, help="take frames 0, k, 2k, ... of the source (default 4; external 1)"),
    Param("idm_steps", "int", B, lo=1, hi=1000, help="stage-1 steps per frame"),
    Param("image_guidance", "float", B, help="instruct-pix2pix image guidance (1.5)"),
    Param("noise", "choice", B, choices=NOISE_POLICIES,
          help="stage-1 noise: one generator across frames in order (official) | same per frame | seed + i"),
    Param("frame_joint_norm", "bool", B, help="inversion UNet GroupNorm pooled over frames (bivdiff_compat: on)"),
    Param("edit_type", "choice", B, choices=presets.P2P_EDIT_TYPES,
          help="p2p: refine (add words; aligned tokens keep the source's maps) | replace (swap words one for one)"),
    Param("cross_replace", "float", B, lo=0.0, hi=1.0,
          help=f"p2p: fraction of steps with cross-attention replaced ({presets.P2P_REPLACE})"),
    Param("self_replace", "float", B, lo=0.0, hi=1.0,
          help=f"p2p: fraction of steps with self-attention replaced ({presets.P2P_REPLACE})"),
    Param("local_blend", "str", B, help="p2p: words whose attention bounds the edit, e.g. 'car' or 'car,truck' (one "
          "group per prompt); default '' = edit everywhere"),
)


def of_kind(kind: str) -> dict[str, Param]:
    return {p.name: p for p in PARAMS if kind in p.kinds}


def names(kind: str) -> tuple[str, ...]:
    return tuple(of_kind(kind))


def manifest_columns() -> dict[str, tuple[str, ...]]:
    """column -> accepted Arrow kinds (union over the kinds that share a name)."""
    out: dict[str, tuple[str, ...]] = {}
    for p in PARAMS:
        out[p.name] = tuple(dict.fromkeys(out.get(p.name, ()) + p.arrow_kinds))
    return out


def metadata_fields(kind: str) -> list[tuple[str, pa.DataType]]:
    return [(p.name, p.arrow_type) for p in of_kind(kind).values()]


# ---- validation (pydantic) ------------------------------------------------------------------------------------------
def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


def _annotation(p: Param):
    bounds = {k: v for k, v in (("ge", p.lo), ("le", p.hi)) if v is not None}
    t = {"int": Annotated[int, BeforeValidator(_not_bool), Field(**bounds)],
         "float": Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False, **bounds)],
         "str": StrictStr, "bool": StrictBool,
         "ramp": Annotated[CFGRamp, BeforeValidator(CFGRamp.parse)],
         "interval": Annotated[Interval, BeforeValidator(Interval.parse)],
         "choice": Literal[p.choices] if p.choices else StrictStr}[p.type]
    return Optional[t] if p.nullable else t


_MODELS = {kind: create_model(f"{kind.title()}Row", __config__=ConfigDict(arbitrary_types_allowed=True),
                              **{p.name: (_annotation(p), None if p.nullable else ...) for p in of_kind(kind).values()})
           for kind in KINDS}


def _message(p: Param, err: Mapping[str, Any]) -> str:
    """pydantic's error as the project's one-line `name: reason, got value`."""
    kind, got = err["type"], err.get("input")
    if kind == "value_error":
        return f"{p.name}: {err['ctx']['error']}"
    if isinstance(got, float) and not math.isfinite(got):
        return f"{p.name}: must be a finite number, got {got!r}"
    if kind in ("greater_than_equal", "less_than_equal"):
        if p.type == "float":
            return f"{p.name}: must lie in [{p.lo:g}, {p.hi:g}], got {got}"
        return f"{p.name}: must be {'>= %d' % p.lo if p.hi is None else f'in [{p.lo:.0f}, {p.hi:.0f}]'}, got {got}"
    reason = {"finite_number": "a finite number", "literal_error": f"one of {p.choices}", "bool_type": "true or false",
              "string_type": "a string"}.get(kind)
    if reason is None:
        reason = ("an integer" if kind.startswith("int") else "a number" if kind.startswith("float")
                  else err["msg"].lower())
    return f"{p.name}: must be {reason}, got {got!r}"


def validate(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Types and bounds of every parameter of `kind` (missing ones raise), as a dict of checked values; the first
    problem raises ValueError('name: reason, got value')."""
    declared = of_kind(kind)
    try:
        model = _MODELS[kind].model_validate({k: v for k, v in values.items() if k in declared})
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0])
        if first["type"] == "missing":
            raise ValueError(f"{name}: required") from None
        raise ValueError(_message(declared[name], first)) from None
    return {name: getattr(model, name) for name in declared}


# ---- command-line flags ---------------------------------------------------------------------------------------------
def add_flags(group, kind: str, flags: Mapping[str, str] | None = None, extra_help: Mapping[str, str] | None = None,
              required: tuple[str, ...] = ()) -> None:
    """One flag per parameter of `kind` (`--idm-guidance` for idm_guidance unless `flags` renames it), default None:
    an unset flag takes the default the resolver gives it."""
    for p in of_kind(kind).values():
        text = p.help_for(kind) + (extra_help or {}).get(p.name, "")
        kwargs: dict[str, Any] = {"dest": p.name, "default": None, "help": text,
                                  **({"required": True} if p.name in required else {})}
        if p.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif p.type in ("int", "float"):
            kwargs["type"] = int if p.type == "int" else float
        if p.choices:
            kwargs["choices"] = p.choices
        group.add_argument((flags or {}).get(p.name, "--" + p.name.replace("_", "-")), **kwargs)


def from_args(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in names(kind)}


def markdown() -> str:
    """docs/parameters.md: the table of every parameter (`python -m pipelines.params > docs/parameters.md`)."""
    rows = [f"| `{p.name}` | {', '.join(p.kinds)} | {p.type}{' or null' if p.nullable else ''} | "
            f"{_bounds(p)} | {_cell(p.help + (f'; BIVDiff: {p.bivdiff_help}' if p.bivdiff_help else ''))} |"
            for p in PARAMS]
    return ("# Row parameters\n\nGenerated from `pipelines/params.py` (`python -m pipelines.params > "
            "docs/parameters.md`). Each is a manifest column, a job-config `defaults` key (BIVDiff's under "
            "`bivdiff.defaults`), a flag of the CLI of its kind (`--name-with-dashes`) and a metadata column. Defaults "
            "come from the preset, the backbone or the task (docs/sample.md, docs/bivdiff.md).\n\n"
            "| name | row kinds | type | bounds | meaning |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _cell(text: str) -> str:
    """One markdown table cell: one line, `%%` (argparse's escape) as `%`, pipes escaped."""
    return " ".join(text.split()).replace("%%", "%").replace("|", "\\|")


def _bounds(p: Param) -> str:
    def g(v) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    return "" if p.lo is None else f"≥ {g(p.lo)}" if p.hi is None else f"[{g(p.lo)}, {g(p.hi)}]"


if __name__ == "__main__":
    print(markdown(), end="")
