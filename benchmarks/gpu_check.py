"""One-shot GPU check: every backbone at its real size on one GPU, with full-size random models (no hub access).

    python benchmarks/gpu_check.py [--steps 4] [--json gpu_check.json] [--compile on|off] [--channels-last on|off]
    python benchmarks/gpu_check.py --smoke     # same code on the CPU with tiny models (make test runs it)

For each backbone (16 x 512 x 512, float16): seconds per video for `standard`, `ivmixed`, `ivmixed_fast` and the
backbone's `*_v1` preset, extrapolated from `--steps` sampling steps to the backbone's 50 (the calls of the 50-step
plan at each model's measured time, + one decode; said in the table), milliseconds per IDM and per VDM call, peak GPU
memory, the fraction of sampling wall time spent inside model calls (CUDA events around each call: what is left is
Python and launch overhead), videos per hour per GPU at sampler_batch 1, 2 and 4, and (AnimateDiff) `standard` beside
diffusers' own AnimateDiffPipeline and `ivmixed` beside the tests' independent loop (tests/reference.py), same models
and noise. Then the exact speed options
(pipelines/speed.py) side by side with those eager numbers, same noise and settings: `ivmixed` with `compile` and
`channels_last` on, its seconds per video and the ratio to eager, the compile seconds (the first call, reported apart),
the relative difference of its latents from eager's, and the host synchronisations inside the sampling call (CUDA
sync debug mode; the final copy of the latents to the host is one). One table is printed and the same numbers are
written as JSON. The full-size models are built from the published configs with random weights straight on the GPU
in float16 (pipelines/fixtures/published.py `random_backbone`: no folder written, nothing but torch, transformers,
diffusers and the project needed: `make device-wheels` and the README's command for a bare GPU image).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass

from pipelines import presets
from pipelines.backbones.registry import BACKBONES as REGISTERED
from pipelines.backbones.registry import load_backbone
from pipelines.cli import quiet_libraries
from pipelines.config import ModelSpec, resolve_params
from pipelines.fixtures.published import LAYOUTS, random_backbone
from pipelines.fixtures.tiny import ensure_tiny
from pipelines.generate import build_plan, generate
from pipelines.speed import accelerate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("gpu_check")
# the registered backbones with tiny and full-size model sets, and the preset that reproduces each one's official code
BACKBONES = tuple(name for name, cls in REGISTERED.items() if cls.tiny is not None and name in LAYOUTS)
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
    compile: str  # the speed options' pass: "on" or "off"
    channels_last: str


FULL = Setup("cuda", "float16", 16, 512, 4, 50, (1, 2, 4), "on", "on")
# the CPU smoke run leaves compiling out (minutes on a CPU; tests/test_speed.py checks compiled = eager there)
SMOKE = Setup("cpu", "float32", 2, 64, 2, 4, (1, 2), "off", "on")


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


def backbone_for(name: str, root: str, setup: Setup):
    """Eager models: the tiny set from its folder (smoke), or the published architectures built on the device."""
    import torch

    if setup.device == "cpu":
        folder = ensure_tiny(name, os.path.join(root, name))
        return load_backbone(ModelSpec.from_model_dir(name, folder, dtype=setup.dtype, device=setup.device,
                                                      compile="off", channels_last="off"))
    return random_backbone(REGISTERED[name], setup.device, getattr(torch, setup.dtype))


def check_backbone(name: str, bb, setup: Setup) -> dict:
    import torch

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
    reference = baselines(name, bb, params, clock)
    batches = [run("ivmixed", b) for b in setup.batches if b > 1]
    eager = generate(bb, [params("ivmixed", 0)], decode=False)[0].latents
    # the exact speed options on the same models, same rows: compile time apart, then the timed run as above
    clock.sync()
    start = time.perf_counter()
    done = accelerate(bb, compile=setup.compile, channels_last=setup.channels_last)
    fast_first = generate(bb, [params("ivmixed", 0)], decode=False)[0].latents
    clock.sync()
    compile_s = time.perf_counter() - start
    fast = run("ivmixed", 1)
    syncs = host_syncs(lambda: generate(bb, [params("ivmixed", 0)], decode=False)) if cuda else None
    options = {**fast, "compiled": done["compiled"], "channels_last_convs": done["channels_last"],
               "compile": setup.compile, "channels_last": setup.channels_last,
               "first_call_s": compile_s, "speedup": presets_run[1]["seconds_per_video"] / fast["seconds_per_video"],
               "rel_diff": ((fast_first.float() - eager.float()).norm() / eager.float().norm()).item(),
               "host_syncs": syncs}
    out = {"backbone": name, "presets": presets_run, "batches": [presets_run[1], *batches], "options": options,
           "baselines": reference}
    bb = None  # the closures hold it too: release the models before emptying the CUDA cache
    if cuda:
        torch.cuda.empty_cache()
    return out


def baselines(name: str, bb, params, clock: Clock) -> list[dict]:
    """The project's sampler beside code written against diffusers alone, on the same models, noise and settings,
    `--steps` steps, latents out, each timed twice interleaved (the faster kept), with the relative difference of the
    latents: `standard` against diffusers' AnimateDiffPipeline (the DDIM grid the tests pin it to) and `ivmixed`
    against the tests' independent loop in the official code's shape (tests/reference.py). AnimateDiff only."""
    if name != "animatediff":
        return []
    import torch
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    # the tests' reference file, read from the tree (the tests are not part of the installed package)
    spec = importlib.util.spec_from_file_location("ivmix_reference", os.path.join(ROOT, "tests", "reference.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    animatediff_ivmixed_loop = reference.animatediff_ivmixed_loop

    pipe = AnimateDiffPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                               motion_adapter=None, scheduler=DDIMScheduler.from_config(
                                   bb.scheduler_config, timestep_spacing="linspace", steps_offset=1, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    std, iv = params("standard", 0), params("ivmixed", 0)
    ramp = lambda r: f"{r.begin}" if r.begin == r.end else f"{r.begin},{r.end},{r.rho}"  # noqa: E731 (its spec)
    references = {
        "standard": ("diffusers AnimateDiffPipeline", lambda: pipe(
            prompt=std.prompt, negative_prompt=std.negative_prompt or None, num_frames=std.frames, height=std.height,
            width=std.width, num_inference_steps=std.steps, guidance_scale=std.guidance, output_type="latent",
            generator=torch.Generator("cpu").manual_seed(std.seed)).frames),
        "ivmixed": ("tests/reference.py loop", lambda: animatediff_ivmixed_loop(
            bb, bb.scheduler_config, bb.image_scheduler_config, prompt=iv.prompt, seed=iv.seed, steps=iv.steps,
            frames=iv.frames, height=iv.height, width=iv.width, legacy=False, idm_guidance=ramp(iv.idm_guidance),
            vdm_guidance=ramp(iv.vdm_guidance), guidance=iv.guidance)),
    }

    def timed(fn) -> tuple[float, torch.Tensor]:
        clock.sync()
        start = time.perf_counter()
        out = fn()
        clock.sync()
        return time.perf_counter() - start, out.float().cpu()

    out = []
    for sampler, (label, theirs) in references.items():
        row = {"standard": std, "ivmixed": iv}[sampler]
        ours = lambda: generate(bb, [row], decode=False)[0].latents  # noqa: E731 (a thunk)
        theirs(), ours()  # warm-up; then each twice, interleaved
        runs = [(timed(theirs), timed(ours)) for _ in range(2)]
        (t_s, ref), (o_s, mine) = (min((r[i] for r in runs), key=lambda x: x[0]) for i in (0, 1))
        out.append({"sampler": sampler, "reference": label, "reference_s": t_s, "ours_s": o_s,
                    "rel_diff": ((mine - ref).norm() / ref.norm()).item()})
    return out


def host_syncs(fn) -> int:
    """Host synchronisations CUDA's sync debug mode reports while `fn` runs."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


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
    lines.append(f"against code written with diffusers alone: same models, noise and {setup.steps} steps (sampling s)")
    for r in results:
        for b in r["baselines"]:
            lines.append(f"{r['backbone']:<14} {b['sampler']:<9} {b['reference']:<30} {b['reference_s']:7.2f} s  "
                         f"ivmix {b['ours_s']:7.2f} s  {b['reference_s'] / b['ours_s']:5.2f}x  "
                         f"rel diff {b['rel_diff']:.1e}")
    lines.append(f"exact speed options (ivmixed; compile {setup.compile}, channels-last {setup.channels_last}) "
                 "against the eager row above")
    lines.append(f"{'backbone':<14} {'s/video':>8} {'eager':>8} {'ratio':>6} {'first call s':>13} {'rel diff':>9} "
                 f"{'host syncs':>11}")
    for r in results:
        o, eager = r["options"], r["presets"][1]["seconds_per_video"]
        syncs = "-" if o["host_syncs"] is None else str(o["host_syncs"])
        lines.append(f"{r['backbone']:<14} {o['seconds_per_video']:8.1f} {eager:8.1f} {o['speedup']:5.2f}x "
                     f"{o['first_call_s']:13.1f} {o['rel_diff']:9.1e} {syncs:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, 2 frames at 64x64: the code path only")
    ap.add_argument("--models", help="smoke: where the tiny model folders are (written once); default .cache/tiny")
    ap.add_argument("--compile", choices=("on", "off"), help="the speed options' pass (default on; smoke: off)")
    ap.add_argument("--channels-last", choices=("on", "off"), help="the speed options' pass (default on)")
    ap.add_argument("--steps", type=int, help="measured sampling steps (default 4; smoke 2)")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--json", default="gpu_check.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    setup = SMOKE if args.smoke else FULL
    chosen = {"steps": args.steps, "compile": args.compile, "channels_last": args.channels_last}
    setup = Setup(**{**setup.__dict__, **{k: v for k, v in chosen.items() if v}})
    root = args.models or os.path.join(ROOT, ".cache", "tiny")
    results = []
    for name in args.backbones.split(","):
        start = time.perf_counter()
        results.append(check_backbone(name, backbone_for(name, root, setup), setup))
        logger.info("%s checked in %.0f s", name, time.perf_counter() - start)
    print(table(results, setup))
    with open(args.json, "w") as f:
        json.dump({"setup": setup.__dict__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
