"""Sample a batch of videos that share structure (size, frames, steps, variant) in one sampler call.

Rows keep their own prompt, seed and guidance; row b's result equals sampling it alone (spec:
batched sampling), because its initial noise comes only from its own seed (initial-noise contract).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterator, Sequence

import torch

from .config import GenParams
from .grammar import Plan, compile_plan
from .sampling import RowNoise, sample_plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class VideoResult:
    params: GenParams
    latents: torch.Tensor  # (1, C, F, h, w) float32, cpu
    frames: torch.Tensor | None  # (F, H, W, 3) float32 in [0, 1], cpu; None when not decoded
    calls: dict  # model calls per model for this video ({"I": n, "V": m}); NFE = 2 x total
    seconds: float  # wall seconds of its batch divided by the batch size

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def nfe(self) -> int:
        return 2 * self.total_calls


def build_plan(backbone, rows: Sequence[GenParams]) -> Plan:
    """Compile the plan of a structurally uniform batch (raises ValueError otherwise)."""
    if not rows:
        raise ValueError("no rows to sample")
    if len({r.batch_key() for r in rows}) != 1:
        raise ValueError("rows in one batch must share sampler, variant, steps, frames, size, interval and zz")
    p = rows[0]
    preset = p.preset
    for name, v in (("height", p.height), ("width", p.width)):
        if v % backbone.spatial_factor:
            raise ValueError(f"{name}: must be a multiple of the VAE factor {backbone.spatial_factor}, got {v}")
    backbone.check_frames(p.frames)
    down, up = backbone.tables(preset)
    ts = backbone.main_timesteps(preset, p.steps)
    return compile_plan(p.parsed, timesteps=ts, down_table=down, up_table=up,
                        guidance=[r.guidance for r in rows], idm_guidance=[r.idm_guidance for r in rows],
                        vdm_guidance=[r.vdm_guidance for r in rows], interval=p.interval, zz=p.zz,
                        keep_noop=preset.keep_noop)


def generate(backbone, rows: Sequence[GenParams], *, decode: bool = True,
             callback: Callable[[dict], None] | None = None) -> list[VideoResult]:
    """Sample one structurally uniform batch; returns one result per row, in order."""
    start = time.perf_counter()
    plan = build_plan(backbone, rows)
    p = rows[0]
    noise = RowNoise([r.seed for r in rows])
    shape = (backbone.latent_channels, p.frames, p.height // backbone.spatial_factor, p.width // backbone.spatial_factor)
    x = noise.draw(shape, backbone.device)  # (B, C, F, h, w) float32; latents stay fp32 between moves
    with torch.inference_mode():
        models = backbone.denoisers([r.prompt for r in rows], [r.negative_prompt for r in rows],
                                    frames=p.frames, idm_text=p.preset.idm_text, fps=p.fps)
        main_step = backbone.main_solver(rows, [s.t for s in plan.steps], shape)
        x, calls = sample_plan(models, x, plan, noise=noise, callback=callback, main_step=main_step)
        frames = backbone.decode(x) if decode else None
    latents = x.float().cpu()
    seconds = (time.perf_counter() - start) / len(rows)
    return [VideoResult(r, latents[b : b + 1].clone(), None if frames is None else frames[b], dict(calls), seconds)
            for b, r in enumerate(rows)]


def batches(rows: Sequence[GenParams], max_batch: int) -> Iterator[list[int]]:
    """Indices of rows grouped into structurally uniform batches of at most `max_batch` (input order kept within a group)."""
    if max_batch < 1:
        raise ValueError(f"batch size must be >= 1, got {max_batch}")
    order = sorted(range(len(rows)), key=lambda i: (repr(rows[i].batch_key()), i))
    for _, group in groupby(order, key=lambda i: repr(rows[i].batch_key())):
        group = list(group)
        for s in range(0, len(group), max_batch):
            yield group[s : s + max_batch]
