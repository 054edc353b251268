"""Sample a batch of videos that share structure (size, frames, steps, variant) in one sampler call.

Rows keep their own prompt, seed and guidance; row b's result equals sampling it alone (docs/algorithms.md §7:
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
from .cost import backbone_costs
from .freeinit import butterworth_lowpass, reinitialize
from .freenoise import shuffle_noise
from .grammar import Plan, call_size, compile_plan
from .sampling import RowNoise, sample_plan, sde_dpmpp_2m
from .schedule import dpm_timesteps, timesteps
from .videoelevator import gaussian_lowpass, mixed_prior, sample_videoelevator

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class VideoResult:
    params: GenParams
    latents: torch.Tensor  # (1, C, F, h, w) float32, cpu
    frames: torch.Tensor | None  # (F, H, W, 3) float32 in [0, 1], cpu; None when not decoded
    calls: dict  # model calls for this video: {"I": n, "V": m}, and "V_cond" / "V_pag" (grammar.call_key)
    seconds: float  # wall seconds of its batch divided by the batch size
    flops: float | None = None  # its model calls and decode, counted per shape (pipelines/cost.py); None: not counted

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def model_calls(self, model: str) -> int:
        """Calls of one model ("I" or "V"), conditional-only and perturbed-attention ones included."""
        return sum(n for k, n in self.calls.items() if call_size(k)[0] == model)

    @property
    def nfe(self) -> int:
        """Network evaluations: 2 per CFG pair, 1 per conditional-only call, 3 per perturbed-attention call."""
        return sum(call_size(k)[2] * n for k, n in self.calls.items())


def main_grid(backbone, preset, steps: int) -> list[int]:
    """The main solver's timesteps: the preset's DDIM grid, or the DPM-Solver grid of the VDM's scheduler config."""
    cfg = backbone.scheduler_config
    n_train = int(cfg.get("num_train_timesteps", 1000))
    if backbone.main_solver == "sde-dpmpp2m":  # the backbone code's main solver (`BackboneBase.main_solver`)
        return dpm_timesteps(steps, cfg.get("timestep_spacing", "linspace"), n_train, int(cfg.get("steps_offset", 0)))
    return timesteps(steps, preset.timestep_spacing, n_train, preset.steps_offset)


def move_tables(backbone, preset) -> tuple:
    """(table of denoise moves, table of inversion moves): one shared table, unless the preset reproduces code that
    reads the IDM's table for inversions (`split_tables`) or for the whole zigzag (`zigzag_on_image_table`); the one
    place that reads these preset flags (docs/algorithms.md §4, §5)."""
    down, image = backbone.video_table(), backbone.image_table()
    if preset.zigzag_on_image_table:
        return image, image
    if preset.split_tables:
        return down, image
    if not torch.equal(down.alphas_cumprod, image.alphas_cumprod):
        raise ValueError("image and video models use different noise schedules (ᾱ tables); "
                         "IV-Mixed needs one shared schedule (docs/algorithms.md)")
    if not down.same_as(image):  # same β, another set_alpha_to_one: only the ᾱ "below zero" of the last step differs
        logger.info("the image model's scheduler sets set_alpha_to_one differently; every move reads the video "
                    "model's table (its last step ends at ᾱ=%.6g)", float(down.below_zero))
    return down, down


def build_plan(backbone, rows: Sequence[GenParams]) -> Plan:
    """Compile the plan of a structurally uniform batch (raises ValueError otherwise)."""
    if not rows:
        raise ValueError("no rows to sample")
    if len({r.batch_key() for r in rows}) != 1:
        raise ValueError("rows in one batch must share sampler, variant, steps, frames, size, interval and zz")
    p = rows[0]
    preset = p.preset
    backbone.check(p)
    down, up = move_tables(backbone, preset)
    ts = main_grid(backbone, preset, p.steps)
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
    costs = backbone_costs(backbone, p.frames, p.height, p.width, p.fps, plan.resize)
    noise = RowNoise([r.seed for r in rows])
    factor = backbone.spatial_factor
    shape = (backbone.latent_channels, p.frames, p.height // factor, p.width // factor)
    x = noise.draw(shape, backbone.device)  # (B, C, F, h, w) float32; latents stay fp32 between moves
    # FreeNoise acts on rows longer than its window; a shorter row is sampled as without it (one window: the same)
    windows = plan.freenoise if plan.freenoise is not None and p.frames > plan.freenoise[0] else None
    if windows is not None:
        x = shuffle_noise(x, noise.generators, *windows)
    if plan.elevator is not None:  # its prior: every frame mixed with one noise frame, the next draw of the row
        c, f, h, w = shape
        x = mixed_prior(x, noise.draw((c, 1, h, w), backbone.device))
    with torch.inference_mode():
        models = backbone.denoisers([r.prompt for r in rows], [r.negative_prompt for r in rows],
                                    frames=p.frames, idm_text=p.preset.idm_text, fps=p.fps, pag=plan.pag,
                                    freenoise=windows)
        main_step = None
        if backbone.main_solver == "sde-dpmpp2m":
            # its SDE noise: row b's own stream seeded seed_b + 1 (docs/algorithms.md §7)
            table = backbone.video_table()
            sde = RowNoise([r.seed + 1 for r in rows])
            c, f, h, w = shape
            main_step = sde_dpmpp_2m(table.alphas_cumprod, [s.t for s in plan.steps],
                                     lambda x: sde.draw((f, c, h, w), x.device).permute(0, 2, 1, 3, 4).to(x.dtype))
        with backbone.free_noise(windows), backbone.freeu(plan.freeu), \
                backbone.perturbed_attention(plan.pag is not None), \
                backbone.first_frame_attention(None if plan.elevator is None else p.frames):
            x, calls = _sample_freeinit(backbone, models, x, plan, noise, callback, main_step)
        frames = backbone.decode(x) if decode else None
    latents = x.float().cpu()
    seconds = (time.perf_counter() - start) / len(rows)
    flops = None if costs is None else costs.of(calls, decode)
    return [VideoResult(r, latents[b : b + 1].clone(), None if frames is None else frames[b], dict(calls), seconds,
                        flops) for b, r in enumerate(rows)]


def _sample_freeinit(backbone, models, x, plan: Plan, noise: RowNoise, callback, main_step) -> tuple:
    """`sample_plan` (or VideoElevator's sampler for a plan with `elevator`; its own DDIM steps, not the backbone's
    main solver), run `plan.freeinit` times: each run after the first starts from FreeInit's re-initialisation of
    the previous run's result (pipelines/freeinit.py), its fresh noise the next draw of each row's own stream; the
    calls of every run are counted."""
    def run(start: torch.Tensor) -> tuple:
        if plan.elevator is not None:
            mask = gaussian_lowpass(*start.shape[-3:])
            return sample_videoelevator(models, start, plan, noise=noise, mask=mask, callback=callback)
        return sample_plan(models, start, plan, noise=noise, callback=callback, main_step=main_step)

    initial = x
    x, calls = run(x)
    if plan.freeinit > 1:
        table = backbone.video_table()
        lowpass = butterworth_lowpass(*x.shape[-3:])
        for _ in range(plan.freeinit - 1):
            start = reinitialize(x, initial, noise.draw(x.shape[1:], x.device), table.at(table.num_train_timesteps - 1),
                                 lowpass).to(x.dtype)
            x, more = run(start)
            calls = {k: calls.get(k, 0) + more.get(k, 0) for k in {**calls, **more}}
    return x, calls


def batches(rows: Sequence[GenParams], max_batch: int) -> Iterator[list[int]]:
    """Indices of rows grouped into structurally uniform batches of at most `max_batch` (input order kept within a
    group)."""
    if max_batch < 1:
        raise ValueError(f"batch size must be >= 1, got {max_batch}")
    order = sorted(range(len(rows)), key=lambda i: (repr(rows[i].batch_key()), i))
    for _, group in groupby(order, key=lambda i: repr(rows[i].batch_key())):
        group = list(group)
        for s in range(0, len(group), max_batch):
            yield group[s : s + max_batch]
