"""The sampler: executes a compiled plan of DDIM moves over denoisers (docs/algorithms.md §1-§3).

A denoiser is any callable `eps = model(x, timestep, w)` with x of shape (B, C, F, h, w), an int
timestep shared by the batch and w the per-row CFG scale (B,), or None for the conditional prediction alone; it
returns the guided ε. The sampler never sees prompts, models or devices (k-diffusion style); device and dtype follow
`x`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from .grammar import Move, Plan, call_key
from .schedule import ddim_move, forward_jump


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, timestep: int, w: torch.Tensor) -> torch.Tensor: ...


class CFGDenoiser:
    """ε̂ = ε(x,∅) + w·(ε(x,c) − ε(x,∅)); both branches in one batched call, uncond first (docs/algorithms.md §1).

    `eps_fn(x2, timestep)` evaluates the model on x2 = [x; x] (2B rows) with conditioning bound by the
    caller (negative embeddings for the first B rows, prompt embeddings for the last B).
    """

    def __init__(self, eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
                 cond_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        """`cond_fn(x, timestep)`: the model on x (B rows) with the prompt embeddings alone, for steps without
        guidance; None: the conditional half of a pair (the same numbers, twice the cost)."""
        self.eps_fn, self.cond_fn = eps_fn, cond_fn

    def __call__(self, x: torch.Tensor, timestep: int, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return self.cond(x, timestep)
        return guide(self.pair(x, timestep), w)

    def cond(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """ε(x, c) alone: the prediction a step without guidance moves along."""
        if self.cond_fn is None:
            return self.pair(x, timestep)[1]
        return self.cond_fn(x, timestep).to(x.dtype)

    def pair(self, x: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε(x,∅), ε(x,c)) in x's dtype: what a reused call keeps, so that another scale or sign can be formed."""
        return self.eps_fn(torch.cat([x, x]), timestep).to(x.dtype).chunk(2)


class PAGDenoiser:
    """Perturbed-attention guidance with CFG (Ahn et al., arXiv 2403.17377, as diffusers' PAG pipelines combine them):
    ε̂ = ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_p), the three in one call on [x; x; x] with the negative, the prompt and
    again the prompt embeddings bound by the caller; in ε_p the chosen self-attention layers give their values
    unmixed (the model's attention processors, set for the batch by the backbone)."""

    def __init__(self, eps_fn: Callable[[torch.Tensor, int], torch.Tensor], scale: float):
        self.eps_fn, self.scale = eps_fn, scale

    def __call__(self, x: torch.Tensor, timestep: int, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            raise ValueError("pag: every call is guided (cfg= does not combine with pag)")
        uncond, cond, perturbed = self.eps_fn(torch.cat([x, x, x]), timestep).to(x.dtype).chunk(3)
        return guide((uncond, cond), w) + self.scale * (cond - perturbed)


def guide(pair: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor | None) -> torch.Tensor:
    """ε̂ = ε_u + w·(ε_c − ε_u) with w per row (docs/algorithms.md §1); w None: ε_c."""
    uncond, cond = pair
    if w is None:
        return cond
    w = w.to(device=uncond.device, dtype=uncond.dtype).view(-1, *([1] * (uncond.ndim - 1)))
    return uncond + w * (cond - uncond)


class StepCalls:
    """The model calls of a run, each move's ε through `eps` and counted under `grammar.call_key`. Under a plan's
    `reuse` (docs/algorithms.md §10) each call's (model, timestep, input, ε pair) is kept for the step (`start`
    begins one): a move marked `shares` takes the pair of the move it names (reuse=V), and a call whose model,
    timestep and input equal an earlier call's takes its pair (exact: the same numbers). Inputs are compared only when
    model and timestep match, so a step where nothing matches costs no comparison. Reuse needs models that give pairs
    (`CFGDenoiser.pair`)."""

    def __init__(self, models: Mapping[str, Denoiser], plan: Plan):
        self.models, self.pag, self.reuse = models, plan.pag, plan.reuse != "off"
        missing = [k for k, m in models.items() if not hasattr(m, "pair")]
        if self.reuse and missing:
            raise ValueError(f"reuse: the denoiser(s) {missing} give no ε pair (CFGDenoiser.pair)")
        self.made, self.pairs = [], []
        self.calls = {"I": 0, "V": 0}

    def start(self) -> None:
        self.made, self.pairs = [], []

    def _count(self, mv: Move) -> None:
        key = call_key(mv, self.pag)
        self.calls[key] = self.calls.get(key, 0) + 1

    def eps(self, mv: Move, x: torch.Tensor) -> torch.Tensor:
        if not self.reuse or mv.w is None:  # a step without guidance: nothing another move could share
            if self.reuse:
                self.made.append((mv.model, mv.timestep, x))
                self.pairs.append(None)
            self._count(mv)
            return self.models[mv.model](x, mv.timestep, mv.w)
        if mv.shares is not None:
            pair = self.pairs[mv.shares]
        else:
            pair = next((p for (m, t, seen), p in zip(self.made, self.pairs) if p is not None and m == mv.model
                         and t == mv.timestep and seen.shape == x.shape and torch.equal(seen, x)), None)
            if pair is None:
                pair = self.models[mv.model].pair(x, mv.timestep)
                self._count(mv)
        self.made.append((mv.model, mv.timestep, x))
        self.pairs.append(pair)
        return guide(pair, mv.w)


class RowNoise:
    """Per-row randomness: row b draws only from a CPU generator seeded with seeds[b] (diffusers' contract).

    The first draw is the initial noise `torch.randn((1, C, F, h, w), generator=Generator("cpu").manual_seed(s))`;
    later draws (R letters, stochastic solvers) continue the same per-row stream, so a row's seed fully
    determines its video however rows are batched.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def draw(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, *shape) float32 standard normal, row b from generator b, then moved to `device`."""
        rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(rows).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.draw(x.shape[1:], x.device).to(x.dtype)


def sde_dpmpp_2m(alphas_cumprod: torch.Tensor, grid: Sequence[int], noise: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The main move of SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, the SDE form of the 2M update;
    docs/algorithms.md §6): `step(x, ε, i)` goes from grid[i] to grid[i + 1] (to σ = 0 after the last
    level, first order). σ_t = √((1 − ᾱ_t)/ᾱ_t), α_t = 1/√(1 + σ_t²), λ = log(α/σ), h = λ_next − λ_i; data
    prediction x̂0 = (x − σ_i α_i ε)/α_i; D = x̂0 + (x̂0 − x̂0_prev)·h/(2 h_prev) from the second step on;
    x_next = (σ_next α_next)/(σ_i α_i)·e^{−h} x + α_next(1 − e^{−2h}) D + σ_next α_next √(1 − e^{−2h}) z,
    z = noise(x).
    The history (the previous x̂0 and h) is this closure's local state: it holds main-step predictions only."""
    a = alphas_cumprod.double()
    sigmas = [math.sqrt((1 - float(a[t])) / float(a[t])) for t in grid] + [0.0]
    state: dict = {}

    def step(x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        s, t = sigmas[i], sigmas[i + 1]
        alpha_s = 1 / math.sqrt(1 + s * s)
        x0 = (x - s * alpha_s * eps) / alpha_s
        if t == 0.0:  # the last move lands on the data prediction
            state.clear()
            return x0
        alpha_t = 1 / math.sqrt(1 + t * t)
        h = math.log(1 / t) - math.log(1 / s)  # λ_t − λ_s with λ = log(α/σ) = −log σ
        d = x0 if "x0" not in state else x0 + (x0 - state["x0"]) * (h / (2 * state["h"]))
        state.update(x0=x0, h=h)
        e = math.exp(-h)
        return ((t * alpha_t / (s * alpha_s) * e) * x + (alpha_t * (1 - e * e)) * d
                + (t * alpha_t * math.sqrt(1 - e * e)) * noise(x))

    return step


def _resize_frames(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of (B, C, F, h, w) latents over (h, w)."""
    if tuple(x.shape[-2:]) == size:
        return x
    b, c, f, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    y = F.interpolate(y, size=size, mode="nearest")
    return y.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)


def apply_move(models: Mapping[str, Denoiser], x: torch.Tensor, mv: Move, *, resize: str = "none",
               noise: Callable[[torch.Tensor], torch.Tensor] | None = None, calls: StepCalls | None = None
               ) -> torch.Tensor:
    """One sub-step of docs/algorithms.md §3: a DDIM move along the model's ε, or a forward noise jump for R. With
    `calls` (a run's `StepCalls`), ε comes through it and is counted."""
    a_from, a_to = mv.a_from.to(x.device), mv.a_to.to(x.device)
    if mv.model == "R":
        if noise is None:
            raise ValueError("variant uses R (fresh noise) but no noise sampler was given")
        return forward_jump(x, noise(x), a_from, a_to)

    def eps(y: torch.Tensor) -> torch.Tensor:
        if calls is None:
            return models[mv.model](y, mv.timestep, mv.w)
        return calls.eps(mv, y)

    if resize == "nearest64" and mv.model == "I":
        # ModelScope code (docs/algorithms.md §5): the IDM sub-step runs and moves at 64x64, then resizes back
        small = _resize_frames(x, (64, 64))
        moved = ddim_move(small, eps(small), a_from, a_to)
        return _resize_frames(moved, tuple(x.shape[-2:]))
    return ddim_move(x, eps(x), a_from, a_to)


def sample_plan(
    models: Mapping[str, Denoiser],
    x: torch.Tensor,
    plan: Plan,
    *,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    main_step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Run every step: its zigzag moves, then the ordinary main move (docs/algorithms.md §2). Returns (x, calls).

    `main_step(x, eps, i)` replaces the main DDIM move by another solver (e.g. SDE-DPM-Solver++, whose multistep
    history then holds only main-step predictions, as in the VideoCrafter2 code). A plan with `reuse` takes ε pairs
    made earlier in the step where it may (`StepCalls`); the calls returned are the calls made."""
    made = StepCalls(models, plan)
    for step in plan.steps:
        made.start()
        for mv in step.zigzag:
            x = apply_move(models, x, mv, resize=plan.resize, noise=noise, calls=made)
        mv = step.main
        if main_step is None:
            x = apply_move(models, x, mv, resize=plan.resize, noise=noise, calls=made)
        else:
            x = main_step(x, made.eps(mv, x), step.index)
        if callback is not None:
            callback({"i": step.index, "t": step.t, "x": x, "calls": dict(made.calls)})
    return x, dict(made.calls)
