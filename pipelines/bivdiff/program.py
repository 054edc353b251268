"""BIVDiff stages 2 and 3 as pure functions over denoisers (docs/algorithms.md §8).

No prompts, models, files or devices here: the caller binds conditioning into denoisers
`eps = model(x, t, w)` (the IV-Mixed contract, `pipelines/sampling.py`) and this module only builds the
time grids and runs the DDIM moves with the engine's `apply_move`. Model keys:
"I" image-model inversion (frame-wise, single pass), "U" video-model inversion (single pass),
"V" video-model smoothing (CFG).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..grammar import Move
from ..sampling import Denoiser, apply_move
from ..schedule import AlphaTable, timesteps

CLEAN = -1  # nominal level of a clean latent in logs/tests (ᾱ read as ᾱ_0, docs/algorithms.md §8)


@dataclass(frozen=True)
class LatentSpace:
    """What a latent means (docs/algorithms.md §8): mixing or handing latents across spaces is refused."""

    channels: int
    spatial_factor: int
    scaling_factor: float
    shift_factor: float | None = None
    temporal_factor: int = 1

    @classmethod
    def from_vae_config(cls, cfg) -> "LatentSpace":
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(channels=int(get("latent_channels", 4)), spatial_factor=2 ** (len(get("block_out_channels")) - 1),
                   scaling_factor=float(get("scaling_factor", 0.18215)), shift_factor=get("shift_factor", None),
                   temporal_factor=int(get("temporal_compression_ratio", 1) or 1))

    def describe(self) -> str:
        shift = "" if self.shift_factor is None else f", shift {self.shift_factor:g}"
        return (f"{self.channels}ch x{self.spatial_factor} spatial x{self.temporal_factor} temporal, "
                f"scale {self.scaling_factor:g}{shift}")


@dataclass(frozen=True, eq=False)
class State:
    """A batch of latents (B, C, F, h, w) at one noise level of one latent space (docs/algorithms.md §8)."""

    x: torch.Tensor
    level: int
    space: LatentSpace


def mix(states: Sequence[tuple[State, torch.Tensor | float]]) -> State:
    """z = Σ w_k·x_k, one plain weighted sum with no variance renormalisation (docs/algorithms.md §8).

    Every state must share space, shape and level; weights are scalars or per-row (B,) tensors."""
    first = states[0][0]
    for s, _ in states[1:]:
        if s.space != first.space:
            raise ValueError(f"cannot mix latents from different latent spaces ({first.space.describe()} vs "
                             f"{s.space.describe()}); docs/algorithms.md §8")
        if s.x.shape != first.x.shape:
            raise ValueError(f"cannot mix latents of shapes {tuple(first.x.shape)} and {tuple(s.x.shape)}")
        if s.level != first.level:
            raise ValueError(f"cannot mix latents at different noise levels ({first.level} vs {s.level})")
    out = None
    for s, w in states:
        w = torch.as_tensor(w, dtype=s.x.dtype, device=s.x.device)
        w = w.view(-1, *([1] * (s.x.ndim - 1))) if w.ndim else w
        term = w * s.x
        out = term if out is None else out + term
    return State(out, first.level, first.space)


def smoothing_grid(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending grid of the SD-1.5 DDIM config: leading spacing, offset 1 (981, 961, …, 1 at N=50;
    docs/algorithms.md §8)."""
    return timesteps(steps, "leading", num_train_timesteps, steps_offset=1)


def inversion_moves(table: AlphaTable, steps: int, model: str, *, compat: bool) -> list[Move]:
    """The ascending DDIM inversion moves (docs/algorithms.md §8).

    compat: ε at e_k = 1, 21, …, 981, moving ᾱ_{e_k} -> ᾱ_{min(e_k + Δ, T - 2)} (ends at t = 998, quirk Q1).
    clean: mirror of the smoothing grid, ε at 0, 1, 21, …, 961 moving to 1, 21, …, 981, so the inverted latent
    sits exactly where smoothing starts."""
    n_train = table.num_train_timesteps
    up = smoothing_grid(steps, n_train)[::-1]
    if compat:
        ratio = n_train // steps
        pairs = [(e, min(e + ratio, n_train - 2)) for e in up]
    else:
        pairs = list(zip([0, *up[:-1]], up))
    return [Move(model, t_from, table.at(t_from), table.at(t_to), None, "up", t_from, t_to) for t_from, t_to in pairs]


def smoothing_moves(table: AlphaTable, steps: int, w: torch.Tensor, model: str = "V") -> list[Move]:
    """Descending DDIM moves t -> t-Δ, the last one to ᾱ below level 0 (ᾱ_0 when set_alpha_to_one is false)."""
    grid = smoothing_grid(steps, table.num_train_timesteps)
    ratio = table.num_train_timesteps // steps
    return [Move(model, t, table.at(t), table.at(t - ratio), w, "down", t, t - ratio) for t in grid]


def run_moves(models: Mapping[str, Denoiser], state: State, moves: Sequence[Move],
              callback: Callable[[dict], None] | None = None) -> State:
    x = state.x
    for k, mv in enumerate(moves):
        x = apply_move(models, x, mv)
        if callback is not None:
            callback({"stage": mv.kind, "model": mv.model, "k": k, "t": mv.timestep, "x": x})
    return State(x, moves[-1].dst if moves else state.level, state.space)


def mixed_inversion(models: Mapping[str, Denoiser], z0: State, alpha: torch.Tensor | float, image_moves: Sequence[Move],
                    video_moves: Sequence[Move], *,
                    callback: Callable[[dict], None] | None = None) -> tuple[State, dict]:
    """Invert z0 along the image model ("I") and the video model ("U") and mix `α·img + (1-α)·vid` once at the end
    (docs/algorithms.md §8). A branch whose weight is 0 for every row is not computed (quirk Q4); returns (z_T,
    calls)."""
    a = torch.as_tensor(alpha, dtype=torch.float32)
    if bool(((a < 0) | (a > 1)).any()) or not bool(torch.isfinite(a).all()):
        raise ValueError(f"alpha: must lie in [0, 1], got {a.tolist()}")
    run_image, run_video = bool((a != 0).any()), bool((a != 1).any())
    calls = {"I": len(image_moves) if run_image else 0, "V": len(video_moves) if run_video else 0}
    branches = []
    if run_image:
        branches.append((run_moves(models, z0, image_moves, callback), a))
    if run_video:
        branches.append((run_moves(models, z0, video_moves, callback), 1 - a))
    if len(branches) == 1:
        return branches[0][0], calls  # weight 1: the chain itself, bit for bit
    return mix(branches), calls


def bivdiff_sample(models: Mapping[str, Denoiser], z0: State, alpha: torch.Tensor | float, *, table: AlphaTable,
                   steps: int, guidance: torch.Tensor, compat: bool,
                   callback: Callable[[dict], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Mixed Inversion then Video Temporal Smoothing (docs/algorithms.md §8): clean latents -> smoothed latents, calls
    per model."""
    z_t, calls = mixed_inversion(models, z0, alpha, inversion_moves(table, steps, "I", compat=compat),
                                 inversion_moves(table, steps, "U", compat=compat), callback=callback)
    out = run_moves(models, z_t, smoothing_moves(table, steps, guidance), callback)
    calls["V"] += steps
    return out.x, calls
