"""The variant grammar of docs/algorithms.md §3 and its compilation into a plan of DDIM moves.

    variant := ["up:" | "down:"] front "-" back ["@" opts]

Letters: I (image model), V (video model), R (fresh forward noise, front only). The front half adds
noise ("go", towards noisier levels), the back half denoises ("back"). `down:` (default, the
official code) runs the back letters first from the current level and then the front letters
back up to it; `up:` (the paper figure) goes up first and comes back down. The empty program
(`standard`, `origin`, `-`) is the plain sampler.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .schedule import AlphaTable, CFGRamp, _number

LETTERS = "IVR"
NAMED = {
    "standard": "",
    "origin": "",
    "ddim": "",
    # every variant named in the paper figure, README and code (docs/algorithms.md §3)
    "r-i": "R-I", "r-v": "R-V", "rr-ii": "RR-II", "rr-vv": "RR-VV",
    "i-i": "I-I", "v-v": "V-V", "ii-ii": "II-II", "vv-vv": "VV-VV",
    "iv-iv": "IV-IV", "iv-vi": "IV-VI", "ii-vv": "II-VV", "vi-vi": "VI-VI", "vv-ii": "VV-II", "vi-iv": "VI-IV",
    # the AD file's unused Z-Sampling __call__: V denoise +4, V invert -4, only i < 40 (docs/algorithms.md §3)
    "v-v-40": "down:V-V@w_go_V=-4,w_back_V=4,interval=0..39",
}
W_KEYS = ("w_go_I", "w_back_I", "w_go_V", "w_back_V")
# the key of a model's conditional-only calls in a calls count ("V_cond"): a main move on a step outside `cfg=` runs
# the model on the prompt alone, half a CFG pair's cost (docs/lab.md "Comparators")
COND = "_cond"
# ... and of its perturbed-attention calls ("V_pag"): the batch three times over, 1.5 CFG pairs' cost
PAG = "_pag"
# VideoElevator's video-model DDIM steps per refinement, as a fraction of the run (8 of 50 in the authors' examples)
ELEVATOR_SUBSTEPS = 0.16
# FreeNoise's default stride between windows (diffusers' enable_free_noise)
FREENOISE_STRIDE = 4
PARAM_KEYS = ("w_main", "interval", "sub_every")  # per-row parameters a pattern may also set
CHOICES = {"main": ("I", "V"), "labels": ("chain", "legacy_ad"), "resize": ("none", "nearest64"), "sub_cfg": ("I", "V"),
           "reuse": ("off", "exact", "V")}


@dataclass(frozen=True)
class Interval:
    """Steps that get the zigzag: inclusive step indices `a..b`, or fractions `0.0..0.5` of the run."""

    lo: float
    hi: float
    unit: str  # "index" | "fraction"

    @classmethod
    def parse(cls, value: Any) -> "Interval":
        if isinstance(value, Interval):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2:
            lo_s, hi_s = str(value[0]), str(value[1])
        elif isinstance(value, str) and ".." in value:
            lo_s, hi_s = value.split("..", 1)
        else:
            raise ValueError(f"interval must look like 'a..b' (step indices) or '0.0..0.5' (fractions), got {value!r}")
        lo_s, hi_s = lo_s.strip(), hi_s.strip()
        fraction = "." in lo_s or "." in hi_s
        try:
            lo, hi = (float(lo_s), float(hi_s)) if fraction else (int(lo_s), int(hi_s))
        except ValueError:
            raise ValueError(f"interval bounds must be numbers, got {value!r}") from None
        if fraction:
            if not (0.0 <= lo < hi <= 1.0):
                raise ValueError(f"interval {value!r}: fractions need 0 <= a < b <= 1 "
                                 "(an empty or out-of-range interval)")
        elif lo < 0 or hi < lo:
            raise ValueError(f"interval {value!r}: indices need 0 <= a <= b (an empty or out-of-range interval)")
        return cls(lo, hi, "fraction" if fraction else "index")

    def check(self, num_steps: int) -> None:
        if self.unit == "index" and self.hi > num_steps - 1:
            raise ValueError(f"interval {self.text()} is out of range for {num_steps} steps "
                             f"(last index {num_steps - 1})")
        if self.unit == "fraction" and not any(self.active(i, num_steps) for i in range(num_steps)):
            raise ValueError(f"interval {self.text()} selects no step of a {num_steps}-step run")

    def active(self, i: int, num_steps: int) -> bool:
        if self.unit == "index":
            return self.lo <= i <= self.hi
        return self.lo * num_steps <= i < self.hi * num_steps

    def text(self) -> str:
        if self.unit == "index":
            return f"{int(self.lo)}..{int(self.hi)}"
        return f"{float(self.lo)!r}..{float(self.hi)!r}"


FULL_RUN = Interval(0.0, 1.0, "fraction")


@dataclass(frozen=True)
class Variant:
    """The structural part of a sampler: which letters, in which order, with which labels (docs/algorithms.md §3)."""

    orientation: str = "down"
    front: str = ""
    back: str = ""
    main: str = "V"
    # "chain": every call's timestep = its latent's level; "legacy_ad": docs/algorithms.md §2 swap
    labels: str = "chain"
    resize: str = "none"  # "nearest64": IDM sees latents resized to 64x64 (ModelScope code, docs/algorithms.md §3)
    sub_cfg: str = "V"  # CFG schedule of letters substituted by `sub_every` (AD: V, VC: I)
    w: tuple[tuple[str, CFGRamp], ...] = ()  # explicit signed zigzag scales, e.g. (("w_go_I", CFGRamp(4,4,7,-1)),)
    # reuse of a model call's ε pair within a step (docs/algorithms.md §10): "off"; "exact" (a call whose model,
    # timestep and input equal an earlier one's takes its pair: the same numbers, fewer calls); "V" (exact, and a
    # video-model call at a timestep an earlier video-model call of the step had takes that call's pair: approximate)
    reuse: str = "off"
    # comparators composed with any variant (docs/lab.md): FreeU's (b1, b2, s1, s2) on the video model's calls
    # (Si et al., arXiv 2309.11497); FreeInit's iterations, each re-initialising the initial noise's low frequencies
    # from the previous result (Wu et al., arXiv 2312.07537); 1: none
    freeu: tuple[float, float, float, float] | None = None
    freeinit: int = 1
    # classifier-free guidance on the main moves of these steps only; elsewhere the conditional prediction alone
    # (diffusers' ClassifierFreeGuidance(start, stop)); None: every step
    cfg: "Interval | None" = None
    # perturbed-attention guidance on the video model's calls (Ahn et al., arXiv 2403.17377; diffusers'
    # AnimateDiffPAGPipeline): its scale; None: none
    pag: float | None = None
    # FreeNoise on the video model (Qiu et al., arXiv 2310.15169; diffusers' AnimateDiff `enable_free_noise`):
    # (context length, stride) of the sliding windows its temporal attention sees, with the pyramid weighting and the
    # shuffled initial noise: videos longer than the motion module's frame limit; None: none
    freenoise: tuple[int, int] | None = None
    # VideoElevator (Zhang et al., arXiv 2403.05438; pipelines/videoelevator.py): the image model samples, the video
    # model refines at these fractions of the run; None: none
    elevator: tuple[float, ...] | None = None

    @property
    def k(self) -> int:
        return len(self.front)

    @property
    def is_standard(self) -> bool:
        return self.k == 0

    def pattern(self) -> str:
        """Canonical text; parse(v.pattern()) == v."""
        extras = []
        if self.freeu is not None:
            extras.append("freeu=" + "/".join(f"{v:g}" for v in self.freeu))
        if self.freeinit != 1:
            extras.append(f"freeinit={self.freeinit}")
        if self.cfg is not None:
            extras.append(f"cfg={self.cfg.text()}")
        if self.pag is not None:
            extras.append(f"pag={self.pag:g}")
        if self.freenoise is not None:
            extras.append("freenoise={}/{}".format(*self.freenoise))
        if self.elevator is not None:
            extras.append("elevator=" + "/".join(f"{v:g}" for v in self.elevator))
        if self.is_standard and self.main == "V" and not self.w:
            return "standard" + ("@" + ",".join(extras) if extras else "")
        opts = []
        if self.main != "V":
            opts.append(f"main={self.main}")
        if self.labels != "chain":
            opts.append(f"labels={self.labels}")
        if self.resize != "none":
            opts.append(f"resize={self.resize}")
        if self.sub_cfg != "V":
            opts.append(f"sub_cfg={self.sub_cfg}")
        if self.reuse != "off":
            opts.append(f"reuse={self.reuse}")
        opts += [f"{k}={r.text()}" for k, r in self.w]
        opts += extras
        return f"{self.orientation}:{self.front}-{self.back}" + ("@" + ",".join(opts) if opts else "")


@dataclass(frozen=True)
class ParsedVariant:
    variant: Variant
    params: dict = field(default_factory=dict)  # w_main / interval / zz given inside the pattern


def _split_opts(text: str) -> list[str]:
    """Split on commas that are not inside parentheses (karras(6,2,7), sub_every=3(cfg=I))."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in variant options {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced '(' in variant options {text!r}")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_variant(text: str) -> ParsedVariant:
    """Parse a variant name or pattern; raises ValueError naming what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"variant must be a string, got {type(text).__name__}")
    raw = text.strip()
    if raw.lower() in NAMED:
        raw = NAMED[raw.lower()]
    if raw in ("", "-"):
        return ParsedVariant(Variant())
    body, _, opt_text = raw.partition("@")
    if body.strip().lower() in NAMED and "@" not in NAMED[body.strip().lower()]:  # a named variant with options
        body = NAMED[body.strip().lower()] or "-"
    orientation = "down"
    m = re.fullmatch(r"\s*(up|down)\s*:(.*)", body)
    if m:
        orientation, body = m.group(1), m.group(2)
    if body.count("-") != 1:
        raise ValueError(f"variant {text!r}: expected 'front-back', e.g. 'IV-IV'")
    front, back = (s.strip() for s in body.split("-"))
    for half, letters in (("front", front), ("back", back)):
        bad = sorted(set(letters) - set(LETTERS))
        if bad:
            raise ValueError(f"variant {text!r}: unknown letter(s) {''.join(bad)!r} in the {half} half (use I, V, R)")
    if len(front) != len(back):
        raise ValueError(f"variant {text!r}: mismatched halves, front has {len(front)} letters and back {len(back)}")
    if "R" in back:
        raise ValueError(f"variant {text!r}: R (fresh noise) may only appear in the front half")
    fields: dict[str, Any] = {"orientation": orientation, "front": front, "back": back}
    params: dict[str, Any] = {}
    w: dict[str, CFGRamp] = {}
    for opt in _split_opts(opt_text) if opt_text else []:
        key, eq, val = opt.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or not val:
            raise ValueError(f"variant {text!r}: option {opt!r} must be key=value")
        if key in W_KEYS:
            w[key] = CFGRamp.parse(val)
        elif key in CHOICES:
            if val not in CHOICES[key]:
                raise ValueError(f"variant {text!r}: {key} must be {' or '.join(CHOICES[key])}")
            fields[key] = val
        elif key in ("sub_every", "zz"):
            m2 = re.fullmatch(r"(\d+)(?:\(cfg=(I|V)\))?", val)
            if not m2:
                raise ValueError(f"variant {text!r}: sub_every must be an integer, optionally with (cfg=I|V)")
            params["zz"] = int(m2.group(1))
            if m2.group(2):
                fields["sub_cfg"] = m2.group(2)
        elif key == "w_main":
            params["guidance"] = _number(val)
        elif key == "interval":
            params["interval"] = Interval.parse(val)
        elif key == "freeu":
            try:
                numbers = [float(v) for v in val.split("/")]
            except ValueError:
                numbers = []
            if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
                raise ValueError(f"variant {text!r}: freeu must be four numbers b1/b2/s1/s2 (e.g. 1.2/1.4/0.9/0.2)")
            fields["freeu"] = tuple(numbers)
        elif key == "cfg":
            fields["cfg"] = Interval.parse(val)
        elif key == "pag":
            try:
                scale = float(val)
            except ValueError:
                scale = float("nan")
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"variant {text!r}: pag must be a scale > 0 (e.g. 3.0)")
            fields["pag"] = scale
        elif key == "freeinit":
            if not re.fullmatch(r"\d+", val) or not 1 <= int(val) <= 10:
                raise ValueError(f"variant {text!r}: freeinit must be an integer from 1 to 10 (iterations)")
            fields["freeinit"] = int(val)
        elif key == "freenoise":
            m2 = re.fullmatch(r"(\d+)(?:/(\d+))?", val)
            if not m2 or not 1 <= int(m2.group(1)) <= 256 or not 1 <= int(m2.group(2) or FREENOISE_STRIDE) \
                    <= int(m2.group(1)):
                raise ValueError(f"variant {text!r}: freenoise must be a window length, optionally with a stride no "
                                 f"longer than it (frames, e.g. 16/4)")
            fields["freenoise"] = (int(m2.group(1)), int(m2.group(2) or FREENOISE_STRIDE))
        elif key == "elevator":
            try:
                points = [float(v) for v in val.split("/")]
            except ValueError:
                points = []
            if not points or not all(0 <= v < 1 for v in points) or points != sorted(set(points)):
                raise ValueError(f"variant {text!r}: elevator must be increasing fractions of the run in [0, 1) "
                                 "(e.g. 0.1/0.3/0.5/0.7)")
            fields["elevator"] = tuple(points)
        else:
            raise ValueError(f"variant {text!r}: unknown option {key!r}")
    if "pag" in fields and ("cfg" in fields or fields.get("reuse", "off") != "off"):
        raise ValueError(f"variant {text!r}: pag runs every video-model call as one batch of three; it does not "
                         "combine with cfg= or reuse=")
    if "elevator" in fields and (front or back or any(k in fields for k in ("pag", "cfg", "main", "resize"))
                                 or fields.get("reuse", "off") != "off" or w):
        raise ValueError(f"variant {text!r}: elevator is a sampler of its own (the image model samples, the video "
                         "model refines); it takes no zigzag letters, main=, cfg=, pag=, reuse= or resize=")
    if fields.get("labels") == "legacy_ad" and (orientation != "down" or len(front) != 2):
        raise ValueError(f"variant {text!r}: labels=legacy_ad only exists for a down-first 2-letter zigzag")
    fields["w"] = tuple(sorted(w.items()))
    return ParsedVariant(Variant(**fields), params)


# ---------------------------------------------------------------------------------------------
# Compilation: variant + step grid + tables + per-row CFG -> a flat list of moves per step


@dataclass(frozen=True, eq=False)
class Move:
    """One sub-step: evaluate `model` at `timestep` with CFG `w` (per row), move ᾱ a_from -> a_to."""

    model: str  # "I", "V" or "R" (R: no model call, fresh noise)
    timestep: int | None
    a_from: torch.Tensor
    a_to: torch.Tensor
    w: torch.Tensor | None  # (B,)
    kind: str  # "down" | "up" | "noise" | "main"
    src: int  # nominal levels, for tests and logs
    dst: int
    # reuse=V: the index, among the step's model moves (zigzag, then main; R moves not counted), of the earlier
    # video-model call whose ε pair this move takes instead of calling the model (docs/algorithms.md §10)
    shares: int | None = None

    def is_identity(self) -> bool:
        return self.model != "R" and bool(torch.equal(self.a_from, self.a_to))


@dataclass(frozen=True, eq=False)
class StepPlan:
    index: int
    t: int
    zigzag: tuple[Move, ...]
    main: Move


@dataclass(frozen=True, eq=False)
class Plan:
    steps: tuple[StepPlan, ...]
    resize: str = "none"
    reuse: str = "off"  # Variant.reuse
    freeu: tuple[float, float, float, float] | None = None  # Variant.freeu
    freeinit: int = 1  # Variant.freeinit
    pag: float | None = None  # Variant.pag
    freenoise: tuple[int, int] | None = None  # Variant.freenoise
    elevator: "Elevation | None" = None  # Variant.elevator, compiled for the run's steps

    def calls(self) -> dict[str, int]:
        """Model calls per model ("I", "V"); one call = one CFG-batched forward, NFE = 2 x calls; a main move outside
        the variant's `cfg=` steps is a conditional-only call, counted under "<model>_cond" (NFE 1), and with `pag` a
        video-model call under "V_pag" (NFE 3): `call_key`. Each FreeInit run counts. A move that takes an earlier
        call's ε pair (reuse=V) is not a call; exact reuse, which depends on the numbers, can only make fewer."""
        if self.elevator is not None:
            return {k: n * self.freeinit for k, n in self.elevator.calls(len(self.steps)).items()}
        out = {"I": 0, "V": 0}
        for step in self.steps:
            for mv in (*step.zigzag, step.main):
                if mv.model in out and mv.shares is None:
                    key = call_key(mv, self.pag)
                    out[key] = out.get(key, 0) + self.freeinit
        return out


@dataclass(frozen=True)
class Elevation:
    """VideoElevator's schedule on a run of n steps (pipelines/videoelevator.py): the step indices that get temporal
    motion refining, and the video model's DDIM steps in each."""

    refine: tuple[int, ...]
    sub: int

    @classmethod
    def of(cls, fractions: Sequence[float], steps: int) -> "Elevation":
        """round(f · steps) for each fraction (distinct, in order); `ELEVATOR_SUBSTEPS` of the steps, at least one."""
        return cls(tuple(sorted({min(steps - 1, round(f * steps)) for f in fractions})),
                   max(1, round(ELEVATOR_SUBSTEPS * steps)))

    def calls(self, steps: int) -> dict[str, int]:
        """The model calls of one run, as the sampler makes them: an image-model CFG call per step; per refinement
        `sub` video-model CFG calls (fewer near the end) and one conditional-only image-model call per level it
        inverts through; after the first refinement, one conditional-only image-model call per step for the
        inversion correction (not on refining steps, whose result the refinement replaces)."""
        inversions = sum(steps - 1 - r for r in self.refine)
        corrections = 0 if not self.refine else sum(1 for i in range(self.refine[0] + 1, steps)
                                                     if i not in self.refine)
        video = sum(min(self.sub, steps - r) for r in self.refine)
        return {"I": steps, "V": video, "I" + COND: inversions + corrections}


def call_key(mv: Move, pag: float | None) -> str:
    """Where a model move's call is counted: "I"/"V" (a CFG pair), "<model>_cond" (the prompt alone: a step outside
    `cfg=`), "V_pag" (a perturbed-attention call: three branches)."""
    if mv.w is None:
        return mv.model + COND
    if pag is not None and mv.model == "V":
        return mv.model + PAG
    return mv.model


# a call's cost in CFG pairs (pipelines/cost.py) and its network evaluations, by the suffix of its key
CALL_SIZE = {"": (1.0, 2), COND: (0.5, 1), PAG: (1.5, 3)}


def call_size(key: str) -> tuple[str, float, int]:
    """(model, cost in CFG pairs, network evaluations) of a calls-count key."""
    model, _, suffix = key.partition("_")
    pairs, nfe = CALL_SIZE["_" + suffix if suffix else ""]
    return model, pairs, nfe


def share_video_calls(moves: Sequence[Move]) -> list[Move]:
    """reuse=V: each video-model move whose timestep an earlier video-model move of the same step had takes that
    move's ε pair (`Move.shares`); the first call at a timestep is made (docs/algorithms.md §10)."""
    first: dict[int, int] = {}
    out = []
    calls = 0  # the index counts model moves only (an R move calls no model)
    for mv in moves:
        if mv.model == "V" and mv.timestep in first:
            mv = replace(mv, shares=first[mv.timestep])
        elif mv.model == "V":
            first[mv.timestep] = calls
        calls += mv.model != "R"
        out.append(mv)
    return out


def compile_plan(
    variant: Variant,
    *,
    timesteps: Sequence[int],
    down_table: AlphaTable,
    up_table: AlphaTable,
    guidance: Sequence[float],
    idm_guidance: Sequence[CFGRamp],
    vdm_guidance: Sequence[CFGRamp],
    interval: Interval = FULL_RUN,
    zz: int | None = None,
    keep_noop: bool = False,
) -> Plan:
    """Compile the moves of every step for a batch of B rows (CFG lists have one entry per row).

    Calls = N + 4K for a 2-letter variant with K active steps (docs/algorithms.md §2). Unless `keep_noop`, a
    zigzag whose every move is an exact identity (the t = 0 step, docs/algorithms.md §1) is dropped.
    """
    n = len(timesteps)
    T = down_table.num_train_timesteps
    delta = T // n
    interval.check(n)
    if variant.cfg is not None:
        variant.cfg.check(n)
    if zz is not None and zz < 1:
        raise ValueError(f"zz must be >= 1, got {zz}")
    rows = len(guidance)
    if not (len(idm_guidance) == len(vdm_guidance) == rows) or rows == 0:
        raise ValueError("guidance, idm_guidance and vdm_guidance need one entry per row")
    ramps = {"I": [r.values(n) for r in idm_guidance], "V": [r.values(n) for r in vdm_guidance]}
    explicit = {k: r.values(n) for k, r in variant.w}
    w_main = torch.tensor([float(g) for g in guidance], dtype=torch.float32)

    def cfg(key_model: str, direction: str, i: int) -> torch.Tensor:
        key = f"w_{direction}_{key_model}"
        if key in explicit:
            return torch.full((rows,), explicit[key][i], dtype=torch.float32)
        sign = -1.0 if direction == "go" else 1.0  # inversion uses the negated scale (docs/algorithms.md §2)
        return torch.tensor([sign * ramp[i] for ramp in ramps[key_model]], dtype=torch.float32)

    A, U = down_table.at, up_table.at
    steps = []
    for i, t in enumerate(timesteps):
        guided = variant.cfg is None or variant.cfg.active(i, n)
        main = Move(variant.main, t, A(t), A(t - delta), w_main if guided else None, "main", t, t - delta)
        moves: list[Move] = []
        if not variant.is_standard and interval.active(i, n):
            substitute = zz is not None and i % zz == zz - 1

            def letter(ch: str, direction: str) -> tuple[str, torch.Tensor | None]:
                if ch == "R":
                    return "R", None
                if ch == "I" and substitute:
                    return "V", cfg(variant.sub_cfg, direction, i)
                return ch, cfg(ch, direction, i)

            k = variant.k
            if variant.orientation == "down":
                for j, ch in enumerate(variant.back):  # back letters first: t -> t - kΔ
                    s = max(0, t - j * delta)
                    model, w = letter(ch, "back")
                    moves.append(Move(model, s, A(s), A(s - delta), w, "down", s, s - delta))
                if variant.labels == "legacy_ad":  # docs/algorithms.md §2: sub-steps 1/2 carry each other's labels
                    (m1, m2) = moves
                    moves = [replace(m1, timestep=m2.timestep, a_from=m2.a_from, a_to=m2.a_to, src=m2.src, dst=m2.dst),
                             replace(m2, timestep=m1.timestep, a_from=m1.a_from, a_to=m1.a_to, src=m1.src, dst=m1.dst)]
                for j, ch in enumerate(variant.front):  # then front letters back up to t
                    u = max(0, t - (k - 1 - j) * delta)
                    model, w = letter(ch, "go")
                    kind = "noise" if model == "R" else "up"
                    moves.append(Move(model, None if model == "R" else max(0, u - delta), U(u - delta), U(u), w, kind,
                                      u - delta, u))
            else:  # up-first (paper figure): levels clamp at T-1
                levels = [min(T - 1, t + j * delta) for j in range(k + 1)]
                for j, ch in enumerate(variant.front):
                    src, dst = levels[j], levels[j + 1]
                    model, w = letter(ch, "go")
                    kind = "noise" if model == "R" else "up"
                    moves.append(Move(model, None if model == "R" else src, U(src), U(dst), w, kind, src, dst))
                for j, ch in enumerate(variant.back):
                    src, dst = levels[k - j], levels[k - j - 1]
                    model, w = letter(ch, "back")
                    moves.append(Move(model, src, A(src), A(dst), w, "down", src, dst))
            if not keep_noop and all(m.is_identity() for m in moves):
                moves = []
        if variant.reuse == "V":
            *moves, main = share_video_calls([*moves, main])
        steps.append(StepPlan(i, t, tuple(moves), main))
    return Plan(tuple(steps), variant.resize, variant.reuse, variant.freeu, variant.freeinit, variant.pag,
                variant.freenoise, None if variant.elevator is None else Elevation.of(variant.elevator, n))
