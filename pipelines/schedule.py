"""Noise-level tables, timestep lists, DDIM moves and CFG ramps (docs/algorithms.md §1, §2).

Everything here is a pure function of its arguments: no scheduler objects carry state between
calls (style guide: "schedules are tensors"). The arithmetic mirrors diffusers' `DDIMScheduler.step`
and `DDIMInverseScheduler.step` operation for operation so that results agree to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True, eq=False)
class AlphaTable:
    """Cumulative alphas ᾱ_t on the integer training grid, plus the value used below level 0.

    `below_zero` is DDIM's `final_alpha_cumprod` (and DDIMInverse's `initial_alpha_cumprod`):
    1.0 when the scheduler config sets `set_alpha_to_one`, else ᾱ_0 (docs/algorithms.md §1).
    """

    alphas_cumprod: torch.Tensor  # (T,) float32
    below_zero: torch.Tensor  # 0-d float32

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def at(self, level: int) -> torch.Tensor:
        """ᾱ at an integer level; levels < 0 read `below_zero` as diffusers does."""
        if level >= self.num_train_timesteps:
            raise ValueError(f"level {level} is past the last training timestep")
        return self.alphas_cumprod[level] if level >= 0 else self.below_zero

    def same_as(self, other: "AlphaTable") -> bool:
        return bool(
            self.alphas_cumprod.shape == other.alphas_cumprod.shape
            and torch.equal(self.alphas_cumprod, other.alphas_cumprod)
            and torch.equal(self.below_zero, other.below_zero)
        )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "AlphaTable":
        """Build the table the way diffusers' DDIM scheduler does for this config (any beta schedule)."""
        from diffusers import DDIMScheduler  # local import: keeps the maths importable without diffusers

        kwargs = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        sched = DDIMScheduler.from_config(kwargs)
        prediction = sched.config.prediction_type
        if prediction != "epsilon":
            raise ValueError(
                f"scheduler prediction_type={prediction!r}: the IV-Mixed moves need epsilon-prediction "
                "models sharing one ᾱ table (docs/algorithms.md §4)"
            )
        if getattr(sched.config, "rescale_betas_zero_snr", False):
            raise ValueError("zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported "
                             "(docs/algorithms.md §4)")
        return cls(sched.alphas_cumprod.clone().float(), sched.final_alpha_cumprod.clone().float())


def timesteps(num_steps: int, spacing: str = "linspace", num_train_timesteps: int = 1000,
              steps_offset: int = 0) -> list[int]:
    """The descending model timesteps of an N-step DDIM run (diffusers `set_timesteps`, Table 2 of 2305.08891)."""
    if num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_steps}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"steps must be <= {num_train_timesteps}, got {num_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return [int(t) for t in ts]


def dpm_timesteps(num_steps: int, spacing: str = "linspace", num_train_timesteps: int = 1000,
                  steps_offset: int = 0) -> list[int]:
    """The descending grid of an N-step DPM-Solver run: N + 1 evenly placed levels without the last one (diffusers'
    `DPMSolverMultistepScheduler.set_timesteps`; it differs from the DDIM grid above)."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, num_steps + 1) * (num_train_timesteps // (num_steps + 1))).round()[::-1][:-1]
        ts = ts.astype(np.int64)
        ts = ts + steps_offset
    elif spacing == "trailing":
        ts = np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return [int(t) for t in ts]


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move (η = 0) from level ᾱ=a_from to ᾱ=a_to along ε (Song et al. eq. 12).

    With a_to < a_from this is `DDIMScheduler.step`; with a_to > a_from it is `DDIMInverseScheduler.step`.
    """
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def forward_jump(x: torch.Tensor, z: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Stochastic forward diffusion q(x_to | x_from) with fresh noise z (the "R" letter, docs/algorithms.md §3)."""
    ratio = a_to / a_from
    return ratio**0.5 * x + (1 - ratio) ** 0.5 * z


def karras_ramp(begin: float, end: float, rho: float, num_steps: int) -> list[float]:
    """w(i) = (b^{1/ρ} + i/(n−1)·(e^{1/ρ} − b^{1/ρ}))^ρ over the actual number of steps (docs/algorithms.md §2)."""
    if num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_steps}")
    if begin == end:
        return [float(begin)] * num_steps
    if begin <= 0 or end <= 0 or rho <= 0:
        raise ValueError("a CFG ramp with begin != end needs begin > 0, end > 0 and rho > 0")
    lo, hi = begin ** (1 / rho), end ** (1 / rho)
    denom = max(num_steps - 1, 1)
    return [float((lo + (i / denom) * (hi - lo)) ** rho) for i in range(num_steps)]


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CFGRamp:
    """A per-step CFG scale: `sign · karras_ramp(begin, end, rho)`; begin == end is a constant (docs/algorithms.md
    §2)."""

    begin: float
    end: float
    rho: float = 7.0
    sign: int = 1

    def __post_init__(self) -> None:
        for name in ("begin", "end", "rho"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"CFG ramp {name} must be a finite number, got {getattr(self, name)!r}")
        if self.sign not in (1, -1):
            raise ValueError("CFG ramp sign must be +1 or -1")
        if self.begin != self.end and (self.begin <= 0 or self.end <= 0 or self.rho <= 0):
            raise ValueError(f"CFG ramp {self.text()}: a ramp needs begin > 0, end > 0 and rho > 0")
        if self.begin < 0 or self.end < 0:
            raise ValueError(f"CFG ramp {self.text()}: write a negative scale with a leading '-'")

    def values(self, num_steps: int) -> list[float]:
        return [self.sign * v for v in karras_ramp(self.begin, self.end, self.rho, num_steps)]

    def text(self) -> str:
        s = "-" if self.sign < 0 else ""
        if self.begin == self.end:
            return f"{s}{_fmt(self.begin)}"
        return f"{s}karras({_fmt(self.begin)},{_fmt(self.end)},{_fmt(self.rho)})"

    @classmethod
    def parse(cls, value: Any) -> "CFGRamp":
        """Accept 4, "-4", "6,2,7", "6,2", "karras(6,2,7)", "-karras(6,2,1/7)", a list, or a CFGRamp."""
        if isinstance(value, CFGRamp):
            return value
        if is_finite_number(value):
            return cls(abs(float(value)), abs(float(value)), 7.0, -1 if value < 0 else 1)
        if isinstance(value, (list, tuple)):
            parts = [str(v) for v in value]
            sign = 1
        elif isinstance(value, str):
            text = value.strip().replace(" ", "")
            sign = 1
            if text.startswith("-"):
                sign, text = -1, text[1:]
            if text.startswith("karras(") and text.endswith(")"):
                text = text[len("karras(") : -1]
            parts = [p for p in text.split(",")]
        else:
            raise ValueError(f"cannot read a CFG scale from {value!r}")
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"a CFG scale is 'w' or 'begin,end[,rho]', got {value!r}")
        try:
            nums = [_number(p) for p in parts]
        except ValueError:
            raise ValueError(f"a CFG scale is 'w' or 'begin,end[,rho]' with numbers, got {value!r}") from None
        if len(nums) == 1:
            nums = [nums[0], nums[0]]
        begin, end = nums[0], nums[1]
        rho = nums[2] if len(nums) == 3 else 7.0
        return cls(begin, end, rho, sign)


def _fmt(x: float) -> str:
    """Short text that reads back to the same float."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def _number(text: str) -> float:
    """A float, also written as a fraction like 1/7 (the code's ρ search space, docs/algorithms.md §2)."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)
