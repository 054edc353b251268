"""One-shot GPU check: every backbone at its real size on one GPU, with full-size random models (no hub access).

    python benchmarks/gpu_check.py [--models .cache/fullsize] [--steps 4] [--json gpu_check.json]
    python benchmarks/gpu_check.py --smoke     # same code on the CPU with tiny models (make test runs it)

For each backbone (16 x 512 x 512, float16): seconds per video for `standard`, `ivmixed`, `ivmixed_fast` and the
backbone's `*_v1` preset, extrapolated from `--steps` sampling steps to the backbone's 50 (the calls of the 50-step
plan at each model's measured time, + one decode; said in the table), milliseconds per IDM and per VDM call, peak GPU
memory, the fraction of sampling wall time spent inside model calls (CUDA events around each call: what is left is
Python and launch overhead), and videos per hour per GPU at sampler_batch 1, 2 and 4. One table is printed and the
same numbers are written as JSON. Needs ~8 minutes on one H100/H200-class GPU, most of it writing the random models
(`python -m pipelines.fixtures.tiny KIND DIR --full-size`)
once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from pipelines import presets
from pipelines.backbones.registry import BACKBONES as REGISTERED
from pipelines.backbones.registry import load_backbone
from pipelines.cli import quiet_libraries
from pipelines.config import ModelSpec, resolve_params
from pipelines.fixtures.tiny import ensure_tiny
from pipelines.generate import build_plan, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("gpu_check")
# the registered backbones with tiny and full-size model sets, and the preset that reproduces each one's official code
BACKBONES = tuple(name for name, cls in REGISTERED.items() if cls.tiny is not None)
V1 = {b: p.name for p in presets.PRESETS.values() if p.name.endswith("_v1") for b in p.backbones}


@dataclass(frozen=True)
class Setup:
    device: str
    dtype: str
    frames: int
    size: int
    steps: int  # measured steps; results are extrapolated to `full_steps`
    full_steps: int
    batches: tuple[int, ...]


FULL = Setup("cuda", "float16", 16, 512, 4, 50, (1, 2, 4))
SMOKE = Setup("cpu", "float32", 2, 64, 2, 4, (1, 2))


class Clock:
    """Wall time and time inside model calls; CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.spans: list = []

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def wrap(self, fn, label: str):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.spans.append((label, start, end))
            else:
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                self.spans.append((label, t, time.perf_counter()))
            return out

        return timed

    def take(self) -> dict[str, list[float]]:
        """Seconds per call by label, emptied."""
        self.sync()
        out: dict[str, list[float]] = {}
        for label, a, b in self.spans:
            out.setdefault(label, []).append(a.elapsed_time(b) / 1000 if self.cuda else b - a)
        self.spans = []
        return out


def instrument(backbone, clock: Clock) -> None:
    """Time every model call: wrap the denoisers the backbone hands the sampler (the library stays untouched)."""
    make = backbone.denoisers

    def denoisers(*args, **kwargs):
        made = make(*args, **kwargs)
        for k, d in made.items():  # the model function inside each CFG denoiser: its ε pairs stay reusable
            d.eps_fn = clock.wrap(d.eps_fn, k)
        return made

    backbone.denoisers = denoisers


def models_for(name: str, root: str, smoke: bool) -> str:
    folder = os.path.join(root, name)
    if smoke:
        return ensure_tiny(name, folder)
    if not os.path.isfile(os.path.join(folder, "tiny.json")):
        subprocess.run([sys.executable, "-m", "pipelines.fixtures.tiny", name, folder, "--full-size"], check=True,
                       cwd=ROOT)
    return folder


def check_backbone(name: str, folder: str, setup: Setup) -> dict:
    import torch

    bb = load_backbone(ModelSpec.from_model_dir(name, folder, dtype=setup.dtype, device=setup.device))
    clock = Clock(bb.device)
    instrument(bb, clock)
    cuda = bb.device.type == "cuda"

    def params(sampler: str, seed: int, steps: int | None = None):
        return resolve_params({"prompt": "a red fox running through fresh snow, golden hour", "sampler": sampler,
                               "steps": steps or setup.steps, "frames": setup.frames, "height": setup.size,
                               "width": setup.size, "seed": seed}, backbone=name)

    def run(sampler: str, batch: int) -> dict:
        rows = [params(sampler, s) for s in range(batch)]
        generate(bb, rows[:1], decode=False)  # warm-up: kernels chosen, caches filled
        clock.take()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock.sync()
        start = time.perf_counter()
        result = generate(bb, rows, decode=False)
        clock.sync()
        sampling = time.perf_counter() - start
        calls = clock.take()
        t = time.perf_counter()
        bb.decode(result[0].latents.to(bb.device).repeat(batch, 1, 1, 1, 1))
        clock.sync()
        decode = time.perf_counter() - t
        # to the full length by the calls the full plan makes, each at its model's measured time (an interval
        # covers another share of 4 steps than of 50)
        ms = {k: sum(v) / len(v) for k, v in calls.items()}
        full = build_plan(bb, [params(sampler, 0, setup.full_steps)]).calls()
        made = sum(n * ms.get(k, 0.0) for k, n in result[0].calls.items())
        scale = sum(n * ms.get(k, 0.0) for k, n in full.items()) / made if made else setup.full_steps / setup.steps
        per_video = (sampling * scale + decode) / batch
        return {"sampler": sampler, "batch": batch, "sampling_s": sampling, "decode_s": decode,
                "seconds_per_video": per_video, "videos_per_hour": 3600 / per_video,
                "ms_per_call": {k: 1000 * sum(v) / len(v) for k, v in calls.items()},
                "calls": dict(result[0].calls), "timed_calls": {k: len(v) for k, v in calls.items()},
                "busy_fraction": sum(sum(v) for v in calls.values()) / sampling,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}

    presets_run = [run(s, 1) for s in ("standard", "ivmixed", "ivmixed_fast", V1[name])]
    batches = [run("ivmixed", b) for b in setup.batches if b > 1]
    out = {"backbone": name, "presets": presets_run, "batches": [presets_run[1], *batches]}
    bb = None  # the closures hold it too: release the models before emptying the CUDA cache
    if cuda:
        torch.cuda.empty_cache()
    return out


def table(results: list[dict], setup: Setup) -> str:
    lines = [f"{setup.frames} x {setup.size} x {setup.size}, {setup.dtype} on {setup.device}; seconds per video "
             f"extrapolated from {setup.steps} measured steps to {setup.full_steps} (+ one decode)",
             f"{'backbone':<14} {'sampler':<14} {'s/video':>8} {'ms/IDM':>8} {'ms/VDM':>8} {'peak GiB':>9} "
             f"{'in calls':>9}"]
    for r in results:
        for p in r["presets"]:
            ms = p["ms_per_call"]
            peak = "-" if p["peak_gib"] is None else f"{p['peak_gib']:.1f}"
            lines.append(f"{r['backbone']:<14} {p['sampler']:<14} {p['seconds_per_video']:8.1f} {ms.get('I', 0):8.1f} "
                         f"{ms.get('V', 0):8.1f} {peak:>9} {p['busy_fraction']:9.0%}")
    lines.append("videos per hour per device (ivmixed) at sampler_batch " + ", ".join(str(b) for b in setup.batches))
    for r in results:
        cells = [f"b={b['batch']}: {b['videos_per_hour']:.0f}"
                 + ("" if b["peak_gib"] is None else f" ({b['peak_gib']:.1f} GiB)") for b in r["batches"]]
        lines.append(f"{r['backbone']:<14} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, 2 frames at 64x64: the code path only")
    ap.add_argument("--models",
                    help="where the model folders are (written once); default .cache/fullsize or .cache/tiny")
    ap.add_argument("--steps", type=int, help="measured sampling steps (default 4; smoke 2)")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--json", default="gpu_check.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    setup = SMOKE if args.smoke else FULL
    if args.steps:
        setup = Setup(**{**setup.__dict__, "steps": args.steps})
    root = args.models or os.path.join(ROOT, ".cache", "tiny" if args.smoke else "fullsize")
    results = []
    for name in args.backbones.split(","):
        start = time.perf_counter()
        results.append(check_backbone(name, models_for(name, root, args.smoke), setup))
        logger.info("%s checked in %.0f s", name, time.perf_counter() - start)
    print(table(results, setup))
    with open(args.json, "w") as f:
        json.dump({"setup": setup.__dict__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
